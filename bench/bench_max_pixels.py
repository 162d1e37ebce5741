"""Peak memory of one large PNG: decoding alone, and decoding + a tiny anomaly run (CLI path).

Each measurement runs in a fresh subprocess and reports its peak RSS (``ru_maxrss``), so the
numbers include the interpreter, torch and the tiny models. Use it to pick ``--max-pixels``:

    python bench/bench_max_pixels.py [--mp 4 16 36]

The image is a smooth gradient with noise (a PNG that decodes like a photo, small on disk).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = r"""
import json, resource, sys
from pathlib import Path
mode, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "decode":
    from zsdense.io import read_image_records
    recs = read_image_records(Path(path), max_pixels=10**10)
    shape = list(recs[0].image.shape)
else:
    from zsdense.cli.main import main
    try:
        main(["anomaly", path, "--out", out, "--models", "tiny", "-q",
              "--max-pixels", "10000000000"])
    except SystemExit as e:
        assert not e.code, e.code
    shape = None
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"mode": mode, "shape": shape, "peak_rss_mb": round(rss_mb)}))
"""


def make_png(path: Path, megapixels: float) -> tuple[int, int]:
    w = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    h = int(megapixels * 1e6 // w)
    rows = []
    rng = np.random.RandomState(0)
    for y0 in range(0, h, 512):  # build in strips to keep this process small
        y = np.arange(y0, min(h, y0 + 512))[:, None]
        x = np.arange(w)[None, :]
        base = ((x + y) * 255 // (w + h)).astype(np.uint8)
        noise = rng.randint(0, 8, size=base.shape, dtype=np.uint8)
        rows.append(np.stack([base, base[:, ::-1], base + noise], axis=-1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path, compress_level=1)
    return h, w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mp", type=float, nargs="+", default=[4, 16, 36])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for mp in args.mp:
            png = Path(tmp) / f"big{mp:g}.png"
            h, w = make_png(png, mp)
            row = {"megapixels": mp, "hw": [h, w]}
            for mode in ("decode", "anomaly-tiny"):
                r = subprocess.run(
                    [sys.executable, "-c", CHILD, mode, str(png), str(Path(tmp) / f"o{mp:g}")],
                    capture_output=True,
                    text=True,
                )
                if r.returncode:
                    row[mode] = f"failed: {r.stderr.strip().splitlines()[-1:]}"
                else:
                    row[mode] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
