"""``thresholds.json``: decision thresholds kept for reuse, with where they came from.

Choosing a threshold is work (calibrating on good parts, reading an evaluation); recomputing it
for every run is waste. A thresholds file is small strict JSON::

    {
      "format": "zsdense-thresholds", "format_version": 1,
      "threshold": 0.565,                # pixel: mask = map >= threshold
      "image_threshold": 0.71,           # image: label = score >= image_threshold (or null)
      "source": "calibrated",            # calibrated | eval-f1-max | decide | fixed
      "detail": {"rule": "max", "n_images": 15, ...},
      "belongs_to": {"preset": "crane", "models": "default", "object_name": "screw", ...},
      "categories": {"screw": {"threshold": ..., "image_threshold": ..., ...}}   # eval only
    }

``belongs_to`` names what the values are only valid for: the preset and model set (another
preset or model gives maps on another scale: a file made for one is refused for the other) and
the settings that move the scores less (object, domain, dataset, image size, prompts: a
difference is reported as a warning). ``zsdense eval anomaly`` writes one entry per category
(its F1-optimal thresholds); :func:`pick` chooses the category by the object name.

Written by ``zsdense anomaly --calibrate-with`` (in OUT), ``zsdense decide`` (in OUT) and
``zsdense eval anomaly`` (in its --out); read by ``--thresholds FILE`` of ``zsdense anomaly``
and ``zsdense decide`` and kept in memory banks (``zsdense memory build --thresholds``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from zsdense.errors import ConfigError
from zsdense.io.atomic import to_jsonable, write_json

__all__ = [
    "THRESHOLDS_NAME",
    "FORMAT",
    "Thresholds",
    "read_thresholds",
    "write_thresholds",
    "thresholds_from_mapping",
    "belongs_to",
    "mismatches",
    "pick",
]

THRESHOLDS_NAME = "thresholds.json"
FORMAT = "zsdense-thresholds"
FORMAT_VERSION = 1
SOURCES = ("calibrated", "eval-f1-max", "decide", "fixed")
# a file for another preset or model set holds values on another scale: refused
STRICT_KEYS = ("preset", "models")
# settings of the anomaly task that move the maps and scores, recorded with the values
BELONGS_KEYS = (
    "preset",
    "models",
    "precision",
    "object_name",
    "domain",
    "dataset",
    "overrides",
    "reference",
    "shots",
)


@dataclass
class Thresholds:
    """The values and their provenance (see the module docstring)."""

    threshold: float | None
    image_threshold: float | None
    source: str
    detail: dict = field(default_factory=dict)
    belongs_to: dict = field(default_factory=dict)
    categories: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return to_jsonable(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "threshold": self.threshold,
                "image_threshold": self.image_threshold,
                "source": self.source,
                "detail": self.detail,
                "belongs_to": self.belongs_to,
                **({"categories": self.categories} if self.categories else {}),
            }
        )


def _number(value: Any, what: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {what} must be a number or null, got {value!r}")
    if not math.isfinite(float(value)):
        raise ConfigError(f"{where}: {what} must be finite, got {value!r}")
    return float(value)


def thresholds_from_mapping(data: Mapping[str, Any], where: str = "thresholds") -> Thresholds:
    """Validate a parsed thresholds file (a ConfigError naming ``where`` when it is not one)."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ConfigError(
            f'{where}: not a zsdense thresholds file (expected "format": "{FORMAT}"); '
            "make one with `zsdense decide`, `zsdense anomaly --calibrate-with` or "
            "`zsdense eval anomaly`"
        )
    version = data.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ConfigError(
            f"{where}: thresholds format version {version!r} is not supported "
            f"(this zsdense reads 1..{FORMAT_VERSION})"
        )
    cats: dict[str, dict] = {}
    for name, entry in dict(data.get("categories") or {}).items():
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: categories.{name} must be an object")
        cats[str(name)] = {
            **dict(entry),
            "threshold": _number(entry.get("threshold"), f"categories.{name}.threshold", where),
            "image_threshold": _number(
                entry.get("image_threshold"), f"categories.{name}.image_threshold", where
            ),
        }
    th = Thresholds(
        threshold=_number(data.get("threshold"), "threshold", where),
        image_threshold=_number(data.get("image_threshold"), "image_threshold", where),
        source=str(data.get("source") or "fixed"),
        detail=dict(data.get("detail") or {}),
        belongs_to=dict(data.get("belongs_to") or {}),
        categories=cats,
    )
    if th.threshold is None and th.image_threshold is None and not cats:
        raise ConfigError(f"{where}: the file holds no threshold")
    return th


def read_thresholds(path: str | Path) -> Thresholds:
    """Read and validate a thresholds file (ConfigError when missing or malformed)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"thresholds file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the thresholds file ({exc})") from None
    return thresholds_from_mapping(data, str(path))


def write_thresholds(path: str | Path, th: Thresholds) -> Path:
    """Write ``th`` as strict JSON, atomically."""
    return write_json(Path(path), th.to_dict())


def belongs_to(task_settings: Mapping[str, Any], run_settings: Mapping[str, Any] | None = None):
    """What thresholds made from an anomaly task's outputs belong to: its preset and options
    (from ``run_settings.json``'s task entry) and the run's model set and precision."""
    out = {k: task_settings.get(k) for k in BELONGS_KEYS if k in task_settings}
    if run_settings is not None:
        out["models"] = run_settings.get("models")
        out["precision"] = run_settings.get("precision")
    return to_jsonable(out)


def mismatches(th: Thresholds, settings: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(refusals, warnings): the ``belongs_to`` entries that differ from ``settings`` (same
    keys). A different preset or model set is a refusal, anything else a warning. Keys missing
    on either side are not compared."""
    want = to_jsonable(dict(settings))
    hard, soft = [], []
    for k, v in th.belongs_to.items():
        if k not in want or v is None or want[k] is None:
            continue
        if v != want[k]:
            (hard if k in STRICT_KEYS else soft).append(f"{k}: {v!r} (file) vs {want[k]!r}")
    return hard, soft


def _norm(name: str) -> str:
    return str(name).strip().lower().replace("_", " ")


def pick(th: Thresholds, category: str | None = None) -> tuple[float | None, float | None, str]:
    """(pixel threshold, image threshold, what was chosen). A file with per-category entries
    (from ``zsdense eval anomaly``) gives the entry of ``category`` (the object name; ``_`` and
    spaces alike, case-insensitive), or its only entry; else the top-level values."""
    if th.categories:
        by_norm = {_norm(k): k for k in th.categories}
        key = by_norm.get(_norm(category)) if category else None
        if key is None and len(th.categories) == 1:
            key = next(iter(th.categories))
        if key is None:
            names = ", ".join(sorted(th.categories))
            wanted = f"no entry for {category!r}; " if category else ""
            raise ConfigError(
                f"the thresholds file has one entry per category ({names}): {wanted}"
                "choose one with --object NAME"
            )
        entry = th.categories[key]
        return entry.get("threshold"), entry.get("image_threshold"), f"category {key}"
    return th.threshold, th.image_threshold, "file"


def from_bank(reference: Any) -> tuple[Thresholds | None, str]:
    """The thresholds kept in a memory bank (``zsdense memory build --thresholds``), if
    ``reference`` is one ``.zsdmem`` file holding them; (None, "") otherwise."""
    refs = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    if len(refs) != 1 or not str(refs[0]).endswith(".zsdmem") or not Path(refs[0]).is_file():
        return None, ""
    from zsdense.io.membank import read_header

    data = (read_header(refs[0]).get("extra") or {}).get("thresholds")
    if not data:
        return None, ""
    return thresholds_from_mapping(data, f"{refs[0]} (thresholds)"), str(refs[0])


def resolve_options(
    *,
    threshold: float | None,
    image_threshold: float | None,
    thresholds_file: str | Path | None,
    calibrate_with: Any,
    reference: Any = None,
    settings: Mapping[str, Any] | None = None,
) -> tuple[float | None, float | None, list[str]]:
    """The ``threshold`` / ``image_threshold`` options of an anomaly run once ``--thresholds
    FILE`` (or the thresholds kept in a memory bank given as ``--reference``) filled the values
    not given: (threshold, image threshold, notes). The values become explicit options, so the
    run's settings record numbers (a resume with the same file resumes). ``settings``: what the
    run is (preset, models, object_name...), checked against the file's ``belongs_to``."""
    notes: list[str] = []
    th, where = None, ""
    if thresholds_file is not None:
        if calibrate_with:
            raise ConfigError("--thresholds and --calibrate-with are two sources: give one")
        th, where = read_thresholds(thresholds_file), str(thresholds_file)
    elif threshold is None and image_threshold is None and not calibrate_with:
        th, where = from_bank(reference)
        if th is not None:
            notes.append(f"using the thresholds kept in the memory bank {where}")
    if th is None:
        return threshold, image_threshold, notes
    hard, soft = mismatches(th, settings or {})
    if hard:
        raise ConfigError(
            f"{where} was made for other settings ({'; '.join(hard)}): its values are on "
            "another scale; calibrate again (--calibrate-with) or give --threshold"
        )
    notes += [f"{where} was made with other settings: {s}" for s in soft]
    f_thr, f_ithr, _ = pick(th, (settings or {}).get("object_name"))
    return (
        threshold if threshold is not None else f_thr,
        image_threshold if image_threshold is not None else f_ithr,
        notes,
    )
