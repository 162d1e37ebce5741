"""Referring queries: the JSONL file of ``{"image", "text", optional "id"}`` lines and the work
items made from it (one per query; the queries on one image share its decode in the engine)."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from zsdense.errors import ConfigError
from zsdense.io.manifest import WorkItem

_ID_RE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_id(value: Any) -> str:
    text = _ID_RE.sub("_", str(value)).strip("._")
    return text or "q"


def load_queries(path: str | Path) -> list[dict]:
    """Read a JSONL file of {"image", "text", optional "id"} lines.

    Relative image paths are resolved against the JSONL file's folder. Ids default to the line
    number; they are made file-name safe and must be unique. Blank lines are skipped. A line that
    is not a JSON object with a non-empty "image" and "text" is a ConfigError naming the line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the queries file ({exc.strerror or exc})") from None
    out: list[dict] = []
    seen: set[str] = set()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f'{path}:{n}: expected an object like {{"image": ..., "text": ...}}')
        image, text = obj.get("image"), obj.get("text")
        if not isinstance(image, str) or not image.strip():
            raise ConfigError(f'{path}:{n}: missing "image" (a path to the image)')
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f'{path}:{n}: missing "text" (the referring expression)')
        qid = _safe_id(obj.get("id", n))
        if qid in seen:
            raise ConfigError(f"{path}:{n}: duplicate query id {qid!r}")
        seen.add(qid)
        img = Path(image).expanduser()
        if not img.is_absolute():
            img = path.parent / img
        out.append({"image": img, "text": text, "id": qid, "line": n})
    if not out:
        raise ConfigError(f"{path}: no queries in the file")
    return out


def items_from_queries(queries: list[dict], base: Path) -> list:
    """Queries -> WorkItems with params {"text", "id", "image"}; keys ``<rel>#<id>`` so the
    output stem is ``<rel without extension>.<id>``."""
    items = []
    for q in queries:
        img: Path = q["image"]
        try:
            rel = PurePosixPath(img.resolve().relative_to(base.resolve()).as_posix())
        except ValueError:
            rel = PurePosixPath(img.name)
        items.append(
            WorkItem(
                key=f"{rel}#{q['id']}",
                path=img,
                rel=rel,
                params={"text": q["text"], "id": q["id"], "image": str(img)},
            )
        )
    return items
