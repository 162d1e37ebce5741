"""Few-shot memory banks on disk: safetensors tensors plus a JSON header, never pickle.

A bank is what an inspection line keeps between runs: the patch features of a few known-good
images (and their rotations), which patch of which image and angle each row came from, the
foreground masks, the settings that decided those features and the identity of the model that
computed them. It is built by :func:`zsdense.tasks.fewshot.build_memory` and used as
``reference=`` of :func:`zsdense.tasks.fewshot.run_fewshot`.

File layout (``.zsdmem``, a plain safetensors file):

- tensors ``features.{i}`` (n_i, D) float32, ``source.{i}`` (n_i, 3) int32 (the reference
  image's position in the list the bank was built from, angle index, patch) and ``masks.{i}``
  (A, N_i) uint8, one triple per reference image ``i``. The features are the rows of the
  nearest-neighbour index, in the reference's order (reference, then angle, then patch);
  L2-normalised for the ``L2_normalized`` metric;
- metadata key ``zsdense_membank``: a JSON header with ``format`` (``"zsdense-membank"``),
  ``format_version``, ``settings`` (the bank-defining options), ``model`` (registry name,
  SHA-256 of the loaded weights, hub id), per-reference ``names``, ``sizes`` and ``grids``,
  optional ``extra`` statistics, and ``payload_sha256``: a SHA-256 over every tensor's name,
  shape and bytes, so a flipped bit is caught instead of silently changing scores.

:func:`load_memory` turns a truncated, corrupted or foreign file into an
:class:`~zsdense.errors.InputError` that names the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zsdense.errors import InputError

FORMAT = "zsdense-membank"
FORMAT_VERSION = 1
HEADER_KEY = "zsdense_membank"
SUFFIX = ".zsdmem"


@dataclass
class MemoryBank:
    """The memory of a few-shot scorer: features per reference image and how they were made.

    ``features[i]`` (n_i, D) float32 and ``source[i]`` (n_i, 3) int32 hold reference ``i``'s
    kept patches over all its angles, each row as (position of the image in the reference list
    the bank was built from, angle index, patch): with a few-shot draw the position is the
    image's place in the user's list, not ``i``; ``masks[i]`` (A, N_i) bool the foreground mask
    of each angle (all True where masking was off); ``grids[i]`` its patch grid, ``sizes[i]`` its
    original (H, W). ``settings`` are the options that decided the features; ``model`` names
    the backbone and the SHA-256 of its weights.
    """

    features: list[torch.Tensor]
    source: list[torch.Tensor]
    masks: list[torch.Tensor]
    grids: list[tuple[int, int]]
    sizes: list[tuple[int, int]]
    names: list[str]
    settings: dict
    model: dict
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_shots(self) -> int:
        return len(self.features)

    @property
    def n_rows(self) -> int:
        return sum(int(f.shape[0]) for f in self.features)

    @property
    def width(self) -> int:
        return int(self.features[0].shape[1]) if self.features else 0

    def nbytes(self) -> int:
        """Bytes held by the feature rows (what the nearest-neighbour search reads)."""
        return sum(f.numel() * f.element_size() for f in self.features)

    def first(self, n: int) -> MemoryBank:
        """A bank of the first ``n`` references (rows shared, not copied)."""
        n = int(n)
        return MemoryBank(
            features=self.features[:n],
            source=self.source[:n],
            masks=self.masks[:n],
            grids=self.grids[:n],
            sizes=self.sizes[:n],
            names=self.names[:n],
            settings=dict(self.settings),
            model=dict(self.model),
            extra=dict(self.extra),
            format_version=self.format_version,
        )

    def all_source(self) -> torch.Tensor:
        """(M, 3) int32 (position in the given reference list, angle index, patch) of every
        memory row, in index order."""
        key = "all_source"
        if key not in self._cache:
            self._cache[key] = torch.cat(self.source, dim=0) if self.source else torch.zeros(0, 3)
        return self._cache[key]


def _payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tensors(bank: MemoryBank) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, (f, s, m) in enumerate(zip(bank.features, bank.source, bank.masks)):
        out[f"features.{i}"] = f.detach().to("cpu", torch.float32).contiguous()
        out[f"source.{i}"] = s.detach().to("cpu", torch.int32).contiguous()
        out[f"masks.{i}"] = m.detach().to("cpu", torch.uint8).contiguous()
    return out


def save_memory(bank: MemoryBank, path: str | os.PathLike) -> Path:
    """Write ``bank`` to ``path`` (safetensors + JSON header), atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = _tensors(bank)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": bank.settings,
        "model": bank.model,
        "names": list(bank.names),
        "sizes": [list(map(int, s)) for s in bank.sizes],
        "grids": [list(map(int, g)) for g in bank.grids],
        "n_shots": bank.n_shots,
        "n_rows": bank.n_rows,
        "width": bank.width,
        "extra": bank.extra,
        "payload_sha256": _payload_sha256(tensors),
    }
    from zsdense.io.atomic import atomic_path  # the outputs' one file mode (umask)

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
    return path


save = save_memory  # the name the issue uses


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a bank file without reading its tensors (InputError if unreadable)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "memory bank file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any parse failure is a damaged file
        raise InputError(
            path, f"not a readable memory bank (damaged or truncated safetensors file: {exc})"
        ) from None
    raw = meta.get(HEADER_KEY)
    if raw is None:
        raise InputError(path, "a safetensors file, but not a zsdense memory bank (no header)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"memory bank header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise InputError(path, "memory bank header has the wrong format tag")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise InputError(
            path,
            f"memory bank format version {version!r} is not supported by this zsdense "
            f"(reads version 1..{FORMAT_VERSION}); rebuild it with `zsdense memory build`",
        )
    return header


def load_memory(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> MemoryBank:
    """Read a bank written by :func:`save_memory`; damaged files raise InputError."""
    from safetensors.torch import load_file

    path = Path(path)
    header = read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            path, f"memory bank tensors cannot be read (damaged or truncated file: {exc})"
        ) from None
    if _payload_sha256(tensors) != header.get("payload_sha256"):
        raise InputError(
            path, "memory bank is corrupted: its tensors do not match the checksum in its header"
        )
    try:
        n = int(header["n_shots"])
        feats = [tensors[f"features.{i}"].to(device) for i in range(n)]
        source = [tensors[f"source.{i}"] for i in range(n)]
        masks = [tensors[f"masks.{i}"].bool() for i in range(n)]
        bank = MemoryBank(
            features=feats,
            source=source,
            masks=masks,
            grids=[tuple(int(v) for v in g) for g in header["grids"]],
            sizes=[tuple(int(v) for v in s) for s in header["sizes"]],
            names=[str(x) for x in header["names"]],
            settings=dict(header["settings"]),
            model=dict(header["model"]),
            extra=dict(header.get("extra") or {}),
            format_version=int(header["format_version"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"memory bank is incomplete ({exc!s} missing or invalid)") from None
    if len(bank.grids) != n or len(bank.names) != n or bank.n_rows != header.get("n_rows"):
        raise InputError(path, "memory bank header and tensors disagree")
    return bank


def describe(header_or_bank: dict | MemoryBank) -> dict[str, Any]:
    """A short JSON-able summary (shots, rows, model, settings) for logs and manifests."""
    if isinstance(header_or_bank, MemoryBank):
        b = header_or_bank
        return {
            "n_shots": b.n_shots,
            "n_rows": b.n_rows,
            "model": b.model,
            "settings": b.settings,
        }
    h = header_or_bank
    return {k: h.get(k) for k in ("n_shots", "n_rows", "model", "settings")}
