"""DINOv2 (with or without registers) through transformers: patch features on any grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zsdense.errors import WeightsError
from zsdense.models.weights_table import DINOV2 as DINOV2_TABLE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_SEED = 1

# registry name -> HF hub id (from the weights table: one list of DINOv2 checkpoints)
DINOV2_MODELS = {name: repo for name, repo, _sha in DINOV2_TABLE}

# published architectures by size: (width, layers, heads, SwiGLU FFN)
_SIZES = {
    "small": (384, 12, 6, False),
    "base": (768, 12, 12, False),
    "large": (1024, 24, 16, False),
    "giant": (1536, 40, 24, True),
}


@dataclass
class DinoModel:
    """A transformers DINOv2 model; patches start at ``1 + num_registers`` in its tokens."""

    model: torch.nn.Module
    name: str
    is_random: bool = False

    @property
    def patch_size(self) -> int:
        return int(self.model.config.patch_size)

    @property
    def num_registers(self) -> int:
        return int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> DinoModel:
        self.model.to(device)
        return self

    def normalize(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """[0,1] RGB -> ImageNet-normalised input."""
        mean = torch.tensor(IMAGENET_MEAN, device=images_bchw.device, dtype=images_bchw.dtype)
        std = torch.tensor(IMAGENET_STD, device=images_bchw.device, dtype=images_bchw.dtype)
        return (images_bchw - mean[:, None, None]) / std[:, None, None]

    @torch.no_grad()
    def tokens(self, x_norm_bchw: torch.Tensor) -> torch.Tensor:
        """``last_hidden_state`` (B, 1 + R + N, C): after the final LayerNorm."""
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=x_norm_bchw.to(self.device, dtype))
        return out.last_hidden_state

    @torch.no_grad()
    def patch_features(self, x_norm_bchw: torch.Tensor) -> torch.Tensor:
        """Patch features (B, C, H/p, W/p) of a normalised batch; class and registers dropped."""
        b, _, h, w = x_norm_bchw.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        t = self.tokens(x_norm_bchw)[:, 1 + self.num_registers :]
        return t.transpose(1, 2).reshape(b, -1, gh, gw)

    @torch.no_grad()
    def features_on_grid(
        self, images01_bchw: torch.Tensor, grid_hw: tuple[int, int]
    ) -> torch.Tensor:
        """Patch features (B, C, gh, gw) for [0,1] images resized (bilinear) to ``grid*patch``."""
        gh, gw = grid_hw
        size = (gh * self.patch_size, gw * self.patch_size)
        x = images01_bchw
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.patch_features(self.normalize(x))


def _config(hub_id: str, tiny: bool):
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    regs = "with-registers" in hub_id
    cls = Dinov2WithRegistersConfig if regs else Dinov2Config
    size = hub_id.rsplit("-", 1)[-1]
    width, layers, heads, swiglu = _SIZES[size]
    if tiny:
        width, layers, heads = 64, 2, 2
    kw = dict(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
    )
    if swiglu:  # ViT-g/14: SwiGLU MLP (transformers sizes it from mlp_ratio)
        kw["use_swiglu_ffn"] = True
    if regs:
        kw["num_register_tokens"] = 4
    return cls(**kw)


def build_dinov2(
    name: str = "dinov2-reg-base", *, tiny: bool = False, seed: int = TINY_SEED
) -> DinoModel:
    """Architecture with random weights (fixed seed); ``tiny`` shrinks it to 2 layers, width 64."""
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    hub_id = DINOV2_MODELS[name]
    cfg = _config(hub_id, tiny)
    cls = Dinov2WithRegistersModel if "with-registers" in hub_id else Dinov2Model
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = cls(cfg)
    finally:
        torch.random.set_rng_state(state)
    model = model.float().eval().requires_grad_(False)
    return DinoModel(model=model, name=("tiny-" if tiny else "") + name, is_random=True)


def load_dinov2(
    name: str = "dinov2-reg-base",
    *,
    weights_dir: str | None = None,
    device: str | torch.device = "cpu",
    download: bool | None = None,
) -> DinoModel:
    """Load DINOv2 from an HF directory (config.json + model.safetensors) via the registry."""
    from transformers import AutoConfig, Dinov2Model, Dinov2WithRegistersModel

    from zsdense.models import registry

    if name not in DINOV2_MODELS:
        raise WeightsError(f"unknown DINOv2 model {name!r}; known: {', '.join(DINOV2_MODELS)}")
    path = registry.resolve(name, weights_dir=weights_dir, download=download)
    directory = path if path.is_dir() else path.parent
    try:
        cfg = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise WeightsError(f"{directory}: cannot read the DINOv2 config.json ({exc})") from None
    cls = Dinov2WithRegistersModel if "with_registers" in cfg.model_type else Dinov2Model
    if not any(directory.glob("*.safetensors")):
        raise WeightsError(f"{directory}: no model.safetensors for {name}")
    # from_pretrained maps the published key names (attention.attention.query...) onto the
    # in-memory module names; safetensors only, never unpickling.
    try:
        model = cls.from_pretrained(str(directory), local_files_only=True, use_safetensors=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is a weights problem
        raise WeightsError(f"{directory}: DINOv2 weights do not fit {name} ({exc})") from None
    model = model.float().eval().requires_grad_(False)
    return DinoModel(model=model, name=name).to(device)
