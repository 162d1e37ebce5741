"""Training a JAFAR feature upsampler on unlabelled images: the authors' ``train.py`` step as run.

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

The trainer (:class:`UpsamplerTrainer`) runs over any folder of images zsdense's readers accept
(the first image of each file), on any CLIP or DINOv2 zsdense loads, with the checkpoint
machinery of prompt training (:mod:`zsdense.train.checkpoint`: safetensors, atomic writes,
settings checked on resume). Validation: the held-out images' ``L_hr`` of JAFAR against plain
bilinear upsampling of the same low-resolution features, with fixed draws: a number that means
something even on random weights (below 1 = JAFAR beats bilinear).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zsdense.dense.jafar import JAFAR, JafarConfig, save_jafar
from zsdense.errors import ConfigError, InputError
from zsdense.io.writers import atomic_path
from zsdense.train.checkpoint import (
    check_out_for_training,
    check_resume_settings,
    load_state,
    save_state,
    training_runtime,
)

FORMAT = "zsdense-jafar-train/1"
STATE_FILE = "state.safetensors"
LOG_FILE = "train.jsonl"
RUN_FILE = "run.json"
UPSAMPLER_FILE = "upsampler.safetensors"


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


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def step_generators(seed: int, step: int) -> tuple[torch.Generator, np.random.RandomState]:
    """The (torch, numpy) generators of step ``step``: a function of (seed, step) only."""
    s = _seed_of(seed, 1, step)
    return torch.Generator().manual_seed(s), np.random.RandomState(s % (2**32))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([int(seed), 0, int(epoch)]).permutation(n)


def transform_image(image01: np.ndarray, size: int) -> torch.Tensor:
    """The reference's data transform before normalisation: ``Resize(size, BILINEAR)`` of the
    shorter side (PIL, antialiased), ``CenterCrop(size)``, ``ToTensor`` -> (3, S, S) in [0, 1].

    8-bit images go through PIL exactly as the reference's; deeper ones through torchvision's
    antialiased tensor resize (same geometry, float precision kept)."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    u8 = np.round(image01 * 255.0)
    if np.allclose(u8, image01 * 255.0, atol=1e-3):
        pil = Image.fromarray(u8.astype(np.uint8), mode="RGB")
        pil = TF.center_crop(TF.resize(pil, size, InterpolationMode.BILINEAR), size)
        return TF.to_tensor(pil)
    t = torch.from_numpy(np.ascontiguousarray(image01.transpose(2, 0, 1), dtype=np.float32))
    t = TF.resize(t, size, InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(t, size).clamp_(0, 1)


@dataclass(frozen=True)
class ImageItem:
    path: Path
    rel: str


def list_images(data: Sequence[str | Path], exclude: Sequence[str | Path] = ()) -> list[ImageItem]:
    """Every input file under ``data`` that zsdense's readers accept (files, folders, globs)."""
    from zsdense.io.inputs import list_inputs

    listed = list_inputs(list(data), exclude=list(exclude))
    return [ImageItem(Path(it.path), str(it.rel)) for it in listed]


def fingerprint(items: Sequence[ImageItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.rel}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpsamplerOptions:
    """How (not what) to train: validation data and how often to validate and save (the
    models, device, precision and image-size limit are the runtime's)."""

    val: tuple[str, ...] = ()  # a separate held-out set instead of a share of DATA
    save_every: int = 500
    val_every: int = 500


ProgressFn = Callable[[dict], None]

_RECIPE_NOT_SETTINGS = ("steps",)  # a resume may extend the run


def load_backbone(name: str, runtime):
    """The zsdense encoder ``name`` from ``runtime``: a DINOv2 registry name (``dinov2-small``...)
    or a CLIP (``clip-ViT-B-16-openai`` or the bare arch ``ViT-B-16``)."""
    from zsdense.models.clip import CLIP_ARCHS
    from zsdense.models.dinov2 import DINOV2_MODELS

    if name in DINOV2_MODELS:
        return runtime.dinov2(name)
    arch, pretrained = name, "openai"
    if name.startswith("clip-"):
        arch, _, pretrained = name[len("clip-") :].rpartition("-")
    if arch in CLIP_ARCHS:
        return runtime.clip(arch, pretrained=pretrained)
    known = ", ".join([*DINOV2_MODELS, *(f"clip-{a}-openai" for a in CLIP_ARCHS)])
    raise ConfigError(f"--backbone {name!r}: not a DINOv2 or CLIP zsdense loads; known: {known}")


@dataclass
class UpsamplerTrainer:
    """One JAFAR training run into ``out_dir`` (see the module docstring).

    Files: ``state.safetensors`` (weights, AdamW state, metadata; what ``resume`` reads),
    ``upsampler.safetensors`` (the weights with their backbone, for ``--upsampler FILE``),
    ``train.jsonl`` (one line per validation), ``run.json`` (settings, data).
    """

    data: Sequence[str | Path]
    out_dir: str | Path
    backbone: str
    recipe: JafarRecipe = field(default_factory=JafarRecipe)
    options: UpsamplerOptions = field(default_factory=UpsamplerOptions)
    resume: bool = False
    runtime: Any = None  # a Runtime (or Segmenter): models, device, precision; default fp32 CPU
    encoder: object = None  # injected encoder (tests); else the runtime's ``backbone``

    def __post_init__(self) -> None:
        from zsdense.models.jafar_backbone import encoder_id, encoder_patch_size, encoder_width

        r, o = self.recipe, self.options
        self.out = Path(self.out_dir)
        if o.save_every < 1 or o.val_every < 1:
            raise ConfigError("save_every and val_every must be >= 1")
        # data first: what a user can fix is reported before any model loads
        items = list_images(self.data, exclude=[self.out])
        if o.val:
            val = list_images(o.val, exclude=[self.out])
            if not val:
                raise ConfigError(f"--val {', '.join(o.val)}: no images found")
            train = items
        else:
            n_val = r.val_images
            if n_val is None:
                n_val = min(64, max(1, round(0.05 * len(items))))
            if len(items) - n_val < 1:
                raise ConfigError(
                    f"{', '.join(str(d) for d in self.data)}: {len(items)} image(s) found; "
                    f"training needs at least {n_val + 1} ({n_val} held out for validation)"
                )
            perm = np.random.default_rng([int(r.seed), 2]).permutation(len(items))
            held = set(int(i) for i in perm[:n_val])
            val = [it for i, it in enumerate(items) if i in held]
            train = [it for i, it in enumerate(items) if i not in held]
        if not train:
            raise ConfigError(f"{', '.join(str(d) for d in self.data)}: no images found")
        self.train_items, self.val_items = train, val
        state_path = check_out_for_training(self.out, STATE_FILE, self.resume)
        self.rt = training_runtime(self.runtime)
        self.precision = self.rt.precision
        if self.encoder is None:
            self.encoder = load_backbone(self.backbone, self.rt)
        self.device = self.rt.device
        self.patch = encoder_patch_size(self.encoder)
        self.width = encoder_width(self.encoder)
        self.backbone_id = encoder_id(self.encoder)
        if r.img_size % self.patch or (r.img_size // 2) < 1:
            raise ConfigError(
                f"img_size {r.img_size} must be a multiple of the patch size {self.patch} "
                f"(the backbone takes S×S images)"
            )
        self.model = new_jafar(self.width, r).to(self.device)
        self.optimizer = make_optimizer(self.model, r)
        self.generator = torch.Generator()  # unused by the draws; save_state stores one
        self.settings = {
            "recipe": {k: v for k, v in r.to_json().items() if k not in _RECIPE_NOT_SETTINGS},
            "backbone": self.backbone_id,
            "backbone_name": self.backbone,
            "data": fingerprint(train),
            "val": fingerprint(val),
            "precision": self.precision,
        }
        self.step = 0
        self.history: list[dict] = []
        if self.resume:
            meta = load_state(state_path, self.model, self.optimizer, self.generator)
            if meta.get("format") != FORMAT:
                raise ConfigError(
                    f"{state_path}: not a JAFAR training state ({meta.get('format')})"
                )
            check_resume_settings(self.out, meta.get("settings", {}), self.settings)
            self.step = int(meta["step"])
            self.history = list(meta.get("history", []))
        self._val_cache: list | None = None
        self.skipped: list[str] = []

    # ---- data --------------------------------------------------------------------------------
    def features(self, x_norm: torch.Tensor) -> torch.Tensor:
        from zsdense.models.jafar_backbone import jafar_features

        return jafar_features(self.encoder, x_norm)

    def load_batch(self, items: Sequence[ImageItem]) -> torch.Tensor:
        """Normalised (B, 3, S, S) batch; unreadable files are skipped with a warning."""
        from zsdense.io.readers import read_image

        max_pixels = getattr(self.rt.config, "max_pixels", None)
        kw = {} if max_pixels is None else {"max_pixels": max_pixels}
        ims = []
        for it in items:
            try:
                rec = read_image(it.path, **kw)
            except InputError as exc:
                if str(it.path) not in self.skipped:
                    self.skipped.append(str(it.path))
                    warnings.warn(f"skipped {exc}", stacklevel=2)
                continue
            ims.append(transform_image(rec.image, self.recipe.img_size))
        if not ims:
            return torch.empty(0)
        x = torch.stack(ims).to(self.device)
        return self.encoder.normalize(x)

    def batch_items(self, step: int) -> list[ImageItem]:
        n, bs = len(self.train_items), self.recipe.batch_size
        per_epoch = math.ceil(n / bs)
        epoch, pos = divmod(step, per_epoch)
        order = epoch_order(self.recipe.seed, epoch, n)
        return [self.train_items[int(i)] for i in order[pos * bs : (pos + 1) * bs]]

    # ---- validation --------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Held-out ``L_hr`` of JAFAR and of bilinear upsampling of the same low-resolution
        features (fixed draws per held-out batch), and their ratio."""
        r = self.recipe
        if self._val_cache is None:
            cache = []
            for i in range(0, len(self.val_items), r.batch_size):
                x = self.load_batch(self.val_items[i : i + r.batch_size])
                if x.numel() == 0:
                    continue
                lo, hi = r.factor_range
                f = float(np.random.default_rng([int(r.seed), 3, i]).uniform(lo, hi))
                n = lr_size(r.img_size, f, self.patch)
                with _autocast(self.device, self.precision):
                    hr = self.features(x)
                    lr = self.features(F.interpolate(x, size=(n, n), mode="bilinear"))
                img = F.interpolate(x, scale_factor=0.5, mode="bilinear")
                cache.append((img, lr.float(), hr.float()))
            self._val_cache = cache
        tot = {"jafar": 0.0, "bilinear": 0.0}
        count = 0
        self.model.eval()
        for img, lr, hr in self._val_cache:
            grid = tuple(hr.shape[-2:])
            with _autocast(self.device, self.precision):
                pred = self.model.forward_reference(img, lr, grid).float()
            bil = F.interpolate(lr, size=grid, mode="bilinear", align_corners=False)
            b = img.shape[0]
            tot["jafar"] += float(cosine_mse_loss(pred, hr)["total"]) * b
            tot["bilinear"] += float(cosine_mse_loss(bil, hr)["total"]) * b
            count += b
        self.model.train()
        if not count:
            return {"images": 0}
        out = {k: v / count for k, v in tot.items()}
        out["ratio"] = out["jafar"] / out["bilinear"] if out["bilinear"] else float("nan")
        out["images"] = count
        return out

    # ---- files -------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {
            "format": FORMAT,
            "backbone": self.backbone_id,
            "backbone_name": self.backbone,
            "step": self.step,
            "recipe": self.recipe.to_json(),
            "models": self.rt.config.models,
        }

    def save(self) -> None:
        save_state(
            self.out / STATE_FILE,
            self.model,
            self.optimizer,
            self.generator,
            {**self._meta(), "settings": self.settings, "history": self.history},
        )
        save_jafar(self.model, self.out / UPSAMPLER_FILE, self.upsampler_meta())

    def upsampler_meta(self) -> dict:
        """What an exported ``.safetensors`` records (read back by ``load_jafar``)."""
        return {
            "backbone": self.backbone_id,
            "backbone_name": self.backbone,
            "patch_size": self.patch,
            "mean": list(map(float, getattr(self.encoder, "mean", (0.485, 0.456, 0.406)))),
            "std": list(map(float, getattr(self.encoder, "std", (0.229, 0.224, 0.225)))),
            "steps": self.step,
            "trained_by": FORMAT,
        }

    def export(self, path: str | Path) -> Path:
        """The current weights as ``path``: ``.safetensors`` (with the backbone) or the released
        ``{"jafar": state_dict}`` layout (any other suffix)."""
        return save_jafar(self.model, path, self.upsampler_meta())

    def _write_log(self) -> None:
        with atomic_path(self.out / LOG_FILE) as tmp:
            tmp.write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in self.history))

    def _write_run(self) -> None:
        info = {
            "settings": self.settings,
            "recipe": self.recipe.to_json(),
            "data": [str(d) for d in self.data],
            "val": list(self.options.val),
            "train_images": len(self.train_items),
            "val_images": len(self.val_items),
            "models": self.rt.config.models,
            "precision": self.precision,
            "device": str(self.device),
        }
        with atomic_path(self.out / RUN_FILE) as tmp:
            tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    # ---- the run -----------------------------------------------------------------------------
    def run(
        self,
        progress: ProgressFn | None = None,
        stop_after: int | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[dict]:
        """Train until ``recipe.steps``; returns the validation records (``train.jsonl``).

        Stops early after ``stop_after`` more steps or when ``should_stop()`` turns true
        (checked between steps, e.g. set by Ctrl-C): the last completed step is saved and a
        ``resume`` continues from it."""
        r, o = self.recipe, self.options
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_run()
        if self.step == 0 and not self.history:
            self.history.append({"step": 0, "val": self.validate()})
            self._write_log()
        self.model.train()
        done = 0
        last = None
        while self.step < r.steps:
            if (stop_after is not None and done >= stop_after) or (
                should_stop is not None and should_stop()
            ):
                break
            t0 = time.perf_counter()
            x = self.load_batch(self.batch_items(self.step))
            tg, ng = step_generators(r.seed, self.step)
            if x.numel():
                draws = draw_step(r, x.shape, tg, ng)
                last = train_step(
                    self.model,
                    self.optimizer,
                    self.features,
                    x,
                    draws,
                    r,
                    patch_size=self.patch,
                    precision=self.precision,
                )
            self.step += 1
            done += 1
            if progress and last is not None:
                progress(
                    {
                        "phase": "train",
                        "step": self.step,
                        "steps": r.steps,
                        "loss": last["loss"],
                        "hr": last["hr"]["total"],
                        "reg": last["reg"]["total"],
                        "seconds": time.perf_counter() - t0,
                    }
                )
            end = self.step >= r.steps
            if self.step % o.val_every == 0 or end:
                rec = {"step": self.step, "val": self.validate()}
                if last is not None:
                    rec["loss"] = {"total": last["loss"], "hr": last["hr"], "reg": last["reg"]}
                self.history.append(rec)
                self._write_log()
                if progress:
                    progress({"phase": "val", "step": self.step, "val": rec["val"]})
            if self.step % o.save_every == 0 or end:
                self.save()
        if done and self.step % o.save_every and self.step < r.steps:
            self.save()  # stopped early: the state of the last completed step
        return self.history


def train_upsampler(
    data: Sequence[str | Path],
    out_dir: str | Path,
    backbone: str,
    recipe: JafarRecipe | None = None,
    options: UpsamplerOptions | None = None,
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    runtime: Any = None,
) -> UpsamplerTrainer:
    """Train (or continue) a JAFAR upsampler for ``backbone`` on ``data`` into ``out_dir``;
    ``runtime``: a :class:`~zsdense.runtime.Runtime` or ``Segmenter`` (default: CPU, fp32)."""
    trainer = UpsamplerTrainer(
        data,
        out_dir,
        backbone,
        recipe or JafarRecipe(),
        options or UpsamplerOptions(),
        resume=resume,
        runtime=runtime,
    )
    trainer.run(progress=progress)
    return trainer


__all__ = [
    "FORMAT",
    "JafarRecipe",
    "StepDraws",
    "UpsamplerOptions",
    "UpsamplerTrainer",
    "add_blur_noise",
    "cosine_mse_loss",
    "draw_step",
    "epoch_order",
    "list_images",
    "load_backbone",
    "lr_size",
    "make_optimizer",
    "new_jafar",
    "step_generators",
    "train_step",
    "train_upsampler",
    "transform_image",
]
