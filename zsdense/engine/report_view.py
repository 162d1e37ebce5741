"""The anomaly part of ``report.html``: what a person needs to choose a threshold by looking.

For every anomaly record with a saved float map, a *view* is embedded in the page:

- ``orig``: the input at reduced size (JPEG, longer side <= :data:`VIEW_SIDE` pixels);
- ``map``: the anomaly map at the same reduced size, quantised to 8 bits over the map's own
  range ``[lo, hi]`` (code ``c = round((v - lo) / step)``, ``step = (hi - lo) / 255``), as a
  grayscale PNG: the page decodes it and draws map, mask and overlay on canvases;
- ``hist``: the 256-bin histogram of the same codes over the **full-resolution** map.

With them the page's threshold slider recomputes, for a threshold ``t``, the mask of every image
(``lo + c * step >= t`` on the reduced map) and its pixel count at full resolution (the sum of
``hist`` over those codes). That count differs from ``(map >= t).sum()`` only for pixels within
half a quantisation step of ``t`` (``|v - t| <= step / 2``): the bound the browser test checks.

Size per image (base64 included): the picture pair of a 128-pixel side is 4-20 KB for real
maps and photos (smooth maps compress well; measured 15 KB for a smoothed 518x518 map and its
image) and at most about 38 KB for incompressible noise, the histogram 0.3-2 KB, the card's HTML
0.6 KB: :data:`VIEW_BYTES_MAX` (40 KB) bounds a view. Pictures are embedded for at most
:data:`MAX_PICTURES` images (the highest scores: at most 20 MB), histograms (counts under the
slider, ~1 KB each) for at most :data:`MAX_COUNTS`; the page says when it left some out.

Views are cached in ``OUT/.zsdense-report/`` (one small JSON per record and task, checked
against the map file's size and time), written by the engine while the run writes its outputs,
so the report at the end of a run, and after ``zsdense decide``, reads no map and no input again.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from zsdense.io.saved_maps import read_map
from zsdense.io.writers import atomic_path

VIEW_SIDE = 128
VIEW_DIR = ".zsdense-report"
CODES = 256
MAX_PICTURES = 500
MAX_COUNTS = 20000
# upper bound of the embedded bytes of one view: base64 of an incompressible 128x128 8-bit PNG
# (~22 KB) and 128x128 JPEG (~14 KB) plus the histogram text (<= 2 KB); tests/test_report_decide
VIEW_BYTES_MAX = 40 * 1024
VIEW_VERSION = 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def reduced_size(h: int, w: int, side: int = VIEW_SIDE) -> tuple[int, int]:
    """(h, w) scaled so the longer side is at most ``side`` (never enlarged)."""
    s = min(1.0, side / max(h, w, 1))
    return max(1, round(h * s)), max(1, round(w * s))


def quantise(amap: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(codes uint8, lo, hi) of a float map over its finite range (non-finite -> code 0)."""
    a = np.asarray(amap)
    lo, hi = float(a.min()), float(a.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):  # rare: NaN or inf pixels
        finite = np.isfinite(a)
        if not finite.any():
            return np.zeros(a.shape, np.uint8), 0.0, 0.0
        lo, hi = float(a[finite].min()), float(a[finite].max())
        a = np.where(finite, a, lo)
    if not hi > lo:
        return np.zeros(a.shape, np.uint8), lo, hi
    step = (hi - lo) / (CODES - 1)
    codes = np.subtract(a, lo, dtype=np.float64)
    codes /= step
    np.rint(codes, out=codes)
    # no clip: every value is in [lo, hi] here, so (v - lo) / step is in [0, 255 (1 + 2 eps)]
    # (rounding is monotone) and rounds into 0..255
    return codes.astype(np.uint8), lo, hi


def _decimate(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Every k-th row and column so the array is at most ~2x (h, w) before the box filter:
    a thumbnail does not need every pixel of a large image."""
    k = max(1, min(a.shape[0] // (2 * h), a.shape[1] // (2 * w)))
    return a[::k, ::k] if k > 1 else a


def _packed(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of a strided (h, w, c) array, one channel at a time: numpy copies
    strided pixels of 3 bytes slowly (0.59 against 0.08 ms for a 240x320 RGB picture)."""
    if a.flags.c_contiguous:
        return a
    out = np.empty(a.shape, a.dtype)
    for c in range(a.shape[2]):
        out[:, :, c] = a[:, :, c]
    return out


def code_threshold(lo: float, hi: float, t: float) -> int:
    """The smallest code whose value ``lo + c * step`` is >= ``t`` (256: none): the page's rule,
    written with the same float64 operations as its JavaScript."""
    step = (hi - lo) / (CODES - 1)
    for c in range(CODES):
        if lo + c * step >= t:
            return c
    return CODES


def make_view(amap: np.ndarray, image: np.ndarray | None = None) -> dict:
    """The embedded view of one map (and its image: float in [0, 1], or its uint8 pixels):
    see the module docstring."""
    from PIL import Image

    a = np.asarray(amap, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"an anomaly map is (H, W), got {a.shape}")
    H, W = a.shape
    codes, lo, hi = quantise(a)
    # Pillow counts the 8-bit codes in C (np.bincount first widens them to intp: 2.5x slower)
    hist = Image.fromarray(np.ascontiguousarray(codes), mode="L").histogram()
    h, w = reduced_size(H, W)
    sub = _decimate(a, h, w)
    if not np.isfinite(sub).all():
        sub = np.where(np.isfinite(sub), sub, lo)
    small = np.asarray(
        Image.fromarray(np.ascontiguousarray(sub), mode="F").resize((w, h), Image.Resampling.BOX),
        dtype=np.float64,
    )
    if hi > lo:
        step = (hi - lo) / (CODES - 1)
        small_codes = np.clip(np.rint((small - lo) / step), 0, CODES - 1).astype(np.uint8)
    else:
        small_codes = np.zeros((h, w), np.uint8)
    buf = io.BytesIO()
    # zlib level 1, as the mask PNGs: optimize=True took 0.5-0.8 ms a view for files 8 % smaller
    Image.fromarray(small_codes, mode="L").save(buf, format="PNG", compress_level=1)
    view: dict[str, Any] = {
        "v": VIEW_VERSION,
        "H": int(H),
        "W": int(W),
        "h": int(h),
        "w": int(w),
        "lo": lo,
        "hi": hi,
        "hist": hist,  # Python ints already
        "map": _b64(buf.getvalue()),
        "orig": None,
    }
    if image is not None:
        img = np.asarray(image)
        if img.ndim == 2:
            img = img[:, :, None]
        img = _decimate(img, h, w)[:, :, :3]
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        if img.dtype == np.uint8:  # an 8-bit picture (u8 / 255 is the float image): as is
            rgb = _packed(img)
        else:
            # one new array, scaled and rounded in place (the dtype the expression would have)
            f = np.clip(img, 0, 1).astype(np.result_type(img.dtype, np.float32), copy=False)
            f *= 255
            f += 0.5
            rgb = f.astype(np.uint8)
        pil = Image.fromarray(np.ascontiguousarray(rgb)).resize((w, h), Image.Resampling.BOX)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=80)
        view["orig"] = _b64(buf.getvalue())
    return view


def small_codes(view: dict) -> np.ndarray:
    """The reduced map's codes (h, w) uint8 decoded from a view (what the page draws)."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(view["map"]))) as im:
        return np.asarray(im.convert("L"))


# ---- the cache -------------------------------------------------------------------------------


def _cache_path(out_dir: Path, key: str, task: str | None) -> Path:
    h = hashlib.sha1(f"{key}\0{task or ''}".encode()).hexdigest()[:24]
    return Path(out_dir) / VIEW_DIR / f"{h}.json"


def _stamp(path: Path) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def store_view(
    out_dir: Path,
    key: str,
    task: str | None,
    map_rel: str,
    amap: np.ndarray,
    image: np.ndarray | None,
) -> dict:
    """Make the view of a record's map (in memory) and cache it next to the outputs."""
    view = make_view(amap, image)
    view["src"] = {"map": map_rel, "stamp": _stamp(Path(out_dir) / map_rel)}
    path = _cache_path(out_dir, key, task)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(view), encoding="utf-8")
    return view


def load_view(out_dir: Path, rec: dict, task: str | None, map_rel: str) -> dict | None:
    """The view of a record's map: from the cache when it matches the map file, else made from
    the map file (and the input, read again for the picture) and cached. None if the map
    cannot be read."""
    out_dir = Path(out_dir)
    key = str(rec.get("key"))
    path = _cache_path(out_dir, key, task)
    stamp = _stamp(out_dir / map_rel)
    if stamp is None:
        return None
    try:
        view = json.loads(path.read_text(encoding="utf-8"))
        if view.get("v") == VIEW_VERSION and view.get("src") == {"map": map_rel, "stamp": stamp}:
            return view
    except (OSError, ValueError):
        pass
    try:
        amap = read_map(out_dir / map_rel)
    except Exception:  # noqa: BLE001 - a damaged map: no view, the report still lists it
        return None
    image = _read_input(rec)
    try:
        return store_view(out_dir, key, task, map_rel, amap, image)
    except OSError:
        view = make_view(amap, image)
        return view


def _read_input(rec: dict) -> np.ndarray | None:
    from zsdense.io import read_image_records

    try:
        for r in read_image_records(str(rec.get("input"))):
            if r.suffix == (rec.get("suffix") or ""):
                return r.image
    except Exception:  # noqa: BLE001 - the input moved: the view has no picture
        return None
    return None
