"""The spaCy path of the expression parser (extra ``nlp``): an English pipeline, if installed,
parses the expression as the reference does (see :mod:`zsdense.text.parse`)."""

from __future__ import annotations

from typing import Sequence

from zsdense.text.parse_base import Parse

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
