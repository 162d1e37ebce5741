"""Training a JAFAR feature upsampler on unlabelled images: the trainer, and the public names of
the parts, re-exported (the recipe and the step, the authors' ``train.py`` step as run:
:mod:`zsdense.train.jafar_step`; the data: :mod:`zsdense.train.jafar_data`).

The trainer (:class:`UpsamplerTrainer`) runs over any folder of images zsdense's readers accept
(the first image of each file), on any CLIP or DINOv2 zsdense loads, with the checkpoint
machinery of prompt training (:mod:`zsdense.train.checkpoint`: safetensors, atomic writes,
settings checked on resume). Validation: the held-out images' ``L_hr`` of JAFAR against plain
bilinear upsampling of the same low-resolution features, with fixed draws: a number that means
something even on random weights (below 1 = JAFAR beats bilinear).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zsdense.errors import ConfigError, InputError
from zsdense.train.checkpoint import (
    check_out_for_training,
    check_resume_settings,
    load_state,
    save_jafar,
    save_state,
    training_runtime,
    write_run_info,
    write_training_log,
)
from zsdense.train.jafar_data import (
    ImageItem,
    epoch_order,
    fingerprint,
    list_images,
    step_generators,
    transform_image,
)
from zsdense.train.jafar_step import (
    JafarRecipe,
    StepDraws,
    _autocast,
    add_blur_noise,
    cosine_mse_loss,
    draw_step,
    gaussian_blur,
    lr_size,
    make_optimizer,
    new_jafar,
    train_step,
)

FORMAT = "zsdense-jafar-train/1"
STATE_FILE = "state.safetensors"
UPSAMPLER_FILE = "upsampler.safetensors"

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
        write_training_log(self.out, self.history)

    def _write_run(self) -> None:
        write_run_info(
            self,
            recipe=self.recipe.to_json(),
            train_images=len(self.train_items),
            val_images=len(self.val_items),
            precision=self.precision,
        )

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
    "ImageItem",
    "JafarRecipe",
    "StepDraws",
    "UpsamplerOptions",
    "UpsamplerTrainer",
    "add_blur_noise",
    "cosine_mse_loss",
    "draw_step",
    "epoch_order",
    "fingerprint",
    "gaussian_blur",
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
