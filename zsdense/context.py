"""Per-image state shared by every head: the decoded image and each encoder output once.

A head asks ``ctx.get(key, compute)`` for an encoder output (e.g. ``("sam", "vit_b")`` or
``("clip-dense", arch, size, variant)``); the first head to ask computes it, every later head
(of the same or another task) reuses it. ``ctx.computed`` counts the computations per key so
tests and benchmarks can prove that each encoder ran once per image.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numpy as np

# cache entries that are the image itself (its uint8 pixels: decoded, or rounded from the
# floats), not outputs computed from it: ImageContext.release keeps them
IMAGE_KEYS = ("_u8", "_u8_exact")


@dataclass
class ImageContext:
    image: np.ndarray  # (H, W, 3) float32 RGB in [0, 1]
    meta: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False)
    computed: Counter = field(default_factory=Counter, repr=False)
    # the test-time register setting the cached encoder outputs belong to ("off", or the
    # setting's record as JSON); None until a runtime claims the context (Runtime.context)
    registers: str | None = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def image_u8(self) -> np.ndarray:
        """(H, W, 3) uint8, rounded; what SAM and PIL-based references consume."""
        u8 = self.cache.get("_u8")
        if u8 is None:
            u8 = np.clip(np.round(self.image * 255.0), 0, 255).astype(np.uint8)
            self.cache["_u8"] = u8
        return u8

    @property
    def exact_u8(self) -> np.ndarray | None:
        """The image as uint8 when it is 8-bit-representable (``models.clip.eight_bit``), else
        None; computed once, and then also :attr:`image_u8` (the same pixels)."""
        if "_u8_exact" not in self.cache:
            from zsdense.models.clip import eight_bit

            u8 = eight_bit(self.image)
            self.cache["_u8_exact"] = u8
            if u8 is not None:
                self.cache.setdefault("_u8", u8)
        return self.cache["_u8_exact"]

    @property
    def known_u8(self) -> np.ndarray | None:
        """:attr:`exact_u8` when it is known already (decoded, or found by an earlier head),
        else None; never computes it."""
        return self.cache.get("_u8_exact")

    def decoded_u8(self, u8: np.ndarray | None) -> ImageContext:
        """Record the uint8 pixels the image was decoded from (``image == u8 / 255``, an 8-bit
        file; None: nothing to record), so that :attr:`exact_u8` and :attr:`image_u8` need not
        recover them from the floats: they are the pixels ``eight_bit`` would give back."""
        if u8 is not None:
            if u8.dtype != np.uint8 or u8.shape != self.image.shape:
                raise ValueError(
                    f"decoded pixels {u8.dtype} {u8.shape} do not match the image "
                    f"{self.image.shape}"
                )
            self.cache["_u8_exact"] = u8
            self.cache["_u8"] = u8
        return self

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The cached value for ``key``, computing (and counting) it on first use."""
        if key not in self.cache:
            self.cache[key] = compute()
            self.computed[key] += 1
        return self.cache[key]

    def sam_state(self, sam, *, capture_last_attn: bool = False):
        """SAM's encoding of this image, computed at most once per SAM model.

        A state captured with the last block's attention also serves requests without it.
        """
        key = ("sam", sam.arch)
        state = self.cache.get(key)
        if state is None or (capture_last_attn and state.last_attn is None):
            state = sam.encode(self.image_u8, capture_last_attn=capture_last_attn)
            self.cache[key] = state
            self.computed[key] += 1
        return state

    def release(self) -> None:
        """Drop cached encoder outputs (after every head of this image has run). The image's
        uint8 pixels (:data:`IMAGE_KEYS`) stay: they are the image, not an output, and the
        writes that follow use them (the report's view takes the decoded pixels as they are)."""
        kept = {k: self.cache[k] for k in IMAGE_KEYS if k in self.cache}
        self.cache.clear()
        self.cache.update(kept)
