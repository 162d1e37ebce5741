"""Write masks, label maps, float maps and overlays, each one atomically; every result's files.

Every writer goes through :func:`~zsdense.io.atomic.atomic_path` (a temporary file renamed over
the final name once complete: a killed run never leaves a half-written output). Atomic files and
strict JSON live in :mod:`zsdense.io.atomic`, COCO RLE in :mod:`zsdense.io.rle`; both are
re-exported here.

Formats (lossless unless said otherwise):

* ``*.mask.png``: 8-bit grayscale, 0 / 255 (encoded by :mod:`zsdense.io.png`).
* label PNG: palette (``P``) image, one byte per pixel, default palette the PASCAL VOC colormap.
* ``*.map.tiff``: float32 ``(H, W)`` or ``(K, H, W)`` (K pages), uncompressed, via tifffile.
* ``*.npy``: ``np.save`` without pickle.
* ``*.overlay.jpg``: for people only (lossy), heat map / labels / mask outline / legend / caption.
* COCO RLE: ``{"size": [H, W], "counts": str}``, byte-identical to pycocotools' compressed RLE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zsdense.io.atomic import (
    atomic_path,
    current_umask,
    dumps_strict,
    output_mode,
    to_jsonable,
    write_json,
)
from zsdense.io.overlay_text import caption_layout, default_font, draw_caption, draw_legend
from zsdense.io.png import gray8_png
from zsdense.io.rle import as_mask as _as_mask
from zsdense.io.rle import mask_to_rle, rle_to_mask, write_rle_json

__all__ = [
    "atomic_path",
    "current_umask",
    "dumps_strict",
    "output_mode",
    "voc_palette",
    "write_mask_png",
    "write_label_png",
    "write_map_tiff",
    "write_map_npy",
    "write_overlay_jpg",
    "write_outputs",
    "write_result",
    "mask_to_rle",
    "rle_to_mask",
    "write_rle_json",
    "write_json",
    "to_jsonable",
    "jet_colors",
]


# ----------------------------------------------------------------------------------------------
# Masks, label maps, float maps
# ----------------------------------------------------------------------------------------------


# zlib level of the mask / label PNGs: 1 wrote a 480×640 mask in 1.6 ms against 2.6 ms at
# PIL's default 6 (the same pixels; a few KB larger)
PNG_LEVEL = 1
# zlib's run-length strategy for the 0/255 masks: half the file (3.6 against 6.9 KB for a
# 480×640 mask) and a little faster (1.68 against 1.80 ms with the write); label maps keep the
# default strategy (RLE was slower for them)
PNG_MASK_STRATEGY = 3  # Z_RLE


def write_mask_png(path: str | Path, mask: np.ndarray) -> Path:
    """Write a binary mask ``(H, W)`` (bool; non-bool: ``!= 0``) as an 8-bit 0/255 PNG.

    Encoded by :func:`zsdense.io.png.gray8_png` (rows unfiltered, zlib's run-length strategy):
    the same pixels as Pillow's PNG in a third of the time, Pillow's per-row filter search
    being most of its write."""
    m = _as_mask(mask)
    if 0 in m.shape:
        raise ValueError(f"cannot write an empty mask ({m.shape[0]}x{m.shape[1]}) as a PNG")
    data = gray8_png(
        np.multiply(m, np.uint8(255), dtype=np.uint8), level=PNG_LEVEL, strategy=PNG_MASK_STRATEGY
    )
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colormap: ``(n, 3)`` uint8, label ``i``'s colour from its bits shuffled.

    Bit ``3j + c`` of the label sets bit ``7 - j`` of channel ``c`` (0 -> black, 1 -> (128, 0, 0),
    2 -> (0, 128, 0), 3 -> (128, 128, 0), ...).
    """
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def _palette_array(palette: Any, need: int) -> np.ndarray:
    """Palette as ``(256, 3)`` uint8; user entries first, VOC colours for the rest."""
    full = voc_palette(256)
    if palette is None:
        return full
    pal = np.asarray(palette)
    if pal.ndim == 1:
        if pal.size % 3:
            raise ValueError("a flat palette must hold a multiple of 3 values (r, g, b, ...)")
        pal = pal.reshape(-1, 3)
    if pal.ndim != 2 or pal.shape[1] != 3:
        raise ValueError(f"palette must be (K, 3) RGB, got shape {pal.shape}")
    if pal.shape[0] > 256:
        raise ValueError(f"a PNG palette holds at most 256 colours, got {pal.shape[0]}")
    if pal.shape[0] < need:
        raise ValueError(f"palette has {pal.shape[0]} colours but labels go up to {need - 1}")
    if np.issubdtype(pal.dtype, np.floating) and pal.size and float(pal.max()) <= 1.0:
        pal = np.round(pal * 255.0)
    full[: pal.shape[0]] = np.clip(pal, 0, 255).astype(np.uint8)
    return full


def _check_labels(labels: np.ndarray) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {lab.shape}")
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == np.bool_):
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    if lab.size:
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"a label PNG holds labels 0..255 only, got values {lo}..{hi}; "
                "write the label map as .npy or .tiff instead"
            )
    return lab.astype(np.uint8)


def write_label_png(path: str | Path, labels: np.ndarray, palette: Any = None) -> Path:
    """Write an integer label map ``(H, W)`` (0..255) as a palette PNG.

    ``palette``: ``(K, 3)`` RGB (uint8, or floats in [0, 1]) for labels ``0..K-1``; defaults to
    the PASCAL VOC colormap. The pixel values are the labels themselves, so the file reads back
    losslessly with ``np.asarray(Image.open(path))``.
    """
    lab = _check_labels(labels)
    need = int(lab.max()) + 1 if lab.size else 1
    pal = _palette_array(palette, need)
    img = Image.frombytes("P", (lab.shape[1], lab.shape[0]), np.ascontiguousarray(lab).tobytes())
    img.putpalette(pal.reshape(-1).tolist())
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", compress_level=PNG_LEVEL)
    return Path(path)


def write_map_tiff(
    path: str | Path,
    arr: np.ndarray,
    *,
    metadata: dict | None = None,
    compression: str | None = None,
) -> Path:
    """Write a float map ``(H, W)`` or ``(K, H, W)`` as lossless float32 TIFF.

    ``(K, H, W)`` becomes K pages; ``tifffile.imread`` returns the same shape. ``metadata`` (e.g.
    ``{"class_names": [...]}``) is stored as JSON in the image description. Uncompressed by
    default: zlib saved 12 % of a smooth 480×640 map's size at 200× the time (43 ms against
    0.2 ms, the largest per-image cost of a run after the models); ``compression="zlib"`` (any
    ``tifffile`` compression) compresses.
    """
    import tifffile

    a = np.asarray(arr, dtype=np.float32)
    if a.ndim not in (2, 3):
        raise ValueError(f"map must be (H, W) or (K, H, W), got shape {a.shape}")
    md: dict[str, Any] = {"axes": "YX" if a.ndim == 2 else "QYX"}
    if metadata:
        md.update(to_jsonable(metadata))
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, a, photometric="minisblack", compression=compression, metadata=md)
    return Path(path)


def write_map_npy(path: str | Path, arr: np.ndarray) -> Path:
    """Write an array with ``np.save`` (no pickle), atomically; the name is used as given."""
    a = np.asarray(arr)
    if a.dtype == object:
        raise ValueError("object arrays cannot be written without pickle")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, a, allow_pickle=False)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# Overlay (for people)
# ----------------------------------------------------------------------------------------------


def jet_colors(
    x: np.ndarray, out: np.ndarray | None = None, scale: float | None = None
) -> np.ndarray:
    """Jet-like colour map: ``x`` in [0, 1] ``(...)`` -> RGB float ``(..., 3)`` in [0, 1].

    Channel c is ``clip(1.5 − |4x − (3 − c)|, 0, 1)``; computed into ``out`` (float32
    ``(..., 3)``, allocated when None) one channel at a time with in-place float32 operations
    (the same values as the expression, without its temporaries). ``scale``: each colour times
    ``float32(scale)`` as it is stored (an overlay's blend weight: the same products as scaling
    the colours afterwards, one pass fewer)."""
    x4 = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * np.float32(4.0)
    if out is None:
        out = np.empty(x4.shape + (3,), dtype=np.float32)
    t = np.empty_like(x4)
    for c, centre in enumerate((3.0, 2.0, 1.0)):
        np.subtract(x4, np.float32(centre), out=t)
        np.abs(t, out=t)
        np.subtract(np.float32(1.5), t, out=t)
        np.clip(t, 0.0, 1.0, out=t)
        if scale is None:
            out[..., c] = t
        else:
            np.multiply(t, np.float32(scale), out=out[..., c])
    return out


def _resize(a: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    if a.shape[:2] == hw:
        return a
    if nearest:
        ri = (np.arange(hw[0]) * a.shape[0] // hw[0]).clip(0, a.shape[0] - 1)
        ci = (np.arange(hw[1]) * a.shape[1] // hw[1]).clip(0, a.shape[1] - 1)
        return a[ri][:, ci]
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    return np.asarray(img.resize((hw[1], hw[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def _outline(m: np.ndarray, width: int) -> np.ndarray:
    """Inner boundary of a boolean mask, ``width`` pixels thick: the mask less its erosion by
    the 4-neighbour cross, ``width`` times (outside the array counts as background, so the
    edge rows and columns are never inner)."""
    inner = m
    for _ in range(width):
        nxt = np.zeros_like(m)
        c = inner[1:-1, 1:-1]
        nxt[1:-1, 1:-1] = (
            c & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
        )
        inner = nxt
    return m & ~inner


# rows of an overlay computed at once: its float temporaries stay a few MB whatever the image
OVERLAY_STRIP_VALUES = 1 << 19


def _finite_range(h: np.ndarray, step: int) -> tuple[float, float] | None:
    """(min, max) of the finite values of ``h``, strip by strip; None when none is finite."""
    lo, hi = np.inf, -np.inf
    for a in range(0, h.shape[0], step):
        part = h[a : a + step]
        finite = np.isfinite(part)
        if finite.all():
            lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
        elif finite.any():
            vals = part[finite]
            lo, hi = min(lo, float(vals.min())), max(hi, float(vals.max()))
    return None if lo > hi else (lo, hi)


@dataclass
class _Layers:
    """What an overlay blends over its image, each resized to the image (None: not drawn)."""

    heat: np.ndarray | None = None  # (H, W) float32
    lo: float = 0.0  # heat normalisation range
    hi: float = 1.0
    labels: np.ndarray | None = None  # (H, W) uint8
    palette: np.ndarray | None = None  # (256, 3) uint8
    mask: np.ndarray | None = None  # (H, W) bool, drawn as an outline
    width: int = 1  # outline thickness


def write_overlay_jpg(
    path: str | Path,
    image: np.ndarray,
    *,
    heat: np.ndarray | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    labels: np.ndarray | None = None,
    palette: Any = None,
    class_names: Sequence[str] | None = None,
    mask: np.ndarray | None = None,
    mask_color: tuple[int, int, int] = (0, 255, 0),
    caption: str | None = None,
    alpha: float = 0.5,
    quality: int = 90,
    max_legend: int = 20,
) -> Path:
    """Write a human-readable overlay JPEG of ``image`` (``(H, W, 3)`` float in [0, 1]).

    ``heat`` ``(h, w)`` is normalised with ``vmin``/``vmax`` (default: its finite min/max),
    coloured with a jet map and blended with ``alpha``; ``labels`` ``(h, w)`` are blended with
    their ``palette`` colours (VOC by default) and, with ``class_names``, a legend lists the
    classes present (largest first, at most ``max_legend``). ``mask`` gets a coloured outline.
    ``caption`` is drawn in a black strip under the image. Maps of another size are resized to
    the image (bilinear for heat, nearest for labels and mask).

    Memory: the blend runs in strips of rows into one uint8 picture, so a large image costs that
    picture (3 bytes a pixel, plus Pillow's copy) and a few MB of float temporaries, not several
    float copies of the image.
    """
    img = _overlay_image(image)
    hw = (img.shape[0], img.shape[1])
    step = max(1, OVERLAY_STRIP_VALUES // max(1, hw[1] * 3))
    layers = _Layers()
    if heat is not None:
        layers.heat, layers.lo, layers.hi = _heat_layer(heat, hw, vmin, vmax, step)
    legend: list[tuple[str, tuple[int, int, int]]] = []
    if labels is not None:
        layers.labels = _resize(_check_labels(labels), hw, nearest=True)
        lab = layers.labels
        layers.palette = _palette_array(palette, int(lab.max()) + 1 if lab.size else 1)
        if class_names:
            legend = _legend_entries(lab, layers.palette, class_names, max_legend)
    if mask is not None:
        layers.mask = _resize(_as_mask(mask), hw, nearest=True)
        layers.width = max(1, round(min(hw) / 256))
    font_size = max(10, min(hw) // 40)
    font = default_font(font_size)
    strip_h = 0
    if caption:
        lines, line_h, strip_h = caption_layout(caption, font, hw[1])
    rgb = _blend(img, layers, step, strip_h, np.asarray(mask_color, dtype=np.uint8), alpha)
    pil = Image.fromarray(rgb)
    del rgb
    if legend:
        draw_legend(pil, legend, font, font_size)
    if caption:
        draw_caption(pil, hw, lines, line_h, strip_h, font, clear=bool(legend))
    with atomic_path(path) as tmp:
        pil.save(tmp, format="JPEG", quality=int(quality))
    return Path(path)


def _overlay_image(image: np.ndarray) -> np.ndarray:
    """The picture under an overlay as ``(H, W, C)``, C = 3 or 1 (grey, repeated when drawn)."""
    img = np.asarray(image)
    if img.ndim != 2 and (img.ndim != 3 or img.shape[2] != 3):
        raise ValueError(f"image must be (H, W, 3), got shape {img.shape}")
    return img[:, :, None] if img.ndim == 2 else img


def _heat_layer(
    heat: np.ndarray, hw: tuple[int, int], vmin: float | None, vmax: float | None, step: int
) -> tuple[np.ndarray, float, float]:
    """The heat map at the image size and its range (``vmin``/``vmax``, else its finite
    min/max, else [0, 1])."""
    h = _resize(np.asarray(heat, dtype=np.float32), hw, nearest=False)
    rng = _finite_range(h, step) if vmin is None or vmax is None else None
    lo = vmin if vmin is not None else (rng[0] if rng else 0.0)
    hi = vmax if vmax is not None else (rng[1] if rng else 1.0)
    return h, lo, hi


def _legend_entries(
    lab: np.ndarray, pal: np.ndarray, class_names: Sequence[str], max_legend: int
) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of the labels present, largest area first, at most ``max_legend`` and a
    "+N more" line."""
    legend: list[tuple[str, tuple[int, int, int]]] = []
    counts = np.bincount(lab.ravel(), minlength=256)
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    for i in present[:max_legend]:
        name = class_names[i] if i < len(class_names) else f"label {i}"
        legend.append((str(name), tuple(int(v) for v in pal[i])))
    if len(present) > max_legend:
        legend.append((f"+{len(present) - max_legend} more", (0, 0, 0)))
    return legend


def _blend(
    img: np.ndarray, layers: _Layers, step: int, strip_h: int, color: np.ndarray, alpha: float
) -> np.ndarray:
    """The uint8 picture (``strip_h`` black rows below for the caption), ``step`` rows at a
    time: image, then heat, then labels blended with ``alpha``, then the mask outline."""
    hw = (img.shape[0], img.shape[1])
    rgb = np.zeros((hw[0] + strip_h, hw[1], 3), dtype=np.uint8)
    for a in range(0, hw[0], step):
        b = min(hw[0], a + step)
        part = img[a:b].astype(np.float32, copy=False)
        if part.shape[2] == 1:
            part = np.repeat(part, 3, axis=2)
        out = np.clip(part, 0.0, 1.0)  # a new float32 array: blended in place below
        if layers.heat is not None:
            hp = layers.heat[a:b]
            lo, hi = layers.lo, layers.hi
            if hi > lo:
                norm = np.subtract(hp, np.float32(lo), dtype=np.float32)
                norm /= np.float32(hi - lo)
                finite = np.isfinite(hp)
                if not finite.all():
                    norm[~finite] = 0.0
            else:
                norm = np.zeros(hp.shape, np.float32)
            _mix(out, jet_colors(norm, scale=alpha), alpha)
        if layers.labels is not None:
            colours = layers.palette[layers.labels[a:b]].astype(np.float32)
            colours /= np.float32(255.0)
            colours *= np.float32(alpha)
            _mix(out, colours, alpha)
        if not 0.0 <= alpha <= 1.0:
            # else every layer and weight is in [0, 1]: a sum above 1 is at most a few ulps
            # over and still truncates to 255 below, so the clip would change nothing
            np.clip(out, 0.0, 1.0, out=out)
        out *= np.float32(255.0)
        out += np.float32(0.5)
        rgb[a:b] = out  # uint8 assignment truncates, as astype did
        if layers.mask is not None:  # the outline of these rows needs `width` rows around them
            width = layers.width
            a0, b0 = max(0, a - width), min(hw[0], b + width)
            edge = _outline(layers.mask[a0:b0], width)[a - a0 : a - a0 + (b - a)]
            rgb[a:b].reshape(-1, 3)[np.flatnonzero(edge)] = color  # an outline is sparse
    return rgb


def _mix(out: np.ndarray, scaled_layer: np.ndarray, alpha: float) -> None:
    """``out = (1 - alpha) * out + scaled_layer`` in place, ``scaled_layer`` being
    ``float32(alpha) * layer`` already (each layer is scaled as it is made)."""
    out *= np.float32(1.0 - alpha)
    out += scaled_layer


# ---- the one output path of every result --------------------------------------------------


#: Caption suffix of overlays made with random-weight models (``--models tiny`` / ``random``).
RANDOM_WEIGHTS_MARK = "RANDOM WEIGHTS - not meaningful"


def write_outputs(
    stem: str | Path,
    image: np.ndarray,
    *,
    fmt: str = "tiff",
    overlay: bool = True,
    mask: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    float_map: np.ndarray | None = None,
    map_metadata: dict | None = None,
    heat: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    caption: str | None = None,
    random_weights: bool = False,
) -> dict[str, str]:
    """Write one result's files next to ``stem`` (each atomically); ``{kind: path}``.

    ``<stem>.mask.png``: ``labels`` as a palette label PNG, else ``mask`` as 0/255;
    ``<stem>.map.tiff|.npy``: ``float_map`` as float32 by ``fmt`` (``rle`` writes tiff maps,
    ``none`` no map); ``<stem>.overlay.jpg`` with ``heat``, ``labels`` (+ legend), the ``mask``
    outline and ``caption`` when ``overlay``; ``<stem>.rle.json`` for a binary mask with
    ``fmt="rle"``. Result types call this from their ``write`` method: nothing here guesses what
    a result is. ``random_weights`` (the result's meta says the models had random weights) adds
    :data:`RANDOM_WEIGHTS_MARK` to the overlay's caption, so a picture shown without its
    manifest still says it is not meaningful.
    """
    stem = Path(stem)
    outputs: dict[str, str] = {}
    if random_weights:
        caption = f"{caption} | {RANDOM_WEIGHTS_MARK}" if caption else RANDOM_WEIGHTS_MARK
    if labels is not None:
        outputs["mask"] = str(write_label_png(f"{stem}.mask.png", labels))
    elif mask is not None:
        outputs["mask"] = str(write_mask_png(f"{stem}.mask.png", mask))
    if float_map is not None:
        arr = np.asarray(float_map, dtype=np.float32)
        if fmt == "npy":
            outputs["map"] = str(write_map_npy(f"{stem}.map.npy", arr))
        elif fmt in ("tiff", "rle"):
            outputs["map"] = str(write_map_tiff(f"{stem}.map.tiff", arr, metadata=map_metadata))
    if overlay:
        outputs["overlay"] = str(
            write_overlay_jpg(
                f"{stem}.overlay.jpg",
                image,
                heat=heat,
                labels=labels,
                class_names=class_names,
                mask=mask,
                caption=caption,
            )
        )
    if fmt == "rle" and mask is not None and labels is None:
        outputs["rle"] = str(write_rle_json(f"{stem}.rle.json", mask_to_rle(mask)))
    return outputs


def write_result(
    stem: str | Path,
    image: np.ndarray,
    out: Any,
    meta: Mapping[str, Any] | None = None,
    **layers: Any,
) -> dict[str, str]:
    """:func:`write_outputs` as a result type's ``write`` calls it: the map format and the
    overlay switch from ``out`` (an :class:`~zsdense.options.OutputOptions`), the random-weights
    mark from the result's ``meta``; ``layers`` are the rest of its keywords (``mask``,
    ``labels``, ``float_map``, ``heat``, ``caption``, ...)."""
    random_weights = bool((meta or {}).get("random_weights"))
    return write_outputs(
        stem, image, fmt=out.fmt, overlay=out.overlay, random_weights=random_weights, **layers
    )
