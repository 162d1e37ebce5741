"""Large images at full resolution: a batch anomaly scorer run on tiles (``--tile S[:O]``).

Without tiles a scorer resizes the whole image to its encoder's input (518 px for Crane, a
448-px smaller edge for AnomalyDINO), so a small defect in a 6000×4000 photo shrinks to a few
pixels. :func:`tiled` wraps a registered :class:`~zsdense.tasks.anomaly_registry.AnomalyScorer`
through the registry contract, so every batch scorer (crane, crane+, anomalydino,
crane+fewshot, and registered ones) gets tiles the same way:

- **Tiles.** Each image is cut into SIZE×SIZE tiles (:func:`tile_starts`): starts every
  SIZE − OVERLAP pixels, the last row and column aligned to the image's edge (so they may overlap
  their neighbour more than OVERLAP). A side shorter than SIZE is one tile of that side's length:
  an image smaller than a tile is one tile, the image itself.
- **Streaming.** The tiles of the images of one call are contexts of their own, handed to
  ``scorer.run`` in batches of ``batch_size`` (``--batch-size``); each tile's map is added to the
  image's stitched map as soon as its batch is done, so memory holds one batch of tiles and one
  float32 map per image, never a model input of the whole image. The image's context counts
  the tiles' encoder passes (a manifest line's ``encoders``: one pass per tile).
- **Blending** (:func:`axis_weights`). Along each axis a tile weighs 1, except over OVERLAP
  pixels along each edge that faces another tile, where its weight ramps linearly,
  ``(k + ½) / OVERLAP`` at the k-th pixel from that edge; a tile's 2-D weight is the product of
  its two axis weights. The stitched map is ``Σ w·map / Σ w`` (the sum of weights factorises into
  the two axes, so only the numerator is an image-sized array). Where one tile covers a pixel
  alone with weight 1 its value is the tile's value unchanged; where two tiles meet over exactly
  OVERLAP pixels their weights sum to 1 (a cross-fade).
- **Image score**: the max over the image's tiles of the scorer's own image score of each tile
  (each scorer's score is defined on what its encoder sees: Crane's abnormal probability of the
  image, AnomalyDINO's mean of the top 1 % of its patch distances, the fused scale of
  crane+fewshot). An image is as anomalous as its most anomalous tile: a defect that fills part
  of one tile is not averaged away over the whole photo. ``meta["tiling"]["score_tile"]`` is
  that tile's box ``[y0, x0, y1, x1]``, and the rest of the scorer's meta is that tile's.
- **One tile** (a tile at least as large as the image): the scorer's own result for the image's
  own context, unchanged (bit-identical to the untiled run, ``model_map`` included).

Good images are tiled the same way, so that everything is compared at one scale
(:func:`tile_references`): calibration images (``--calibrate-with``) go through the tiled
scorer like any input; few-shot reference images (``--reference``) are cut into tiles of the
same SIZE and OVERLAP (kept as 8-bit) and the scorer's memory is built from those tiles, with
``--shots`` choosing whole reference images first. Their leave-one-out statistics (the default
threshold of ``anomalydino``, the fusion scale of ``crane+fewshot``) leave out every tile of the
same reference image (:class:`~zsdense.tasks.good_images.GroupedImages`). A memory bank
(``.zsdmem``) holds features of whole images at another scale and is refused with tiles.

Set-level scorers (``group="all"``, e.g. ``musc``) are refused: their images score each other
and their image score is normalised over the whole set, which tiles would turn into one
unrelated set per tile position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import numpy as np

from zsdense.errors import ConfigError
from zsdense.options import TileSpec, parse_tile
from zsdense.tasks.anomaly_registry import AnomalyScorer, RawScore

BLEND_RULE = (
    "linear ramps over OVERLAP px along edges facing another tile, weight (k+1/2)/OVERLAP; "
    "map = sum(w*tile map) / sum(w)"
)
SCORE_RULE = "max over tiles of the scorer's image score of each tile"
DEFAULT_PATCH = 14  # ViT patch size when an encoder's name does not say


# ---- the option (parsed in zsdense.options) -------------------------------------------------


def encoder_patch(encoder: str) -> int:
    """The patch size of an encoder named like ``clip/ViT-L-14-336`` or ``dinov2/...`` (14 when
    the name does not say)."""
    m = re.search(r"ViT-[A-Za-z]+-(\d+)", encoder)
    return int(m.group(1)) if m else DEFAULT_PATCH


def check_tile(opts, inner: AnomalyScorer) -> TileSpec:
    """The options' TileSpec after checking it against the scorer (before any input):
    SIZE at least the largest patch of its encoders, a batch scorer, reference images rather
    than a memory bank. ConfigError (exit 2) otherwise."""
    from zsdense.tasks.good_images import is_bank

    spec = parse_tile(opts.tile)
    if spec is None:
        raise ConfigError("check_tile needs options with a tile")
    if inner.group != "batch":
        raise ConfigError(
            f"--tile does not apply to --preset {opts.preset}: its images score each other and "
            "its image score is normalised over the whole set, which tiles would split into "
            "unrelated sets; run it without --tile (or use crane, crane+, anomalydino or "
            "crane+fewshot with --tile)"
        )
    cfg = opts.config()
    patch = max([encoder_patch(e) for e in inner.encoders(cfg)] or [DEFAULT_PATCH])
    if spec.size < patch:
        raise ConfigError(
            f"--tile {spec.text()}: SIZE must be at least the encoders' patch size ({patch} px)"
        )
    refs = opts.reference
    refs = refs if isinstance(refs, (tuple, list)) else (() if refs is None else (refs,))
    if any(is_bank(r) for r in refs):
        raise ConfigError(
            "--tile with a memory bank: the bank holds features of whole images at another "
            "scale; give the good reference images instead (--reference GOOD_DIR), they are "
            "cut into tiles of the same size"
        )
    return spec


# ---- geometry --------------------------------------------------------------------------------


def tile_starts(length: int, spec: TileSpec) -> list[int]:
    """Starts of the tiles along one axis of ``length`` pixels: every ``spec.stride``, the last
    one at ``length - size`` (aligned to the edge); ``[0]`` when the axis fits in one tile."""
    length = int(length)
    if length <= spec.size:
        return [0]
    n = -(-(length - spec.size) // spec.stride) + 1  # ceil((L - S) / stride) + 1
    starts = [i * spec.stride for i in range(n - 1)]
    starts.append(length - spec.size)
    return starts


def tile_boxes(hw: tuple[int, int], spec: TileSpec) -> list[tuple[int, int, int, int]]:
    """``(y0, x0, y1, x1)`` of every tile of an (H, W) image, row by row."""
    h, w = int(hw[0]), int(hw[1])
    th, tw = min(spec.size, h), min(spec.size, w)
    return [(y, x, y + th, x + tw) for y in tile_starts(h, spec) for x in tile_starts(w, spec)]


def axis_weights(length: int, spec: TileSpec) -> tuple[list[np.ndarray], np.ndarray]:
    """Per tile along one axis its weight vector, and their sum over the axis (float32).

    Weight 1, ramping linearly over ``overlap`` pixels along an edge that faces another tile
    (``(k + 0.5) / overlap`` at the k-th pixel from that edge)."""
    length = int(length)
    starts = tile_starts(length, spec)
    t = min(spec.size, length)
    r = spec.overlap
    ramp = ((np.arange(r, dtype=np.float64) + 0.5) / r).astype(np.float32) if r else None
    weights, total = [], np.zeros(length, dtype=np.float32)
    for s in starts:
        w = np.ones(t, dtype=np.float32)
        if ramp is not None and s > 0:
            w[:r] = np.minimum(w[:r], ramp)
        if ramp is not None and s + t < length:
            w[t - r :] = np.minimum(w[t - r :], ramp[::-1])
        weights.append(w)
        total[s : s + t] += w
    return weights, total


class Stitcher:
    """One image's map stitched from its tiles (:data:`BLEND_RULE`), and its image score (the
    max over tiles). Add every tile once with :meth:`add`, then :meth:`result`."""

    def __init__(self, hw: tuple[int, int], spec: TileSpec):
        self.hw = (int(hw[0]), int(hw[1]))
        self.spec = spec
        self.ys, self.wy = tile_starts(self.hw[0], spec), axis_weights(self.hw[0], spec)
        self.xs, self.wx = tile_starts(self.hw[1], spec), axis_weights(self.hw[1], spec)
        self.boxes = tile_boxes(self.hw, spec)
        self.n = len(self.boxes)
        self.acc: np.ndarray | None = None
        self.done = 0
        self.best: tuple[float, int, RawScore] | None = None

    def add(self, k: int, raw: RawScore) -> None:
        """Add tile ``k``'s raw result (its map at the tile's size)."""
        y0, x0, y1, x1 = self.boxes[k]
        m = np.asarray(raw.anomaly_map, dtype=np.float32)
        if m.shape != (y1 - y0, x1 - x0):
            raise ConfigError(
                f"a tiled scorer returned a map of shape {m.shape} for a tile of "
                f"{(y1 - y0, x1 - x0)}: scorers must return maps at their input's size"
            )
        score = float(raw.score)
        if self.best is None or score > self.best[0] or (np.isnan(self.best[0])):
            self.best = (score, k, raw)
        if self.n == 1:
            self.acc = m
        else:
            if self.acc is None:
                self.acc = np.zeros(self.hw, dtype=np.float32)
            wy = self.wy[0][self.ys.index(y0)]
            wx = self.wx[0][self.xs.index(x0)]
            self.acc[y0:y1, x0:x1] += m * wy[:, None] * wx[None, :]
        self.done += 1

    def result(self, meta: dict) -> RawScore:
        """The stitched raw result (``meta`` added under ``"tiling"``)."""
        if self.done != self.n or self.best is None or self.acc is None:
            raise ConfigError(f"stitching: {self.done} of {self.n} tiles were scored")
        score, k, raw = self.best
        info = {**meta, "tiles": self.n, "grid": [len(self.ys), len(self.xs)]}
        info["score_tile"] = list(self.boxes[k])
        if self.n == 1:
            out_meta = {**raw.meta, "tiling": info}
            return RawScore(raw.anomaly_map, raw.score, out_meta, raw.model_map)
        wsum_y, wsum_x = self.wy[1], self.wx[1]
        step = max(1, (1 << 22) // max(1, self.hw[1]))  # ~16 MB of float32 per block
        for a in range(0, self.hw[0], step):  # divide in place, block by block (no H×W temp)
            b = min(self.hw[0], a + step)
            self.acc[a:b] /= wsum_y[a:b, None] * wsum_x[None, :]
        acc, self.acc = self.acc, None
        return RawScore(acc, score, {**raw.meta, "tiling": info}, None)


# ---- references ------------------------------------------------------------------------------


def tile_references(rt, reference: Any, spec: TileSpec, shots: int | None) -> tuple[Any, Any, dict]:
    """Good reference images as the tiled scorer's memory takes them: ``(reference, shots,
    info)`` for the inner scorer's options.

    ``--shots`` picks whole images first (the first N, as untiled); then each image larger than
    a tile becomes its tiles (8-bit arrays, :class:`~zsdense.tasks.good_images.GroupedImages`
    remembering which image each tile came from). When every reference fits in one tile the
    references and shots are returned unchanged (the untiled memory, exactly)."""
    from zsdense.tasks.fewshot.options import reference_positions
    from zsdense.tasks.good_images import GroupedImages, is_bank, resolve_images, single

    if reference is None or is_bank(single(reference)):
        return reference, shots, {}
    items = resolve_images(reference, "--reference")
    if shots is not None and int(shots) > len(items):
        raise ConfigError(
            f"--shots {shots}: only {len(items)} reference image(s) were given; "
            f"give more good images or --shots {len(items)} or fewer"
        )
    chosen = [items[i] for i in reference_positions(len(items), shots, 0)]
    tiles: list = []
    groups: list[int] = []
    split = 0
    for g, item in enumerate(chosen):
        ctx = rt.context(item)
        boxes = tile_boxes(ctx.size, spec)
        if len(boxes) == 1:
            tiles.append(item)
            groups.append(g)
            continue
        split += 1
        u8 = ctx.image_u8
        for y0, x0, y1, x1 in boxes:
            tiles.append(np.ascontiguousarray(u8[y0:y1, x0:x1]))
            groups.append(g)
        del ctx, u8
    info = {"reference_images": len(chosen), "reference_tiles": len(tiles)}
    if split == 0:
        return reference, shots, info
    return GroupedImages(tiles, groups=groups), None, info


# ---- the wrapper -----------------------------------------------------------------------------


@dataclass
class TiledState:
    """The inner scorer, its options (no tile; tiled references) and its prepared state."""

    inner: AnomalyScorer
    opts: Any
    state: Any
    spec: TileSpec
    info: dict


def _iter_tiles(ctxs: Sequence, stitchers: list[Stitcher]) -> Iterator[tuple[int, int, Any]]:
    """(image index, tile index, tile context) in image order; a tile covering the whole image
    is the image's own context."""
    from zsdense.context import ImageContext

    for i, (ctx, st) in enumerate(zip(ctxs, stitchers)):
        for k, (y0, x0, y1, x1) in enumerate(st.boxes):
            if st.n == 1:
                yield i, k, ctx
            else:
                crop = np.ascontiguousarray(ctx.image[y0:y1, x0:x1])
                yield i, k, ImageContext(image=crop, meta={"tile": [y0, x0, y1, x1]})


def run_tiled(rt, ctxs: Sequence, state: TiledState, batch_size: int) -> list[RawScore]:
    """Raw results of the inner scorer on tiles of ``ctxs``, stitched (module docstring)."""
    ctxs = list(ctxs)
    stitchers = [Stitcher(c.size, state.spec) for c in ctxs]
    meta = {
        "size": state.spec.size,
        "overlap": state.spec.overlap,
        "blend": BLEND_RULE,
        "score_rule": SCORE_RULE,
        **state.info,
    }
    out: list[RawScore | None] = [None] * len(ctxs)
    bs = max(1, int(batch_size))
    pending: list[tuple[int, int, Any]] = []

    def flush() -> None:
        raws = state.inner.run(rt, [t for _, _, t in pending], state.opts, state.state)
        if len(raws) != len(pending):
            raise ConfigError(
                f"anomaly scorer {state.inner.name!r} returned {len(raws)} results for "
                f"{len(pending)} tiles"
            )
        for (i, k, tile_ctx), raw in zip(pending, raws):
            if tile_ctx is not ctxs[i]:  # the image's record counts one encoder pass per tile
                ctxs[i].computed.update(tile_ctx.computed)
            stitchers[i].add(k, raw)
            if stitchers[i].done == stitchers[i].n:
                out[i] = stitchers[i].result(meta)
        pending.clear()

    for item in _iter_tiles(ctxs, stitchers):
        pending.append(item)
        if len(pending) == bs:
            flush()
    if pending:
        flush()
    return [r for r in out if r is not None]


def tiled(inner: AnomalyScorer, opts) -> AnomalyScorer:
    """``inner`` run on tiles of each image (``opts.tile``), as an AnomalyScorer with the same
    declarations (checked by :func:`check_tile` first)."""
    spec = check_tile(opts, inner)

    def prepare(rt, o) -> TiledState:
        ref, shots, info = tile_references(rt, o.reference, spec, o.shots)
        inner_opts = replace(o, tile=None, reference=ref, shots=shots)
        return TiledState(inner, inner_opts, inner.prepare(rt, inner_opts), spec, info)

    def run(rt, ctxs, o, state: TiledState) -> list[RawScore]:
        return run_tiled(rt, ctxs, state, o.batch_size or rt.config.batch_size)

    default = None
    if inner.default_threshold is not None:

        def default(rt, o, state: TiledState):  # noqa: ARG001 - the inner options decide
            return inner.default_threshold(rt, state.opts, state.state)

    return replace(
        inner,
        name=f"{inner.name}[tile {spec.text()}]",
        prepare=prepare,
        run=run,
        default_threshold=default,
    )


__all__ = [
    "BLEND_RULE",
    "SCORE_RULE",
    "Stitcher",
    "TileSpec",
    "TiledState",
    "axis_weights",
    "check_tile",
    "encoder_patch",
    "parse_tile",
    "run_tiled",
    "tile_boxes",
    "tile_references",
    "tile_starts",
    "tiled",
]
