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

from typing import Sequence

from zsdense.config import FALLBACK_READINGS
from zsdense.text.parse_base import (
    DIRECTION_KEYWORDS,
    NO_HEAD,
    NULL_KEYWORDS,
    RELATION_KEYWORDS,
    RELATION_WORDS,
    SENSIBLE_RELATION_KEYWORDS,
    SIDE_WORDS,
    Expression,
    NounPhrase,
    Parse,
)
from zsdense.text.parse_rules import parse_fallback, tokenize
from zsdense.text.parse_spacy import SPACY_MODELS, load_spacy, parse_spacy

__all__ = [
    "DIRECTION_KEYWORDS",
    "NO_HEAD",
    "NULL_KEYWORDS",
    "RELATION_KEYWORDS",
    "RELATION_WORDS",
    "SENSIBLE_RELATION_KEYWORDS",
    "SIDE_WORDS",
    "SPACY_MODELS",
    "Expression",
    "NounPhrase",
    "Parse",
    "analyse",
    "analyse_parse",
    "direction_word",
    "load_spacy",
    "noun_phrase",
    "other_nouns",
    "parse",
    "parse_fallback",
    "parse_spacy",
    "possessed_sides",
    "relation_word",
    "tokenize",
]

_POSSESSIVE_DET = frozenset("his her its their my your our".split())


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
