"""Peak memory of one large photo through ``zsdense anomaly --models tiny``, with and without
``--tile`` (README "Large images").

Each measurement runs ``zsdense anomaly`` (the CLI path: decode, scorer, TIFF map, mask PNG,
overlay JPEG, manifest) in a fresh subprocess and reports its peak RSS (``ru_maxrss``, so the
interpreter, torch and the tiny models are included) and its wall time::

    python bench/bench_tile_memory.py [--hw 5774 8660] [--tile 518:64] [--also 2000 3000 ...]

The image is a smooth gradient with noise (as in ``bench_max_pixels.py``: a PNG that decodes
like a photo). ``--also H W ...`` measures more sizes both untiled and tiled (the 50-megapixel
image itself only tiled: untiled it may not fit a small machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = r"""
import json, resource, sys
from zsdense.cli.main import main
args = json.loads(sys.argv[1])
try:
    main(["anomaly", *args])
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def make_photo(path: Path, h: int, w: int) -> tuple[int, int]:
    """An (h, w) PNG: a smooth gradient with noise, built in strips (this process stays small)."""
    rng = np.random.RandomState(0)
    rows = []
    for y0 in range(0, h, 512):
        y = np.arange(y0, min(h, y0 + 512))[:, None]
        x = np.arange(w)[None, :]
        base = ((x + y) * 255 // (w + h)).astype(np.uint8)
        noise = rng.randint(0, 8, size=base.shape, dtype=np.uint8)
        rows.append(np.stack([base, base[:, ::-1], base + noise], axis=-1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path, compress_level=1)
    return h, w


def measure(png: Path, out: Path, extra: list[str]) -> dict:
    args = [str(png), "--out", str(out), "--models", "tiny", "-q", "--force", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True
    )
    wall = round(time.perf_counter() - t0, 1)
    if r.returncode:
        return {"failed": r.stderr.strip().splitlines()[-3:], "wall_s": wall}
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hw", type=int, nargs=2, default=[5774, 8660], help="height width")
    ap.add_argument("--tile", default="518:64")
    ap.add_argument(
        "--also", type=int, nargs="*", default=[], help="more images: h w h w ... (both modes)"
    )
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--untiled", action="store_true", help="also the big image without tiles")
    ap.add_argument("--no-tiled", action="store_true", help="skip the big image with tiles")
    args = ap.parse_args()
    common = ["--precision", args.precision, "--max-pixels", "100000000"]
    with tempfile.TemporaryDirectory() as tmp:
        h, w = args.hw
        png = Path(tmp) / "big.png"
        hw = make_photo(png, h, w)
        row = {"hw": list(hw), "megapixels": round(hw[0] * hw[1] / 1e6, 1), "tile": args.tile}
        if not args.no_tiled:
            row["tiled"] = measure(png, Path(tmp) / "tiled", [*common, "--tile", args.tile])
        if args.untiled:
            row["untiled"] = measure(png, Path(tmp) / "untiled", common)
        print(json.dumps(row), flush=True)
        for k in range(0, len(args.also) - 1, 2):
            sh, sw = args.also[k], args.also[k + 1]
            small = Path(tmp) / f"also{k}.png"
            make_photo(small, sh, sw)
            row = {"hw": [sh, sw], "megapixels": round(sh * sw / 1e6, 1)}
            for mode, extra in (("untiled", []), ("tiled", ["--tile", args.tile])):
                row[mode] = measure(small, Path(tmp) / f"{mode}{k}", [*common, *extra])
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
