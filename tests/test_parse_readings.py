"""How an expression is read: the reference's keyword readings (always for a spaCy parse, and for
the rule parser under ``hybridgl``) and the rule parser's sensible reading (``hybridgl+``):
possessed parts, "behind", "in front of", "next to"; and the relations they lead to.

The reference (HybridGL with spaCy) reads "the cat 's left eye" as the chunk "the cat 's left
eye" (spaCy's noun chunk of "eye" spans its possessor) with relation and direction "left" (the
amod "left" is a keyword whose head is the chunk root), "behind" as *up* and "next to" as no
relation (no keyword); ``tests/test_parse_table.py`` holds the reference readings of many more.
"""

from __future__ import annotations

import pytest
import torch

from zsdense.config import REFER_PRESETS
from zsdense.errors import ConfigError
from zsdense.tasks import hybridgl as R
from zsdense.text import parse as P

# (expression, noun phrase, reference relation, reference direction,
#  sensible relation, sensible direction)
CASES = [
    ("the cat's left eye", "the cat 's left eye", "left", "left", "none", "none"),
    ("his right hand", "his right hand", "right", "right", "none", "none"),
    ("the dog's owner on the left", "the dog 's owner", "left", "left", "left", "left"),
    ("the man behind the car", "the man", "up", "none", "behind", "none"),
    ("the person behind the counter", "the person", "up", "none", "behind", "none"),
    ("the girl in the back", "the girl", "up", "none", "behind", "none"),
    ("the cat in front of the tv", "the cat", "down", "none", "front", "none"),
    ("the lamp next to the bed", "the lamp", "none", "none", "near", "none"),
    ("the vase beside the window", "the vase", "none", "none", "near", "none"),
    ("the bike near the wall", "the bike", "none", "none", "near", "none"),
    ("the box underneath the table", "the box", "none", "none", "down", "none"),
    # unchanged by the sensible reading
    ("the left cup", "the left cup", "left", "left", "left", "left"),
    ("the cup left of the laptop", "the cup", "left", "left", "left", "left"),
    ("the book on top of the shelf", "the book", "up", "up", "up", "up"),
    ("the bigger elephant next to the tree", "the bigger elephant", "big", "none", "big", "none"),
]


@pytest.mark.parametrize("text,phrase,rel,dirn,s_rel,s_dirn", CASES, ids=[c[0] for c in CASES])
def test_fallback_parser_readings(text, phrase, rel, dirn, s_rel, s_dirn):
    p = P.parse_fallback(text)
    ref = P.analyse_parse(p, right_relation=True)
    assert (ref.noun_phrase, ref.relation, ref.direction) == (phrase, rel, dirn)
    fixed = P.analyse_parse(p, right_relation=True, fallback_reading="sensible")
    assert (fixed.noun_phrase, fixed.relation, fixed.direction) == (phrase, s_rel, s_dirn)


def test_possessive_is_one_chunk_as_spacy_makes_it():
    p = P.parse_fallback("The cat's left eye")
    assert p.words == ("the", "cat", "'s", "left", "eye")
    assert p.chunks == ((0, 5, 4),)  # spaCy: noun_chunks -> [the cat 's left eye], root "eye"
    e = P.analyse_parse(p)
    assert e.head_noun == "eye" and e.context == ()
    # a contraction is not a possessive
    q = P.parse_fallback("that's the cat")
    assert q.chunks == ((2, 4, 3),)


def test_spacy_parses_keep_the_reference_reading():
    """``fallback_reading`` is the rule parser's: the same parse marked as spaCy's is read as the
    reference reads it."""
    p = P.parse_fallback("the man behind the car")
    as_spacy = P.Parse(p.words, p.heads, p.chunks, backend="spacy")
    e = P.analyse_parse(as_spacy, fallback_reading="sensible")
    assert e.relation == "up" and e.backend == "spacy"


def test_presets_choose_the_reading():
    assert REFER_PRESETS["hybridgl"].fallback_reading == "reference"
    assert REFER_PRESETS["hybridgl+"].fallback_reading == "sensible"
    e = P.analyse("the lamp next to the bed", backend="fallback", fallback_reading="sensible")
    assert e.relation == "near"
    with pytest.raises(ConfigError, match="fallback_reading"):
        P.analyse("the lamp", backend="fallback", fallback_reading="poetic")
    from zsdense.options import ReferOptions

    with pytest.raises(ConfigError, match="fallback_reading"):
        ReferOptions.from_mapping(fallback_reading="poetic").config()


# ---- the relations the sensible reading leads to (hand-computed) -----------------------------


def _boxes():
    # a: (0,0,10,10); b: right next to a (gap 0); c: far right (gap 90); d: below a, touching
    return torch.tensor([[0, 0, 10, 10], [10, 0, 10, 10], [100, 0, 10, 10], [0, 10, 10, 10]])


def test_near_relation_by_hand():
    P_ = torch.tensor([0.4, 0.3, 0.2, 0.1])
    rel = R.relation_guidance(P_, None, _boxes(), "near", k1=3)
    # T = U = [0, 1, 2] (top-3 by P), weights P; cond(a, b) = exp(-gap / 10) for b != a
    import math

    e8, e9 = math.exp(-8.0), math.exp(-9.0)  # gaps 80 and 90 px, scale sqrt(100) = 10
    want = [
        0.4 * (0.3 * 1.0 + 0.2 * e9),  # a=0: b=1 touches it (gap 0), b=2 is 90 px away
        0.3 * (0.4 * 1.0 + 0.2 * e8),  # a=1: b=0 touches it, b=2 is 80 px away
        0.2 * (0.4 * e9 + 0.3 * e8),
    ]
    assert rel.T.tolist() == [0, 1, 2]
    assert rel.R_raw.tolist() == pytest.approx(want, rel=1e-6)  # P is float32


def test_behind_and_front_by_hand():
    # a above d (touching): "behind" favours the upper one, "front" the lower one
    P_ = torch.tensor([0.5, 0.0, 0.0, 0.5])
    boxes = _boxes()
    behind = R.relation_guidance(P_, None, boxes, "behind", k1=2)
    front = R.relation_guidance(P_, None, boxes, "front", k1=2)
    assert sorted(behind.T.tolist()) == [0, 3]
    got_b = dict(zip(behind.T.tolist(), behind.R_raw.tolist()))
    got_f = dict(zip(front.T.tolist(), front.R_raw.tolist()))
    assert got_b == pytest.approx({0: 0.25, 3: 0.0})  # 0.5 * 0.5 * exp(0) * [cy0 < cy3]
    assert got_f == pytest.approx({0: 0.0, 3: 0.25})
