"""JAFAR training's recipe and step: the authors' ``train.py`` step as run.

One step (``../shared/fixtures/jafar/README.md`` §3; :func:`train_step`), for a batch of S×S
images normalised with the backbone's mean/std:

1. ``hr = backbone(batch)``, the target, on the (S/p)² grid;
2. ``f ~ U(0.25, 0.5)``, ``n = p·round(S·f/p)`` (Python's round, half to even);
   ``lr = backbone(bilinear(batch, n×n))`` (no antialias, on the normalised image);
3. JAFAR's image is the **half-resolution** image ``img = bilinear(batch, ×0.5)``;
   ``L_hr = loss(JAFAR(img, lr, hr grid), hr)``;
4. regulariser: ``noised = add_blur_noise(img)`` (Gaussian blur 5×5, σ 1 with probability 0.5;
   then ``+= 0.02·N(0, 1)`` **in place** with probability 0.3, so that without blur the target
   below sees the noise too; then clamped to [0, 1], the normalised image included),
   ``L_reg = 0.1 · loss(JAFAR(noised, hr, 224²), JAFAR(img, hr, 224²) without grad)`` (the output
   size 224×224 is fixed whatever S is);
5. AdamW (lr 2e-4, betas 0.9/0.999, weight decay 1e-5) on ``L_hr + L_reg``.

The loss (``Cosine_MSE``): ``mean(1 − cos)`` over the tokens plus the MSE of both maps min-max
normalised with the **target's** per-token min and max. The authors trained under bf16 autocast
on CUDA (a runtime at bf16 does the same: the frozen encoder in bf16, JAFAR's float32 weights
under autocast); the fixture and ``fp32`` are float32 throughout.

Randomness is counter-based: the data order of epoch e and the draws of step k come from
generators seeded with (seed, e) and (seed, k), so a resumed run continues bit for bit from
its last saved step, and the draws follow the reference's order (numpy for f; torch for the
blur / noise coins, the blur's σ draw and the noise tensor).

The data (order, transform, listing) is :mod:`zsdense.train.jafar_data`; the trainer
:mod:`zsdense.train.jafar`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zsdense.dense.jafar import JAFAR, JafarConfig
from zsdense.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JafarRecipe:
    """Every setting of a JAFAR training run (defaults: the authors' ``config/base.yaml``)."""

    img_size: int = 448
    batch_size: int = 4
    steps: int = 100_000
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-5
    eps: float = 1e-8
    qk_dim: int = 128
    num_heads: int = 4
    kernel_size: int = 1
    factor_range: tuple[float, float] = (0.25, 0.5)
    uhr_size: int = 224  # the regulariser's output size (hard-coded in train.py)
    reg_weight: float = 0.1
    blur_prob: float = 0.5
    blur_kernel: int = 5
    blur_sigma: float = 1.0
    noise_prob: float = 0.3
    noise_std: float = 0.02
    seed: int = 0
    val_images: int | None = None  # held out of DATA: None = 5 % (1 to 64)

    def __post_init__(self) -> None:
        for name in ("img_size", "batch_size", "steps", "qk_dim", "num_heads", "uhr_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        lo, hi = self.factor_range
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"factor_range must satisfy 0 < low <= high <= 1, got {lo}, {hi}")
        if self.img_size % 2:
            raise ConfigError("img_size must be even (JAFAR sees the image at half size)")
        if self.val_images is not None and self.val_images < 0:
            raise ConfigError("val_images must be >= 0")

    def to_json(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict) -> JafarRecipe:
        known = {f.name for f in fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**kw)


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def cosine_mse_loss(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """``Cosine_MSE`` of (B, C, h, w) maps: ``{"total", "cosine", "mse"}``.

    Tokens are the (B·h·w) pixel vectors; ``cosine = mean(1 − cos)`` (eps 1e-12 on the squared
    norms, as ``CosineEmbeddingLoss``); ``mse`` compares both maps min-max normalised with the
    target's per-token min and max (+1e-6)."""
    c = pred.shape[1]
    p = pred.permute(0, 2, 3, 1).reshape(-1, c)
    t = target.permute(0, 2, 3, 1).reshape(-1, c)
    cos = F.cosine_embedding_loss(p, t, torch.ones(p.shape[0], device=p.device, dtype=p.dtype))
    mn = t.min(dim=1, keepdim=True).values
    mx = t.max(dim=1, keepdim=True).values
    span = mx - mn + 1e-6
    mse = F.mse_loss((p - mn) / span, (t - mn) / span)
    return {"total": cos + mse, "cosine": cos, "mse": mse}


@dataclass
class StepDraws:
    """The random draws of one step, in the reference's order."""

    factor: float
    rand_blur: float
    rand_noise: float
    blur_sigma: float | None = None
    noise: torch.Tensor | None = None  # the randn_like draw (before × noise_std)


def draw_step(
    recipe: JafarRecipe,
    image_shape: Sequence[int],
    torch_gen: torch.Generator,
    np_rng: np.random.RandomState,
) -> StepDraws:
    """The draws of one step: ``np.random.uniform`` for the factor; ``torch.rand(1)`` for the
    blur coin, GaussianBlur's σ draw (one ``uniform_(σ, σ)``) if blurred, ``torch.rand(1)`` for
    the noise coin, ``randn_like`` of JAFAR's image if noised. With generators seeded like the
    reference's global RNGs this gives the reference's values."""
    lo, hi = recipe.factor_range
    factor = float(np_rng.uniform(lo, hi))
    b, c, s = int(image_shape[0]), int(image_shape[1]), int(image_shape[2]) // 2
    s2 = int(image_shape[3]) // 2
    rand_blur = float(torch.rand(1, generator=torch_gen))
    sigma = None
    if rand_blur < recipe.blur_prob:
        sigma = float(
            torch.empty(1).uniform_(recipe.blur_sigma, recipe.blur_sigma, generator=torch_gen)
        )
    rand_noise = float(torch.rand(1, generator=torch_gen))
    noise = None
    if rand_noise < recipe.noise_prob:
        noise = torch.randn((b, c, s, s2), generator=torch_gen)
    return StepDraws(factor, rand_blur, rand_noise, sigma, noise)


def lr_size(img_size: int, factor: float, patch: int) -> int:
    """``patch · round(img_size · factor / patch)`` (half to even), at least one patch."""
    return max(patch, patch * round(img_size * factor / patch))


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """torchvision's ``GaussianBlur(kernel, sigma)`` on a (B, C, H, W) batch (reflect)."""
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    return tv_blur(x, [kernel, kernel], [sigma, sigma])


def add_blur_noise(img: torch.Tensor, draws: StepDraws, recipe: JafarRecipe) -> torch.Tensor:
    """The reference's augmentation: blur (new tensor), noise added **in place** (into ``img``
    itself when not blurred), clamp to [0, 1]."""
    x = img
    if draws.blur_sigma is not None:
        x = gaussian_blur(x, recipe.blur_kernel, draws.blur_sigma)
    if draws.noise is not None:
        x += recipe.noise_std * draws.noise.to(x.device, x.dtype)
    return x.clamp(0, 1)


def _autocast(device: torch.device, precision: str):
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("--precision fp16 is not supported on CPU; use bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(
    model: JAFAR,
    optimizer: torch.optim.Optimizer | None,
    backbone: Callable[[torch.Tensor], torch.Tensor],
    image_batch: torch.Tensor,
    draws: StepDraws,
    recipe: JafarRecipe,
    *,
    patch_size: int,
    precision: str = "fp32",
    record: bool = False,
) -> dict:
    """One optimisation step of ``train.py`` (module docstring); ``backbone(x)`` -> features of
    a normalised batch. Returns the loss scalars, and with ``record`` every intermediate under
    the fixture's names. ``optimizer=None``: forward and backward only (gradients kept)."""
    dev = image_batch.device
    s = int(image_batch.shape[-1])
    rec: dict = {}
    with _autocast(dev, precision):
        with torch.no_grad():
            hr_feats = backbone(image_batch)
            n = lr_size(s, draws.factor, patch_size)
            low_res = F.interpolate(image_batch, size=(n, n), mode="bilinear")
            lr_feats = backbone(low_res)
            img = F.interpolate(image_batch, scale_factor=0.5, mode="bilinear")
        grid = tuple(hr_feats.shape[-2:])
        jafar_hr = model.forward_reference(img, lr_feats, grid)
        l_hr = cosine_mse_loss(jafar_hr, hr_feats)
        if record:
            rec.update(
                lr_image_hw=[n, n],
                low_res_batch=low_res.detach().clone(),
                hr_feats=hr_feats.detach().clone(),
                lr_feats=lr_feats.detach().clone(),
                jafar_image=img.detach().clone(),
                jafar_hr_feats=jafar_hr.detach().clone(),
            )
        noised = add_blur_noise(img, draws, recipe)
        uhr = (recipe.uhr_size, recipe.uhr_size)
        pred_uhr = model.forward_reference(noised, hr_feats, uhr)
        with torch.no_grad():
            target_uhr = model.forward_reference(img, hr_feats, uhr)
        l_reg = cosine_mse_loss(pred_uhr, target_uhr)
        loss = l_hr["total"] + recipe.reg_weight * l_reg["total"]
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    out = {
        "loss": float(loss.detach()),
        "hr": {k: float(v.detach()) for k, v in l_hr.items()},
        "reg": {k: float(v.detach()) for k, v in l_reg.items()},
    }
    if record:
        rec.update(
            noised_batch=noised.detach().clone(),
            target_input=img.detach().clone(),
            pred_uhr=pred_uhr.detach(),
            target_uhr=target_uhr.detach(),
        )
        out["record"] = rec
    return out


def make_optimizer(model: JAFAR, recipe: JafarRecipe) -> torch.optim.AdamW:
    """AdamW over every parameter (as train.py: unused ones get no gradient, hence no state)."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=recipe.lr,
        betas=tuple(recipe.betas),
        eps=recipe.eps,
        weight_decay=recipe.weight_decay,
    )


def new_jafar(v_dim: int, recipe: JafarRecipe) -> JAFAR:
    """A freshly initialised upsampler (PyTorch default init, RoPE init) from ``recipe.seed``,
    without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):  # the global RNG left as it was
        torch.manual_seed(int(recipe.seed))
        cfg = JafarConfig(
            v_dim=int(v_dim),
            qk_dim=recipe.qk_dim,
            num_heads=recipe.num_heads,
            kernel_size=recipe.kernel_size,
        )
        return JAFAR(cfg).float()
