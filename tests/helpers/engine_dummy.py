"""A model-free task for engine tests and benchmarks (``--task engine_dummy:spec``; tests only).

It behaves like a real head where the engine is concerned: it asks the :class:`ImageContext`
for a shared "encoder" output (counted in ``ctx.computed``), computes a deterministic float map
and writes a mask PNG, a float map and an overlay JPEG atomically. Options (all optional):
``sleep`` seconds per image, ``fail`` a substring of the input path that makes the head raise,
``fail_batch`` raise whenever a batch holds more than one image (exercises the one-by-one retry),
``encoder`` the cache key name (two dummy tasks with the same name share one computation),
``hold`` a file path: every batch after the first waits (up to 120 s) until that file exists, so
a test can signal a run that is certainly mid-way and then let it go on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from zsdense.context import ImageContext
from zsdense.engine.specs import TaskSpec


def _encode(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W) float32: a deterministic stand-in for an encoder."""
    gray = image.mean(axis=2, dtype=np.float32)
    return (gray - gray.mean()).astype(np.float32)


def spec(
    seg: Any = None,
    name: str = "dummy",
    sleep: float = 0.0,
    fail: str | None = None,
    fail_batch: bool = False,
    encoder: str = "dummy-enc",
    fmt: str = "npy",
    overlay: bool = True,
    hold: str | None = None,
    **_: Any,
) -> TaskSpec:
    """A :class:`TaskSpec` for the dummy head (see the module docstring)."""
    batches = [0]

    def run(ctxs: list[ImageContext], params: list[dict]) -> list[dict]:
        batches[0] += 1
        if hold and batches[0] > 1:
            deadline = time.monotonic() + 120
            while not Path(hold).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        if fail_batch and len(ctxs) > 1:
            raise MemoryError("dummy: batch too large (simulated out-of-memory)")
        out = []
        for ctx in ctxs:
            src = str(ctx.meta.get("source") or "")
            if fail and fail in src:
                raise RuntimeError(f"dummy: refusing {Path(src).name}")
            feat = ctx.get((encoder,), lambda c=ctx: _encode(c.image))  # (H, W)
            if sleep:
                time.sleep(float(sleep))
            amap = np.abs(feat).astype(np.float32)
            out.append({"map": amap, "mask": amap > 0.25, "score": float(amap.max())})
        return out

    def write(res: dict, ctx: ImageContext, stem: Path, params: dict) -> dict:
        from zsdense.io import write_map_npy, write_map_tiff, write_mask_png, write_overlay_jpg

        outputs = {"mask": str(write_mask_png(f"{stem}.mask.png", res["mask"]))}
        if fmt == "tiff":
            outputs["map"] = str(write_map_tiff(f"{stem}.map.tiff", res["map"]))
        elif fmt != "none":
            outputs["map"] = str(write_map_npy(f"{stem}.map.npy", res["map"]))
        if overlay:
            outputs["overlay"] = str(
                write_overlay_jpg(
                    f"{stem}.overlay.jpg", ctx.image, heat=res["map"], mask=res["mask"]
                )
            )
        return {
            "outputs": outputs,
            "scores": {"score": round(res["score"], 6)},
            "meta": {"task": name},
        }

    return TaskSpec(name=name, run=run, write=write)
