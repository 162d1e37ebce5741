"""AnomalyDINO's zero-shot foreground masking: the first principal component of the patch
features, thresholded, flipped when it misses the centre, then dilated and closed along the
flattened patch list."""

from __future__ import annotations

import numpy as np
import torch


def first_pc_scores(features: torch.Tensor | np.ndarray) -> np.ndarray:
    """Scores on the first principal component (N,), float64, exact (no randomized solver).

    Sign as scikit-learn >= 1.5 (the reference's as-run version): the component's
    largest-magnitude entry is positive. The reference's randomized PCA agrees to ~3e-5.
    """
    f = np.asarray(features, dtype=np.float32).astype(np.float64)
    centred = f - f.mean(axis=0, keepdims=True)
    # the top right-singular vector of the centred features = the top eigenvector of their
    # (D, D) scatter matrix (much cheaper than an SVD of the (N, D) matrix)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    v = vecs[:, -1]
    if v[np.argmax(np.abs(v))] < 0:
        v = -v
    return centred @ v


def morph_1d(mask: np.ndarray, kernel: int = 3) -> np.ndarray:
    """Dilation then closing (dilate, erode) with a ``kernel``-wide window along the flat index.

    This is OpenCV's 3×3 dilation/closing applied to the reference's (N, 1) column: only the
    neighbours n−1, n+1 of the flattened row-major list count (so a run wraps from the end of
    one grid row to the start of the next); positions outside the list are ignored.
    """
    m = np.asarray(mask, dtype=bool).ravel()
    r = kernel // 2

    def window(x: np.ndarray, op, pad_value: bool) -> np.ndarray:
        p = np.pad(x, r, constant_values=pad_value)
        stack = np.stack([p[i : i + x.size] for i in range(2 * r + 1)])
        return op(stack, axis=0)

    d = window(m, np.any, False)
    d = window(d, np.any, False)  # closing = dilate ...
    return window(d, np.all, True)  # ... then erode


def foreground_mask(
    features: torch.Tensor | np.ndarray,
    grid: tuple[int, int],
    threshold: float = 10.0,
    *,
    border: float = 0.2,
    centre_fraction: float = 0.35,
    kernel: int = 3,
) -> np.ndarray:
    """The reference's zero-shot foreground mask (N,) bool (``compute_background_mask``).

    m = first-PC score > ``threshold``; if m keeps ≤ ``centre_fraction`` of the centre crop
    (rows/cols ``int(border·g):int((1−border)·g)``), m = −score > ``threshold`` (no second
    check); then :func:`morph_1d`.
    """
    s = first_pc_scores(features)
    gh, gw = int(grid[0]), int(grid[1])
    m = s > threshold
    crop = m.reshape(gh, gw)[
        int(gh * border) : int(gh * (1 - border)), int(gw * border) : int(gw * (1 - border))
    ]
    if crop.sum() <= crop.size * centre_fraction:
        m = -s > threshold
    return morph_1d(m, kernel)
