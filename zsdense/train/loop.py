"""The training run: epochs over a dataset, checkpoints, ``train.jsonl``, resume, validation.

:class:`PromptTrainer` checks everything first (data, masks, models, the run folder), then runs
Crane's loop: per epoch the DataLoader's shuffled order, one Adam step per batch, a checkpoint
(``epoch_N.safetensors``), a line in ``train.jsonl`` and the resumable ``state.safetensors``.
``best.safetensors`` is the epoch with the best validation score (mean of image and pixel
AUROC) with ``--val``, else the lowest mean training loss.

Resume is bit for bit: the parameters, the Adam moments and step counts and the data-order
generator are restored, and with feature caching the features are precomputed in a fixed
order (dataset order, chunks of the batch size) so a resumed run reuses identical numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from zsdense.config import TRAIN_CACHE_MODES
from zsdense.errors import ConfigError
from zsdense.train.checkpoint import (
    base_model_info,
    check_out_for_training,
    check_resume_settings,
    load_state,
    save_prompts,
    save_state,
    training_runtime,
    write_run_info,
    write_training_log,
)
from zsdense.train.data import (
    TrainItem,
    batches,
    check_training_set,
    data_fingerprint,
    epoch_order,
    load_images,
    load_masks,
    read_training_set,
)
from zsdense.train.features import (
    FeatureCache,
    VisionBatch,
    cacheable,
    encode_images,
    vision_setup,
)
from zsdense.train.learner import PromptLearner
from zsdense.train.recipe import TrainRecipe
from zsdense.train.step import make_optimizer, train_step

STATE_FILE = "state.safetensors"
BEST_FILE = "best.safetensors"
CACHE_MODES = TRAIN_CACHE_MODES


@dataclass(frozen=True)
class TrainOptions:
    """How (not what) to train: caching, micro-batches, validation data (the models, device and
    precision are the runtime's)."""

    cache_features: str = "auto"  # auto: on when the recipe allows it
    micro_batch: int | None = None  # gradient accumulation: at most this many images at once
    layout: str = "auto"
    val: tuple[str, ...] = ()


ProgressFn = Callable[[dict], None]


def _settings_key(recipe: TrainRecipe) -> dict:
    """The recipe fields a resume must not change (everything but the epoch count)."""
    d = recipe.to_json()
    d.pop("epochs", None)
    return d


@dataclass
class PromptTrainer:
    """One training run into ``out_dir`` (see the module docstring)."""

    data: Sequence[str | Path]
    out_dir: str | Path
    recipe: TrainRecipe
    options: TrainOptions = field(default_factory=TrainOptions)
    resume: bool = False
    runtime: Any = None  # a Runtime (or Segmenter): models, device, precision; default fp32 CPU
    clip: object = None  # injected models (tests, benches); else the runtime's
    dino: object = None

    def __post_init__(self) -> None:
        self.out = Path(self.out_dir)
        r, o = self.recipe, self.options
        if o.cache_features not in CACHE_MODES:
            raise ConfigError(f"cache_features must be one of {CACHE_MODES}")
        if o.micro_batch is not None and o.micro_batch < 1:
            raise ConfigError(f"--micro-batch must be >= 1, got {o.micro_batch}")
        # data first: every problem a user can fix is reported before models load
        self.items: list[TrainItem] = read_training_set(list(self.data), o.layout)
        self.counts = check_training_set(self.items, ", ".join(str(d) for d in self.data))
        self.val_items: list[TrainItem] = []
        if o.val:
            self.val_items = read_training_set(list(o.val), o.layout)
            if not self.val_items:
                raise ConfigError(f"--val {', '.join(o.val)}: no images found")
        state_path = check_out_for_training(
            self.out, STATE_FILE, self.resume, "epoch_*.safetensors"
        )
        # models
        self.rt = training_runtime(self.runtime)
        if self.clip is None:
            self.clip = self.rt.clip(r.clip_arch)
        if r.use_dattn and self.dino is None:
            self.dino = self.rt.dinov2(r.dino_name)
        self.device = self.clip.device
        self.setup = vision_setup(r, self.clip.num_layers)
        if o.cache_features == "on" and not cacheable(self.setup):
            FeatureCache(self.setup)  # raises the explanatory ConfigError
        self.use_cache = o.cache_features != "off" and cacheable(self.setup)
        self.learner = PromptLearner(
            self.clip, r, generator=torch.Generator().manual_seed(int(r.seed))
        ).to(self.device)
        self.optimizer = make_optimizer(self.learner, r)
        self.data_gen = torch.Generator().manual_seed(int(r.seed))
        self.base_model = base_model_info(self.clip)
        self.settings = {
            "recipe": _settings_key(r),
            "data": data_fingerprint(self.items),
            "base_model": self.base_model,
            "cache_features": self.use_cache,
            "micro_batch": o.micro_batch,
            "depth": self.learner.depth,
        }
        self.history: list[dict] = []
        self.start_epoch = 0
        self.global_step = 0
        self.best: dict | None = None
        if self.resume:
            meta = load_state(state_path, self.learner, self.optimizer, self.data_gen)
            check_resume_settings(self.out, meta.get("settings", {}), self.settings)
            self.start_epoch = int(meta["epoch"])
            self.global_step = int(meta["global_step"])
            self.history = list(meta.get("history", []))
            self.best = meta.get("best")
        self._cache: FeatureCache | None = None
        self._masks: torch.Tensor | None = None
        self._val_cache: list | None = None

    # ---- setup checks ------------------------------------------------------------------------
    # ---- batches -----------------------------------------------------------------------------
    def _encode(self, items: Sequence[TrainItem]) -> VisionBatch:
        x = self.clip.normalize(load_images(items, self.recipe.image_size).to(self.device))
        return encode_images(self.clip, x, self.recipe, self.setup, dino=self.dino)

    def precompute(self, progress: ProgressFn | None = None) -> None:
        """Fill the feature cache in dataset order, chunks of the batch size (deterministic)."""
        if not self.use_cache or self._cache is not None:
            return
        cache = FeatureCache(self.setup)
        n, bs = len(self.items), self.recipe.batch_size
        for s in range(0, n, bs):
            idx = list(range(s, min(n, s + bs)))
            cache.put(idx, self._encode([self.items[i] for i in idx]))
            if progress:
                progress({"phase": "features", "done": min(n, s + bs), "total": n})
        self._masks = (load_masks(self.items, self.recipe.image_size) > 0.5).to(torch.uint8)
        self._cache = cache

    def batch(self, idx: Sequence[int]) -> tuple[VisionBatch, torch.Tensor, torch.Tensor]:
        """Frozen features, masks (B, S, S) and labels (B,) of the images ``idx``."""
        items = [self.items[i] for i in idx]
        labels = torch.tensor([it.label for it in items], dtype=torch.long, device=self.device)
        if self._cache is not None:
            vb = self._cache.get(idx, self.device)
            masks = self._masks[list(idx)].float().to(self.device)
        else:
            vb = self._encode(items)
            masks = load_masks(items, self.recipe.image_size).to(self.device)
        return vb, masks, labels

    # ---- validation --------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Image and pixel AUROC of the current prompts at test time (no image token, bilinear
        maps, temperature 0.07, σ=4 smoothing), through zsdense.metrics."""
        from zsdense.config import ANOMALY_PRESETS
        from zsdense.dense.crane import crane_maps
        from zsdense.dense.smoothing import smooth_maps
        from zsdense.metrics import PixelAccumulator, auroc
        from zsdense.text.anomaly_prompts import learned_text_features

        preset = ANOMALY_PRESETS.get(self.recipe.name, ANOMALY_PRESETS["crane"])
        text = learned_text_features(self.clip, self.learner.to_learned_prompts())
        size = self.recipe.image_size
        if self._val_cache is None:
            chunks = []
            bs = self.recipe.batch_size
            for s in range(0, len(self.val_items), bs):
                items = self.val_items[s : s + bs]
                vb = self._encode(items)
                masks = load_masks(items, size) > 0.5
                known = [it.label == 0 or it.mask is not None for it in items]
                chunks.append((vb.to("cpu"), masks, [it.label for it in items], known))
            if cacheable(self.setup):
                self._val_cache = chunks
        else:
            chunks = self._val_cache
        acc = PixelAccumulator()
        labels, scores = [], []
        for vb, masks, lab, known in chunks:
            r = crane_maps(
                [m.to(self.device) for m in vb.maps],
                text,
                vb.global_embed.to(self.device),
                grid=vb.grid,
                size=(size, size),
                soft_mean=preset.soft_mean,
                temperature=preset.temperature,
                alpha=preset.fusion_alpha,
                abnormal_only=True,
            )
            maps = smooth_maps(r.anomaly_map, preset.sigma).cpu().numpy()
            for m, k, ok in zip(maps, masks.numpy(), known):
                if ok:  # an anomalous image without a mask has no pixel ground truth
                    acc.update(np.clip(m, 0.0, 1.0), k)
            labels += lab
            scores += r.anomaly_score.cpu().tolist()
        if len(set(labels)) < 2:
            img = float("nan")
        else:
            img = auroc(np.asarray(labels), np.asarray(scores))
        pix = acc.auroc()
        out = {"image_auroc": _num(img), "pixel_auroc": _num(pix), "images": len(labels)}
        return out

    # ---- the run -----------------------------------------------------------------------------
    def _meta(self, epoch: int, record: dict | None) -> dict:
        return {
            "recipe": self.recipe.to_json(),
            "base_model": self.base_model,
            "epoch": epoch,
            "metrics": record or {},
            "depth": self.learner.depth,
            "models": self.rt.config.models,
        }

    def _write_log(self) -> None:
        write_training_log(self.out, self.history)

    def _write_run(self) -> None:
        write_run_info(self, counts=self.counts, epochs=self.recipe.epochs)

    def run(
        self,
        progress: ProgressFn | None = None,
        on_epoch_end: Callable[[dict], bool | None] | None = None,
    ) -> list[dict]:
        """Train until ``recipe.epochs``; returns the per-epoch records (``train.jsonl``).

        ``progress`` gets a dict after every step (and during feature precomputation);
        ``on_epoch_end(record)`` returning False stops after that epoch's checkpoint (a stop
        that ``resume=True`` continues from).
        """
        r = self.recipe
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_run()
        if self.start_epoch >= r.epochs:
            return self.history
        self.precompute(progress)
        self.learner.train()
        for epoch in range(self.start_epoch, r.epochs):
            t0 = time.perf_counter()
            loss, seen = self._train_epoch(epoch, progress)
            record = {
                "epoch": epoch + 1,
                "steps": self.global_step,
                "images": seen,
                "loss": loss,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            self._end_epoch(epoch, record)
            if on_epoch_end is not None and on_epoch_end(record) is False:
                break
        return self.history

    def _train_epoch(self, epoch: int, progress: ProgressFn | None) -> tuple[dict, int]:
        """One pass over the training images in this epoch's order: (mean losses, images)."""
        r = self.recipe
        order = epoch_order(self.data_gen, len(self.items))
        bl = batches(order, r.batch_size)
        sums: dict[str, float] = {}
        seen = 0
        for bi, idx in enumerate(bl):
            vb, masks, labels = self.batch(idx)
            scalars, _ = train_step(
                self.learner,
                self.optimizer,
                self.clip,
                vb,
                masks,
                labels,
                r,
                micro_batch=self.options.micro_batch,
            )
            self.global_step += 1
            seen += len(idx)
            for k, v in scalars.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
            if progress:
                progress(
                    {
                        "phase": "train",
                        "epoch": epoch + 1,
                        "epochs": r.epochs,
                        "batch": bi + 1,
                        "batches": len(bl),
                        "loss": {k: v / seen for k, v in sums.items()},
                    }
                )
        return {k: v / seen for k, v in sums.items()}, seen

    def _end_epoch(self, epoch: int, record: dict) -> None:
        """Validate, write the epoch's checkpoint (and the best one), the log and the resume
        state; ``record`` gains ``val``, ``checkpoint`` and ``best_epoch``."""
        if self.val_items:
            record["val"] = self.validate()
        ckpt = self.out / f"epoch_{epoch + 1}.safetensors"
        sd = self.learner.state_dict()
        save_prompts(ckpt, sd, self._meta(epoch + 1, record))
        record["checkpoint"] = ckpt.name
        score = _score(record)
        if self.best is None or score > self.best["score"]:
            self.best = {"epoch": epoch + 1, "score": score}
            save_prompts(self.out / BEST_FILE, sd, self._meta(epoch + 1, record))
        record["best_epoch"] = self.best["epoch"]
        self.history.append(record)
        self._write_log()
        save_state(
            self.out / STATE_FILE,
            self.learner,
            self.optimizer,
            self.data_gen,
            {
                **self._meta(epoch + 1, record),
                "global_step": self.global_step,
                "history": self.history,
                "best": self.best,
                "settings": self.settings,
            },
        )


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _score(record: dict) -> float:
    """Higher is better: mean validation AUROC when there is one, else −mean training loss."""
    val = record.get("val") or {}
    vals = [v for v in (val.get("image_auroc"), val.get("pixel_auroc")) if v is not None]
    if vals:
        return float(sum(vals) / len(vals))
    return -float(record["loss"]["total"])


def train_prompts(
    data: Sequence[str | Path],
    out_dir: str | Path,
    recipe: TrainRecipe,
    options: TrainOptions | None = None,
    *,
    runtime: Any = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> list[dict]:
    """Train Crane prompts on ``data`` into ``out_dir`` (Python entry of ``train-prompts``);
    ``runtime``: a :class:`~zsdense.runtime.Runtime` or ``Segmenter`` (default: CPU, fp32)."""
    trainer = PromptTrainer(
        data, out_dir, recipe, options or TrainOptions(), resume=resume, runtime=runtime
    )
    return trainer.run(progress=progress)


__all__ = ["PromptTrainer", "TrainOptions", "train_prompts"]
