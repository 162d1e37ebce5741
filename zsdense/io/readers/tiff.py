"""TIFF: tifffile first (16-bit RGB, float, many samples, planar data), Pillow as fallback.

**Pages.** A multi-page TIFF whose pages all have the same shape and dtype is an image *stack*
(microscopy, CT exports): it gives one record per page, suffix ``.pNNN`` (0-based, at least three
digits), with ``meta["page"]`` and ``meta["pages_in_file"]``, and ``max_pixels`` bounds the pixels
of the whole stack. Every page is decoded by the same rules as the first (declared bit depth,
palette, MINISWHITE, CMYK, orientation), so a 12-bit stack is divided by 4095 on every page.
Pages of different shapes (a full image plus its thumbnail or pyramid levels) keep the first page
only, with a warning; so do TIFFs that only Pillow can decode (missing codec, YCbCr, CIELab).
A single-page TIFF gives one record with suffix ``""``.

**Channels.** A page with C samples per pixel is one image of C channels (contiguous or planar).
An H×W×C array saved by ``tifffile.imwrite`` is stored, unless C is 3 or 4, as H pages of W×C
pixels with its shape in the ImageDescription (a "shaped" file); such a file is read as **one
H×W×C image** when its declared axes are ``YXC`` / ``YXS``, or, with no axes declared, when C
is 2..:data:`MAX_ARRAY_CHANNELS` and smaller than H and W (a channel axis is the short one). A
stack of pages is still a stack: pages written one by one, ImageJ stacks, or a shaped file that
declares other axes (``metadata={"axes": "ZYX"}``). Channels then become RGB by the one rule of
:func:`~zsdense.io.readers.common.to_rgb` (1: grey, 2: the first as grey, 3: RGB, 4 and more:
the first three), recorded in ``meta["channels"]`` / ``meta["channels_used"]`` with a warning
naming what was dropped (an extra sample declared alpha is dropped silently).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from zsdense.errors import InputError
from zsdense.io.readers.common import (
    ImageRecord,
    base_meta,
    check_pixels,
    digits,
    finish,
    orient,
    scale_array,
)
from zsdense.io.readers.pil import read_pil_file

#: Photometric interpretations decoded here; others (YCbCr, CIELab, ...) go through Pillow.
_OWN_PHOTOMETRIC = (0, 1, 2, 3, 5)
#: The most channels an undeclared trailing axis of a shaped H×W×C file may have to be channels.
MAX_ARRAY_CHANNELS = 16


def _array_channels(tif: Any) -> int | None:
    """C when the file is one H×W×C array stored as H pages of W×C (a tifffile "shaped" file
    whose axes say so, or say nothing and C is a short trailing axis); else None (pages)."""
    try:
        shaped = tif.shaped_metadata if tif.is_shaped else None
    except Exception:  # noqa: BLE001 - unreadable metadata: read the pages as they are
        return None
    if not shaped or len(tif.series) != 1 or not isinstance(shaped[0], dict):
        return None
    shape = shaped[0].get("shape")
    if not isinstance(shape, list) or len(shape) != 3:
        return None
    h, w, c = (int(v) for v in shape)
    page = tif.pages.first
    if len(tif.pages) != h or tuple(page.shape) != (w, c) or int(page.samplesperpixel) != 1:
        return None
    if int(page.photometric) not in (0, 1):  # grey pages only (no palette, no RGB)
        return None
    axes = str(shaped[0].get("axes") or "").upper()
    if axes in ("YXC", "YXS"):
        declared = True
    elif axes in ("", "QYX"):
        declared = False
    else:
        return None  # declared pages (ZYX, TYX, IYX, ...)
    if declared:
        return c  # more than MAX_ARRAY_CHANNELS: refused by _array_image, naming the limit
    return c if 2 <= c <= MAX_ARRAY_CHANNELS and c < min(h, w) else None


def _is_alpha(page: Any) -> bool:
    """Whether the page's extra sample is declared alpha (ExtraSamples 1 or 2)."""
    try:
        return any(int(e) in (1, 2) for e in page.extrasamples)
    except (TypeError, ValueError, AttributeError):
        return False


def _bits(page: Any) -> int:
    bps = page.bitspersample
    return int(bps[0] if isinstance(bps, tuple) else bps)


def _orientation(page: Any) -> int:
    tag = page.tags.get("Orientation")
    if tag is None:
        return 1
    try:
        return int(tag.value)
    except (TypeError, ValueError):
        return 1


def _samples(page: Any) -> tuple[np.ndarray, str, Any]:
    """A page's raw samples, its tifffile axes and its colour map (or None); may raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = page.asarray()
    colormap = page.colormap if int(page.photometric) == 3 else None
    return arr, page.axes, colormap


def _scale_page(
    arr: np.ndarray, axes: str, colormap: Any, photometric: int, bits: int, meta: dict, warn: list
) -> tuple[np.ndarray, str]:
    """Raw page samples -> (H, W[, C]) float32 in [0, 1] and the scaling description."""
    # Bring samples last: axes like "YX", "YXS", "SYX" (planar), possibly with "Z" (depth).
    if "Z" in axes:
        arr = np.take(arr, 0, axis=axes.index("Z"))
        axes = axes.replace("Z", "")
        warn.append("3D TIFF page: only the first depth plane is used")
    if "S" in axes and axes.index("S") != len(axes) - 1:
        arr = np.moveaxis(arr, axes.index("S"), -1)
    meta["dtype"] = str(arr.dtype)
    meta["bits"] = bits
    meta["photometric"] = int(photometric)
    if photometric == 3 and colormap is not None:  # palette: (3, 2**bits) uint16 colour map
        cmap = np.asarray(colormap, dtype=np.float64)
        denom = 65535.0 if cmap.max() > 255 else 255.0
        x = (cmap[:, arr.astype(np.intp)] / denom).transpose(1, 2, 0).astype(np.float32)
        return x, f"palette/{int(denom)}"
    if arr.dtype == np.bool_ or bits == 1:
        x, scaling = arr.astype(np.float32), "bool"
    else:
        x, scaling = scale_array(arr, warn, bits=bits)
    if photometric == 0:  # MINISWHITE
        x = 1.0 - x
        scaling += ",inverted"
    elif photometric == 5:  # SEPARATED (CMYK, inkset 1)
        if x.ndim == 3 and x.shape[2] >= 4:
            k = x[:, :, 3:4]
            x = (1.0 - x[:, :, :3]) * (1.0 - k)
            scaling += ",cmyk"
        else:
            warn.append("SEPARATED TIFF without 4 inks: read as plain samples")
    elif photometric not in _OWN_PHOTOMETRIC:
        warn.append(f"photometric interpretation {photometric} read as plain samples")
    return x, scaling


def _record(
    path: Path,
    x: np.ndarray,
    scaling: str,
    orientation: int,
    meta: dict,
    warn: list[str],
    page: int | None = None,
    n_pages: int = 1,
    alpha: bool = False,
) -> ImageRecord:
    meta["scaling"] = scaling
    meta["orientation"] = orientation
    x = orient(x.astype(np.float32, copy=False), orientation)
    suffix = f".p{page:0{digits(n_pages)}d}" if page is not None else ""
    rec = finish(x, meta, warn, suffix, alpha=alpha)
    if page is not None:
        rec.meta["page"] = page
    return rec


def _pillow_fallback(path: Path, max_pixels: int | None, exc: Exception, bits: int) -> ImageRecord:
    """First page through Pillow when tifffile cannot decode it (e.g. a missing codec)."""
    try:
        rec = read_pil_file(path, "tiff", max_pixels)
    except InputError as exc2:
        raise InputError(path, f"cannot decode TIFF data: {exc} (Pillow: {exc2.problem})") from exc
    rec.meta["warnings"].append(f"decoded with Pillow (tifffile: {exc})")
    if bits > 8 and rec.meta.get("bits") == 8:
        rec.meta["warnings"].append(
            f"{bits}-bit samples reduced to 8 bits by Pillow; install 'imagecodecs' "
            "to read this TIFF at full precision"
        )
    return rec


def iter_tiff(path: Path, max_pixels: int | None) -> Iterator[ImageRecord]:
    """Yield the records of a TIFF file: one per page of a stack, else the first page only.

    Pages after the first are decoded lazily, while the file stays open.
    """
    try:
        import tifffile
    except ImportError:  # core dependency, but keep a working path through Pillow
        yield read_pil_file(path, "tiff", max_pixels)
        return

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error...
        raise InputError(path, f"cannot read TIFF header: {exc}") from exc
    with tif:
        if not len(tif.pages):
            raise InputError(path, "TIFF file holds no image")
        page = tif.pages.first
        n_channels = _array_channels(tif)
        if n_channels is not None:
            yield _array_image(path, tif, n_channels, max_pixels)
            return
        h, w = int(page.imagelength), int(page.imagewidth)
        check_pixels(path, h * w * max(1, int(page.imagedepth)), max_pixels)
        n_pages = len(tif.pages)
        photometric = int(page.photometric)
        bits = _bits(page)
        try:
            arr, axes, colormap = _samples(page)
        except Exception as exc:  # missing codec (LZW, JPEG without imagecodecs), corrupt strips
            yield _pillow_fallback(path, max_pixels, exc, bits)
            return
        if photometric not in _OWN_PHOTOMETRIC:  # YCbCr, CIELab, ...: let Pillow convert
            first = None
        else:
            pages = list(tif.pages) if n_pages > 1 else [page]
            stack = len(pages) > 1 and len({(p.shape, str(p.dtype)) for p in pages}) == 1
            if stack and max_pixels is not None and n_pages * h * w > max_pixels:
                raise InputError(
                    path,
                    f"TIFF stack has {n_pages * h * w:,} pixels, more than the limit of "
                    f"{max_pixels:,}; raise --max-pixels if the file is trusted",
                )
            warn: list[str] = []
            meta = base_meta(path, "tiff")
            x, scaling = _scale_page(arr, axes, colormap, photometric, bits, meta, warn)
            del arr
            if n_pages > 1:
                meta["pages_in_file"] = n_pages
                if not stack:
                    warn.append(f"file holds {n_pages} pages; only the first is used")
            first = _record(
                path,
                x,
                scaling,
                _orientation(page),
                meta,
                warn,
                0 if stack else None,
                n_pages,
                alpha=_is_alpha(page),
            )
        if first is not None:
            yield first
            if stack:
                yield from _later_pages(path, pages, n_pages)
            return
    yield read_pil_file(path, "tiff", max_pixels)


def _later_pages(path: Path, pages: list, n_pages: int) -> Iterator[ImageRecord]:
    """Pages 1.. of a stack, each decoded by the rules of the first."""
    for i, page in enumerate(pages[1:], start=1):
        try:
            arr, axes, colormap = _samples(page)
        except Exception as exc:  # noqa: BLE001 - one bad page fails the file, with its index
            raise InputError(path, f"cannot decode TIFF page {i}: {exc}") from exc
        warn: list[str] = []
        meta = base_meta(path, "tiff")
        x, scaling = _scale_page(
            arr, axes, colormap, int(page.photometric), _bits(page), meta, warn
        )
        meta["pages_in_file"] = n_pages
        yield _record(
            path, x, scaling, _orientation(page), meta, warn, i, n_pages, alpha=_is_alpha(page)
        )


def _array_image(path: Path, tif: Any, n_channels: int, max_pixels: int | None) -> ImageRecord:
    """The one H×W×C image of a shaped file whose pages are its rows (:func:`_array_channels`)."""
    series = tif.series[0]
    h, w = int(series.shape[0]), int(series.shape[1])
    if n_channels > MAX_ARRAY_CHANNELS:
        raise InputError(
            path,
            f"TIFF declares an image of {h}×{w} pixels with {n_channels} channels; at most "
            f"{MAX_ARRAY_CHANNELS} channels are read (the first three are used): save those",
        )
    check_pixels(path, h * w, max_pixels)
    page = tif.pages.first
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = series.asarray()
    except Exception as exc:  # noqa: BLE001 - a missing codec, corrupt strips
        raise InputError(path, f"cannot decode TIFF data: {exc}") from exc
    warn = [
        f"an H×W×C array ({h}×{w}×{n_channels}) stored as {h} pages of {w}×{n_channels}: "
        f"read as one image with {n_channels} channels"
    ]
    meta = base_meta(path, "tiff")
    x, scaling = _scale_page(arr, "YXS", None, int(page.photometric), _bits(page), meta, warn)
    meta["channel_axis"] = "last axis of the stored array"
    return _record(path, x, scaling, 1, meta, warn)
