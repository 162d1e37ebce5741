"""zsdense: zero-shot dense perception on frozen CLIP, DINOv2 and SAM."""

from __future__ import annotations

from zsdense.version import __version__

__all__ = [
    "__version__",
    "Segmenter",
    "segment_anomalies",
    "segment_open_vocab",
    "segment_referring",
    "ZsdenseError",
]


def __getattr__(name: str):
    # Lazy: `import zsdense` must stay cheap (the CLI's --version imports it) and not pull torch.
    if name in ("Segmenter", "segment_anomalies", "segment_open_vocab", "segment_referring"):
        from zsdense import api

        return getattr(api, name)
    if name == "ZsdenseError":
        from zsdense.errors import ZsdenseError

        return ZsdenseError
    raise AttributeError(f"module 'zsdense' has no attribute {name!r}")
