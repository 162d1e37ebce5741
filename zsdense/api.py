"""Public entry points: :class:`Segmenter` and the one-call helpers.

```python
from zsdense import Segmenter
seg = Segmenter(device="cuda")                       # nothing loads until first use
r = seg.anomaly(image, object_name="screw")          # r.score, r.anomaly_map, r.mask
r = seg.open_vocab(image, classes=["cat", "sofa"])   # r.labels, r.probs, r.class_names
r = seg.refer(image, "the cat on the left")          # r.mask, r.score, r.candidates
```
``image`` may be a path, a PIL image or an HxW / HxWx3 numpy array (uint8, uint16 or float).
Models load lazily and are cached per process; every encoder output is computed once per image
and shared by all heads that run on it (``Segmenter.run``).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from zsdense.config import (
    ANOMALY_PRESETS,
    DEFAULT_ANOMALY_PRESET,
    DEFAULT_BATCH_SIZE,
    DEFAULT_OPENVOCAB_PRESET,
    RuntimeConfig,
)
from zsdense.context import ImageContext

TINY_WARNING = "zsdense: models='{}' uses random weights: results are NOT meaningful"


class Segmenter:
    """One set of frozen encoders serving every task; cheap to construct (lazy loading)."""

    def __init__(
        self,
        device: str = "auto",
        models: str = "default",
        precision: str = "auto",
        weights_dir: str | None = None,
        download: bool | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_pixels: int | None = None,
        prompts: str | None = None,
        **kwargs: Any,
    ) -> None:
        if max_pixels is not None:
            kwargs["max_pixels"] = max_pixels
        self.config = RuntimeConfig(
            device=device,
            precision=precision,
            models=models,
            weights_dir=weights_dir,
            download=download,
            batch_size=batch_size,
            **kwargs,
        )
        from zsdense.models import _check_models

        _check_models(models)
        self._device = None
        self._dtype = None
        self.text_cache: dict = {}  # per-Segmenter text-embedding cache
        # default learned prompts of the anomaly presets that use prompts (a checkpoint file from
        # `zsdense train-prompts`, a registry name, or "ensemble"); per-call prompts= wins
        self.prompts = prompts
        self._warned = False
        self._models_used: dict[str, Any] = {}  # "kind/name" -> model (for the run's record)

    # ---- runtime ---------------------------------------------------------------------------
    @property
    def device(self):
        if self._device is None:
            from zsdense.runtime import resolve_device

            self._device = resolve_device(self.config.device)
        return self._device

    @property
    def dtype(self):
        if self._dtype is None:
            from zsdense.runtime import resolve_precision

            self._dtype = resolve_precision(self.config.precision, self.device)
        return self._dtype

    def autocast(self):
        """Context manager: no-grad plus autocast at the chosen precision."""
        from zsdense.runtime import autocast

        return autocast(self.device, self.dtype)

    @property
    def random_weights(self) -> bool:
        """True for the ``tiny`` and ``random`` model sets (results are not meaningful)."""
        return self.config.models in ("tiny", "random")

    @property
    def tiny(self) -> bool:
        """True for the shrunken ``tiny`` models (heads may use smaller settings to stay fast)."""
        return self.config.models == "tiny"

    def _warn_tiny(self) -> None:
        """One stderr line per Segmenter when random-weight models are used."""
        if self.random_weights and not self._warned:
            self._warned = True
            print(TINY_WARNING.format(self.config.models), file=sys.stderr)

    def result_meta(self) -> dict:
        """Metadata every result carries (model set, precision, the random-weights flag)."""
        meta = {
            "models": self.config.models,
            "device": str(self.device),
            "precision": str(self.dtype).replace("torch.", ""),
        }
        if self.random_weights:
            meta["random_weights"] = True
            meta["warning"] = "random weights — not meaningful"
        return meta

    # ---- encoders (lazy, cached per process) ------------------------------------------------
    def clip(self, arch: str, pretrained: str = "openai"):
        from zsdense.models import get_clip

        self._warn_tiny()
        return self._used(
            f"clip/{arch}/{pretrained}",
            get_clip(
                arch,
                models=self.config.models,
                device=str(self.device),
                weights_dir=self.config.weights_dir,
                download=self.config.download,
                dtype=self.dtype,
                pretrained=pretrained,
            ),
        )

    def dinov2(self, name: str = "dinov2-reg-base"):
        from zsdense.models import get_dinov2

        self._warn_tiny()
        model = get_dinov2(
            name,
            models=self.config.models,
            device=str(self.device),
            weights_dir=self.config.weights_dir,
            download=self.config.download,
            dtype=self.dtype,
        )
        return self._used(f"dinov2/{name}", model)

    def sam(self, arch: str = "vit_b"):
        from zsdense.models import get_sam

        self._warn_tiny()
        model = get_sam(
            arch,
            models=self.config.models,
            device=str(self.device),
            weights_dir=self.config.weights_dir,
            download=self.config.download,
            dtype=self.dtype,
        )
        return self._used(f"sam/{arch}", model)

    def _used(self, name: str, model: Any) -> Any:
        self._models_used[name] = model
        return model

    def weights_record(self, during: Any = None) -> dict[str, str | None]:
        """The encoders this Segmenter has served — only those asked for while ``during()`` runs
        when given (a run's setup) — with the SHA-256 of their weights where known (the
        checkpoint file for CLIP, the loaded tensors for DINOv2; None for random weights)."""
        used = self._models_used
        if during is not None:
            before = dict(used)
            used.clear()
            try:
                during()
                used, self._models_used = dict(used), {**before, **used}
            except BaseException:
                self._models_used = {**before, **used}
                raise
        out: dict[str, str | None] = {}
        for name, model in sorted(used.items()):
            sha = getattr(model, "weights_sha256", None)
            if callable(sha):
                sha = sha() if not self.random_weights else None
            out[name] = sha if isinstance(sha, str) else None
        return out

    # ---- images -----------------------------------------------------------------------------
    def context(self, image: Any) -> ImageContext:
        """An :class:`ImageContext` for a path, PIL image, array or an existing context."""
        if isinstance(image, ImageContext):
            return image
        from zsdense.io import to_float_rgb

        arr, meta = to_float_rgb(image, max_pixels=self.config.max_pixels)
        return ImageContext(image=arr, meta=meta)

    def contexts(self, images: Sequence[Any]) -> list[ImageContext]:
        return [self.context(im) for im in images]

    # ---- tasks ------------------------------------------------------------------------------
    def anomaly(
        self,
        image: Any,
        object_name: str | None = None,
        preset: str = DEFAULT_ANOMALY_PRESET,
        **options: Any,
    ):
        """Anomaly map, mask and image score for one image (see ``anomaly_batch``)."""
        return self.anomaly_batch([image], object_name=object_name, preset=preset, **options)[0]

    def anomaly_batch(
        self,
        images: Sequence[Any],
        object_name: str | None = None,
        preset: str = DEFAULT_ANOMALY_PRESET,
        **options: Any,
    ) -> list:
        """Anomaly results for several images, batched through the encoders. ``preset='musc'``
        scores the images against each other and needs at least 5 of one category;
        ``preset='anomalydino'`` (or ``'crane+fewshot'``) scores them against good images:
        ``reference=`` a folder, a list of paths or a ``.zsdmem`` memory bank (built once per
        Segmenter and reference), ``shots=N`` to use the first N."""
        from zsdense.options import AnomalyOptions
        from zsdense.tasks import anomaly_methods

        if self.prompts is not None and options.get("prompts") is None:
            if ANOMALY_PRESETS[preset].method in ("crane", "crane+fewshot"):
                options = {**options, "prompts": self.prompts}
        opts = AnomalyOptions.from_mapping(options, object_name=object_name, preset=preset)
        return anomaly_methods.run(self, self.contexts(images), opts)

    def open_vocab(
        self,
        image: Any,
        classes: Sequence[str] | str,
        preset: str = DEFAULT_OPENVOCAB_PRESET,
        **options: Any,
    ):
        """Label map over ``classes``.

        ``classes``: a list of names or one string (``"sky; cloud, cat"``): ``,`` separates
        classes, ``;`` synonyms of one class, ``NAME: a; b`` names a class; ``file:voc21``
        loads a shipped list. Options include ``dataset="voc21"`` (benchmark settings),
        ``sam_refine=True``, ``prob_thd=...``, ``upsample="jbu"``.
        """
        return self.open_vocab_batch([image], classes=classes, preset=preset, **options)[0]

    def open_vocab_batch(
        self,
        images: Sequence[Any],
        classes: Sequence[str] | str,
        preset: str = DEFAULT_OPENVOCAB_PRESET,
        **options: Any,
    ) -> list:
        from zsdense.tasks.openvocab import run_open_vocab

        return run_open_vocab(
            self, self.contexts(images), classes=classes, preset=preset, **options
        )

    def refer(self, image: Any, text: str, preset: str | None = None, **options: Any):
        """One mask for a referring expression."""
        return self.refer_batch([image], [text], preset=preset, **options)[0]

    def refer_batch(
        self, images: Sequence[Any], texts: Sequence[str], preset: str | None = None, **options: Any
    ) -> list:
        """One result per (image, text) pair; repeated images reuse their proposals/features
        when the same ImageContext object is passed."""
        from zsdense.tasks.referring import run_refer

        return run_refer(self, self.contexts(images), list(texts), preset=preset, **options)

    def run(self, image: Any, tasks: Sequence[dict | str]) -> dict:
        """Several heads on one image with one shared encoder pass: ``{task name: result}``.

        ``tasks``: e.g. ``["anomaly", {"task": "openvocab", "classes": ["cat", "sofa"]},
        {"task": "refer", "text": "the cat on the left"}]`` (see ``zsdense.engine.specs``).
        """
        from zsdense.engine.specs import run_tasks

        return run_tasks(self, image, tasks)


def segment_anomalies(
    images: Sequence[Any],
    object_name: str | None = None,
    preset: str = DEFAULT_ANOMALY_PRESET,
    **kwargs: Any,
) -> list:
    """One call: anomaly results for a list of images (``Segmenter`` kwargs accepted)."""
    seg_kw, opts = _split_kwargs(kwargs)
    return Segmenter(**seg_kw).anomaly_batch(images, object_name=object_name, preset=preset, **opts)


def segment_open_vocab(
    images: Sequence[Any],
    classes: Sequence[str] | str,
    preset: str = DEFAULT_OPENVOCAB_PRESET,
    **kwargs: Any,
) -> list:
    """One call: open-vocabulary label maps for a list of images."""
    seg_kw, opts = _split_kwargs(kwargs)
    return Segmenter(**seg_kw).open_vocab_batch(images, classes=classes, preset=preset, **opts)


def segment_referring(
    images: Sequence[Any], texts: Sequence[str], preset: str | None = None, **kwargs: Any
) -> list:
    """One call: one mask per (image, expression) pair."""
    seg_kw, opts = _split_kwargs(kwargs)
    return Segmenter(**seg_kw).refer_batch(images, texts, preset=preset, **opts)


_SEGMENTER_KW = (
    "device",
    "models",
    "precision",
    "weights_dir",
    "download",
    "batch_size",
    "max_pixels",
)


def _split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    seg = {k: kwargs.pop(k) for k in list(kwargs) if k in _SEGMENTER_KW}
    return seg, kwargs
