"""The few-shot memory: DINOv2 patch features of the good references (and their rotations),
built once (or loaded from a ``.zsdmem`` bank) and checked against the settings it is used with.
"""

from __future__ import annotations

from collections import abc
from typing import Any, Sequence

import numpy as np
import torch

from zsdense.dense.knn import l2_normalize
from zsdense.errors import ConfigError
from zsdense.io.membank import FORMAT_VERSION, MemoryBank, load_memory
from zsdense.io.progress import phase
from zsdense.tasks.fewshot.masking import foreground_mask
from zsdense.tasks.fewshot.options import (
    BANK_KEYS,
    FewShotOptions,
    options_for,
    options_from_bank,
    reference_positions,
)
from zsdense.tasks.fewshot.preprocess import extract_features, resolve_pos_interp, rotate_image
from zsdense.tasks.good_images import image_names, is_bank, resolve_images

# ---- the memory ------------------------------------------------------------------------------


def bank_settings(options: FewShotOptions, dino) -> dict:
    """The bank-defining settings (``BANK_KEYS``) as JSON-able values."""
    return {
        "model": options.model,
        "image_size": int(options.image_size),
        "pos_interp": resolve_pos_interp(dino, options.pos_interp),
        "rotation": bool(options.rotation),
        "rot_angles": [int(a) for a in options.angles()],
        "mask_refs": options.mask_refs,
        "mask_threshold": float(options.mask_threshold),
        "knn_metric": options.knn_metric,
        "masking": bool(options.masking),  # test-time default recorded for options_from_bank
    }


def model_identity(dino, options: FewShotOptions) -> dict:
    """What a bank records about its backbone: registry name, model name, weights SHA-256."""
    return {
        "name": options.model,
        "model": dino.name,
        "weights_sha256": dino.weights_sha256(),
        "random_weights": bool(getattr(dino, "is_random", False)),
    }


def memory_from_features(
    per_reference: Sequence[Sequence[tuple[torch.Tensor, tuple[int, int]]]],
    sizes: Sequence[tuple[int, int]],
    options: FewShotOptions,
    *,
    settings: dict,
    model: dict,
    names: Sequence[str] | None = None,
    positions: Sequence[int] | None = None,
) -> MemoryBank:
    """A bank from features already extracted: ``per_reference[r][a]`` = (features (N, D),
    grid) of reference r at angle index a. Rows in the reference's order: reference, angle,
    patch; masks are computed for every reference and angle (rows are dropped only when
    ``options.mask_refs``).

    ``source`` rows are (position, angle index, patch): ``positions[r]`` is reference r's
    place in the list the user gave (default r), so a row names the image it came from even
    when a few-shot draw used only part of that list (as the reference numbers its memory).
    """
    pos = list(range(len(per_reference))) if positions is None else [int(p) for p in positions]
    if len(pos) != len(per_reference):
        raise ConfigError(f"{len(pos)} positions for {len(per_reference)} reference images")
    feats, source, masks, grids = [], [], [], []
    for r, per_angle in enumerate(per_reference):
        rows, src, mks = [], [], []
        for a, (f, grid) in enumerate(per_angle):
            if options.masking:
                m = foreground_mask(f, grid, options.mask_threshold)
            else:
                m = np.ones(f.shape[0], dtype=bool)
            mks.append(torch.from_numpy(m))
            keep = m if options.mask_refs else np.ones(f.shape[0], dtype=bool)
            idx = np.nonzero(keep)[0]
            sel = f[torch.from_numpy(idx)].float()
            if options.knn_metric == "L2_normalized":
                sel = l2_normalize(sel)
            rows.append(sel)
            s = np.stack([np.full(idx.size, pos[r]), np.full(idx.size, a), idx], axis=1)
            src.append(torch.from_numpy(s.astype(np.int32)))
        feats.append(torch.cat(rows, dim=0).contiguous())
        source.append(torch.cat(src, dim=0))
        masks.append(torch.stack(mks))
        grids.append(tuple(int(v) for v in per_angle[0][1]))
    n = len(feats)
    return MemoryBank(
        features=feats,
        source=source,
        masks=masks,
        grids=grids,
        sizes=[(int(h), int(w)) for h, w in sizes],
        names=[str(x) for x in (names or [f"ref{i}" for i in range(n)])][:n],
        settings=settings,
        model=model,
        format_version=FORMAT_VERSION,
    )


@torch.no_grad()
def build_memory_with(
    dino,
    images_u8: Sequence[np.ndarray],
    options: FewShotOptions,
    names: Sequence[str] | None = None,
    *,
    seed: int = 0,
) -> MemoryBank:
    """A bank from uint8 reference images with a given DINOv2 wrapper (see :func:`build_memory`).

    With ``options.shots`` the references are the reference's few-shot draw from the given
    list (:func:`reference_positions`: the block ``seed·shots ..``; the first ``shots`` at seed
    0; more shots than images is a ConfigError); each bank row records its image's position in
    the given list. Each reference is rotated (``options.angles()``), its angles run through the
    model as one batch, and its rows are appended; the memory is a list of per-reference blocks,
    never concatenated into a second copy.
    """
    options = options.validate()
    given = images_u8 if isinstance(images_u8, abc.Sequence) else list(images_u8)
    if not given:
        raise ConfigError("few-shot scoring needs at least one reference (good) image")
    if options.shots is not None and int(options.shots) > len(given):
        raise ConfigError(
            f"--shots {options.shots}: only {len(given)} reference image(s) were given; "
            f"give more good images or --shots {len(given)} or fewer"
        )
    positions = reference_positions(len(given), options.shots, seed)
    angles = options.angles()
    settings = bank_settings(options, dino)
    model = model_identity(dino, options)
    parts: list[MemoryBank] = []
    with phase("memory of good references", len(positions)) as prog:
        for at in positions:
            img = given[at]
            rotated = [rotate_image(img, a) for a in angles]
            fg = extract_features(dino, rotated, options.image_size, options.pos_interp)
            parts.append(
                memory_from_features(
                    [fg], [img.shape[:2]], options, settings=settings, model=model, positions=[at]
                )
            )
            prog.update()
    bank = parts[0]
    for p in parts[1:]:
        bank.features.append(p.features[0])
        bank.source.append(p.source[0])
        bank.masks.append(p.masks[0])
        bank.grids.append(p.grids[0])
        bank.sizes.append(p.sizes[0])
    all_names = [str(x) for x in (names or [])]
    all_names += [f"ref{i}" for i in range(len(all_names), len(given))]
    bank.names = [all_names[i] for i in positions]
    return bank


def reference_contexts(rt, images: Any) -> tuple[list, list[str]]:
    """Reference images (folder / glob / file / list of paths, arrays, PIL, contexts) ->
    (ImageContexts, names). Folders and globs are read in name order."""
    items = resolve_images(images, "--reference")
    return rt.contexts(items), image_names(items)


class _DecodedU8(abc.Sequence):
    """Reference images decoded to uint8 on access, one at a time (nothing kept)."""

    def __init__(self, rt, items: Sequence[Any]):
        self.rt, self.items = rt, list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.rt.context(self.items[i]).image_u8


def build_memory(
    rt, images: Any, options: FewShotOptions | None = None, *, object_name=None, dataset=None
) -> MemoryBank:
    """A :class:`MemoryBank` from known-good ``images`` with the runtime's DINOv2.

    ``images``: a folder, glob, file or a list of paths / arrays / PIL images. ``options``
    default to :func:`options_for` ``(object_name, dataset)``. A
    :class:`~zsdense.tasks.good_images.GroupedImages` (tiles of large references) is recorded
    in ``bank.extra["groups"]``: leave-one-out statistics then leave out a whole picture.
    """
    opts = options or options_for(object_name, dataset)
    groups = getattr(images, "groups", None)  # tiles of one picture (GroupedImages)
    if groups is not None and opts.shots is not None:
        raise ConfigError("few-shot: choose --shots among whole images before grouping tiles")
    items = resolve_images(images, "--reference")
    dino = rt.dinov2(opts.model)
    with rt.autocast():  # one reference decoded at a time (the list may hold many tiles)
        bank = build_memory_with(dino, _DecodedU8(rt, items), opts, image_names(items))
    if groups is not None:
        bank.extra = {**bank.extra, "groups": [int(g) for g in groups]}
    return bank


def check_bank(bank: MemoryBank, options: FewShotOptions, dino) -> None:
    """ConfigError unless ``bank`` was built with this model and these bank-defining settings."""
    want_model = model_identity(dino, options)
    have = bank.model
    problems = []
    if have.get("name") != want_model["name"] or have.get("model") != want_model["model"]:
        problems.append(
            f"model: bank {have.get('model')!r} ({have.get('name')}), "
            f"now {want_model['model']!r} ({want_model['name']})"
        )
    elif have.get("weights_sha256") != want_model["weights_sha256"]:
        problems.append(
            "model weights: bank SHA-256 "
            f"{str(have.get('weights_sha256'))[:12]}..., loaded weights "
            f"{want_model['weights_sha256'][:12]}..."
        )
    want = bank_settings(options, dino)
    for k in BANK_KEYS:
        if bank.settings.get(k) != want[k]:
            problems.append(f"{k}: bank {bank.settings.get(k)!r}, now {want[k]!r}")
    if problems:
        raise ConfigError(
            "this memory bank was built with another model or other settings ("
            + "; ".join(problems)
            + "): rebuild it with `zsdense memory build` for these settings, or run with the "
            "bank's settings"
        )


def load_reference_bank(rt, reference: Any, options: FewShotOptions | None, object_name, dataset):
    """(bank, options) from a bank object, a ``.zsdmem`` path or reference images (built with
    ``options``, default :func:`options_for` ``(object_name, dataset)``; a bank brings its own
    settings unless ``options`` are given). ``options.shots`` takes the first N references."""
    if isinstance(reference, MemoryBank):
        bank = reference
    elif is_bank(reference):
        bank = load_memory(reference)
    else:
        opts = options or options_for(object_name, dataset)
        return build_memory(rt, reference, opts), opts
    opts = options or options_from_bank(bank)
    if opts.shots is not None and int(opts.shots) != bank.n_shots:
        if int(opts.shots) > bank.n_shots:
            raise ConfigError(
                f"--shots {opts.shots}: the memory bank holds only {bank.n_shots} references"
            )
        bank = bank.first(int(opts.shots))
    return bank, opts
