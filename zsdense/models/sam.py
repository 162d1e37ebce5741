"""SAM through segment_anything: one encoder pass per image, reusable by every head.

``SamModel.encode`` runs the image encoder once and returns a :class:`SamImageState` holding the
embedding and, on request, the last encoder block's attention probabilities and values (what
Trident needs), kept from that block's own forward (computed once). A
predictor bound to that state (``SamModel.predictor_for``) answers prompts without re-encoding;
``SamModel.proposals`` decodes automatic mask proposals from it (``sam_proposals.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from zsdense.errors import WeightsError, unknown
from zsdense.models.weights_load import frozen


def _attention(module, captured: dict | None, x: torch.Tensor) -> torch.Tensor:
    """``segment_anything``'s ``Attention.forward``: the same operations in the same order (so
    the same output bits), with the decomposed relative positions added *in place* (the
    reference adds them into two new N×N tensors per head: at 64×64 tokens 2 × 200 M values
    per global block, 1.6 GB of float32 temporaries; the time is the same); with ``captured``
    (a dict) the softmaxed attention (heads, N, N) and the values (heads, gh, gw, d) are kept
    there: Trident reads them, and they are computed once."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    b, h, w, _ = x.shape  # (windows, or the whole grid for global blocks)
    qkv = module.qkv(x).reshape(b, h * w, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * module.num_heads, h * w, -1).unbind(0)
    attn = (q * module.scale) @ k.transpose(-2, -1)
    if module.use_rel_pos:  # add_decomposed_rel_pos, in place: (attn + rel_h) + rel_w
        rh = get_rel_pos(h, h, module.rel_pos_h)
        rw = get_rel_pos(w, w, module.rel_pos_w)
        bh, _, dim = q.shape
        r_q = q.reshape(bh, h, w, dim)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
        grid = attn.view(bh, h, w, h, w)
        grid.add_(rel_h[:, :, :, :, None]).add_(rel_w[:, :, :, None, :])
    attn = attn.softmax(dim=-1)
    if captured is not None:
        captured["attn"] = attn  # (heads, N, N) for b == 1
        captured["v"] = v.reshape(b * module.num_heads, h, w, -1)
    out = (attn @ v).view(b, module.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return module.proj(out)


def _sam_attention_modules(model) -> list:
    """The image encoder's ``segment_anything`` Attention modules (others are left alone)."""
    from segment_anything.modeling.image_encoder import Attention

    return [blk.attn for blk in model.image_encoder.blocks if type(blk.attn) is Attention]


SAM_ARCHS = {
    # arch: (embed_dim, depth, heads, global_attn_indexes)
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
TINY_SEED = 2


@dataclass
class SamImageState:
    """Everything SAM computed for one image (tensors on the model's device)."""

    embedding: torch.Tensor  # (1, 256, 64, 64) image embedding
    original_size: tuple[int, int]  # (H, W) of the image given to SAM
    input_size: tuple[int, int]  # (h, w) after ResizeLongestSide, before padding
    last_attn: torch.Tensor | None = None  # (heads, N, N) last block, N = gh*gw; encoder dtype
    last_v: torch.Tensor | None = None  # (heads, gh, gw, head_dim)
    extra: dict = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.embedding.shape[-2]), int(self.embedding.shape[-1])


def _build(arch: str, tiny: bool):
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    embed_dim, depth, heads, glob = SAM_ARCHS[arch]
    dec_depth, dec_mlp = 2, 2048
    if tiny:
        embed_dim, depth, heads, glob = 64, 2, 2, (1,)
        dec_depth, dec_mlp = 1, 256
    prompt_dim, image_size, patch = 256, 1024, 16
    emb = image_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=depth,
            embed_dim=embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=heads,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=glob,
            window_size=14,
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(emb, emb),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=dec_depth, embedding_dim=prompt_dim, mlp_dim=dec_mlp, num_heads=8
            ),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


@dataclass
class SamModel:
    model: torch.nn.Module  # segment_anything.modeling.Sam
    arch: str
    is_random: bool = False
    encoder_calls: int = 0  # how many times the image encoder ran (tests prove reuse with it)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def img_size(self) -> int:
        return int(self.model.image_encoder.img_size)

    def to(self, device: str | torch.device) -> SamModel:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, image_u8_hwc: np.ndarray, *, capture_last_attn: bool = False) -> SamImageState:
        """Run SAM's image encoder once on an 8-bit RGB image."""
        from segment_anything.utils.transforms import ResizeLongestSide

        if image_u8_hwc.dtype != np.uint8 or image_u8_hwc.ndim != 3 or image_u8_hwc.shape[2] != 3:
            raise ValueError("SamModel.encode expects an (H, W, 3) uint8 RGB image")
        transform = ResizeLongestSide(self.img_size)
        x = transform.apply_image(image_u8_hwc)
        x_t = torch.as_tensor(x, device=self.device).permute(2, 0, 1).contiguous()[None]
        input_size = tuple(int(s) for s in x_t.shape[-2:])
        enc_dtype = self.model.image_encoder.patch_embed.proj.weight.dtype
        x_t = self.model.preprocess(x_t.float()).to(enc_dtype)

        captured: dict[str, torch.Tensor] = {}
        mods = _sam_attention_modules(self.model)
        last = self.model.image_encoder.blocks[-1].attn
        if capture_last_attn and (not mods or mods[-1] is not last):
            raise WeightsError("SAM's last encoder block is not segment_anything's Attention")
        # every block through _attention (relative positions added in place); the last one
        # also keeps what it computes anyway when asked (no second pass)
        for m in mods:
            keep = captured if capture_last_attn and m is last else None
            m.forward = partial(_attention, m, keep)
        try:
            emb = self.model.image_encoder(x_t)
        finally:
            for m in mods:
                del m.forward  # back to the class's forward
        self.encoder_calls += 1
        attn, v = captured.get("attn"), captured.get("v")
        return SamImageState(
            embedding=emb.float(),
            original_size=(int(image_u8_hwc.shape[0]), int(image_u8_hwc.shape[1])),
            input_size=input_size,  # type: ignore[arg-type]
            # kept in the encoder's precision: (heads, N, N) is 800 MB in float32 at 64×64
            # tokens, and its reader (Trident's aggregation) converts one row chunk at a time
            last_attn=attn,
            last_v=None if v is None else v.float(),
        )

    def proposals(self, state: SamImageState, settings=None, **options):
        """Automatic mask proposals (point grid) decoded from an encoded image, identical to
        ``SamAutomaticMaskGenerator`` on one crop: see :mod:`zsdense.models.sam_proposals`."""
        from zsdense.models.sam_proposals import sam_proposals

        return sam_proposals(self, state, settings, **options)

    def predictor_for(self, state: SamImageState):
        """A ``SamPredictor`` bound to an already encoded image (no second encoder pass)."""
        from segment_anything import SamPredictor

        pred = SamPredictor(self.model)
        pred.reset_image()
        pred.features = state.embedding
        pred.original_size = state.original_size
        pred.input_size = state.input_size
        pred.is_image_set = True
        return pred


def build_sam(arch: str = "vit_b", *, tiny: bool = False, seed: int = TINY_SEED) -> SamModel:
    """SAM architecture with random weights (fixed seed); ``tiny``: 2 encoder blocks, width 64."""
    if arch not in SAM_ARCHS:
        raise unknown("SAM architecture", arch, SAM_ARCHS, WeightsError)
    with torch.random.fork_rng(devices=[]):  # the global RNG left as it was
        torch.manual_seed(seed)
        model = _build(arch, tiny)
        if tiny:
            with torch.no_grad():  # rel-pos tables start at zero: give them content
                for blk in model.image_encoder.blocks:
                    blk.attn.rel_pos_h.normal_(0, 0.1)
                    blk.attn.rel_pos_w.normal_(0, 0.1)
    model = frozen(model)
    return SamModel(model=model, arch=("tiny-" if tiny else "") + arch, is_random=True)


def load_sam(
    arch: str = "vit_b",
    *,
    weights_dir: str | None = None,
    device: str | torch.device = "cpu",
    download: bool | None = None,
) -> SamModel:
    """Load an official SAM checkpoint (``sam-<arch>``) through the registry, weights_only."""
    from zsdense.models import registry

    if arch not in SAM_ARCHS:
        raise unknown("SAM architecture", arch, SAM_ARCHS, WeightsError)
    path = registry.resolve(f"sam-{arch}", weights_dir=weights_dir, download=download)
    sd = registry.load_state_dict_file(path)
    model = _build(arch, tiny=False)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: SAM weights do not fit {arch}: {exc}") from None
    model = frozen(model)
    return SamModel(model=model, arch=arch).to(device)
