"""Parsing referring expressions: the target noun phrase, context nouns, relation and direction.

Two parsers produce the same neutral :class:`Parse` (lower-case tokens, absolute head indices,
noun chunks):

- **spaCy** when it is installed with an English pipeline (extra ``nlp``; ``en_core_web_lg`` as
  the reference, then ``md``/``sm``/``trf``);
- a **rule-based fallback** otherwise (documented in :func:`parse_fallback`): closed-class
  lexicons (determiners, prepositions, pronouns, auxiliaries, adverbs, conjunctions) split the
  sentence into runs of content words; a run (with its determiner) is a noun chunk whose root is
  its last word; heads are assigned the way spaCy's English models usually attach them (modifiers
  to the chunk root, a preposition to the nearest preceding non-spatial noun, its object to the
  preposition). It approximates spaCy's outputs on the short expressions of RefCOCO-style data.

The functions over a parse reproduce the reference code's ``extract_noun_phrase``,
``extract_nouns``, ``extract_rela_word`` and ``extract_dir_phrase`` (HybridGL ``utils.py``):
whole lower-case tokens only (so "bright" never triggers "right"); when several keywords occur,
a keyword is taken only if its syntactic head index is strictly smaller than the previously
taken one's. ``right_relation=False`` reproduces the reference's defect (its "right"/"east"
test compares a string with a set and never fires).

The reference's keyword table reads "behind"/"back" as *up*, "front" as *down*, and has no
relation for "next to", "beside" or "near"; a side word inside the target ("the cat's left
eye") is a *left* relation. A spaCy parse always gets these readings (they are the reference's).
For the rule-based parser, ``fallback_reading="sensible"`` (the ``hybridgl+`` preset) reads them
as a person would (:data:`SENSIBLE_RELATION_KEYWORDS`): "next to" / "beside" / "near" /
"adjacent" / "alongside" are *near*, "behind" / "back" *behind* and "in front of" *front* (near
and above / below the other object, see ``zsdense.tasks.hybridgl.relation_guidance``), and a
side word after a possessive ("the cat's left eye", "his right hand") names a part of the
target, so it is neither a relation nor a direction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from zsdense.config import FALLBACK_READINGS

RELATION_WORDS = frozenset(
    "left west right east above north top back behind below south under front bigger larger "
    "closer smaller tinier further inside within contained who what which middle".split()
)
NULL_KEYWORDS = frozenset("part image side picture half region section photo".split())
RELATION_KEYWORDS: tuple[tuple[str, frozenset[str]], ...] = (
    ("left", frozenset({"left", "west"})),
    ("right", frozenset({"right", "east"})),
    ("up", frozenset({"above", "north", "top", "back", "behind"})),
    ("down", frozenset({"below", "south", "under", "front"})),
    ("big", frozenset({"bigger", "larger", "closer"})),
    ("small", frozenset({"smaller", "tinier", "further", "smallest"})),
    ("within", frozenset({"inside", "within", "contained"})),
)
DIRECTION_KEYWORDS: tuple[tuple[str, frozenset[str]], ...] = (
    ("left", frozenset({"left"})),
    ("right", frozenset({"right"})),
    ("middle", frozenset({"middle", "between"})),
    ("up", frozenset({"up", "top", "above"})),
    ("down", frozenset({"down", "under", "bottom", "low"})),
)
NO_HEAD = 999  # the reference's start value for the head-index rule
# the rule parser's own reading (fallback_reading="sensible"): depth and proximity words get
# relations of their own instead of up/down/none
SENSIBLE_RELATION_KEYWORDS: tuple[tuple[str, frozenset[str]], ...] = (
    ("left", frozenset({"left", "west"})),
    ("right", frozenset({"right", "east"})),
    ("up", frozenset({"above", "north", "top"})),
    ("down", frozenset({"below", "south", "under", "beneath", "underneath"})),
    ("behind", frozenset({"behind", "back"})),
    ("front", frozenset({"front"})),
    ("near", frozenset({"next", "beside", "besides", "near", "nearby", "adjacent", "alongside"})),
    ("big", frozenset({"bigger", "larger", "closer"})),
    ("small", frozenset({"smaller", "tinier", "further", "smallest"})),
    ("within", frozenset({"inside", "within", "contained"})),
)
SIDE_WORDS = frozenset({"left", "right"})
_POSSESSIVE_DET = frozenset("his her its their my your our".split())


@dataclass(frozen=True)
class Parse:
    """A dependency parse reduced to what the reference functions read."""

    words: tuple[str, ...]  # lower-case tokens
    heads: tuple[int, ...]  # absolute head index per token (the root points to itself)
    chunks: tuple[tuple[int, int, int], ...]  # noun chunks: (start, end exclusive, root index)
    backend: str = "fallback"

    @property
    def text(self) -> str:
        """The sentence as the reference sees it: tokens joined by single spaces."""
        return " ".join(self.words)

    def chunk_text(self, chunk: tuple[int, int, int]) -> str:
        return " ".join(self.words[chunk[0] : chunk[1]])

    def root(self) -> int:
        """The *last* token whose head is itself (as the reference picks it)."""
        roots = [i for i, h in enumerate(self.heads) if h == i]
        return roots[-1] if roots else 0

    def children(self, i: int) -> list[int]:
        return [j for j, h in enumerate(self.heads) if h == i and j != i]


@dataclass(frozen=True)
class NounPhrase:
    text: str  # the chunk text as is ("the man", "left cup"), or the whole sentence
    not_phrase_index: tuple[int, ...]  # token indices outside the chunk
    head_noun: str  # root word of the chunk (or the sentence when no chunk applies)
    chunk: tuple[int, int, int] | None


@dataclass(frozen=True)
class Expression:
    """Everything the scorer needs from one referring expression."""

    sentence: str  # lower-case, re-joined tokens: what CLIP tokenises
    noun_phrase: str
    head_noun: str
    context: tuple[str, ...]  # other noun chunks (texts)
    context_roots: tuple[str, ...]
    relation: str  # none|left|right|up|down|big|small|within
    direction: str  # none|left|right|middle|up|down
    backend: str
    parse: Parse | None = field(default=None, repr=False, compare=False)


# ---- the reference functions over a parse -----------------------------------------------------


def noun_phrase(parse: Parse) -> NounPhrase:
    """Target noun phrase: the chunk containing the root; else the chunk of the root's first
    child; else the whole sentence (``extract_noun_phrase``)."""
    where: dict[int, tuple[int, int, int]] = {}
    for c in parse.chunks:
        for i in range(c[0], c[1]):
            where[i] = c
    n = len(parse.words)
    root = parse.root() if n else 0
    head_tok = root
    chunk = where.get(root)
    if chunk is None:
        kids = parse.children(root)
        if kids and kids[0] in where:
            head_tok = kids[0]
            chunk = where[head_tok]
    if chunk is None:
        return NounPhrase(parse.text, (), parse.text, None)
    outside = tuple(i for i in range(n) if not chunk[0] <= i < chunk[1])
    return NounPhrase(parse.chunk_text(chunk), outside, parse.words[head_tok], chunk)


def other_nouns(parse: Parse, phrase: str | None = None) -> list[tuple[int, int, int]]:
    """Context chunks: every chunk except those whose text equals the target phrase's or whose
    root word is a relation word (``extract_nouns``)."""
    phrase = noun_phrase(parse).text if phrase is None else phrase
    return [
        c
        for c in parse.chunks
        if parse.chunk_text(c) != phrase and parse.words[c[2]] not in RELATION_WORDS
    ]


def _scan(
    parse: Parse,
    table: Sequence[tuple[str, frozenset[str]]],
    skip: frozenset[str] = frozenset(),
    skip_tokens: frozenset[int] = frozenset(),
) -> tuple[str, int]:
    flag, best, idx = "none", NO_HEAD, NO_HEAD
    for i, w in enumerate(parse.words):
        if i in skip_tokens:
            continue
        for name, words in table:
            if name in skip or w not in words:
                continue
            if parse.heads[i] < best:
                flag, best, idx = name, parse.heads[i], i
            break
    return flag, idx


def relation_word(
    parse: Parse,
    context: Sequence[tuple[int, int, int]] | None = None,
    *,
    right_relation: bool = True,
    reading: str = "reference",
) -> str:
    """Relation flag (``extract_rela_word``): ``none`` when any context root is a NULL keyword
    (part, image, side, ...); else the keyword scan with the head-index rule.
    ``right_relation=False`` reproduces the reference, where right/east never fire.
    ``reading="sensible"``: the table :data:`SENSIBLE_RELATION_KEYWORDS`, and side words naming
    a part of a possessed noun are skipped (module docstring)."""
    context = other_nouns(parse) if context is None else context
    if any(parse.words[c[2]] in NULL_KEYWORDS for c in context):
        return "none"
    skip = frozenset() if right_relation else frozenset({"right"})
    if reading == "sensible":
        return _scan(parse, SENSIBLE_RELATION_KEYWORDS, skip, possessed_sides(parse))[0]
    return _scan(parse, RELATION_KEYWORDS, skip)[0]


def direction_word(parse: Parse, *, reading: str = "reference") -> tuple[str, int]:
    """Direction flag and its token index, 999 if none (``extract_dir_phrase``);
    ``reading="sensible"`` skips side words naming a part ("the cat's left eye")."""
    skip = possessed_sides(parse) if reading == "sensible" else frozenset()
    return _scan(parse, DIRECTION_KEYWORDS, skip_tokens=skip)


def possessed_sides(parse: Parse) -> frozenset[int]:
    """Side words (left, right) inside a noun chunk after a possessive ("the cat 's left eye",
    "his right hand"): they name a part of the possessed noun, not a place in the image."""
    out = set()
    for start, end, _root in parse.chunks:
        owner = [
            i
            for i in range(start, end)
            if parse.words[i] == "'s" or (i == start and parse.words[i] in _POSSESSIVE_DET)
        ]
        if owner:
            out.update(i for i in range(owner[0] + 1, end) if parse.words[i] in SIDE_WORDS)
    return frozenset(out)


# ---- spaCy --------------------------------------------------------------------------------------

SPACY_MODELS = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_trf")
_NLP_CACHE: dict[str, object] = {}  # loaded spaCy pipeline (a cache)


def load_spacy(models: Sequence[str] = SPACY_MODELS):
    """The first installed English spaCy pipeline, or None (spaCy or its model missing)."""
    if "nlp" in _NLP_CACHE:
        return _NLP_CACHE["nlp"]
    nlp = None
    try:
        import spacy
    except ImportError:
        spacy = None
    if spacy is not None:
        for name in models:
            try:
                nlp = spacy.load(name)
                break
            except Exception:  # OSError: model not installed; others: broken installs
                continue
    _NLP_CACHE["nlp"] = nlp
    return nlp


def parse_spacy(text: str, nlp) -> Parse:
    """Parse with spaCy as the reference does: lower-case, tokenise, re-join with single spaces,
    and parse the re-joined string (what every reference function sees)."""
    first = nlp(text.lower())
    joined = " ".join(t.text for t in first if not t.is_space)
    doc = nlp(joined)
    return Parse(
        words=tuple(t.text for t in doc),
        heads=tuple(t.head.i for t in doc),
        chunks=tuple((c.start, c.end, c.root.i) for c in doc.noun_chunks),
        backend="spacy",
    )


# ---- rule-based fallback ------------------------------------------------------------------------

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


def _is_function(w: str) -> bool:
    return (
        w in _DET
        or w in _PREP
        or w in _CONJ
        or w in _PRON
        or w in _AUX
        or w in _ADV
        or not w[0].isalnum()
    )


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
    n = len(words)
    if n == 0:
        return Parse((), (), (), "fallback")
    kind: list[str] = []  # DET PREP CONJ PRON AUX ADV PUNCT VERB W
    prev_content = False
    for i, w in enumerate(words):
        if w == "that":
            k = "PRON" if prev_content else "DET"
        elif not w[0].isalnum() and w != "'s":
            k = "PUNCT"
        elif w in _DET:
            k = "DET"
        elif w in _PREP:
            k = "PREP"
        elif w in _CONJ:
            k = "CONJ"
        elif w in _PRON:
            k = "PRON"
        elif w in _AUX:
            k = "AUX"
        elif w in ("most", "very", "more") and i + 1 < n and not _is_function(words[i + 1]):
            k = "W"  # "right most person": part of the modifier run
        elif w in _POST_ADV and prev_content:  # post-nominal: "the dog further away"
            nxt = words[i + 1] if i + 1 < n else ""
            k = "PREP" if w in _POST_PREP and (nxt in _DET or not _is_function(nxt)) else "ADV"
        elif w in _POST_ADV and not (i + 1 < n and not _is_function(words[i + 1])):
            k = "ADV"  # "closer to the camera" with no noun before
        elif w == "her" and not (i + 1 < n and not _is_function(words[i + 1])):
            k = "PRON"  # object "her" ("next to her"), not the determiner of "her hat"
        elif w in _ADV and not (w in ("up", "down") and i > 0 and kind[-1] == "DET"):
            k = "ADV"
        elif _verbish(words, i, prev_content):
            k = "VERB"
        else:
            k = "W"
        kind.append(k)
        prev_content = k == "W"
    _mark_post_spatial(words, kind)
    for i in range(1, n - 1):  # "the cat 's left eye": a possessive inside one noun phrase
        if words[i] == "'s" and kind[i - 1] == "W" and kind[i + 1] == "W":
            kind[i] = "POSS"

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
        if kind[i] == "W":
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
        else:
            i += 1

    chunk_of = {t: c for c in chunks for t in range(c[0], c[1]) if kind[c[2]] != "PRON"}
    if kind[0] == "VERB":
        root = 0
    elif chunks:
        root = chunks[0][2]
    else:
        root = next((t for t in range(n) if kind[t] == "W"), 0)
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
            else:
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
            continue
        if k in ("PREP", "VERB"):
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
    return Parse(tuple(words), tuple(heads), tuple(chunks), "fallback")


# ---- the one entry point ------------------------------------------------------------------------


def parse(text: str, backend: str = "auto") -> Parse:
    """Parse with spaCy (``backend='spacy'`` or ``'auto'`` when available) or the fallback."""
    if backend not in ("auto", "spacy", "fallback"):
        from zsdense.errors import ConfigError

        raise ConfigError(f"unknown parser {backend!r}; choose auto, spacy or fallback")
    if backend != "fallback":
        nlp = load_spacy()
        if nlp is not None:
            return parse_spacy(text, nlp)
        if backend == "spacy":
            from zsdense.errors import DependencyError

            raise DependencyError("spacy (with en_core_web_sm/lg)", "nlp", "spaCy parsing")
    return parse_fallback(text)


def analyse(
    text: str,
    *,
    backend: str = "auto",
    right_relation: bool = True,
    fallback_reading: str = "reference",
) -> Expression:
    """Parse an expression and extract what the referring scorer needs.

    ``fallback_reading``: how the rule parser's parses are read (``reference`` or ``sensible``,
    see the module docstring); a spaCy parse is always read as the reference reads it."""
    p = parse(text, backend)
    return analyse_parse(p, right_relation=right_relation, fallback_reading=fallback_reading)


def analyse_parse(
    p: Parse, *, right_relation: bool = True, fallback_reading: str = "reference"
) -> Expression:
    """The reference functions applied to one parse (``fallback_reading`` applies to the rule
    parser's parses only)."""
    if fallback_reading not in FALLBACK_READINGS:
        from zsdense.errors import ConfigError

        raise ConfigError(
            f"unknown fallback_reading {fallback_reading!r}; choose {', '.join(FALLBACK_READINGS)}"
        )
    reading = fallback_reading if p.backend == "fallback" else "reference"
    np_ = noun_phrase(p)
    ctx = other_nouns(p, np_.text)
    return Expression(
        sentence=p.text,
        noun_phrase=np_.text,
        head_noun=np_.head_noun,
        context=tuple(p.chunk_text(c) for c in ctx),
        context_roots=tuple(p.words[c[2]] for c in ctx),
        relation=relation_word(p, ctx, right_relation=right_relation, reading=reading),
        direction=direction_word(p, reading=reading)[0],
        backend=p.backend,
        parse=p,
    )
