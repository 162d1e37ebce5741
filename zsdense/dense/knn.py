"""Exact nearest-neighbour search over a memory of patch features, in bounded memory.

Few-shot anomaly scoring (AnomalyDINO) compares every test patch with every memory patch: with
64 reference images of ViT-S/14 at 448 px and 8 rotations the memory holds 64·8·1024 = 524,288
vectors, and a full (1024 × 524,288) distance matrix would take 2 GB by itself. This search
streams the memory in blocks (the memory may also be given as a list of blocks, so a bank is
never concatenated into one copy), keeps a running top-k per query, and never holds more than
``budget_bytes`` of distances at once.

Distances are **squared** Euclidean, computed as ``|q|² + |m|² − 2 q·m`` (one fused ``addmm``
per block, clamped at 0), which is what faiss' ``IndexFlatL2`` returns; results are in
ascending order with the memory row index of each neighbour. When ``faiss`` (``faiss-cpu``,
the ``fast`` extra) is importable, ``backend="faiss"`` runs the same exact search through
``IndexFlatL2``: the same neighbours (up to exact ties), and with the default ``refine`` the
returned distances are recomputed from those neighbours by the same code, so they are
identical too.

**Reduced precision.** Inside an enabled bf16 autocast region (the runtime's ``autocast()`` at
``--precision bf16``, or ``auto`` on a machine with native bf16) and when the memory rows are
L2-normalised (the ``L2_normalized`` metric), the torch search runs its distance products in
bf16 (``dtype="autocast"``, the default; ``dtype=torch.float32`` forces the exact search): the
queries and a bf16 copy of each memory block (cached per block, kept while the block lives and
is unchanged) go through the same blocked ``addmm``, which for unit rows computes the squared
distance itself (``|m|² + 1 − 2 q·m``), so the neighbours are chosen on distances rounded to
bf16's relative precision (2⁻⁹); with ``refine`` (the default) the returned distances are then
recomputed in float32 against the float32 memory. Measured (``bench/bench_fewshot.py``-sized
search, 1344 queries × 21,504 rows × 384, one thread): 1.9–2.0× faster than float32 on an AMD
EPYC with avx512_bf16; 95 % of the neighbours identical, refined distances within 0.5 % (the
neighbour chosen instead is that close to the nearest). Raw features
(``L2``: |m|² in the hundreds, where bf16 cannot rank) always search in float32.
"""

from __future__ import annotations

import threading
import weakref
from typing import Sequence

import torch

from zsdense.errors import ConfigError, DependencyError

BACKENDS = ("auto", "torch", "faiss")
# Distances held at once (per query chunk × memory block). Small on purpose: a 4 MB block stays
# in the CPU's cache between the GEMM that writes it and the pass that takes its minimum, so
# the search runs at plain matrix-product speed (1344 queries × 21,504 rows × 384: 0.18 s
# against 0.33 s with 64 MB blocks, the same neighbours and distances; 131,072 rows: 0.77 s
# against 0.89 s).
DEFAULT_BUDGET_MB = 4
DEFAULT_BUDGET_BYTES = DEFAULT_BUDGET_MB * 2**20


# Memory rows must have |m|² within this of 1 for the reduced-precision search (normalised rows).
REDUCED_NORM_TOL = 1e-3
REDUCED_DTYPES = (torch.bfloat16,)


def search_dtype(dtype, device: torch.device) -> torch.dtype:
    """The precision of the distance products: ``dtype`` as given, or for ``"autocast"`` the
    enabled autocast dtype on ``device`` when it is one of ``REDUCED_DTYPES`` (bf16), else
    float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "autocast"):
        raise ConfigError(f"knn dtype must be a torch dtype or 'autocast', not {dtype!r}")
    if dtype is None:
        return torch.float32
    kind = torch.device(device).type
    try:
        on = torch.is_autocast_enabled(kind)
        at = torch.get_autocast_dtype(kind)
    except (RuntimeError, TypeError, AttributeError):  # device types without autocast
        return torch.float32
    return at if on and at in REDUCED_DTYPES else torch.float32


_CAST_LOCK = threading.Lock()
_CAST_CACHE: dict[tuple[int, torch.dtype], tuple] = {}


def _per_block(block: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(the block in ``dtype``, its rows' |m|² in float32), computed once per block tensor and
    dtype while the block lives and is not modified (a memory bank is searched by every test
    image: its cast copy is made once)."""
    key = (id(block), dtype)
    with _CAST_LOCK:
        hit = _CAST_CACHE.get(key)
    if hit is not None and hit[0]() is block and hit[1] == block._version:
        return hit[2], hit[3]
    cast = block if block.dtype == dtype else block.to(dtype)
    norms = torch.linalg.vector_norm(block.float(), dim=1).square_()
    ref = weakref.ref(block, lambda _r, key=key: _CAST_CACHE.pop(key, None))
    with _CAST_LOCK:
        _CAST_CACHE[key] = (ref, block._version, cast, norms)
    return cast, norms


def l2_normalize(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Rows scaled to unit L2 norm (float32), zero rows left at zero: ``faiss.normalize_L2``."""
    x = x.float()
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    inv = torch.where(norm > eps, 1.0 / norm.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
    return x * inv


def faiss_available() -> bool:
    """True when the optional ``faiss`` package imports."""
    try:
        import faiss  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def _blocks(memory: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    blocks = [memory] if isinstance(memory, torch.Tensor) else list(memory)
    blocks = [b for b in blocks if b.shape[0] > 0]
    if not blocks:
        raise ConfigError("the nearest-neighbour memory is empty (no reference patches kept)")
    dims = {int(b.shape[-1]) for b in blocks}
    if len(dims) != 1 or any(b.dim() != 2 for b in blocks):
        raise ConfigError(f"memory blocks must be (M, D) with one D; got dims {sorted(dims)}")
    return blocks


def memory_size(memory: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Total number of rows in a memory given as one tensor or a list of blocks."""
    return sum(int(b.shape[0]) for b in _blocks(memory))


@torch.no_grad()
def knn_search(
    queries: torch.Tensor,
    memory: torch.Tensor | Sequence[torch.Tensor],
    k: int = 1,
    *,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    backend: str = "torch",
    refine: bool = True,
    dtype: torch.dtype | str | None = "autocast",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest memory rows of each query: (squared L2 (Q, k) ascending, index (Q, k)).

    ``memory``: (M, D) or a list of (M_i, D) blocks, indexed as if concatenated in order.
    Exact; streams the memory so that at most ``budget_bytes`` of distances exist at once.
    ``backend``: ``torch`` (default), ``faiss`` (requires faiss-cpu) or ``auto`` (faiss when
    importable and the data is on the CPU, else torch). ``refine``: recompute the returned
    distances as ``sum((q − m)²)`` for the chosen rows (Q·k·D work): the expanded form loses
    digits when |q|² is large (raw, unnormalised features), the direct form does not.
    ``dtype``: the precision of the torch search's distance products: ``"autocast"`` (bf16
    inside an enabled bf16 autocast region when the memory rows are normalised, else float32;
    see the module docstring), or a dtype (``torch.float32``: always exact; ``None`` = float32).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"knn backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    blocks = _blocks(memory)
    total = sum(int(b.shape[0]) for b in blocks)
    k = int(k)
    if k < 1 or k > total:
        raise ConfigError(f"k={k} neighbours asked for, but the memory holds {total} patches")
    if queries.dim() != 2 or queries.shape[1] != blocks[0].shape[1]:
        raise ConfigError(
            f"queries {tuple(queries.shape)} do not match memory width {blocks[0].shape[1]}"
        )
    use_faiss = backend == "faiss" or (
        backend == "auto" and queries.device.type == "cpu" and faiss_available()
    )
    if use_faiss:
        d, i = _knn_faiss(queries, blocks, k)
    else:
        dt = search_dtype(dtype, blocks[0].device)
        if dt != torch.float32 and not _normalised(blocks, dt):
            dt = torch.float32  # raw features: bf16 cannot rank |m|² − 2q·m in the hundreds
        d, i = _knn_torch(queries, blocks, k, budget_bytes, dt)
    if refine and d.numel():
        d = _exact_sq_dist(queries.to(d.device, torch.float32), blocks, i)
    return d, i


def _normalised(blocks: list[torch.Tensor], dtype: torch.dtype) -> bool:
    """True when every memory row has |m|² within ``REDUCED_NORM_TOL`` of 1."""
    for b in blocks:
        _cast, norms = _per_block(b, dtype)
        if norms.numel() and float((norms - 1.0).abs().max()) > REDUCED_NORM_TOL:
            return False
    return True


def _exact_sq_dist(
    queries: torch.Tensor, blocks: list[torch.Tensor], index: torch.Tensor
) -> torch.Tensor:
    """``sum((q − memory[index])²)`` (Q, k) for global row indices into the blocks."""
    q_n, k = index.shape
    flat = index.reshape(-1)
    q_rep = queries.repeat_interleave(k, dim=0) if k > 1 else queries
    if len(blocks) == 1:
        rows = blocks[0].index_select(0, flat.to(blocks[0].device)).to(queries.device)
    else:
        sizes = torch.tensor([b.shape[0] for b in blocks], device=flat.device)
        ends = torch.cumsum(sizes, 0)
        which = torch.bucketize(flat, ends, right=True)  # block of each index
        rows = torch.empty(flat.numel(), queries.shape[1], device=queries.device)
        for bi in torch.unique(which).tolist():
            sel = (which == bi).nonzero(as_tuple=True)[0]
            local = flat[sel] - (ends[bi] - sizes[bi])
            blk = blocks[bi]
            rows[sel] = blk.index_select(0, local.to(blk.device)).to(rows.device, torch.float32)
    diff = q_rep - rows.float()
    return (diff * diff).sum(dim=1).reshape(q_n, k)


def _merge_best(
    best_d: torch.Tensor | None,
    best_i: torch.Tensor | None,
    dv: torch.Tensor,
    di: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest of the running best and one block's candidates (sorted, stable: earlier
    memory rows win ties, as a linear scan would)."""
    if best_d is None:
        return dv, di
    if k == 1:
        better = dv < best_d  # strict: earlier rows win ties
        return torch.where(better, dv, best_d), torch.where(better, di, best_i)
    cat_d = torch.cat([best_d, dv], dim=1)
    cat_i = torch.cat([best_i, di], dim=1)
    order = torch.argsort(cat_d, dim=1, stable=True)[:, :k]
    return torch.gather(cat_d, 1, order), torch.gather(cat_i, 1, order)


def _knn_torch(
    queries: torch.Tensor,
    blocks: list[torch.Tensor],
    k: int,
    budget_bytes: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Streamed search: per (query chunk, memory step) one ``addmm`` into a reused buffer.

    |q|² is the same for every candidate of a query, so the ranking uses ``|m|² − 2 q·m``
    (``addmm`` copies the |m|² row into the output, then one GEMM accumulates onto it) and
    |q|² is added to the winners only: per step one GEMM plus one pass to take the minimum.
    (Folding |m|² into the GEMM as an extra column measured slower: the odd width costs more
    than the copy it saves.) ``dtype``: the precision of the products and of the buffer
    (float32: the exact path; bf16: the memory's cached bf16 copy, distances rounded to bf16).
    """
    if dtype != torch.float32:
        return _knn_torch_reduced(queries, blocks, k, budget_bytes, dtype)
    device = blocks[0].device
    q_all = queries.to(device=device, dtype=torch.float32)
    n_q = q_all.shape[0]  # (none: empty results from the scan)
    elems = max(1, int(budget_bytes) // 4)
    q_chunk = max(1, min(n_q, elems // 1024))  # at least 1024 memory rows per step
    norms = [torch.linalg.vector_norm(b.float(), dim=1).square_() for b in blocks]  # |m|²

    def as_float32():  # cast one block at a time (the memory may be half precision)
        return (b if b.dtype == torch.float32 else b.float() for b in blocks)

    return _scan_blocks(q_all, as_float32, norms, k, elems, q_chunk, shift=0.0)


def _scan_blocks(q_all, blocks, norms, k, elems, q_chunk, *, shift):
    """The streamed search of :func:`_knn_torch`: per query chunk, per step of memory rows one
    ``addmm`` of ``norms − 2 q·m`` into a reused buffer of ``q_all``'s dtype, the step's k best
    merged into the running best; ``|q|² − shift`` added to the winners (float32 distances,
    clamped at 0). ``blocks()`` yields the memory blocks (again for every query chunk)."""
    n_q, device = q_all.shape[0], q_all.device
    out_d = torch.empty(n_q, k, dtype=torch.float32, device=device)
    out_i = torch.empty(n_q, k, dtype=torch.long, device=device)
    for q0 in range(0, n_q, q_chunk):
        q = q_all[q0 : q0 + q_chunk]
        nq = q.shape[0]
        m_step = max(k, elems // nq)
        buf = torch.empty(nq * m_step, dtype=q_all.dtype, device=device)
        best_d: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        offset = 0
        for b, bn_all in zip(blocks(), norms):
            for m0 in range(0, b.shape[0], m_step):
                mb = b[m0 : m0 + m_step]
                d = buf[: nq * mb.shape[0]].view(nq, mb.shape[0])
                torch.addmm(bn_all[None, m0 : m0 + m_step], q, mb.T, alpha=-2.0, out=d)
                if k == 1:
                    dv, di = _row_min(d)
                else:
                    dv, di = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False, sorted=True)
                best_d, best_i = _merge_best(best_d, best_i, dv.float(), di + (offset + m0), k)
            offset += b.shape[0]
        qf = q.float()
        qn = (qf * qf).sum(dim=1, keepdim=True)
        if shift:
            qn -= shift
        out_d[q0 : q0 + nq] = (best_d + qn).clamp_(min=0.0)
        out_i[q0 : q0 + nq] = best_i
    return out_d, out_i


# Width of the pieces :func:`_row_min` takes the minimum of at once
ROW_MIN_CHUNK = 64


def _row_min(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``d.min(dim=1, keepdim=True)`` of a step's distances (the value and the *first* index of
    each row's minimum: the same values and indices), faster for float32 on the CPU.

    torch's ``min`` with indices runs a scalar loop over every value on the CPU (1.7–2.5 ms for
    4 M float32 values here), its value-only ``amin`` a vectorised one (0.1 ms). So each row is
    cut into pieces of ``ROW_MIN_CHUNK`` values: ``amin`` over every piece, the indexed ``min``
    over the pieces' minima (the first piece holding the row's minimum) and over that one
    piece's values (the first place in it): 0.3–0.5 ms for the same 4 M values. The minimum is
    exact, so the values are the same bits; a row with a NaN takes torch's own ``min``. Other
    dtypes (bf16's ``amin`` is no faster here), devices and narrow rows go to ``min`` as well.
    """
    n, m = d.shape
    c = ROW_MIN_CHUNK
    if d.dtype != torch.float32 or d.device.type != "cpu" or m < 4 * c or not d.is_contiguous():
        return d.min(dim=1, keepdim=True)
    full = m - m % c
    piece_min = d[:, :full].view(n, full // c, c).amin(dim=2)  # (n, full / c)
    if full < m:  # the narrower last piece
        piece_min = torch.cat([piece_min, d[:, full:].amin(dim=1, keepdim=True)], dim=1)
    value, piece = piece_min.min(dim=1, keepdim=True)  # the first piece holding the minimum
    if bool(torch.isnan(value).any()):
        return d.min(dim=1, keepdim=True)
    start = piece * c
    cols = (start + torch.arange(c, device=d.device)).clamp_max_(m - 1)  # (n, c)
    # in the last piece the clamped columns repeat column m - 1 after it: never a first place
    _, within = d.gather(1, cols).min(dim=1, keepdim=True)
    return value, start + within


def _knn_torch_reduced(
    queries: torch.Tensor,
    blocks: list[torch.Tensor],
    k: int,
    budget_bytes: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_knn_torch` with the products in ``dtype`` (bf16) on the memory's cached cast
    copy, for unit rows: the GEMM adds ``|m|² + 1`` (≈ 2) so that its bf16 output is the
    squared distance itself (|q|² ≈ 1), rounded relative to its size rather than to 1; the
    distances come back in float32 with bf16 rounding (refine them)."""
    device = blocks[0].device
    q_all = queries.to(device=device, dtype=dtype)
    n_q = q_all.shape[0]  # (none: empty results from the scan)
    cast = [_per_block(b, dtype) for b in blocks]
    elems = max(1, int(budget_bytes) // q_all.element_size())
    q_chunk = max(1, min(n_q, elems // 1024))
    norms = [(bn + 1.0).to(dtype) for _b, bn in cast]  # |m|² + 1 ≈ 2 for normalised rows
    return _scan_blocks(q_all, lambda: (b for b, _bn in cast), norms, k, elems, q_chunk, shift=1.0)


def unit_similarity(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a·bᵀ`` of unit rows in float32 (``dtype`` float32: the plain product), or in a reduced
    ``dtype`` *shifted by −1*: ``a·bᵀ − 1`` with the −1 added inside the GEMM, so that the
    similarities of close pairs (what nearest-neighbour scores take) come out near 0, where
    bf16 keeps ~2⁻⁹ of their distance instead of 2⁻⁸ of 1. ``a`` and ``b`` must already be in
    ``dtype``. Pair with :func:`unit_distance`."""
    if dtype == torch.float32:
        return a @ b.t()
    shift = torch.full((1, 1), -1.0, dtype=dtype, device=a.device)
    return torch.addmm(shift, a, b.t())


def unit_distance(sim: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Euclidean distance of unit rows from :func:`unit_similarity`'s output (float32):
    ``sqrt(max(2 − 2s, 0))``, or ``sqrt(max(−2t, 0))`` for the shifted ``t = s − 1``."""
    if dtype == torch.float32:
        return (2.0 - 2.0 * sim).clamp_min_(0.0).sqrt_()
    return (sim.float() * -2.0).clamp_min_(0.0).sqrt_()


def _knn_faiss(
    queries: torch.Tensor, blocks: list[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import faiss
    except Exception:  # noqa: BLE001
        raise DependencyError("faiss-cpu", "fast", "the faiss nearest-neighbour backend") from None
    import numpy as np

    index = faiss.IndexFlatL2(int(blocks[0].shape[1]))
    for b in blocks:
        index.add(np.ascontiguousarray(b.detach().to("cpu", torch.float32).numpy()))
    q = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
    d, i = index.search(q, k)
    device = queries.device
    return torch.from_numpy(d).to(device), torch.from_numpy(i.astype(np.int64)).to(device)
