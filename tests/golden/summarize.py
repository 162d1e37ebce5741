"""Summarise a zsdense output folder for the golden-output test (``tests/test_golden.py``).

``python tests/golden/summarize.py OUT_DIR > tests/golden/NAME.json`` records, per manifest
record: its status, outputs, scores, and for every output file its SHA-256 plus, for masks and
float maps, numbers that a tolerance can compare (pixel counts, sums, quantiles). The stored
files were made from the code *before* the library restructuring (issue 10).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np


def _array(path: Path) -> np.ndarray | None:
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".tiff":
        import tifffile

        return tifffile.imread(path)
    if path.name.endswith(".mask.png"):
        from PIL import Image

        return np.array(Image.open(path))
    return None


def summarize(out_dir: Path) -> list[dict]:
    out_dir = Path(out_dir)
    recs = [json.loads(x) for x in (out_dir / "results.jsonl").read_text().splitlines()]
    rows = []
    for r in recs:
        files = {}
        for kind, rel in sorted((r.get("outputs") or {}).items()):
            p = out_dir / rel
            entry = {"name": rel, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            a = _array(p)
            if a is not None:
                a = np.asarray(a, dtype=np.float64)
                entry.update(
                    shape=list(a.shape),
                    sum=float(a.sum()),
                    nonzero=int(np.count_nonzero(a)),
                    q=[float(v) for v in np.quantile(a, [0.0, 0.25, 0.5, 0.75, 1.0])],
                )
            files[kind] = entry
        rows.append(
            {"key": r["key"], "status": r["status"], "scores": r.get("scores"), "files": files}
        )
    return rows


if __name__ == "__main__":
    json.dump(summarize(Path(sys.argv[1])), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
