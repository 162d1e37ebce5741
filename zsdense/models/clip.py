"""CLIP through open_clip: the model plus the pieces the dense heads need as plain tensors.

The dense-feature algorithms (``zsdense.dense``) never patch open_clip classes. They ask this
wrapper for the token stream after any block, for a block's weights (ln_1, in-projection,
out-projection, MLP) and for the head (ln_post, proj), and compute their variants as functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zsdense.errors import ConfigError, WeightsError, unknown
from zsdense.models.weights_load import frozen

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Architectures we name (open_clip config names). ``tiny`` versions keep patch size and native
# grid but use few layers and small widths with random weights from a fixed seed.
CLIP_ARCHS = ("ViT-B-16", "ViT-L-14-336", "ViT-L-14", "ViT-B-32")
TINY_SEED = 0


@dataclass(frozen=True)
class BlockWeights:
    """The pieces of one residual attention block, as plain tensors / callables."""

    ln_1: torch.nn.Module
    in_proj_weight: torch.Tensor  # (3C, C)
    in_proj_bias: torch.Tensor | None  # (3C,)
    out_proj_weight: torch.Tensor  # (C, C)
    out_proj_bias: torch.Tensor | None  # (C,)
    ln_2: torch.nn.Module
    mlp: torch.nn.Module
    num_heads: int

    @property
    def width(self) -> int:
        return self.in_proj_weight.shape[1]

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclass
class ClipModel:
    """An open_clip CLIP with its preprocessing constants and cached helpers."""

    model: torch.nn.Module  # open_clip.CLIP
    arch: str
    is_random: bool = False
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    _pos_cache: dict = field(default_factory=dict, repr=False)
    _stacked_proj: dict = field(default_factory=dict, repr=False, compare=False)
    _tokenizer: object = field(default=None, repr=False)
    weights_name: str | None = None  # registry name of the loaded checkpoint (real weights)
    weights_sha256: str | None = None  # SHA-256 of the loaded checkpoint file, when known
    # test-time registers while attached (zsdense.models.registers), else None
    _registers: object = field(default=None, repr=False, compare=False)

    @property
    def base_model_id(self) -> str:
        """What a trained prompt checkpoint records as its base model: the architecture, plus
        the weights (registry name, or "random weights" for the tiny / random sets)."""
        if self.is_random:
            return f"{self.arch} (random weights)"
        return f"{self.arch} ({self.weights_name})" if self.weights_name else self.arch

    # ---- structure -------------------------------------------------------------------------
    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    @property
    def blocks(self) -> list[torch.nn.Module]:
        return list(self.model.visual.transformer.resblocks)

    @property
    def num_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return int(self.model.visual.class_embedding.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.proj.shape[1])

    @property
    def patch_size(self) -> int:
        return int(self.model.visual.conv1.kernel_size[0])

    @property
    def native_grid(self) -> int:
        return int(math.isqrt(self.model.visual.positional_embedding.shape[0] - 1))

    @property
    def native_size(self) -> int:
        return self.native_grid * self.patch_size

    @property
    def device(self) -> torch.device:
        return self.model.visual.proj.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.proj.dtype

    def block(self, i: int) -> BlockWeights:
        """Weights of block ``i`` (0-based)."""
        blk = self.model.visual.transformer.resblocks[i]
        attn = blk.attn
        return BlockWeights(
            ln_1=blk.ln_1,
            in_proj_weight=attn.in_proj_weight,
            in_proj_bias=attn.in_proj_bias,
            out_proj_weight=attn.out_proj.weight,
            out_proj_bias=attn.out_proj.bias,
            ln_2=blk.ln_2,
            mlp=blk.mlp,
            num_heads=int(attn.num_heads),
        )

    def to(self, device: str | torch.device) -> ClipModel:
        self.model.to(device)
        self.clear_caches()
        return self

    def clear_caches(self) -> None:
        """Drop what was derived from the weights (after they moved or changed dtype)."""
        self._pos_cache.clear()
        self._stacked_proj.clear()

    def stacked_out_proj(self, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output projections of blocks ``first..last-1`` (0-based) side by side:
        the weight ``[W_first | ... | W_last-1]`` (C, L·C) and the sum of their biases (summed
        in float32, then in the weights' dtype; None when no block has one), so that
        ``Σ_j out_proj_j(x_j) = F.linear([x_first | ... | x_last-1], weight, bias)``.

        Kept for the last range asked (one entry, L·C² values: 40 MB for ViT-L/14 from block 6
        in bf16) and rebuilt when a weight's or bias's storage, version, dtype or device changes."""
        ws = [self.block(i) for i in range(first, last)]
        key = (first, last) + tuple(
            (t.data_ptr(), t._version, t.dtype, t.device)
            for b in ws
            for t in (b.out_proj_weight, b.out_proj_bias)
            if t is not None
        )
        hit = self._stacked_proj.get(key)
        if hit is not None:
            return hit
        with torch.no_grad():
            weight = torch.cat([b.out_proj_weight for b in ws], dim=1)
            biases = [b.out_proj_bias for b in ws if b.out_proj_bias is not None]
            bias = None
            if biases:
                bias = torch.stack([b.float() for b in biases]).sum(0).to(biases[0].dtype)
        self._stacked_proj.clear()
        self._stacked_proj[key] = (weight, bias)
        return weight, bias

    # ---- test-time registers (zsdense.models.registers) -------------------------------------
    @property
    def extra_tokens(self) -> int:
        """Test-time register tokens :meth:`embed` appends after the patches (0 when off)."""
        return 0 if self._registers is None else self._registers.extra_tokens

    def strip_registers(self, tokens_bnc: torch.Tensor) -> torch.Tensor:
        """Tokens from :meth:`embed` / the blocks without the test-time registers (B, 1+N, C);
        the same tensor when none are attached."""
        return tokens_bnc if self._registers is None else self._registers.strip(tokens_bnc)

    # ---- image side ------------------------------------------------------------------------
    def normalize(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """[0,1] RGB (B,3,H,W) -> CLIP-normalised input."""
        mean = torch.tensor(self.mean, device=images_bchw.device, dtype=images_bchw.dtype)
        std = torch.tensor(self.std, device=images_bchw.device, dtype=images_bchw.dtype)
        return (images_bchw - mean[:, None, None]) / std[:, None, None]

    def pos_embed(self, grid_hw: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        """Positional embedding (1 + gh*gw, C) for a patch grid, class slot unchanged.

        ``mode``: ``"native"`` (grid must equal the native one), ``"bilinear"`` (Crane:
        ``F.interpolate(size=grid, mode="bilinear", align_corners=False)``), ``"bicubic-scale"``
        (Trident / ProxyCLIP / SCLIP family: bicubic with ``scale_factor=((g+0.1)/G)``), or
        ``"bicubic"`` (size-based bicubic). Cached per (grid, mode).
        """
        gh, gw = int(grid_hw[0]), int(grid_hw[1])
        key = (gh, gw, mode)
        pe = self.model.visual.positional_embedding
        cached = self._pos_cache.get(key)
        if cached is not None and cached.device == pe.device and cached.dtype == pe.dtype:
            return cached
        G = self.native_grid
        cls_pe, grid_pe = pe[:1], pe[1:]
        if (gh, gw) == (G, G) or mode == "native":
            if (gh, gw) != (G, G):
                raise ConfigError(f"grid {gh}x{gw} differs from the native {G}x{G}")
            out = pe
        else:
            g = grid_pe.reshape(1, G, G, -1).permute(0, 3, 1, 2)  # (1, C, G, G)
            if mode == "bilinear":
                g = F.interpolate(g, size=(gh, gw), mode="bilinear", align_corners=False)
            elif mode == "bicubic":
                g = F.interpolate(g, size=(gh, gw), mode="bicubic", align_corners=False)
            elif mode == "bicubic-scale":
                g = F.interpolate(
                    g,
                    scale_factor=((gh + 0.1) / G, (gw + 0.1) / G),
                    mode="bicubic",
                    align_corners=False,
                )
                if g.shape[-2:] != (gh, gw):  # pragma: no cover - float rounding guard
                    raise RuntimeError(f"scale-factor resize gave {tuple(g.shape[-2:])}")
            else:
                raise ConfigError(f"unknown positional-embedding resize mode {mode!r}")
            g = g.permute(0, 2, 3, 1).reshape(gh * gw, -1)
            out = torch.cat([cls_pe, g], dim=0)
        out = out.detach()
        self._pos_cache[key] = out
        return out

    def embed(self, x_bchw: torch.Tensor, pos_mode: str = "bilinear") -> torch.Tensor:
        """Patch embedding + class token + positional embedding + ln_pre -> (B, 1+N, C).

        With test-time registers attached, (B, 1+N+R, C): R tokens after the patches (appended
        by a hook on ``patch_dropout``, an identity at inference, as in open_clip's forward).
        """
        v = self.model.visual
        x = v.conv1(x_bchw.to(v.conv1.weight.dtype))  # (B, C, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.pos_embed((gh, gw), pos_mode).to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def run_blocks(
        self, x_bnc: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Run blocks ``start..stop-1`` (0-based) on batch-first tokens (B, N, C), cast to the
        model's dtype first (a method may hand fp32 tokens to bf16 weights)."""
        x_bnc = x_bnc.to(self.dtype)
        blocks = self.model.visual.transformer.resblocks
        stop = len(blocks) if stop is None else stop
        for i in range(start, stop):
            x_bnc = blocks[i](x_bnc)
        return x_bnc

    def forward_layers(self, x_bnc: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Residual tokens after each listed block (1-based block numbers, as papers count); the
        input is cast to the model's dtype."""
        x_bnc = x_bnc.to(self.dtype)
        want = sorted(set(int(i) for i in layers))
        out: dict[int, torch.Tensor] = {}
        blocks = self.model.visual.transformer.resblocks
        for i, blk in enumerate(blocks, start=1):
            if i > want[-1]:
                break
            x_bnc = blk(x_bnc)
            if i in want:
                out[i] = x_bnc
        return out

    def head(self, tokens_bnc: torch.Tensor) -> torch.Tensor:
        """ln_post then projection: (..., C) -> (..., D), not normalised; the input is cast to
        the model's dtype (bf16 weights under ``--precision bf16``), so the output is in it."""
        v = self.model.visual
        return v.ln_post(tokens_bnc.to(v.proj.dtype)) @ v.proj

    def encode_image_global(self, x_bchw: torch.Tensor, pos_mode: str = "bilinear") -> torch.Tensor:
        """Global image embedding (B, D), L2-normalised, on any input size."""
        x = self.run_blocks(self.embed(x_bchw, pos_mode))
        return F.normalize(self.head(x[:, 0]), dim=-1)

    # ---- text side -------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer("ViT-B-16")  # the shared CLIP BPE
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings (T, D)."""
        outs = []
        texts = list(texts)
        for i in range(0, len(texts), batch_size):
            tok = self.tokenize(texts[i : i + batch_size])
            outs.append(F.normalize(self.model.encode_text(tok).float(), dim=-1))
        return torch.cat(outs, dim=0)


# ---- construction ----------------------------------------------------------------------------


def _infer_config(
    sd: dict[str, torch.Tensor],
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> dict:
    """open_clip CLIP constructor arguments from an OpenAI-layout state dict.

    Head counts are in no tensor shape: by default they follow OpenAI's rule (width // 64, at
    least 1); ``vision_heads`` / ``text_heads`` override it for checkpoints built otherwise.
    """
    try:
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        n_pos = sd["visual.positional_embedding"].shape[0]
        layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
        embed_dim = sd["visual.proj"].shape[1]
        t_width = sd["ln_final.weight"].shape[0]
        t_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
        ctx = sd["positional_embedding"].shape[0]
        vocab = sd["token_embedding.weight"].shape[0]
    except KeyError as exc:
        raise WeightsError(
            f"not an OpenAI/open_clip CLIP state dict (missing key {exc.args[0]!r})"
        ) from None
    grid = math.isqrt(n_pos - 1)
    for what, heads, w in (("vision", vision_heads, width), ("text", text_heads, t_width)):
        if heads is not None and (heads < 1 or w % heads):
            raise ConfigError(f"{what} heads {heads} do not divide the {what} width {w}")
    return dict(
        embed_dim=embed_dim,
        vision_cfg=dict(
            layers=layers,
            width=width,
            patch_size=patch,
            image_size=grid * patch,
            head_width=64 if vision_heads is None else width // vision_heads,
        ),
        text_cfg=dict(
            context_length=ctx,
            vocab_size=vocab,
            width=t_width,
            heads=max(1, t_width // 64) if text_heads is None else text_heads,
            layers=t_layers,
        ),
        quick_gelu=True,
    )


def clip_from_state_dict(
    sd: dict[str, torch.Tensor],
    *,
    arch: str = "custom",
    is_random: bool = False,
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> ClipModel:
    """Build an open_clip CLIP (float32, QuickGELU as OpenAI) and load ``sd`` strictly.

    Sizes come from the tensor shapes; the head counts (which no shape holds) default to
    width // 64 as in OpenAI's checkpoints, or are given (e.g. from a fixture's stored config).
    """
    import open_clip

    sd = {
        k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")
    }
    cfg = _infer_config(sd, vision_heads, text_heads)
    model = open_clip.CLIP(**cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"CLIP state dict does not fit {arch}: {exc}") from None
    model = frozen(model)
    return ClipModel(model=model, arch=arch, is_random=is_random)


def _tiny_cfg(arch: str) -> dict:
    import open_clip

    try:
        full = open_clip.get_model_config(arch)
    except Exception:  # pragma: no cover - open_clip versions differ in what they raise
        full = None
    if full is None:
        raise unknown("CLIP architecture", arch, CLIP_ARCHS)
    v = full["vision_cfg"]
    return dict(
        embed_dim=64,
        vision_cfg=dict(
            layers=6,
            width=128,
            patch_size=v["patch_size"],
            image_size=v["image_size"],
            head_width=64,
        ),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
        quick_gelu=True,
    )


def build_tiny_clip(arch: str = "ViT-B-16", seed: int = TINY_SEED) -> ClipModel:
    """The same architecture family with 6 layers, width 128, random weights (fixed seed).

    LayerNorm weights are perturbed away from 1/0 so that tests exercise them.
    """
    import open_clip

    with torch.random.fork_rng(devices=[]):  # the global RNG left as it was
        torch.manual_seed(seed)
        model = open_clip.CLIP(**_tiny_cfg(arch))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("ln_post.weight") or ".ln_" in name or name.startswith("ln_"):
                    if name.endswith("weight"):
                        p.add_(0.1 * torch.randn_like(p))
                    else:
                        p.add_(0.05 * torch.randn_like(p))
                if name.endswith("in_proj_bias"):
                    p.add_(0.1 * torch.randn_like(p))
    model = frozen(model)
    return ClipModel(model=model, arch=f"tiny-{arch}", is_random=True)


def build_random_clip(arch: str = "ViT-B-16", seed: int = 0) -> ClipModel:
    """The full-size ``arch`` with random weights (QuickGELU as OpenAI): benchmarks measure speed
    and memory on it without downloading anything."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise unknown("CLIP architecture", arch, CLIP_ARCHS)
    with torch.random.fork_rng(devices=[]):  # the global RNG left as it was
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg, quick_gelu=True)
    return ClipModel(model=frozen(model), arch=arch, is_random=True)


def load_clip(
    arch: str = "ViT-B-16",
    *,
    pretrained: str = "openai",
    weights_dir: str | None = None,
    device: str | torch.device = "cpu",
    download: bool | None = None,
) -> ClipModel:
    """Load a real CLIP checkpoint through the weights registry (``clip-<arch>-<pretrained>``)."""
    from zsdense.models import registry

    name = f"clip-{arch}-{pretrained}"
    path = registry.resolve(name, weights_dir=weights_dir, download=download)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
        if not files:
            raise WeightsError(f"{path}: no weights file in the checkpoint directory for {name}")
        path = files[0]
    sd = registry.load_state_dict_file(path)
    clip = clip_from_state_dict(sd, arch=arch)
    clip.weights_name = name
    clip.weights_sha256 = registry.sha256_file(path)  # cached by (path, size, mtime)
    return clip.to(device)


def _close_to_rounded(u8: np.ndarray, x: np.ndarray) -> bool:
    """``np.allclose(u8, x, atol=1e-3)`` for ``u8 = np.round(x)``, decided from the largest
    ``|u8 − x|`` when that settles it (≤ atol: every element passes; half the passes over the
    image of ``allclose``), by ``allclose`` itself otherwise (NaN, inf, or in between)."""
    d = np.subtract(u8, x)
    np.abs(d, out=d)
    worst = d.max() if d.size else 0.0
    if worst <= 1e-3:
        return True
    return bool(np.allclose(u8, x, atol=1e-3))


def eight_bit(image: np.ndarray) -> np.ndarray | None:
    """``round(255·image)`` as uint8 when every value is within 1e-3 of it (the image is
    8-bit-representable: 8-bit sources), else None."""
    x = image * 255.0
    u8 = np.round(x)
    return u8.astype(np.uint8) if _close_to_rounded(u8, x) else None


def pixels_tensor(u8: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 pixels as a tensor that is only read: sharing a writable array's memory, or a copy
    of a read-only one (Pillow hands its decoded pixels out read-only, and torch warns that a
    tensor sharing them must not be written); a copy is 0.03 ms at 480x640."""
    arr = np.ascontiguousarray(u8)
    return torch.as_tensor(arr if arr.flags.writeable else arr.copy(), device=device)


def preprocess_images(
    images: Sequence[np.ndarray],
    size: int | tuple[int, int],
    *,
    interpolation: str = "bicubic",
    device: str | torch.device = "cpu",
    exact: bool = True,
    u8s: Sequence[np.ndarray | None] | None = None,
) -> torch.Tensor:
    """Float RGB (H,W,3) images in [0,1] -> (B,3,h,w) tensor resized like PIL (no crop).

    Bicubic resizing goes through PIL on 8-bit data when the input is 8-bit-representable, to
    match the reference implementations (``PIL.Image.resize(BICUBIC)``); otherwise it resizes the
    float data with PIL's float mode per channel, which keeps 16-bit precision.

    ``exact=False`` (reduced-precision runs: :func:`zsdense.tasks.common.exact_inputs`) resizes
    8-bit data with torch's antialiased uint8 kernel instead: 7× faster than PIL at 224 (0.34
    against 2.45 ms for a 480×640 photo), within 2/255 of PIL's values on under 1 % of the
    pixels, which bf16's own rounding of the input (1/256 relative) already exceeds.

    ``u8s``: per image, what :func:`eight_bit` gives for it (its uint8 picture, or None for an
    image that is not 8-bit), when the caller already has it (an image context's
    :attr:`~zsdense.context.ImageContext.exact_u8`); omitted, it is computed here.
    """
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[
        interpolation
    ]
    out = np.empty((len(images), 3, h, w), dtype=np.float32)
    for i, img in enumerate(images):
        u8 = u8s[i] if u8s is not None else eight_bit(img)
        if u8 is not None:
            if not exact and interpolation != "nearest":
                out[i] = _torch_resize_u8(u8, (h, w), interpolation)
                continue
            pil = Image.fromarray(u8, mode="RGB")
            out[i] = (
                np.asarray(pil.resize((w, h), resample), dtype=np.float32).transpose(2, 0, 1)
                / 255.0
            )
        else:
            for c in range(3):
                ch = Image.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32), mode="F")
                out[i, c] = np.asarray(ch.resize((w, h), resample), dtype=np.float32)
    return torch.from_numpy(out).to(device)


def _torch_resize_u8(u8: np.ndarray, hw: tuple[int, int], interpolation: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, h, w) float32 in [0, 1] by torch's antialiased uint8 resize."""
    import torch.nn.functional as F

    t = pixels_tensor(u8).permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    r = F.interpolate(t, size=hw, mode=interpolation, antialias=True, align_corners=False)
    return r[0].numpy().astype(np.float32) / np.float32(255.0)
