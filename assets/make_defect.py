"""Rebuild the bundled demo assets: downscaled source copies and a synthetic defect.

Run from anywhere (paths are relative to this file):

    python assets/make_defect.py                  # gravel_scratch.png + its ground-truth mask
    python assets/make_defect.py --copy-sources   # also re-copy/downscale the originals

The defect is deterministic (fixed geometry, no randomness): a bright, slightly curved scratch,
3-4 px wide and anti-aliased, drawn over ``inspection/gravel.png``. Its ground truth (8-bit
0/255) goes to ``ground_truth/inspection/gravel_scratch_mask.png``, outside ``inspection/`` so a
folder run over the inspection images does not pick the mask up as an input.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent

# (name, source file in skimage/data, destination, longest side after downscaling)
SOURCES = [
    ("brick", "brick.png", "inspection/brick.png", 256),
    ("grass", "grass.png", "inspection/grass.png", 256),
    ("gravel", "gravel.png", "inspection/gravel.png", 256),
    ("coffee", "coffee.png", "scenes/coffee.png", 320),
    ("chelsea", "chelsea.png", "scenes/chelsea.png", 320),
    ("astronaut", "astronaut.png", "scenes/astronaut.png", 256),
    ("retina", "retina.jpg", "medical/retina.png", 256),
]


def copy_sources() -> None:
    """Downscale the scikit-image originals (Lanczos) and copy pydicom's CT_small.dcm."""
    import pydicom.data
    import skimage.data

    data_dir = Path(skimage.data.__file__).resolve().parent
    for _name, src, dst, side in SOURCES:
        with Image.open(data_dir / src) as im:
            w, h = im.size
            scale = min(1.0, side / max(w, h))
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            out = im.resize(size, Image.Resampling.LANCZOS) if scale < 1 else im.copy()
        (HERE / dst).parent.mkdir(parents=True, exist_ok=True)
        out.save(HERE / dst, format="PNG", optimize=True)
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    (HERE / "medical").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ct, HERE / "medical" / "CT_small.dcm")


def scratch_distance(h: int, w: int) -> np.ndarray:
    """Distance (pixels) of every pixel to a fixed quadratic Bezier curve."""
    p0, p1, p2 = np.array([0.22, 0.18]), np.array([0.55, 0.38]), np.array([0.72, 0.80])
    t = np.linspace(0.0, 1.0, 400)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # (400, 2) as (x, y) in [0,1]
    pts = curve * np.array([w - 1, h - 1])
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.full((h, w), np.inf)
    for x, y in pts:  # 400 points x 64k pixels: fast enough, and obviously correct
        d = np.minimum(d, np.hypot(xx - x, yy - y))
    return d


def make_defect() -> None:
    src = HERE / "inspection" / "gravel.png"
    with Image.open(src) as im:
        base = np.asarray(im.convert("L"), dtype=np.float32)
    h, w = base.shape
    d = scratch_distance(h, w)
    alpha = np.clip(2.2 - d, 0.0, 1.0)  # full inside 1.2 px, soft 1 px rim: ~4 px wide
    scratched = (1 - alpha) * base + alpha * 235.0
    out = np.clip(np.round(scratched), 0, 255).astype(np.uint8)
    Image.fromarray(out).save(HERE / "inspection" / "gravel_scratch.png", optimize=True)
    mask = (alpha > 0.25).astype(np.uint8) * 255
    gt = HERE / "ground_truth" / "inspection" / "gravel_scratch_mask.png"
    gt.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(gt, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copy-sources", action="store_true", help="re-copy the original images")
    args = ap.parse_args()
    if args.copy_sources:
        copy_sources()
    make_defect()


if __name__ == "__main__":
    main()
