"""JAFAR feature upsampling (Couairon, Chambon et al., 2025): low-resolution ViT features to any
output size, guided by the image. The public face: :class:`Upsampler`, :func:`load_jafar`,
:func:`upsample`, and the names of the parts, re-exported:

- :mod:`zsdense.dense.jafar_model`: the module :class:`JAFAR` (what it computes, its two paths,
  measured memory);
- :mod:`zsdense.dense.jafar_layers`: :class:`JafarConfig`, the layers, the positional encoding;
- :mod:`zsdense.dense.jafar_bands`: banded pooling and GroupNorm statistics of the chunked path;
- :mod:`zsdense.dense.jafar_files`: state dicts and reading upsampler files (written by
  :func:`zsdense.train.checkpoint.save_jafar`: algorithms here take tensors, files are written
  above).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from zsdense.dense.jafar_files import (
    FORMAT,
    META_KEY,
    STATE_DICT_KEY,
    config_from_state_dict,
    jafar_from_state_dict,
    read_jafar_file,
    reference_key_order,
)
from zsdense.dense.jafar_layers import (
    DEFAULT_HEADS,
    DEFAULT_QK_DIM,
    GN_EPS,
    GN_GROUPS,
    ROPE_THETA,
    JafarConfig,
    image_coords,
    rope_init,
)
from zsdense.dense.jafar_model import (
    DEFAULT_CHUNK_BYTES,
    IMAGE_BAND_BYTES,
    JAFAR,
    MEASURED_PEAK_MB,
    QUERY_CHUNK,
)
from zsdense.errors import ConfigError, WeightsError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_HEADS",
    "DEFAULT_QK_DIM",
    "FORMAT",
    "GN_EPS",
    "GN_GROUPS",
    "IMAGE_BAND_BYTES",
    "JAFAR",
    "JafarConfig",
    "MEASURED_PEAK_MB",
    "META_KEY",
    "QUERY_CHUNK",
    "ROPE_THETA",
    "STATE_DICT_KEY",
    "Upsampler",
    "config_from_state_dict",
    "image_coords",
    "jafar_from_state_dict",
    "load_jafar",
    "read_jafar_file",
    "reference_key_order",
    "rope_init",
    "upsample",
]


@dataclass
class Upsampler:
    """A loaded JAFAR upsampler and what it was trained on.

    ``backbone``: the features it was trained on (a timm model name for the released files, a
    zsdense encoder id for files zsdense trained; None if the file does not say).
    ``encoder``: the zsdense encoder id (:func:`zsdense.models.jafar_backbone.encoder_id`) whose
    features those are, or None when no zsdense encoder computes them.
    """

    module: JAFAR
    source: str
    backbone: str | None = None
    encoder: str | None = None
    released: bool = False

    @property
    def feature_dim(self) -> int:
        return self.module.config.v_dim

    def to(self, device) -> Upsampler:
        self.module.to(device)
        return self

    def check_encoder(self, encoder, *, allow_other_backbone: bool = False) -> None:
        """WeightsError unless ``encoder`` gives the features this upsampler was trained on.

        The width must match (nothing else could run); the backbone must match where it is
        known, unless ``allow_other_backbone`` (features of another distribution: it runs, the
        result is not what the upsampler was trained for)."""
        from zsdense.models.jafar_backbone import encoder_id, encoder_width

        width, eid = encoder_width(encoder), encoder_id(encoder)
        trained = self.backbone or "an unrecorded backbone"
        if width != self.feature_dim:
            raise WeightsError(
                f"{self.source}: this JAFAR upsampler takes {self.feature_dim}-channel features "
                f"(trained on {trained}); the encoder {eid} gives {width}-channel features. Use "
                f"an upsampler made for this encoder or train one: zsdense train-upsampler DATA "
                f"--backbone NAME --out RUN"
            )
        if allow_other_backbone:
            return
        if self.released and self.encoder is None:
            raise WeightsError(
                f"{self.source}: this upsampler was trained on the features of timm's "
                f"{self.backbone}, which no zsdense encoder computes; {eid} gives features of "
                f"another distribution. Train an upsampler for it (zsdense train-upsampler) or "
                f"allow another backbone explicitly"
            )
        if self.encoder is not None and self.encoder != eid:
            raise WeightsError(
                f"{self.source}: this upsampler was trained on the features of {self.encoder}"
                + (f" (timm {self.backbone})" if self.released else "")
                + f", not of {eid}. Use the upsampler made for this encoder, train one "
                f"(zsdense train-upsampler), or allow another backbone explicitly"
            )

    def __call__(self, image_norm, features, output_size, values=None) -> torch.Tensor:
        return upsample(self, image_norm, features, output_size, values=values)


def _release(name: str):
    from zsdense.models.weights_table import JAFAR as TABLE

    for rel in TABLE:
        if rel.name == name:
            return rel
    return None


def load_jafar(
    spec: str | Path,
    *,
    encoder=None,
    weights_dir: str | None = None,
    download: bool | None = None,
    device: str | torch.device = "cpu",
    allow_other_backbone: bool = False,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
) -> Upsampler:
    """A JAFAR upsampler from a registry name (``jafar-dinov2-small``...: found, downloaded and
    hash-checked like every checkpoint, ``--weights-dir`` / ``--offline`` apply) or a file
    (released ``.pth`` layout or zsdense ``.safetensors``). With ``encoder``, refuse an
    upsampler trained for another width or backbone (:meth:`Upsampler.check_encoder`)."""
    from zsdense.models.weights_table import JAFAR as TABLE

    rel = _release(str(spec))
    if rel is not None:
        from zsdense.models import registry

        path = registry.resolve(rel.name, weights_dir=weights_dir, download=download)
        sd, meta = read_jafar_file(path)
        source = f"{path} ({rel.name})"
        model = jafar_from_state_dict(sd, source, num_heads=DEFAULT_HEADS, chunk_bytes=chunk_bytes)
        if model.config.v_dim != rel.feature_dim:
            raise WeightsError(
                f"{source}: holds an upsampler for {model.config.v_dim}-channel features, but "
                f"{rel.name} is the one for {rel.feature_dim}-channel {rel.backbone} features: "
                f"the file is another checkpoint; replace it"
            )
        from zsdense.models.jafar_backbone import registry_encoder_id

        enc = registry_encoder_id(rel.encoder) if rel.encoder else None
        up = Upsampler(model, source, rel.backbone, enc, released=True)
    else:
        p = Path(spec).expanduser()
        if not p.is_file():
            known = ", ".join(r.name for r in TABLE)
            raise ConfigError(
                f"upsampler {spec!r}: neither a file nor a registered upsampler (known: {known})"
            )
        sd, meta = read_jafar_file(p)
        heads = meta.get("num_heads")
        model = jafar_from_state_dict(sd, str(p), num_heads=heads, chunk_bytes=chunk_bytes)
        up = Upsampler(model, str(p), meta.get("backbone"), meta.get("backbone"))
    up.to(device)
    if encoder is not None:
        up.check_encoder(encoder, allow_other_backbone=allow_other_backbone)
    return up


def upsample(
    upsampler: Upsampler | JAFAR,
    image_norm: torch.Tensor,
    features: torch.Tensor,
    output_size,
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """High-resolution features (B, Cv, Ho, Wo) of low-resolution ``features`` (B, Cv, h, w).

    ``image_norm`` (B, 3, H, W) is the image normalised with the encoder's mean/std, the same
    tensor (or the same image at the same size) the encoder computed ``features`` from;
    ``features`` are what the upsampler was trained on
    (:func:`zsdense.models.jafar_backbone.jafar_features`). ``values`` (B, D, h, w): other maps
    on the same grid (a preset's own dense features, projected features, scores) to carry to
    the output size with the attention computed from ``features``. The output is float32 (the
    upsampler's dtype), memory-bounded at any output size.
    """
    module = upsampler.module if isinstance(upsampler, Upsampler) else upsampler
    with torch.no_grad():
        return module.forward_chunked(image_norm, features, output_size, values=values)
