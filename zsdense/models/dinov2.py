"""DINOv2 (with or without registers) through transformers: patch features on any grid.

Positional-embedding resize. transformers' ``Dinov2Model`` resizes the stored embedding grid with
``F.interpolate(size=(gh, gw), mode="bicubic")``. The torch-hub DINOv2 code that the reference
implementations run (``dinov2_vits14`` ...) does not: without registers it calls
``F.interpolate(scale_factor=((gh + 0.1) / G, (gw + 0.1) / G), mode="bicubic",
antialias=False)`` (the ``+0.1`` offset changes the sampling positions; 0.70 max apart on the
AnomalyDINO fixture's tiny model), and the ``_reg`` hub models use ``size=`` with antialias,
which is what transformers' ``Dinov2WithRegistersModel`` does. ``DinoModel.pos_interp = "hub"``
(or ``tokens(..., pos_interp="hub")``) runs the hub resize; the default ``"transformers"`` keeps
the model's own behaviour.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from zsdense.errors import ConfigError, WeightsError, unknown
from zsdense.models.weights_load import frozen
from zsdense.models.weights_table import DINOV2 as DINOV2_TABLE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_SEED = 1
POS_INTERPS = ("transformers", "hub")
HUB_INTERPOLATE_OFFSET = 0.1  # torch-hub DINOv2 without registers (interpolate_offset)

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
    # "transformers": the model's own positional-embedding resize; "hub": the torch-hub code's
    # scale_factor=(g + offset)/G bicubic resize (see the module docstring)
    pos_interp: str = "transformers"
    hub_interpolate_offset: float = HUB_INTERPOLATE_OFFSET
    hub_interpolate_antialias: bool = False
    weights_file: str | None = None  # the loaded weights file (real weights), for its SHA-256
    # test-time registers while attached (zsdense.models.registers), else None
    _registers: object = field(default=None, repr=False, compare=False)

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

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device) -> DinoModel:
        self.model.to(device)
        return self

    # ---- test-time registers (zsdense.models.registers) -------------------------------------
    @property
    def extra_tokens(self) -> int:
        """Test-time register tokens appended after the patches (0 when off)."""
        return 0 if self._registers is None else self._registers.extra_tokens

    def strip_registers(self, tokens_bnc: torch.Tensor) -> torch.Tensor:
        """Tokens as the layers carry them -> without test-time registers, in transformers'
        order ``[CLS, trained registers, patches]``; the same tensor when none are attached."""
        return tokens_bnc if self._registers is None else self._registers.strip(tokens_bnc)

    def normalize(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """[0,1] RGB -> ImageNet-normalised input."""
        mean = torch.tensor(IMAGENET_MEAN, device=images_bchw.device, dtype=images_bchw.dtype)
        std = torch.tensor(IMAGENET_STD, device=images_bchw.device, dtype=images_bchw.dtype)
        return (images_bchw - mean[:, None, None]) / std[:, None, None]

    @torch.no_grad()
    def tokens(self, x_norm_bchw: torch.Tensor, pos_interp: str | None = None) -> torch.Tensor:
        """``last_hidden_state`` (B, 1 + R + N, C): after the final LayerNorm.

        ``pos_interp`` overrides ``self.pos_interp`` for this call (``"transformers"`` |
        ``"hub"``). R counts the trained registers; test-time registers are stripped.
        """
        mode = self.pos_interp if pos_interp is None else pos_interp
        if mode not in POS_INTERPS:
            raise ConfigError(f"pos_interp must be one of {', '.join(POS_INTERPS)}, not {mode!r}")
        dtype = next(self.model.parameters()).dtype
        x = x_norm_bchw.to(self.device, dtype)
        if mode == "transformers":
            return self.strip_registers(self.model(pixel_values=x).last_hidden_state)
        emb = self._hub_embeddings(x)
        hidden = self.model.encoder(emb).last_hidden_state
        return self.strip_registers(self.model.layernorm(hidden))

    def hub_pos_embed(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The positional embedding (1, 1 + gh*gw, C) resized the torch-hub way.

        As the hub's ``interpolate_pos_encoding``: no resize when the grid already matches and
        is square; otherwise bicubic on the float32 grid with ``scale_factor=((gh + o)/G,
        (gw + o)/G)`` (o = ``hub_interpolate_offset``; ``size=`` when o is 0) and
        ``antialias=hub_interpolate_antialias``. The class slot is kept.
        """
        pos = self.model.embeddings.position_embeddings  # (1, 1 + G*G, C)
        gh, gw = int(grid_hw[0]), int(grid_hw[1])
        n_pos = pos.shape[1] - 1
        if gh * gw == n_pos and gh == gw:
            return pos
        g = int(math.sqrt(n_pos))
        dim = pos.shape[-1]
        p = pos.float()
        grid = p[:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2)
        kw: dict = {}
        if self.hub_interpolate_offset:
            off = float(self.hub_interpolate_offset)
            kw["scale_factor"] = ((gh + off) / g, (gw + off) / g)
        else:
            kw["size"] = (gh, gw)
        grid = F.interpolate(grid, mode="bicubic", antialias=self.hub_interpolate_antialias, **kw)
        if tuple(grid.shape[-2:]) != (gh, gw):
            raise ConfigError(
                f"hub positional-embedding resize gave {tuple(grid.shape[-2:])}, not {(gh, gw)}"
            )
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)
        return torch.cat([p[:, :1], grid], dim=1).to(pos.dtype)

    def _hub_embeddings(self, x_bchw: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, 1 + R + N, C) with the hub positional-embedding resize."""
        emb = self.model.embeddings
        b, _, h, w = x_bchw.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        patches = emb.patch_embeddings(x_bchw)  # (B, N, C)
        t = torch.cat([emb.cls_token.expand(b, -1, -1), patches], dim=1)
        t = t + self.hub_pos_embed((gh, gw))
        regs = getattr(emb, "register_tokens", None)
        if regs is not None and self.num_registers:
            t = torch.cat([t[:, :1], regs.expand(b, -1, -1), t[:, 1:]], dim=1)
        return emb.dropout(t)  # identity at inference; test-time registers hook it

    @torch.no_grad()
    def patch_features(
        self, x_norm_bchw: torch.Tensor, pos_interp: str | None = None
    ) -> torch.Tensor:
        """Patch features (B, C, H/p, W/p) of a normalised batch; class and registers dropped."""
        b, _, h, w = x_norm_bchw.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        t = self.tokens(x_norm_bchw, pos_interp=pos_interp)[:, 1 + self.num_registers :]
        return t.transpose(1, 2).reshape(b, -1, gh, gw)

    def weights_sha256(self) -> str:
        """SHA-256 over the loaded tensors (names, shapes, dtypes and bytes), cached.

        Identifies the weights a feature was computed with, whatever file they came from.
        """
        cached = getattr(self, "_weights_sha256", None)
        if cached is None:
            h = hashlib.sha256()
            for k, v in sorted(self.model.state_dict().items()):
                t = v.detach().to("cpu").contiguous()
                h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            cached = h.hexdigest()
            object.__setattr__(self, "_weights_sha256", cached)
        return cached

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
    with torch.random.fork_rng(devices=[]):  # the global RNG left as it was
        torch.manual_seed(seed)
        model = cls(cfg)
    model = frozen(model)
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
        raise unknown("DINOv2 model", name, DINOV2_MODELS, WeightsError)
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
    model = frozen(model)
    files = sorted(directory.glob("*.safetensors"))
    weights_file = str(files[0]) if len(files) == 1 else None
    return DinoModel(model=model, name=name, weights_file=weights_file).to(device)


# ---- the official (torch-hub) checkpoint layout ---------------------------------------------


def hub_to_transformers_state_dict(state: dict, target_keys) -> dict:
    """Map an official DINOv2 checkpoint (``blocks.i.attn.qkv`` ...) to transformers' keys.

    ``target_keys``: the key names of the transformers model to load into; they decide between
    the 5.x names (``attention.{q,k,v,o}_proj``) and the older ones
    (``attention.attention.{query,key,value}``, ``attention.output.dense``). The fused qkv
    weight and bias are split in rows [0:D], [D:2D], [2D:3D].
    """
    target = set(target_keys)
    new_names = any(".attention.q_proj." in k for k in target)
    if new_names:
        qkv_names = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
        proj_name = "attention.o_proj"
    else:
        qkv_names = ("attention.attention.query", "attention.attention.key")
        qkv_names += ("attention.attention.value",)
        proj_name = "attention.output.dense"
    top = {
        "cls_token": "embeddings.cls_token",
        "mask_token": "embeddings.mask_token",
        "pos_embed": "embeddings.position_embeddings",
        "register_tokens": "embeddings.register_tokens",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    inner = {
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
        "attn.proj.weight": f"{proj_name}.weight",
        "attn.proj.bias": f"{proj_name}.bias",
    }
    out: dict = {}
    for key, value in state.items():
        if key in top:
            v = value
            if key == "mask_token" and v.dim() == 3:
                v = v[:, 0]
            out[top[key]] = v
            continue
        parts = key.split(".", 2)
        if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
            raise WeightsError(f"unexpected key {key!r} in a DINOv2 hub checkpoint")
        i, rest = parts[1], parts[2]
        prefix = f"encoder.layer.{i}."
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            suffix = rest.rsplit(".", 1)[1]
            for name, chunk in zip(qkv_names, value.chunk(3, dim=0)):
                out[f"{prefix}{name}.{suffix}"] = chunk.clone()
        elif rest in inner:
            out[prefix + inner[rest]] = value
        else:
            out[prefix + rest] = value  # norm1, norm2, mlp.fc1, mlp.fc2
    return out


def dinov2_from_hub_state_dict(
    state: dict,
    *,
    name: str = "dinov2-hub",
    img_size: int = 518,
    patch_size: int = 14,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    layer_norm_eps: float = 1e-6,
    interpolate_offset: float = HUB_INTERPOLATE_OFFSET,
    interpolate_antialias: bool = False,
    is_random: bool = False,
) -> DinoModel:
    """A :class:`DinoModel` from an official-layout DINOv2 state dict (strict load).

    Width, depth and registers are read from the tensors; ``num_heads`` defaults to width/64 (the
    published models). The model runs the hub positional-embedding resize
    (``pos_interp="hub"``) with the given offset / antialias, as ``torch.hub.load`` would.
    """
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    try:
        width = int(state["cls_token"].shape[-1])
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        n_reg = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"not an official DINOv2 state dict ({exc})") from None
    heads = int(num_heads) if num_heads else max(1, width // 64)
    kw = dict(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        mlp_ratio=int(mlp_ratio) if float(mlp_ratio).is_integer() else float(mlp_ratio),
        patch_size=patch_size,
        image_size=img_size,
        layer_norm_eps=layer_norm_eps,
        layerscale_value=1.0,
    )
    if n_reg:
        cfg = Dinov2WithRegistersConfig(num_register_tokens=n_reg, **kw)
        model = Dinov2WithRegistersModel(cfg)
    else:
        model = Dinov2Model(Dinov2Config(**kw))
    mapped = hub_to_transformers_state_dict(state, model.state_dict().keys())
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"DINOv2 hub state dict does not fit ({exc})") from None
    model = frozen(model)
    return DinoModel(
        model=model,
        name=name,
        is_random=is_random,
        pos_interp="hub",
        hub_interpolate_offset=interpolate_offset,
        hub_interpolate_antialias=interpolate_antialias,
    )
