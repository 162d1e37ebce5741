"""The rule-based expression parser: spaCy's parses approximated without a model.

Closed-class lexicons (determiners, prepositions, pronouns, auxiliaries, adverbs, conjunctions)
split the sentence into runs of content words; a run (with its determiner) is a noun chunk whose
root is its last word; heads are attached the way spaCy's English models usually attach them.
The steps are :func:`parse_fallback`'s (word kinds, noun chunks, the root, heads).
"""

from __future__ import annotations

import re

from zsdense.text.parse_base import DIRECTION_KEYWORDS, NULL_KEYWORDS, RELATION_WORDS, Parse

_DET = frozenset(
    "the a an this these those his her its their my your our some any each every another no "
    "both either neither".split()
)
_PREP = frozenset(
    "on in at of to with near by under behind above below beside besides between inside from "
    "over into onto across along against around among through toward towards underneath "
    "beneath beyond without within like for about after before off outside past via upon than "
    "atop amid amongst alongside".split()
)
_CONJ = frozenset("and or but nor".split())
_PRON = frozenset(
    "who which whose whom what where when it he she they him them you i me we us itself "
    "himself herself themselves".split()
)
_AUX = frozenset(
    "is are was were be been being am has have had do does did can could will would should may "
    "might 's 're".split()
)
_ADV = frozenset(
    "there here away very most more just only also almost not too so next up down out "
    "partially slightly really mostly nearly ahead apart".split()
)
# comparatives / superlatives that follow the noun as adverbs ("the dog further away", "the man
# closest to the door") but modify it as adjectives before it ("the closest cup")
_POST_ADV = frozenset(
    "further farther closer nearer closest nearest furthest farthest close near adjacent "
    "opposite".split()
)
# the subset that spaCy tags as a preposition when a noun phrase follows ("nearest the door")
_POST_PREP = frozenset({"nearest", "opposite", "near"})
# compass and side words that, right after a noun, are a relation, not part of its noun phrase:
# "the cup left of the laptop", "a man west of the river", "guy far right" (spaCy: advmod / acl /
# appos of the noun, never inside its noun chunk)
_POST_SPATIAL = frozenset(
    "left right west east north south northwest northeast southwest southeast".split()
)
# words allowed between the noun and such a word ("guy far right")
_SPATIAL_MODIFIERS = frozenset("far extreme very".split())
# pronouns that spaCy makes one-word noun chunks of (subjects and objects: "next to her",
# "the dog that is sleeping" -> chunk "that"); "who/which/what" chunks are dropped from the
# context by RELATION_WORDS, as in the reference
_PRON_CHUNK = frozenset(
    "it he she they him them you me us we i that who which what whom her itself himself "
    "herself themselves".split()
)
_RELATIVE = frozenset("that who which what whom".split())
_VERBS = frozenset(
    "wear wears hold holds sit sits stand stands look looks eat eats ride rides play plays "
    "carry carries face faces lay lays lie lies touch touches".split()
)
# adjectives that do not head a noun chunk on their own ("the cup that is white")
_ADJ = frozenset(
    "red blue green yellow white black brown gray grey orange pink purple dark light big small "
    "large little tall short long tiny huge bigger smaller larger biggest smallest largest "
    "taller shorter tallest shortest empty full open closed old young new striped wooden "
    "plain".split()
)
# -ing / -ed words that are nouns or plain adjectives, never verbs here
_ING_NOUNS = frozenset(
    "thing things building buildings ring king ceiling clothing painting paintings string wing "
    "wings pudding icing sibling evening morning spring swing sling railing frosting topping "
    "stuffing awning dining ping something nothing anything everything".split()
)
_ED_WORDS = frozenset("red bed beds shed sled seed weed speed bread head".split())
_SPATIAL = RELATION_WORDS | {w for _, s in DIRECTION_KEYWORDS for w in s} | NULL_KEYWORDS

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|'s|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens (hyphenated words kept, "'s" split off, punctuation separate)."""
    text = text.lower().replace("\u2019", "'")
    toks: list[str] = []
    for t in _TOKEN_RE.findall(text):
        if t.endswith("'s") and len(t) > 2:
            toks.extend([t[:-2], "'s"])
        else:
            toks.append(t)
    return toks


_FUNCTION_WORDS = _DET | _PREP | _CONJ | _PRON | _AUX | _ADV


def _is_function(w: str) -> bool:
    return w in _FUNCTION_WORDS or not w[0].isalnum()


def _mark_post_spatial(words: list[str], kind: list[str]) -> None:
    """Turn a compass / side word right after a noun into an adverb (in place), with the
    intensifiers before it: "the cup left of the laptop", "the dog right of the chair",
    "guy far right". Before a noun ("left cup") or after a determiner ("the far left") it stays
    a content word, so "the far left" is still a noun chunk."""
    n = len(words)
    for i, w in enumerate(words):
        if w not in _POST_SPATIAL or kind[i] != "W":
            continue
        if i + 1 < n and kind[i + 1] == "W":
            continue  # a modifier of the next noun: "the left cup", "man bottom left corner"
        j = i - 1
        while j >= 0 and words[j] in _SPATIAL_MODIFIERS and kind[j] in ("W", "ADV"):
            j -= 1
        if j < 0 or kind[j] != "W" or words[j] in _SPATIAL or words[j] in _ADJ:
            continue  # no noun before it: "left of the laptop", "on the far left"
        for t in range(j + 1, i + 1):
            kind[t] = "ADV"


def _verbish(words: list[str], i: int, prev_content: bool) -> bool:
    """-ing / -ed participles and common verbs acting as clause heads (not modifiers)."""
    w = words[i]
    nxt = words[i + 1] if i + 1 < len(words) else None
    ends_clause = nxt is None or nxt in _DET or nxt in _PREP or nxt in _PRON or nxt in _ADV
    if w in _VERBS:
        return True
    if w.endswith("ing") and len(w) > 4 and w not in _ING_NOUNS:
        return prev_content or ends_clause
    if w.endswith("ed") and len(w) > 4 and w not in _ED_WORDS:
        return prev_content and ends_clause
    return False


def parse_fallback(text: str) -> Parse:
    """Rule-based parse (no model needed).

    1. tokens: :func:`tokenize` ("cat's" -> "cat", "'s"); each token is a function word
       (determiner, preposition,
       conjunction, pronoun, auxiliary, adverb, punctuation), a verb (common verbs, -ing/-ed
       participles in clause position) or a content word. Position decides for some words:
       a compass or side word (left, right, west, east, north, south, north-west...) right after
       a noun, possibly after "far", is an adverb and so outside the noun phrase ("the cup left
       of the laptop", "a man west of the river", "guy far right"), while before a noun or after
       a determiner it is a content word ("left cup", "the far left"); comparatives and
       superlatives such as closer, closest, nearest, further, close, adjacent, opposite are
       adverbs (nearest / opposite / near: prepositions) after a noun and adjectives before one
       ("the man closest to the door" vs "the closest cup"); multi-word relations ("in front
       of", "on top of", "next to", "to the left of") come out of these rules as spaCy's do;
    2. chunks: an optional determiner followed by a maximal run of content words, possessives
       included ("the cat 's left eye" is one chunk rooted at "eye", as spaCy's noun chunks
       are); the root is the run's last word; a run made only of plain adjectives right after a
       verb/auxiliary ("is white") or bare after a preposition ("in white") is not a chunk;
       subject and object pronouns are one-word chunks ("next to her"; "that" in "the cup that
       is white"), as spaCy's noun-chunk iterator gives them;
    3. the sentence root is the first chunk's root, or a leading verb; the target phrase is then
       the first chunk (or the verb's object chunk, or the whole sentence as spaCy would give);
    4. heads: chunk members → chunk root; "of" → the preceding noun; other prepositions, adverbs,
       verbs and conjunctions → the nearest preceding non-spatial noun (else the root); a
       preposition's or verb's object chunk root → that preposition/verb.
    """
    words = tokenize(text)
    if not words:
        return Parse((), (), (), "fallback")
    kind = _word_kinds(words)
    chunks = _noun_chunks(words, kind)
    root = _sentence_root(kind, chunks)
    heads = _heads(words, kind, chunks, root)
    return Parse(tuple(words), tuple(heads), tuple(chunks), "fallback")


def _word_kinds(words: list[str]) -> list[str]:
    """Step 1: DET PREP CONJ PRON AUX ADV PUNCT VERB POSS or W (a content word) per token."""
    kind: list[str] = []
    prev_content = False
    for i in range(len(words)):
        k = _kind_of(words, i, prev_content, kind[-1] if kind else None)
        kind.append(k)
        prev_content = k == "W"
    _mark_post_spatial(words, kind)
    for i in range(1, len(words) - 1):  # "the cat 's left eye": a possessive inside one phrase
        if words[i] == "'s" and kind[i - 1] == "W" and kind[i + 1] == "W":
            kind[i] = "POSS"
    return kind


def _kind_of(words: list[str], i: int, prev_content: bool, prev_kind: str | None) -> str:
    """Token ``i``'s kind from its word, the previous token's kind and the next word."""
    w = words[i]
    n = len(words)
    content_next = i + 1 < n and not _is_function(words[i + 1])
    if w == "that":
        return "PRON" if prev_content else "DET"
    if not w[0].isalnum() and w != "'s":
        return "PUNCT"
    for lexicon, k in ((_DET, "DET"), (_PREP, "PREP"), (_CONJ, "CONJ"), (_PRON, "PRON")):
        if w in lexicon:
            return k
    if w in _AUX:
        return "AUX"
    if w in ("most", "very", "more") and content_next:
        return "W"  # "right most person": part of the modifier run
    if w in _POST_ADV and prev_content:  # post-nominal: "the dog further away"
        nxt = words[i + 1] if i + 1 < n else ""
        return "PREP" if w in _POST_PREP and (nxt in _DET or not _is_function(nxt)) else "ADV"
    if w in _POST_ADV and not content_next:
        return "ADV"  # "closer to the camera" with no noun before
    if w == "her" and not content_next:
        return "PRON"  # object "her" ("next to her"), not the determiner of "her hat"
    if w in _ADV and not (w in ("up", "down") and i > 0 and prev_kind == "DET"):
        return "ADV"
    if _verbish(words, i, prev_content):
        return "VERB"
    return "W"


def _noun_chunks(words: list[str], kind: list[str]) -> list[tuple[int, int, int]]:
    """Step 2: (start, end, root) of each noun chunk, in sentence order."""
    n = len(words)
    chunks: list[tuple[int, int, int]] = []
    i = 0
    while i < n:
        start = i
        if kind[i] == "PRON" and words[i] in _PRON_CHUNK:
            chunks.append((i, i + 1, i))
            i += 1
            continue
        if kind[i] == "DET" and i + 1 < n and kind[i + 1] == "W":
            i += 1
        if kind[i] != "W":
            i += 1
            continue
        j = i
        while j < n and kind[j] == "W":
            j += 1
            if j + 1 < n and kind[j] == "POSS" and kind[j + 1] == "W":
                j += 1  # the possessor and the possessed are one chunk, as spaCy's
        after_verb = start > 0 and kind[start - 1] in ("AUX", "VERB")
        # "the woman in white": a bare colour / size adjective after a preposition
        bare_after_prep = start == i and start > 0 and kind[start - 1] == "PREP"
        only_adj = all(words[t] in _ADJ for t in range(i, j))
        if not (only_adj and (after_verb or bare_after_prep)):
            chunks.append((start, j, j - 1))
        i = j
    return chunks


def _sentence_root(kind: list[str], chunks: list[tuple[int, int, int]]) -> int:
    """Step 3: a leading verb, else the first chunk's root, else the first content word."""
    if kind[0] == "VERB":
        return 0
    if chunks:
        return chunks[0][2]
    return next((t for t in range(len(kind)) if kind[t] == "W"), 0)


def _heads(
    words: list[str], kind: list[str], chunks: list[tuple[int, int, int]], root: int
) -> list[int]:
    """Step 4: the head index of every token (the root points to itself)."""
    n = len(words)
    chunk_of = {t: c for c in chunks for t in range(c[0], c[1]) if kind[c[2]] != "PRON"}
    heads = list(range(n))
    nouns_before: list[int] = []  # chunk roots seen so far
    last_attach: int | None = None  # the preposition / verb awaiting an object

    def attach_point(t: int, w: str) -> int:
        if not nouns_before:
            return root if root != t else t
        if w == "of":
            return nouns_before[-1]
        for r in reversed(nouns_before):
            if words[r] not in _SPATIAL:
                return r
        return root if root != t else nouns_before[0]

    for t in range(n):
        c = chunk_of.get(t)
        if c is not None:
            if t != c[2]:
                heads[t] = c[2]
                continue
            if t == root:
                heads[t] = t
            elif last_attach is not None:
                heads[t] = last_attach
            elif nouns_before:
                heads[t] = nouns_before[0] if root == t else root
            else:
                heads[t] = root
            nouns_before.append(t)
            last_attach = None
            continue
        k = kind[t]
        if t == root:
            heads[t] = t
            last_attach = t if k == "VERB" else None
        elif k in ("PREP", "VERB"):
            heads[t] = attach_point(t, words[t])
            last_attach = t
        elif k == "PRON":
            nxt = next((u for u in range(t + 1, n) if kind[u] in ("VERB", "AUX")), None)
            if words[t] not in _RELATIVE and last_attach is not None:  # an object: "next to her"
                heads[t] = last_attach
                last_attach = None
            else:
                heads[t] = nxt if nxt is not None else attach_point(t, words[t])
        else:
            heads[t] = attach_point(t, words[t])
    return heads
