"""MuSc's set-scoring building blocks, as the reference computes them: LNAMD, MSM (streamed,
from memory or from :class:`DiskStack` files) and RsCIN. :mod:`zsdense.tasks.musc` describes
the method and runs it on a category (:func:`~zsdense.tasks.musc.run_musc`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from zsdense.dense.knn import search_dtype, unit_distance, unit_similarity
from zsdense.errors import ConfigError

# streaming granularity of the distance step: rows of one matrix-product block (query patches).
# Only the blocks on and above the diagonal are multiplied (the others are their transposes), so
# smaller blocks skip more of the products: 6 ViT-B/16 images (196 patches) as 3 blocks of 2 do
# 2/3 of the work of one block, and took 0.7-0.8x its time in bf16 and in float32 (the scores
# were bit-identical on the AMD EPYC measured: a product's elements did not depend on the block
# shapes there). Large grids (over 512 patches) are one image per block either way.
BLOCK_ROWS = 512
# memory for the per-image nearest-distance table; above it, query images go in slices
TABLE_BYTES = 1 << 30
# features read from disk at once as query blocks (each column block read is used against all)
GROUP_BYTES = 256 << 20

RSCIN_K_LISTS = {"mvtec": (1, 2, 3), "visa": (1, 8, 9), "btad": (1, 2, 3)}
RSCIN_K_DEFAULT = (1, 2, 3)


# ---- building blocks (the reference's LNAMD, MSM, RsCIN) -----------------------------------


def layer_features(
    tokens_bnc: torch.Tensor, grid: tuple[int, int], r: int, *, normalize: bool = True
) -> torch.Tensor:
    """LNAMD: raw patch tokens (B, N, C) -> (B, N, C) float32.

    LayerNorm over all (N, C) of each image (eps 1e-5, no affine), r×r mean with zero padding
    counted in the divisor, then (``normalize``) L2 normalisation over C.
    """
    return _pool_normalize(_layer_norm_tokens(tokens_bnc, grid), grid, r, normalize)


def _layer_norm_tokens(tokens_bnc: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """LNAMD's first step, shared by every r: float32 LayerNorm over each image's (N, C)."""
    b, n, c = tokens_bnc.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} tokens do not form the {grid[0]}x{grid[1]} grid")
    return F.layer_norm(tokens_bnc.float(), (n, c))


def _pool_normalize(
    x: torch.Tensor, grid: tuple[int, int], r: int, normalize: bool = True
) -> torch.Tensor:
    """LNAMD's r×r mean (zero padding counted) and L2 normalisation of LayerNormed tokens."""
    b, n, c = x.shape
    if r > 1:
        g = x.transpose(1, 2).reshape(b, c, grid[0], grid[1])
        g = F.avg_pool2d(g, kernel_size=r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
        x = g.flatten(2).transpose(1, 2)
    return F.normalize(x, dim=-1) if normalize else x


def topmin_count(m: int, topmin: float = 0.3) -> int:
    """k = int((M−1)·topmin): how many of the M−1 per-image distances MSM averages."""
    return int((m - 1) * topmin) if topmin < 1 else int(topmin)


def min_images(topmin: float = 0.3) -> int:
    """The smallest set for which MSM averages at least one distance (5 at 30 %)."""
    m = 2
    while topmin_count(m, topmin) < 1:
        m += 1
        if m > 10_000:
            raise ConfigError(f"musc_topmin {topmin} never selects a distance")
    return m


def check_set_size(m: int, topmin: float) -> int:
    k = topmin_count(m, topmin)
    if k < 1:
        need = min_images(topmin)
        raise ConfigError(
            f"preset musc scores images against each other and needs at least {need} images of "
            f"one category (it averages the {topmin:g} smallest of the M−1 per-image distances); "
            f"got {m}. Give more images (a folder of one product) or use --preset crane"
        )
    return k


class DiskStack:
    """A (M, N, C) float32 array kept in a file instead of RAM: the per-layer tokens and the
    LNAMD features of a ``musc`` set, whose size grows with the number of images.

    Rows (images) are written as they are produced and read back in blocks with plain file
    reads into fresh buffers — not through a memory map, whose touched pages would count as
    the process's resident memory until unmapped. The file is raw little-endian float32 in
    image-major order; :meth:`remove` deletes it (the caller's temporary directory removes it
    in any case).
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int, int]):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        m, n, c = self.shape
        self._row_bytes = n * c * 4
        with open(self.path, "wb") as fh:
            fh.truncate(m * self._row_bytes)

    def write(self, i0: int, rows_bnc: torch.Tensor | np.ndarray) -> None:
        """Store images ``i0 .. i0 + B`` from a (B, N, C) tensor or array."""
        if isinstance(rows_bnc, torch.Tensor):
            rows_bnc = rows_bnc.detach().to("cpu", torch.float32).numpy()
        a = np.ascontiguousarray(rows_bnc, dtype=np.float32)
        if a.ndim != 3 or a.shape[1:] != self.shape[1:] or i0 < 0 or i0 + len(a) > self.shape[0]:
            raise ValueError(f"rows {a.shape} at {i0} do not fit the stack {self.shape}")
        with open(self.path, "r+b") as fh:
            fh.seek(i0 * self._row_bytes)
            fh.write(memoryview(a).cast("B"))

    def read(self, i0: int, i1: int) -> torch.Tensor:
        """Images ``i0 .. i1`` as a fresh (i1 − i0, N, C) float32 CPU tensor."""
        i0, i1 = max(0, int(i0)), min(self.shape[0], int(i1))
        out = np.empty((max(0, i1 - i0),) + self.shape[1:], dtype=np.float32)
        with open(self.path, "rb") as fh:
            fh.seek(i0 * self._row_bytes)
            got = fh.readinto(memoryview(out).cast("B"))
        if got != out.nbytes:
            raise OSError(f"{self.path}: short read ({got} of {out.nbytes} bytes)")
        return torch.from_numpy(out)

    def remove(self) -> None:
        """Delete the file (no error if it is already gone)."""
        self.path.unlink(missing_ok=True)


FeatureSet = Union[torch.Tensor, DiskStack]


def _block_loader(z: FeatureSet, device=None) -> Callable[[int, int], torch.Tensor]:
    """(i0, i1) -> the ((i1 − i0)·N, C) float32 rows of images i0..i1, on ``device``."""
    m, n, c = z.shape
    if isinstance(z, DiskStack):
        dev = torch.device("cpu") if device is None else torch.device(device)
        return lambda i0, i1: z.read(i0, i1).reshape(-1, c).to(dev)
    flat = z.reshape(m * n, c)
    return lambda i0, i1: flat[i0 * n : i1 * n]


@torch.no_grad()
def nearest_distance_table(
    z_mnc: FeatureSet,
    rows: Sequence[int] | range | None = None,
    *,
    block_rows: int = BLOCK_ROWS,
    group_bytes: int = GROUP_BYTES,
    device=None,
) -> torch.Tensor:
    """d (R, N, M): for each query image i in ``rows`` (default all), patch p and image j the
    Euclidean distance from z[i, p] to its nearest patch in image j; +inf where j == i.

    ``z`` rows must be L2-normalised (‖a−b‖² = 2 − 2a·b); ``z`` is a tensor or a
    :class:`DiskStack` (then blocks are read from disk, ``group_bytes`` of query blocks at a
    time, each column block read once per group, onto ``device``). The distances come from
    blocked matrix products of ``block_rows`` patches at a time; a block whose both image ranges
    lie in ``rows`` is used in both directions (row and column maxima), so scoring the whole set
    costs half the products. Where the data lives changes neither the products nor the result.
    Inside a bf16 autocast region the products run in bf16
    (:func:`zsdense.dense.knn.unit_similarity`); float32 otherwise.
    """
    m, n, c = z_mnc.shape
    rows = range(m) if rows is None else rows
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    if list(rows) != list(range(r0, r1)):
        raise ValueError("rows must be a contiguous range of image indices")
    per = max(1, int(block_rows) // n)
    load = _block_loader(z_mnc, device)
    dev = z_mnc.device if isinstance(z_mnc, torch.Tensor) else torch.device(device or "cpu")
    dt = search_dtype("autocast", dev)  # float32 unless inside a bf16 autocast region
    if dt != torch.float32:
        loaded = load
        load = lambda i0, i1: loaded(i0, i1).to(dt)  # noqa: E731
    d = torch.full((r1 - r0, n, m), float("inf"), dtype=torch.float32, device=dev)
    a_blocks = _blocks(r0, r1, per)
    b_blocks = _blocks(0, r0, per) + a_blocks + _blocks(r1, m, per)
    in_group = max(1, int(group_bytes) // max(1, per * n * c * 4))
    if isinstance(z_mnc, torch.Tensor):
        in_group = len(a_blocks)  # views, nothing to read
    for g in range(0, len(a_blocks), in_group):
        group = {blk: load(*blk) for blk in a_blocks[g : g + in_group]}
        for b0, b1 in b_blocks:
            zb = group.get((b0, b1))
            for (a0, a1), za in group.items():
                inside = r0 <= b0 and b1 <= r1  # (b0, b1) is one of the query blocks too
                if inside and b0 < a0:
                    continue  # filled from block (b, a) in both directions
                if zb is None:
                    zb = load(b0, b1)
                s = unit_similarity(za, zb, dt)  # (Ba·N, Bb·N): za @ zb.t() in float32
                ba, bb = a1 - a0, b1 - b0
                row = s.view(ba * n, bb, n).amax(dim=2)  # best match of each query patch per image
                d[a0 - r0 : a1 - r0, :, b0:b1] = unit_distance(row, dt).view(ba, n, bb)
                if inside and b0 != a0:
                    col = s.view(ba, n, bb * n).amax(dim=1)  # (Ba, Bb·N): image b's patches vs a
                    col = unit_distance(col, dt)
                    d[b0 - r0 : b1 - r0, :, a0:a1] = col.view(ba, bb, n).permute(1, 2, 0)
            del zb
        del group
    idx = torch.arange(r0, r1, device=d.device)
    d[idx - r0, :, idx] = float("inf")
    return d


def _blocks(lo: int, hi: int, per: int) -> list[tuple[int, int]]:
    return [(s, min(s + per, hi)) for s in range(lo, hi, per)]


@torch.no_grad()
def mutual_scores(
    z_mnc: FeatureSet,
    topmin: float = 0.3,
    *,
    block_rows: int = BLOCK_ROWS,
    table_bytes: int = TABLE_BYTES,
    group_bytes: int = GROUP_BYTES,
    device=None,
) -> torch.Tensor:
    """MSM: (M, N, C) L2-normalised features -> (M, N) float32 patch scores.

    Score of patch p of image i = mean of the k = int((M−1)·topmin) smallest nearest-patch
    distances to the other images. All M images are scored as one set; the work is streamed
    (see :func:`nearest_distance_table`) and, when the M × N × M table exceeds ``table_bytes``,
    query images are taken in slices. ``z`` may be a :class:`DiskStack` (features on disk, read
    in blocks onto ``device``): then RAM holds the table slice and a few blocks, whatever M is.
    Exact in every case, and identical for both kinds of ``z``.
    """
    m, n, c = z_mnc.shape
    k = check_set_size(m, topmin)
    if isinstance(z_mnc, DiskStack):
        z: FeatureSet = z_mnc
        step = max(1, int(group_bytes) // max(1, n * c * 4))
        worst = max(
            float((torch.linalg.vector_norm(z.read(i, i + step), dim=-1) - 1).abs().max())
            for i in range(0, m, step)
        )
        dev = torch.device(device or "cpu")
    else:
        z = z_mnc.float()
        worst = float((torch.linalg.vector_norm(z, dim=-1) - 1).abs().max())  # no (M, N, C) temp
        dev = z.device
    if worst > 1e-3:
        raise ValueError("mutual_scores needs L2-normalised feature vectors")
    per = max(1, int(block_rows) // n)
    slice_imgs = max(per, int(table_bytes) // max(1, 4 * n * m))
    slice_imgs = min(m, per * max(1, slice_imgs // per))
    out = torch.empty(m, n, dtype=torch.float32, device=dev)
    for g0 in range(0, m, slice_imgs):
        g1 = min(g0 + slice_imgs, m)
        d = nearest_distance_table(
            z, range(g0, g1), block_rows=block_rows, group_bytes=group_bytes, device=device
        )
        out[g0:g1] = d.topk(k, dim=2, largest=False).values.mean(dim=2)
        del d
    return out


def rscin_k_list(dataset: str | None) -> tuple[int, ...]:
    """The reference's RsCIN k-list for a dataset name: VisA [1, 8, 9], otherwise [1, 2, 3]."""
    key = (dataset or "").lower().replace("-", "").replace("_", "")
    if key in ("mvtec", "mvtecad"):
        key = "mvtec"
    return RSCIN_K_LISTS.get(key, RSCIN_K_DEFAULT)


def parse_k_list(value: str | Sequence[int]) -> tuple[int, ...]:
    """``musc_k`` as given (``"1,8,9"`` or a sequence) -> a tuple of ints (ConfigError if not)."""
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        ks = tuple(int(k) for k in items if str(k) != "")
    except (TypeError, ValueError):
        raise ConfigError(f"musc_k {value!r}: give k values like 1,2,3") from None
    if not ks or min(ks) < 0:
        raise ConfigError(f"musc_k {value!r}: give non-negative k values like 1,2,3")
    return ks


def rscin(
    raw_scores: torch.Tensor, embeds_md: torch.Tensor, ks: Sequence[int] = (1, 2, 3)
) -> torch.Tensor:
    """RsCIN: min-max normalise ``raw_scores`` (M,) over the set, then average over k in ``ks``
    of P_k s, where P_k keeps the k largest similarities W = E Eᵀ of each row (self included,
    negatives not clamped) and divides the row by their sum. ``embeds_md`` are used as given
    (the reference's CLIP embeddings are unit vectors, its DINO ones are not).

    A 0 in ``ks`` returns ``raw_scores`` unchanged, as the reference does. float64 result.
    """
    ks = [int(k) for k in ks]
    raw = raw_scores.double()
    if not ks or 0 in ks:
        return raw
    m = raw.shape[0]
    if max(ks) > m or min(ks) < 0:
        raise ConfigError(
            f"RsCIN k-list {ks} needs at least {max(ks)} images (got {m}); give more images "
            f"or a shorter list (musc_k, e.g. 1,2,3)"
        )
    span = raw.max() - raw.min()
    s = (raw - raw.min()) / span if float(span) > 0 else torch.zeros_like(raw)
    e = embeds_md.double()
    w = e @ e.t()
    outs = []
    for k in ks:
        idx = w.topk(k, dim=1).indices
        wk = torch.zeros_like(w).scatter_(1, idx, w.gather(1, idx))
        outs.append((wk / wk.sum(dim=1, keepdim=True)) @ s)
    return torch.stack(outs).mean(dim=0)


def upsample_aligned(patch_mn: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """(M, N) patch scores -> (M, size, size) float64, bilinear with ``align_corners=True``."""
    m = patch_mn.shape[0]
    g = patch_mn.double().reshape(m, 1, grid[0], grid[1])
    return F.interpolate(g, size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def lnamd_set(
    tokens_mnc: FeatureSet,
    grid: tuple[int, int],
    r: int,
    *,
    device=None,
    chunk: int = 16,
    out: DiskStack | None = None,
) -> FeatureSet:
    """:func:`layer_features` of a whole set, ``chunk`` images at a time, into one (M, N, C)
    float32 tensor or, with ``out``, into that :class:`DiskStack` (returned). LNAMD is per
    image; the chunks bound its temporaries. ``tokens_mnc`` may itself be a DiskStack."""
    return lnamd_sets(
        tokens_mnc, grid, [r], device=device, chunk=chunk, outs=None if out is None else [out]
    )[0]


def lnamd_sets(
    tokens_mnc: FeatureSet,
    grid: tuple[int, int],
    r_list: Sequence[int],
    *,
    device=None,
    chunk: int = 16,
    outs: Sequence[DiskStack] | None = None,
) -> list[FeatureSet]:
    """:func:`lnamd_set` for several r at once, one result per r (tensors, or ``outs``): the
    tokens are read and LayerNormed once per chunk for all of them, the same numbers as one r
    at a time."""
    m, n, c = tokens_mnc.shape
    on_disk = isinstance(tokens_mnc, DiskStack)
    if device is not None:
        dev = torch.device(device)
    else:
        dev = torch.device("cpu") if on_disk else tokens_mnc.device
    if outs is not None:
        if len(outs) != len(r_list):
            raise ValueError(f"{len(outs)} outputs for {len(r_list)} values of r")
        bad = [o.shape for o in outs if o.shape != (m, n, c)]
        if bad:
            raise ValueError(f"out {bad[0]} is not the tokens' shape {(m, n, c)}")
        zs: list[FeatureSet] = list(outs)
    else:
        zs = [torch.empty(m, n, c, dtype=torch.float32, device=dev) for _ in r_list]
    for i in range(0, m, chunk):
        tok = tokens_mnc.read(i, i + chunk) if on_disk else tokens_mnc[i : i + chunk]
        x = _layer_norm_tokens(tok.to(dev), grid)
        for z, r in zip(zs, r_list):
            feats = _pool_normalize(x, grid, int(r))
            if isinstance(z, DiskStack):
                z.write(i, feats)
            else:
                z[i : i + chunk] = feats
    return zs


def musc_patch_scores(
    tokens: Sequence[FeatureSet | Callable[[], FeatureSet]],
    grid: tuple[int, int],
    r_list: Sequence[int] = (1, 3, 5),
    topmin: float = 0.3,
    *,
    device=None,
    block_rows: int = BLOCK_ROWS,
    table_bytes: int = TABLE_BYTES,
    keep_per_layer: bool = False,
    spill_dir: str | os.PathLike | None = None,
):
    """LNAMD + MSM over layers and r: per-layer raw patch tokens (M, N, C) -> (M, N) float64
    patch scores (mean over layers of each r, then over r). With ``keep_per_layer`` also the
    (R, L, M, N) per-(r, layer) MSM scores.

    A layer may be given as a zero-argument callable returning its tokens: it is called once,
    so only one layer's (M, N, C) tokens need to exist at a time. A layer given as a
    :class:`DiskStack`, or any layer when ``spill_dir`` is set, has its LNAMD features written
    to files (in ``spill_dir``, else next to the tokens), one per r, and scored from there, one
    layer at a time, each file removed once scored: RAM then holds a few image chunks and the
    distance table, not M × N × C. The LNAMD features of a layer's r values are made in one
    pass over its tokens (:func:`lnamd_sets`; in memory they are then held together). The
    scores are bit-identical either way.
    """
    if not tokens:
        raise ValueError("no layers")
    r_list = [int(r) for r in r_list]
    scores = None  # (R, L, M, N) float32
    for li, item in enumerate(tokens):
        tok = item() if callable(item) else item
        m, n, c = (int(s) for s in tok.shape)
        check_set_size(m, topmin)
        if scores is None:
            scores = torch.empty(len(r_list), len(tokens), m, n, dtype=torch.float32)
        on_disk = isinstance(tok, DiskStack)
        # LNAMD of every r from one pass over the layer's tokens (one LayerNorm per image)
        if on_disk or spill_dir is not None:
            where = Path(spill_dir) if spill_dir is not None else tok.path.parent
            zs: list = [DiskStack(where / f"lnamd-l{li}-r{r}.f32", (m, n, c)) for r in r_list]
            try:
                lnamd_sets(tok, grid, r_list, device=device, outs=zs)
                for ri, z in enumerate(zs):
                    res = mutual_scores(
                        z, topmin, block_rows=block_rows, table_bytes=table_bytes, device=device
                    )
                    scores[ri, li] = res.cpu()
                    z.remove()
            finally:
                for z in zs:
                    z.remove()
        else:
            zs = lnamd_sets(tok, grid, r_list, device=device)
            for ri in range(len(r_list)):
                res = mutual_scores(zs[ri], topmin, block_rows=block_rows, table_bytes=table_bytes)
                scores[ri, li] = res.cpu()
                zs[ri] = None  # each r's features go as soon as they are scored
        del tok, zs
    patch = scores.double().mean(dim=1).mean(dim=0)
    return (patch, scores) if keep_per_layer else patch


def reference_gt_mask(
    mask_hw: np.ndarray | torch.Tensor, size: int, dataset: str | None
) -> torch.Tensor:
    """A ground-truth mask binarised at ``size`` × ``size`` the way MuSc's evaluation does it
    (README §6.7), for evaluating ``musc`` against its published numbers.

    The mask (0/255 or 0/1, any nonzero pixel anomalous) is resized as an 8-bit 'L' image with
    PIL bilinear; then **MVTec / BTAD** keep only pixels that are exactly 255 (the reference
    truncates ``mask / 255`` to int, so masks shrink at their edges) and **VisA** keeps every
    nonzero pixel (masks grow). Returns a (size, size) bool tensor.
    """
    from PIL import Image

    arr = np.asarray(mask_hw)
    u8 = np.where(arr > 0, 255, 0).astype(np.uint8)
    im = Image.fromarray(u8, mode="L")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    out = np.asarray(im)
    key = (dataset or "").lower().replace("-", "").replace("_", "")
    keep = out > 0 if key == "visa" else out == 255
    return torch.from_numpy(keep.copy())
