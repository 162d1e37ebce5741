"""Expression parsing: the rule-based fallback on a table of expressions, whole-word keyword
matching, the reference's "right" defect, and the spaCy path when an English model is installed."""

from __future__ import annotations

import pytest

from zsdense.text import parse as P

# (expression, head noun, relation with "right" fixed, direction)
TABLE = [
    ("the man on the left", "man", "left", "left"),
    ("the cup on the right", "cup", "right", "right"),
    ("the bright red car", "car", "none", "none"),
    ("bright light", "light", "none", "none"),
    ("the bigger elephant next to the tree", "elephant", "big", "none"),
    ("man in the middle of the picture", "man", "none", "middle"),
    ("left cup", "cup", "left", "left"),
    ("right most person", "person", "right", "right"),
    ("the person up there", "person", "none", "up"),
    ("the dog further away", "dog", "small", "none"),
    ("the left side of the image", "side", "none", "left"),
    ("cup on the left under the shelf", "cup", "down", "down"),
    ("the chair between the tables", "chair", "none", "middle"),
    ("the guy in front", "guy", "down", "none"),
    ("smallest donut", "donut", "small", "none"),
    ("the bowl inside the box", "bowl", "within", "none"),
    ("the bowl in the box", "bowl", "none", "none"),
    ("the top book", "book", "up", "up"),
    ("woman wearing a blue shirt", "woman", "none", "none"),
    ("player holding a bat", "player", "none", "none"),
    ("the elephant behind the fence", "elephant", "up", "none"),
    ("the lamp above the table", "lamp", "up", "up"),
    ("the cat below the window", "cat", "down", "none"),
    ("the larger giraffe", "giraffe", "big", "none"),
    ("the smaller of the two sheep", "smaller", "small", "none"),
    ("zebra closer to the camera", "zebra", "big", "none"),
    ("the pizza slice at the bottom", "slice", "none", "down"),
    ("the boat to the east", "boat", "right", "none"),
    ("the truck to the west of the house", "truck", "left", "none"),
    ("a brown horse on the right side", "horse", "none", "right"),  # NULL rule: "side"
    ("the girl who is sitting on the bench", "girl", "none", "none"),
    ("the tall man with glasses", "man", "none", "none"),
    ("the orange cat under the table", "cat", "down", "down"),
    ("brightest lamp", "lamp", "none", "none"),
    ("the copyright notice", "notice", "none", "none"),
    ("the man in the back", "man", "up", "none"),
    ("the sheep contained in the pen", "sheep", "within", "none"),
    ("the low shelf", "shelf", "none", "down"),
]


@pytest.mark.parametrize("text,head,relation,direction", TABLE)
def test_fallback_table(text, head, relation, direction):
    e = P.analyse_parse(P.parse_fallback(text), right_relation=True)
    assert (e.head_noun, e.relation, e.direction) == (head, relation, direction)


def test_table_is_large_enough():
    assert len(TABLE) >= 30
    assert {r for _, _, r, _ in TABLE} >= {
        "none",
        "left",
        "right",
        "up",
        "down",
        "big",
        "small",
        "within",
    }
    assert {d for _, _, _, d in TABLE} >= {"none", "left", "right", "middle", "up", "down"}


def test_noun_phrase_keeps_modifiers_and_context_chunks():
    e = P.analyse_parse(P.parse_fallback("The bigger Elephant next to the tree."))
    assert e.sentence == "the bigger elephant next to the tree ."
    assert e.noun_phrase == "the bigger elephant"
    assert e.context == ("the tree",)
    e = P.analyse_parse(P.parse_fallback("the man on the left"))
    assert e.context == ()  # "the left" has a relation word as root


@pytest.mark.parametrize(
    "text",
    [
        "the bright red car",
        "brightest lamp",
        "the copyright notice",
        "a righteous dog",
        "eastern gate",
        "leftover pizza",
    ],
)
def test_keywords_are_whole_words(text):
    e = P.analyse_parse(P.parse_fallback(text), right_relation=True)
    assert e.relation == "none" and e.direction == "none"


def test_right_relation_defect_switch():
    p = P.parse_fallback("the cup on the right")
    assert P.analyse_parse(p, right_relation=False).relation == "none"  # the reference
    assert P.analyse_parse(p, right_relation=True).relation == "right"
    p = P.parse_fallback("the boat to the east")
    assert P.analyse_parse(p, right_relation=False).relation == "none"
    assert P.analyse_parse(p, right_relation=True).relation == "right"


def test_head_index_rule_on_hand_parse():
    # "cup on the left under the shelf": 'under' (head 0) beats 'left' (head 1)
    p = P.Parse(
        ("cup", "on", "the", "left", "under", "the", "shelf"),
        (0, 0, 3, 1, 0, 6, 4),
        ((0, 1, 0), (2, 4, 3), (5, 7, 6)),
    )
    assert P.relation_word(p) == "down"
    assert P.direction_word(p) == ("down", 4)
    # with the heads swapped the earlier keyword wins
    p2 = P.Parse(p.words, (0, 0, 3, 0, 1, 6, 4), p.chunks)
    assert P.relation_word(p2) == "left"


def test_empty_and_punctuation_only():
    e = P.analyse_parse(P.parse_fallback("   "))
    assert e.noun_phrase == "" and e.relation == "none"
    e = P.analyse_parse(P.parse_fallback("?!"))
    assert e.relation == "none"


def test_auto_backend_never_fails(monkeypatch):
    e = P.analyse("the dog on the left", backend="auto")
    assert e.relation == "left"
    assert e.backend in ("spacy", "fallback")
    e = P.analyse("the dog on the left", backend="fallback")
    assert e.backend == "fallback"


def test_spacy_backend_missing_model_is_a_clear_error():
    from zsdense.errors import DependencyError

    if P.load_spacy() is not None:
        pytest.skip("spaCy with an English model is installed here")
    with pytest.raises(DependencyError, match="nlp"):
        P.parse("the dog", backend="spacy")


def test_spacy_path_when_available():
    nlp = P.load_spacy()
    if nlp is None:
        pytest.skip(
            "spaCy with an English pipeline (en_core_web_lg/md/sm) is not installed: "
            "install zsdense[nlp] and `python -m spacy download en_core_web_sm`"
        )
    e = P.analyse("The man on the LEFT", backend="spacy", right_relation=True)
    assert e.backend == "spacy"
    assert e.sentence == "the man on the left"
    assert e.head_noun == "man" and e.relation == "left" and e.direction == "left"
    e = P.analyse("the bright red car", backend="spacy")
    assert e.relation == "none" and e.direction == "none"
    e = P.analyse("the cup on the right", backend="spacy", right_relation=False)
    assert e.relation == "none"


class _FakeTok:
    def __init__(self, doc, i, text):
        self.doc, self.i, self.text, self.is_space = doc, i, text, False

    @property
    def head(self):
        return self.doc.toks[self.doc.heads[self.i]]


class _FakeSpan:
    def __init__(self, doc, start, end, root):
        self.start, self.end, self.root = start, end, doc.toks[root]


class _FakeDoc:
    def __init__(self, words, heads, chunks):
        self.heads = heads
        self.toks = [_FakeTok(self, i, w) for i, w in enumerate(words)]
        self.noun_chunks = [_FakeSpan(self, *c) for c in chunks]

    def __iter__(self):
        return iter(self.toks)


def test_spacy_conversion_with_a_stub_pipeline():
    """parse_spacy's contract (lower-case, re-join, re-parse, heads and chunks) on a stub nlp
    that returns a hand-written parse, so the conversion is tested without spaCy models."""
    seen = []

    def nlp(text):
        seen.append(text)
        words = text.replace(",", " ,").split()
        if words == ["the", "cup", ",", "on", "the", "right"]:
            return _FakeDoc(words, [1, 1, 1, 1, 5, 3], [(0, 2, 1), (4, 6, 5)])
        raise AssertionError(text)

    p = P.parse_spacy("The Cup, on the RIGHT", nlp)
    assert seen == ["the cup, on the right", "the cup , on the right"]
    assert p.backend == "spacy" and p.text == "the cup , on the right"
    e = P.analyse_parse(p, right_relation=True)
    assert (e.noun_phrase, e.relation, e.direction) == ("the cup", "right", "right")
