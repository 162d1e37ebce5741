"""Feature upsamplers: ``--upsampler bilinear|jafar[:FILE]`` for the presets whose scores come
from the dense patch features of an encoder.

Every map zsdense makes comes from a patch grid (14 or 16 px per cell). ``bilinear`` (the
default) is what each preset's reference does: scores computed on the grid, then bilinear to the
image; it runs the presets' own code, unchanged. A learned upsampler (JAFAR, Couairon, Chambon
et al., 2025: :mod:`zsdense.dense.jafar`) instead brings the *features* to a finer grid
(``scale`` × the patch grid), guided by the image, before the preset scores them; what each
preset does with the finer features is documented with the preset (README "Feature
upsampling").

Upsamplers are a registry (:data:`UPSAMPLERS`; built-ins are files of ``zsdense.methods``, plug-ins
register through the ``zsdense.methods`` entry-point group): an entry names how it is loaded
for an encoder. The option's text is parsed once (:func:`parse_upsampler`, called by the task
options); the upsampler is loaded once per runtime and encoder (:func:`load_upsampler`, at a
run's setup) and then applied per image (:meth:`LoadedUpsampler.by_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from zsdense.errors import ConfigError
from zsdense.plugins import Registry

BILINEAR = "bilinear"
#: ``--upsampler-scale`` when not given: the finer grid, in cells per patch along each side.
#: Anomaly (AnomalyDINO): the nearest-neighbour search grows with scale² (the test patches),
#: so 2; open vocabulary: the text similarity is cheap next to the upsampler's image pass, 4
#: (Trident, whose canvas is then resampled to SAM's token grid: 2).
DEFAULT_SCALE = {"anomaly": 2, "openvocab": 4, "openvocab-splice-then-segment": 2}
MAX_SCALE = 16

__all__ = [
    "BILINEAR",
    "DEFAULT_SCALE",
    "FeatureUpsampler",
    "LoadedUpsampler",
    "UPSAMPLERS",
    "UpsamplerSpec",
    "check_scale",
    "load_upsampler",
    "parse_upsampler",
    "register_upsampler",
    "upsampler_names",
]


@dataclass(frozen=True)
class UpsamplerSpec:
    """A parsed ``--upsampler`` value: a registered name and, for those that take one, a file."""

    name: str
    file: str | None = None

    @property
    def text(self) -> str:
        return self.name if self.file is None else f"{self.name}:{self.file}"

    @property
    def is_bilinear(self) -> bool:
        return self.name == BILINEAR


@dataclass(frozen=True)
class FeatureUpsampler:
    """One registered upsampler.

    ``load(rt, spec, encoder) -> LoadedUpsampler`` makes it for an encoder (None: nothing to
    load, the presets' own bilinear path); ``takes_file`` / ``needs_file``: whether ``NAME:FILE``
    is accepted / required.
    """

    name: str
    load: Callable[[Any, UpsamplerSpec, Any], LoadedUpsampler] | None
    description: str = ""
    takes_file: bool = False
    needs_file: bool = False


UPSAMPLERS: Registry[FeatureUpsampler] = Registry(
    "feature upsampler",
    {
        BILINEAR: FeatureUpsampler(
            BILINEAR,
            None,
            "scores on the patch grid, then bilinear to the image (the references; default)",
        )
    },
)


def register_upsampler(entry: FeatureUpsampler, *, replace: bool = False) -> FeatureUpsampler:
    """Add ``entry`` under its name (taken: ConfigError unless ``replace``)."""
    if not isinstance(entry, FeatureUpsampler):
        raise ConfigError(f"register_upsampler needs a FeatureUpsampler, got {type(entry)}")
    if UPSAMPLERS.registered(entry.name) and not replace:
        raise ConfigError(f"a feature upsampler named {entry.name!r} is already registered")
    if not entry.name or ":" in entry.name:
        raise ConfigError(f"feature upsampler name {entry.name!r}: non-empty, without ':'")
    UPSAMPLERS[entry.name] = entry
    return entry


def upsampler_names() -> list[str]:
    """``bilinear, jafar[:FILE], ...`` as the option's help and errors show them."""
    out = []
    for name, e in UPSAMPLERS.items():
        out.append(name + (":FILE" if e.needs_file else "[:FILE]" if e.takes_file else ""))
    return out


def parse_upsampler(value: Any) -> UpsamplerSpec:
    """The ``--upsampler`` text (``bilinear``, ``jafar``, ``jafar:FILE``) parsed and checked:
    a registered name, a file only where the upsampler takes one, and the file present."""
    if isinstance(value, UpsamplerSpec):
        return value
    text = str(value if value is not None else BILINEAR).strip()
    name, colon, file = text.partition(":")
    name = name.strip().lower()
    if name not in UPSAMPLERS:
        raise ConfigError(
            f"--upsampler {text!r}: unknown upsampler {name!r}; choose one of: "
            f"{', '.join(upsampler_names())}"
        )
    entry = UPSAMPLERS[name]
    file = file.strip() if colon else None
    if colon and not file:
        raise ConfigError(f"--upsampler {text!r}: give a file after ':' ({name}:FILE)")
    if file is not None and not entry.takes_file:
        raise ConfigError(f"--upsampler {name} takes no file (got {text!r})")
    if file is None and entry.needs_file:
        raise ConfigError(f"--upsampler {name} needs a file: {name}:FILE")
    if file is not None:
        p = Path(file).expanduser()
        if not p.is_file():
            raise ConfigError(
                f"--upsampler {text!r}: {p} is not a file (an upsampler from `zsdense "
                f"train-upsampler`: RUN/upsampler.safetensors, or a released .pth)"
            )
        file = str(p)
    return UpsamplerSpec(name, file)


def check_scale(scale: Any, spec: UpsamplerSpec) -> int | None:
    """``--upsampler-scale``: an integer in 1..MAX_SCALE, only with an upsampler other than
    bilinear (None: the preset family's default)."""
    if scale is None:
        return None
    ok = isinstance(scale, int) and not isinstance(scale, bool)
    if isinstance(scale, str) and scale.strip().isdigit():
        scale, ok = int(scale), True
    if not ok:
        raise ConfigError(f"--upsampler-scale must be an integer, got {scale!r}")
    s = int(scale)
    if spec.is_bilinear:
        raise ConfigError("--upsampler-scale applies to a learned upsampler (--upsampler jafar)")
    if not 1 <= s <= MAX_SCALE:
        raise ConfigError(f"--upsampler-scale must be in 1..{MAX_SCALE}, got {s}")
    return s


# ---- loaded upsamplers ------------------------------------------------------------------------


@dataclass
class LoadedUpsampler:
    """An upsampler made for one encoder: ``by_scale`` brings maps on that encoder's patch grid
    to ``scale`` × the grid.

    ``apply(x_norm, values, out_hw)`` (the entry's own function) takes the image batch as the
    encoder sees it (normalised with its mean/std; sides multiples of its patch) and maps on any
    grid (resized to the encoder's grid first), and returns them at ``out_hw`` (float32).
    ``record`` is what results and meta record about it.
    """

    name: str
    spec: UpsamplerSpec
    encoder: Any
    apply: Callable[[Any, Any, tuple[int, int]], Any]
    record: dict = field(default_factory=dict)

    @property
    def patch_size(self) -> int:
        return int(self.encoder.patch_size)

    def by_scale(self, x_norm, values, scale: int):
        """``values`` (B, D, h, w) -> (B, D, ceil(H·s/p), ceil(W·s/p)): the maps at ``scale``
        cells per patch over the image ``x_norm`` (B, 3, H, W). Sides that are not multiples of
        the patch ``p`` are padded (zeros: the mean colour) for the upsampler, and the rows and
        columns of the padding cut from its output."""
        import torch.nn.functional as F

        p = self.patch_size
        s = int(scale)
        h, w = int(x_norm.shape[-2]), int(x_norm.shape[-1])
        hp, wp = math.ceil(h / p) * p, math.ceil(w / p) * p
        if (hp, wp) != (h, w):
            x_norm = F.pad(x_norm, (0, wp - w, 0, hp - h))
        out = self.apply(x_norm, values, (s * hp // p, s * wp // p))
        return out[..., : math.ceil(h * s / p), : math.ceil(w * s / p)]


def load_upsampler(rt, spec: Any, encoder) -> LoadedUpsampler | None:
    """The upsampler ``spec`` made for ``encoder`` (None for ``bilinear``), once per runtime:
    kept in ``rt.memo`` under the spec, the encoder and the file's size and time, so a run's
    setup loads it and every image (and every later call) reuses it."""
    spec = parse_upsampler(spec)
    entry = UPSAMPLERS.lookup(spec.name)
    if entry.load is None:
        return None
    stamp = None
    if spec.file is not None:
        st = Path(spec.file).stat()
        stamp = (st.st_size, st.st_mtime_ns)
    key = ("feature-upsampler", spec.text, stamp, id(encoder), str(getattr(rt, "device", "")))
    return rt.memo(key, lambda: entry.load(rt, spec, encoder))


# ---- JAFAR ------------------------------------------------------------------------------------


def released_upsampler_for(encoder, rt=None) -> str:
    """The registry name of the released JAFAR upsampler trained on ``encoder``'s features
    (``jafar-dinov2-small`` for DINOv2 ViT-S/14...), or a ConfigError saying which encoders
    have one and how to train one for this encoder."""
    from zsdense.models.jafar_backbone import encoder_id, registry_encoder_id
    from zsdense.models.weights_table import JAFAR as TABLE

    eid = encoder_id(encoder)
    for rel in TABLE:
        if rel.encoder and registry_encoder_id(rel.encoder) == eid:
            return rel.name
    fitting = ", ".join(f"{r.name} ({r.encoder})" for r in TABLE if r.encoder)
    backbone = _backbone_name(encoder)
    train = (
        f"train one on your images: zsdense train-upsampler DATA --backbone {backbone} --out RUN"
        f"{' --models ' + rt.config.models if rt is not None and rt.random_weights else ''}, "
        f"then --upsampler jafar:RUN/upsampler.safetensors"
    )
    if rt is not None and rt.random_weights:
        raise ConfigError(
            f"--upsampler jafar: the released JAFAR upsamplers fit the real weights of their "
            f"encoders; --models {rt.config.models} has random weights ({eid}). Give a file "
            f"made for them: {train}"
        )
    why = ""
    if eid.startswith("clip:"):
        why = (
            " (the released CLIP upsampler was trained on timm's LAION-2B CLIP ViT-B/16 "
            "fine-tuned on ImageNet, not on OpenAI's or open_clip's zero-shot CLIP)"
        )
    raise ConfigError(
        f"--upsampler jafar: no released JAFAR upsampler fits {eid}{why}; released ones fit: "
        f"{fitting}. {train[0].upper()}{train[1:]}"
    )


def _backbone_name(encoder) -> str:
    """The ``--backbone`` of ``zsdense train-upsampler`` that loads ``encoder``."""
    from zsdense.models.jafar_backbone import encoder_kind

    if encoder_kind(encoder) == "dinov2":
        name = str(encoder.name)
        return name[len("tiny-") :] if name.startswith("tiny-") else name
    wn = getattr(encoder, "weights_name", None)
    return wn or f"clip-{encoder.arch}-openai"


class _JafarApply:
    """``(x_norm, values, out_hw) -> values at out_hw``: the encoder's JAFAR features of the
    image (what the upsampler was trained on) give the attention, applied to ``values``.

    Runs at the runtime's precision: float32, or a copy of the module in bf16 / fp16 (made
    once), outside autocast (the memory-bounded path writes into preallocated buffers).
    """

    def __init__(self, upsampler, encoder, dtype) -> None:
        self.upsampler = upsampler
        self.encoder = encoder
        self.dtype = dtype
        self._copies: dict = {}

    def module(self):
        import copy

        import torch

        base = self.upsampler.module
        if self.dtype == torch.float32:
            return base
        if self.dtype not in self._copies:
            self._copies[self.dtype] = copy.deepcopy(base).to(self.dtype)
        return self._copies[self.dtype]

    def __call__(self, x_norm, values, out_hw):
        import torch
        import torch.nn.functional as F

        from zsdense.models.jafar_backbone import jafar_features

        feats = jafar_features(self.encoder, x_norm)
        if tuple(values.shape[-2:]) != tuple(feats.shape[-2:]):
            values = F.interpolate(
                values.float(), size=tuple(feats.shape[-2:]), mode="bilinear", align_corners=False
            )
        mod = self.module()
        dev, dt = mod.rope.freqs.device, mod.rope.freqs.dtype
        with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):
            out = mod.forward_chunked(
                x_norm.to(dev, dt), feats.to(dev, dt), out_hw, values=values.to(dev, dt)
            )
        return out.float()


def load_jafar_upsampler(rt, spec: UpsamplerSpec, encoder) -> LoadedUpsampler:
    """JAFAR for ``encoder``: ``jafar`` = the released upsampler for it (the registry:
    ``--weights-dir``, ``--offline``; downloaded only when missing and allowed), ``jafar:FILE``
    = a file (released ``.pth`` layout or ``zsdense train-upsampler``'s ``.safetensors``).
    A file made for another feature width or (where the file records it) another backbone is
    a WeightsError here, at setup."""
    from zsdense.dense.jafar import load_jafar
    from zsdense.models import registry
    from zsdense.models.jafar_backbone import encoder_id
    from zsdense.runtime import precision_name

    cfg = rt.config
    if spec.file is None:
        name = released_upsampler_for(encoder, rt)
        up = load_jafar(
            name,
            encoder=encoder,
            weights_dir=cfg.weights_dir,
            download=cfg.download,
            device=rt.device,
        )
        path = registry.resolve(name, weights_dir=cfg.weights_dir, download=False)
    else:
        up = load_jafar(spec.file, encoder=encoder, device=rt.device)
        name, path = None, Path(spec.file)
    mc = up.module.config
    record = {
        "upsampler": spec.name,
        "file": str(path),
        "release": name,
        "sha256": registry.sha256_file(path),
        "trained_on": up.backbone,
        "encoder": encoder_id(encoder),
        "qk_dim": mc.qk_dim,
        "heads": mc.num_heads,
        "precision": precision_name(rt.dtype),
    }
    return LoadedUpsampler(spec.name, spec, encoder, _JafarApply(up, encoder, rt.dtype), record)
