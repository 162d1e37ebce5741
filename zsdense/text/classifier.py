"""Zero-shot text classifier for open-vocabulary segmentation.

A class list is a list of classes, each a list of synonyms (the first is the display name).
Syntax:

* a class string (``--classes``): classes separated by ``,``, synonyms within a class by ``;``,
  e.g. ``"sky; wall, cat, sofa; couch"`` = 3 classes;
* a class file: one class per line, synonyms separated by ``;`` (the benchmarks' ``cls_*.txt``
  form; empty lines and lines starting with ``#`` are ignored). Shipped files (``voc21``,
  ``context60``...) are found by name through importlib.resources.

A class may start with ``NAME:`` to give it a display name that is not itself a query, e.g.
``background: sky; wall; tree`` (the shipped files name their stuff-word background line so).
Without it the first synonym is the display name.

Each query (synonym) embedding averages the 80 OpenAI ImageNet templates
(``open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES``): every template embedding is
L2-normalised, averaged, and L2-normalised again. Classifiers are cached per (model, class list).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from zsdense.config import OPENVOCAB_DATASETS
from zsdense.errors import ConfigError

CLASS_FILES = OPENVOCAB_DATASETS  # shipped class lists, one per benchmark dataset


def openai_templates() -> list:
    """The 80 OpenAI ImageNet prompt templates (callables ``name -> sentence``)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES)


def _clean(names: Sequence[str]) -> list[str]:
    return [n.strip() for n in names if n.strip()]


ClassEntry = tuple[str, tuple[str, ...]]  # (display name, queries)


def parse_class_item(item: str | Sequence[str] | ClassEntry) -> ClassEntry | None:
    """One class: ``"name: a; b"``, ``"a; b"``, a list of synonyms or a (name, synonyms) pair."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], (tuple, list)):
        syn = tuple(_clean(list(item[1])))
        return (str(item[0]).strip() or syn[0], syn) if syn else None
    if isinstance(item, str):
        name = ""
        if ":" in item:
            name, item = item.split(":", 1)
        syn = tuple(_clean(item.split(";")))
        if not syn:
            return None
        return (name.strip() or syn[0], syn)
    syn = tuple(_clean(list(item)))
    return (syn[0], syn) if syn else None


def parse_classes(spec: str | Sequence) -> list[ClassEntry]:
    """Class string or list -> ``[(display name, (query, ...)), ...]``.

    A string: classes separated by ``,`` (or newlines), synonyms by ``;``. A list: each item is
    one class, a string (synonyms separated by ``;``), a list of synonyms or a (name, synonyms)
    pair. The label index of a class is its position, so an empty class (``"cat,,cup"``, a
    trailing ``,``, an empty list item) is a ConfigError naming its position, never dropped.
    """
    if isinstance(spec, str):
        lines = [line for line in spec.splitlines() if line.strip()]
        items: list = [part for line in lines for part in line.split(",")]
    else:
        items = list(spec)
    if not items:
        raise ConfigError("the class list is empty; give classes like --classes 'cat, sofa; couch'")
    classes = []
    for pos, item in enumerate(items, start=1):
        c = parse_class_item(item)
        if c is None:
            where = f"in {spec!r}" if isinstance(spec, str) else "in the class list"
            raise ConfigError(
                f"class {pos} of {len(items)} {where} is empty: remove the extra separator "
                "(',' separates classes, ';' synonyms of one class); an empty class would "
                "shift the label index of every class after it"
            )
        classes.append(c)
    return classes


def parse_class_lines(text: str) -> list[ClassEntry]:
    """Class-file text -> classes (one per line, synonyms separated by ``;``)."""
    classes = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        c = parse_class_item(line)
        if c is not None:
            classes.append(c)
    if not classes:
        raise ConfigError("the class file holds no classes (one class per line)")
    return classes


def load_class_file(name_or_path: str | Path) -> list[ClassEntry]:
    """Classes from a file path, or from a shipped list by name (``voc21``, ``ade20k``...)."""
    p = Path(name_or_path)
    if p.is_file():
        try:
            return parse_class_lines(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: the class file is not UTF-8 text") from None
    name = str(name_or_path)
    if name in CLASS_FILES:
        res = resources.files("zsdense.prompts").joinpath("classes", f"{name}.txt")
        return parse_class_lines(res.read_text(encoding="utf-8"))
    raise ConfigError(
        f"class file {name!r} not found; give a path to a text file (one class per line, "
        f"synonyms separated by ';') or one of the shipped lists: {', '.join(CLASS_FILES)}"
    )


@dataclass(frozen=True)
class TextClassifier:
    """Query embeddings and the class each query belongs to."""

    weights: torch.Tensor  # (Q, D) L2-normalised, one row per synonym
    query_class: torch.Tensor  # (Q,) int64 class index of each query
    classes: tuple[ClassEntry, ...]  # (display name, synonyms) per class

    @property
    def class_names(self) -> list[str]:
        return [c[0] for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_probs(self, cos_qhw: torch.Tensor, logit_scale: float) -> torch.Tensor:
        """softmax(logit_scale · cos) over queries, then max over each class's synonyms.

        (Q, H, W) -> (K, H, W).
        """
        p = torch.softmax(logit_scale * cos_qhw, dim=0)
        qc = self.query_class.to(p.device)
        if len(qc) == self.num_classes:
            return p
        return torch.stack([p[qc == c].amax(dim=0) for c in range(self.num_classes)])


def build_classifier(
    clip,
    classes: Sequence,
    *,
    cache: dict | None = None,
    templates: Sequence | None = None,
) -> TextClassifier:
    """Text classifier for ``classes`` (anything :func:`parse_classes` takes), cached in
    ``cache`` per (model, class list)."""
    classes_t = tuple(
        parse_classes(list(classes)) if not isinstance(classes, str) else parse_classes(classes)
    )
    key = ("openvocab-classifier", getattr(clip, "arch", id(clip)), classes_t)
    if cache is not None and key in cache:
        return cache[key]
    tpls = openai_templates() if templates is None else list(templates)
    queries = [q for _name, syn in classes_t for q in syn]
    query_class = torch.tensor(
        [i for i, (_name, syn) in enumerate(classes_t) for _ in syn], dtype=torch.int64
    )
    texts = [t(q) if callable(t) else t.format(q) for q in queries for t in tpls]
    emb = clip.encode_text(texts)  # (Q·T, D) normalised
    emb = emb.reshape(len(queries), len(tpls), -1).mean(dim=1)
    weights = F.normalize(emb, dim=-1)
    clf = TextClassifier(weights=weights, query_class=query_class, classes=classes_t)
    if cache is not None:
        cache[key] = clf
    return clf
