"""Attention primitives over a block's weights (no patched classes).

Every dense-feature variant (Crane's E-Attn / D-Attn here, the open-vocabulary last-block
variants in ``lastblock.py``) needs the same few pieces: q, k, v from a block's in-projection
applied to its ``ln_1`` output, split into heads; heads merged back; the block's out-projection;
and attention maps built from self-correlations (q·qᵀ, k·kᵀ, v·vᵀ, ...). They live here so that
every variant computes them the same way, batched over images and heads (no Python loop over
heads).

Layouts: tokens batch-first ``(B, N, C)``; per-head tensors ``(B, H, N, d)`` with ``C = H·d``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zsdense.config import CORRELATION_TYPES  # the registry (config: no torch for --help)
from zsdense.errors import ConfigError


def split_heads(x_bnc: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, H, N, C/H)."""
    b, n, c = x_bnc.shape
    return x_bnc.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x_bhnd: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H·d): the inverse of :func:`split_heads`."""
    b, h, n, d = x_bhnd.shape
    return x_bhnd.transpose(1, 2).reshape(b, n, h * d)


def qkv_tokens(block_weights, x_ln_bnc: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v (each (B, N, C)) = the block's in-projection (with bias) of ``ln_1(x)``.

    ``x_ln_bnc`` is the block's *normalised* input (``ln_1`` already applied).
    """
    return in_proj(block_weights, x_ln_bnc).chunk(3, dim=-1)


def in_proj(block_weights, x_ln_bnc: torch.Tensor) -> torch.Tensor:
    """The block's in-projection (with bias) of ``ln_1``-normalised tokens: (B, N, 3C)."""
    return F.linear(x_ln_bnc, block_weights.in_proj_weight, block_weights.in_proj_bias)


def qkv_heads(block_weights, x_ln_bnc: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v split into heads, each (B, H, N, d), from ``ln_1``-normalised tokens (B, N, C)."""
    h = block_weights.num_heads
    q, k, v = qkv_tokens(block_weights, x_ln_bnc)
    return split_heads(q, h), split_heads(k, h), split_heads(v, h)


def qkv_heads_packed(block_weights, x_ln_bnc: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`qkv_heads` with each of q, k, v contiguous (B, H, N, d): the in-projection's
    output laid out head-major by one copy (the same values; the materialised attention then
    copies nothing, where it made three copies of the strided views)."""
    h = block_weights.num_heads
    qkv = in_proj(block_weights, x_ln_bnc)
    b, n, c3 = qkv.shape
    packed = qkv.view(b, n, 3, h, c3 // (3 * h)).permute(2, 0, 3, 1, 4).contiguous()
    return packed.unbind(0)


def out_proj(block_weights, x_bnc: torch.Tensor) -> torch.Tensor:
    """The block's attention out-projection (with bias): (B, N, C) -> (B, N, C)."""
    return F.linear(x_bnc, block_weights.out_proj_weight, block_weights.out_proj_bias)


def plain_attention(block_weights, x_ln_bnc: torch.Tensor) -> torch.Tensor:
    """The block's ordinary multi-head self-attention output (after out_proj): (B, N, C).

    Equals ``attn(ln_1(x))`` of the open_clip block; used to run a block without calling its
    module when the inputs are needed anyway.
    """
    q, k, v = qkv_heads(block_weights, x_ln_bnc)
    out = F.scaled_dot_product_attention(q, k, v)
    return out_proj(block_weights, merge_heads(out))


def correlation_terms(attn_type: str):
    """The terms of a correlation attention type, or a ConfigError listing the valid types."""
    try:
        return CORRELATION_TYPES[attn_type]
    except KeyError:
        raise ConfigError(
            f"unknown attention type {attn_type!r}; choose one of {', '.join(CORRELATION_TYPES)}"
        ) from None


def self_correlation_attention(
    q_bhnd: torch.Tensor,
    k_bhnd: torch.Tensor,
    v_bhnd: torch.Tensor,
    attn_type: str = "qq+kk+vv",
    scale: float | None = None,
) -> torch.Tensor:
    """E-Attn attention weights (B, H, N, N): a sum of row-softmaxes of self-correlations.

    ``qq+kk+vv``: softmax(s·qqᵀ) + softmax(s·kkᵀ) + softmax(s·vvᵀ) (not renormalised); ``vv``,
    ``qq``, ``kk``, ``qq+kk`` likewise; ``(q+k+v)^2``: q, k, v concatenated along the head
    dimension, one softmax at scale s/√3. ``s`` defaults to head_dim^-0.5.
    Each term is one matmul + softmax batched over images and heads.
    """
    terms = correlation_terms(attn_type)
    d = q_bhnd.shape[-1]
    s = d**-0.5 if scale is None else scale
    if terms == ("qkv",):
        x = torch.cat([q_bhnd, k_bhnd, v_bhnd], dim=-1)  # (B, H, N, 3d)
        return torch.softmax((s / math.sqrt(3.0)) * (x @ x.transpose(-1, -2)), dim=-1)
    src = {"q": q_bhnd, "k": k_bhnd, "v": v_bhnd}
    if len(terms) == 1:
        x = src[terms[0]]
        return torch.softmax(s * (x @ x.transpose(-1, -2)), dim=-1)
    # One batched (over B and H) softmax per term, accumulated in place: a stacked (T,B,H,N,N)
    # tensor would triple the peak memory for the same arithmetic.
    a = None
    for t in terms:
        x = src[t]
        p = torch.softmax(s * (x @ x.transpose(-1, -2)), dim=-1)  # (B, H, N, N)
        a = p if a is None else a.add_(p)
    return a


def dual_attention_heads(
    q_bhnd: torch.Tensor,
    k_bhnd: torch.Tensor,
    v_bhnd: torch.Tensor,
    attn_type: str = "qq+kk+vv",
    *,
    with_plain: bool = True,
    plain_rows: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(plain ``softmax(s·qkᵀ)·v``, E-Attn ``A·v``), each (B, H, N, d), without forming N×N.

    ``plain_rows``: only the first rows of the plain attention are needed (Crane's last block
    uses the class token's); the materialised path below then computes and returns only those
    (B, H, plain_rows, d), the fused path still returns all rows (the same bits as ever).

    ``A·v = Σ_t softmax(s·x_t x_tᵀ)·v`` is evaluated as a sum of fused scaled-dot-product
    attentions ``sdpa(x_t, x_t, v)`` (linearity of the product in A), one call per term on the
    heads as they are (each call serves every head and every image; stacking the terms into one
    call gave the same bits after copying every operand). Same numbers as
    :func:`self_correlation_attention` ``@ v`` (to float rounding) at a fraction of the
    memory.

    On the CPU in bf16 the terms are instead materialised in cache-sized chunks
    (:func:`_dual_attention_materialised`): torch's fused CPU attention gains nothing from bf16
    on CPUs without AMX (it ran at the float32 speed on an AMD EPYC with avx512_bf16), while
    bf16 ``bmm`` runs 2-3× faster than float32 there, so E-Attn's three extra attentions would
    not shrink with the encoder; materialised, 4 attentions took 0.74× the fused kernel's time
    at 1370 tokens and 0.65× at 197 (one thread).
    """
    terms = correlation_terms(attn_type)
    if q_bhnd.device.type == "cpu" and q_bhnd.dtype in MATERIALISE_DTYPES:
        return _dual_attention_materialised(q_bhnd, k_bhnd, v_bhnd, terms, with_plain, plain_rows)
    if terms == ("qkv",):
        x = torch.cat([q_bhnd, k_bhnd, v_bhnd], dim=-1)
        s = q_bhnd.shape[-1] ** -0.5 / math.sqrt(3.0)
        corr = F.scaled_dot_product_attention(x, x, v_bhnd, scale=s)
        plain = F.scaled_dot_product_attention(q_bhnd, k_bhnd, v_bhnd) if with_plain else None
        return plain, corr
    src = {"q": q_bhnd, "k": k_bhnd, "v": v_bhnd}
    # one fused call per term on the tensors as they are (stacking them first only copied:
    # the kernel treats every (batch, head) alike, so the outputs are the same bits), summed
    # in order
    plain = F.scaled_dot_product_attention(q_bhnd, k_bhnd, v_bhnd) if with_plain else None
    corr = None
    for t in terms:
        x = src[t]
        out = F.scaled_dot_product_attention(x, x, v_bhnd)
        corr = out if corr is None else corr + out
    return plain, corr


# Dtypes for which CPU attention is computed materialised in chunks (see dual_attention_heads)
MATERIALISE_DTYPES = (torch.bfloat16,)


# Bytes of attention scores held at once per chunk (several heads, or a block of rows of one)
ATTN_CHUNK_BYTES = 4 << 20


def _dual_attention_materialised(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    terms: tuple[str, ...],
    with_plain: bool,
    plain_rows: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """:func:`dual_attention_heads` with explicit matrix products + softmax,
    ``ATTN_CHUNK_BYTES`` of scores at a time (whole heads when they fit, else blocks of query
    rows). The correlation terms' probabilities are summed before the one product with ``v``
    (``Σ_t P_t v = (Σ_t P_t) v``); the softmax scale is applied by the score products
    themselves (``baddbmm``'s ``alpha``, in float32 before the scores are rounded to bf16), so
    each operand is only made contiguous: the heads arrive as strided views of the qkv
    projection, and an operand in that layout (a product with it, or a reshape of it with
    b = 1) made ``bmm`` copy it again inside, every chunk. ``plain_rows`` (fewer than N): the
    plain attention of those first rows only, one product over every head before the chunks.
    """
    b, h, n, d = q.shape
    s = d**-0.5
    bh = b * h
    few = with_plain and plain_rows is not None and plain_rows < n  # the first rows only
    with_plain = with_plain and not few  # the chunks' plain attention: every row

    def dense(x: torch.Tensor) -> torch.Tensor:  # (b, h, n, e) -> contiguous (b·h, n, e)
        if x.is_contiguous():  # e.g. from qkv_heads_packed: already laid out
            return x.view(bh, n, -1)
        out = torch.empty((b, h, n, x.shape[-1]), dtype=x.dtype, device=x.device)
        out.copy_(x)
        return out.view(bh, n, -1)

    q_f, k_f, v_f = dense(q), dense(k), dense(v)
    if terms == ("qkv",):
        x = torch.cat([q_f, k_f, v_f], dim=-1)
        corr_ops = [(x, s / math.sqrt(3.0))]
    else:
        src = {"q": q_f, "k": k_f, "v": v_f}
        corr_ops = [(src[t], s) for t in terms]
    per_slice = n * n * q.element_size()
    slices = max(1, ATTN_CHUNK_BYTES // max(1, per_slice))
    rows = (
        n
        if slices > 1 or per_slice <= ATTN_CHUNK_BYTES
        else max(1, ATTN_CHUNK_BYTES // max(1, n * q.element_size()))
    )
    slices = min(slices, bh)
    plain = torch.empty(bh, n, d, dtype=v.dtype, device=v.device) if with_plain else None
    corr = torch.empty(bh, n, d, dtype=v.dtype, device=v.device)
    ignored = torch.empty((), dtype=q.dtype, device=q.device)  # baddbmm's input at beta = 0
    if few:  # a few rows of the plain attention, all heads in one product, before the chunks
        rows_p = int(plain_rows)
        sp = torch.baddbmm(ignored, q_f[:, :rows_p], k_f.transpose(1, 2), beta=0.0, alpha=s)
        plain = torch.bmm(torch.softmax(sp, dim=-1), v_f)

    def scores(left: torch.Tensor, right: torch.Tensor, i: int, r: int, alpha: float):
        lc, rc = left[i : i + slices, r : r + rows], _t(right, i, slices)
        return torch.baddbmm(ignored, lc, rc, beta=0.0, alpha=alpha)

    for i in range(0, bh, slices):
        vc = v_f[i : i + slices]
        for r in range(0, n, rows):
            if with_plain:
                a = scores(q_f, k_f, i, r, s)
                torch.bmm(torch.softmax(a, dim=-1), vc, out=plain[i : i + slices, r : r + rows])
            acc = None
            for x, alpha in corr_ops:
                p_t = torch.softmax(scores(x, x, i, r, alpha), dim=-1)
                acc = p_t if acc is None else acc.add_(p_t)
            torch.bmm(acc, vc, out=corr[i : i + slices, r : r + rows])
    plain_out = None if plain is None else plain.view(b, h, -1, d)
    return plain_out, corr.view(b, h, n, d)


def _t(x: torch.Tensor, i: int, slices: int) -> torch.Tensor:
    return x[i : i + slices].transpose(1, 2)


def vfm_guided_attention(
    feats_bchw: torch.Tensor,
    beta: float = 1.2,
    gamma: float = 3.0,
    *,
    mean: str = "image",
) -> torch.Tensor:
    """Attention (B, N, N) from a vision foundation model's patch features (B, C, h, w).

    The one implementation behind ProxyCLIP's proxy attention and Crane+'s D-Attn: channels
    L2-normalised, ``S = Zᵀ Z`` (cosine, diagonal included), ``S' = γ (S − β·mean(S))``,
    entries with ``S' < 0`` set to −∞, row softmax; one A is shared by every head. ``mean``:
    ``"image"`` (alias ``"window"``) takes one mean per batch element; ``"batch"`` one scalar
    over the whole batch (Crane as run; Trident over its windows).

    The diagonal is each row's maximum (cosine 1), so it is masked only when the whole row is;
    the references then produce NaN. Here such a row keeps its diagonal: the token attends to
    itself. Every other row is unchanged.
    """
    b = feats_bchw.shape[0]
    z = F.normalize(feats_bchw.flatten(2).float(), dim=1)  # (B, C, N)
    sim = z.transpose(1, 2) @ z  # (B, N, N)
    if mean == "batch":
        m = sim.mean()
    elif mean in ("image", "window"):
        m = sim.reshape(b, -1).mean(dim=1).view(b, 1, 1)
    else:
        raise ConfigError(f"unknown similarity-mean scope {mean!r}; use 'image' or 'batch'")
    sim = gamma * (sim - beta * m)
    neg = sim < 0
    neg &= ~torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    return torch.softmax(sim.masked_fill(neg, float("-inf")), dim=-1)
