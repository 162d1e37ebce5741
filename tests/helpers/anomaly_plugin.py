"""A third-party anomaly scorer in one file (tests only): colour distance to good parts.

Importing this module registers the scorer ``colordist`` and its preset ``colordist``; nothing
else in zsdense changes (a plug-in package would have its entry point import it). The method:
each pixel's Euclidean RGB distance to the mean colour of the good reference images (optional;
without references, to the image's own median colour), optionally Gaussian-smoothed (the
preset's ``sigma``); the image score is the 99th percentile of the map. It returns raw maps and
scores only: thresholds, calibration (``--calibrate-with``) and the manifest's decision fields
come from zsdense, as for every preset.

``PREPARED`` counts the calls of ``prepare`` (the references' pass), so a test can check that
it ran once per run, not once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zsdense.config import AnomalyPreset
from zsdense.tasks.anomaly_registry import (
    AnomalyScorer,
    RawScore,
    register_anomaly_preset,
    register_scorer,
)
from zsdense.tasks.good_images import resolve_images

PREPARED: list[int] = []  # one entry per prepare() call: the number of reference images


@dataclass
class State:
    """What a run computes once: the good parts' mean colour (None without references)."""

    mean_rgb: np.ndarray | None
    n_references: int


def prepare(rt, opts) -> State:
    """The references' mean colour, computed once per run (and per runtime)."""
    if opts.reference is None:
        PREPARED.append(0)
        return State(None, 0)
    ctxs = rt.contexts(resolve_images(opts.reference, "--reference"))
    mean = np.mean([c.image.reshape(-1, 3).mean(axis=0) for c in ctxs], axis=0)
    PREPARED.append(len(ctxs))
    return State(mean.astype(np.float32), len(ctxs))


def run(rt, ctxs, opts, state: State) -> list[RawScore]:
    """Raw maps (RGB distance) and scores; no thresholds here."""
    cfg = opts.config()
    out = []
    for c in ctxs:
        ref = state.mean_rgb if state.mean_rgb is not None else np.median(c.image.reshape(-1, 3), 0)
        amap = np.linalg.norm(c.image - ref[None, None, :], axis=2).astype(np.float32)
        if cfg.sigma and cfg.sigma > 0:
            from scipy.ndimage import gaussian_filter

            amap = gaussian_filter(amap, sigma=float(cfg.sigma)).astype(np.float32)
        meta = {"preset": cfg.name, "method": "colordist", "references": state.n_references}
        out.append(RawScore(amap, float(np.percentile(amap, 99)), meta))
    return out


SCORER = register_scorer(
    AnomalyScorer(
        name="colordist",
        prepare=prepare,
        run=run,
        description="colour distance to the good parts' mean colour (a plug-in example)",
        references="optional",
        reference_kinds=("images",),
    ),
    replace=True,
)
PRESET = register_anomaly_preset(
    AnomalyPreset(name="colordist", method="colordist", prompts="none", sigma=1.0), replace=True
)
