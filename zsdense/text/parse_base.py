"""What the expression parsers and the reference functions share: the neutral :class:`Parse`,
the result types and the reference's keyword tables (see :mod:`zsdense.text.parse`)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
