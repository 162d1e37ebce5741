"""The text of overlays: the caption strip's wrapped lines and the legend box (Pillow's default
font at a size that follows the image), measured as few times as a line needs."""

from __future__ import annotations

import threading
from typing import Any

from PIL import Image, ImageDraw, ImageFont

_FONTS = threading.local()  # per thread: a FreeType face is not to be shared between threads
FONTS_KEPT = 8  # sizes kept per thread


def default_font(size: int) -> Any:
    """Pillow's default font at ``size``, loaded once per size and thread (loading it took
    0.2 ms, an overlay's whole caption 1.6 ms)."""
    cache = getattr(_FONTS, "by_size", None)
    if cache is None:
        cache = _FONTS.by_size = {}
    font = cache.get(size)
    if font is None:
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: fixed bitmap font
            font = ImageFont.load_default()
        if len(cache) >= FONTS_KEPT:  # images of many sizes: the oldest size goes
            del cache[next(iter(cache))]
        cache[size] = font
    return font


def text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def caption_layout(caption: str, font: Any, width: int) -> tuple[list[str], int, int]:
    """(wrapped lines, line height, strip height) of the caption strip under an overlay."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sizes: dict[str, tuple[int, int]] = {}  # the wrap's measurements serve the heights too
    lines = wrap(caption, probe, font, max(width - 8, 16), sizes)
    line_h = max(measured(sizes, probe, ln or " ", font)[1] for ln in lines) + 4
    return lines, line_h, line_h * len(lines) + 8


def draw_legend(
    pil: Image.Image, legend: list[tuple[str, tuple[int, int, int]]], font: Any, font_size: int
) -> None:
    """A white box in the top-left corner: a colour swatch and a name per line."""
    draw = ImageDraw.Draw(pil)
    pad, sw = 4, font_size
    sizes = [text_size(draw, name, font) for name, _ in legend]
    line_h = max(sw, max(s[1] for s in sizes)) + 2
    box_w = pad * 3 + sw + max(s[0] for s in sizes)
    box_h = pad * 2 + line_h * len(legend)
    draw.rectangle([0, 0, box_w, box_h], fill=(255, 255, 255))
    for k, (name, color_k) in enumerate(legend):
        y = pad + k * line_h
        draw.rectangle([pad, y, pad + sw, y + sw], fill=color_k, outline=(0, 0, 0))
        draw.text((pad * 2 + sw, y), name, fill=(0, 0, 0), font=font)


def draw_caption(
    pil: Image.Image,
    hw: tuple[int, int],
    lines: list[str],
    line_h: int,
    strip_h: int,
    font: Any,
    *,
    clear: bool,
) -> None:
    """The caption's lines in white on the black strip under the image; ``clear`` blackens
    the strip first (a legend taller than the image stops at its bottom edge)."""
    draw = ImageDraw.Draw(pil)
    if clear:
        draw.rectangle([0, hw[0], hw[1], hw[0] + strip_h], fill=(0, 0, 0))
    for k, ln in enumerate(lines):
        draw.text((4, hw[0] + 4 + k * line_h), ln, fill=(255, 255, 255), font=font)


def measured(
    sizes: dict[str, tuple[int, int]], draw: ImageDraw.ImageDraw, text: str, font: Any
) -> tuple[int, int]:
    """``text_size`` of ``text``, measured once per ``sizes``."""
    got = sizes.get(text)
    if got is None:
        got = sizes[text] = text_size(draw, text, font)
    return got


def wrap(
    text: str,
    draw: ImageDraw.ImageDraw,
    font: Any,
    width: int,
    sizes: dict[str, tuple[int, int]] | None = None,
) -> list[str]:
    """Greedy word wrap: each line takes the most words that fit ``width`` (a first word that
    does not fit still makes a line; empty words, from repeated spaces, never start one). A
    line's width grows with every word it takes, so its break is found by bisection, after one
    look at the whole rest (a caption usually fits one line): a few text measurements a line,
    not one per word. ``sizes`` keeps the measurements (text -> (width, height))."""
    sizes = {} if sizes is None else sizes
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        words = para.split(" ")
        n, i = len(words), 0
        while True:
            start = i
            while i < n and not words[i]:
                i += 1
            if i == n:
                if i > start:  # only empty words left: an empty last line, as typed
                    lines.append("")
                break
            lo, hi = i + 1, n  # words[i:lo] is a line (its first word, fitting or not)
            if lo < hi:
                if measured(sizes, draw, " ".join(words[i:hi]), font)[0] <= width:
                    lo = hi
                else:
                    hi -= 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if measured(sizes, draw, " ".join(words[i:mid]), font)[0] > width:
                    hi = mid - 1
                else:
                    lo = mid
            lines.append(" ".join(words[i:lo]))
            i = lo
            if i == n:
                break
    return lines
