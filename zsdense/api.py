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

from typing import Any, Sequence

from zsdense.config import (
    DEFAULT_ANOMALY_PRESET,
    DEFAULT_BATCH_SIZE,
    DEFAULT_OPENVOCAB_PRESET,
    RuntimeConfig,
)
from zsdense.runtime import Runtime


class Segmenter:
    """The Python face: one :class:`~zsdense.runtime.Runtime` (device, precision, encoders,
    caches; cheap to construct, nothing loads until first use) serving every task.

    Runtime attributes (``device``, ``dtype``, ``config``, ``clip()``, ``context()``...) are
    reachable on the Segmenter too, as ``seg.runtime.<name>``.
    """

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
        self.runtime = Runtime(
            RuntimeConfig(
                device=device,
                precision=precision,
                models=models,
                weights_dir=weights_dir,
                download=download,
                batch_size=batch_size,
                **kwargs,
            )
        )
        # default learned prompts of the anomaly presets that use prompts (a checkpoint file from
        # `zsdense train-prompts`, a registry name, or "ensemble"); per-call prompts= wins
        self.prompts = prompts

    def __getattr__(self, name: str) -> Any:
        # the runtime's attributes (device, dtype, config, clip(), text_cache...) on the face
        if name == "runtime":
            raise AttributeError(name)
        return getattr(self.runtime, name)

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
        from zsdense.tasks.anomaly_registry import scorer_for

        if self.prompts is not None and options.get("prompts") is None:
            if scorer_for(preset).uses_prompts:  # the scorer's declaration
                options = {**options, "prompts": self.prompts}
        opts = AnomalyOptions.from_mapping(options, object_name=object_name, preset=preset)
        return anomaly_methods.run(self.runtime, self.runtime.contexts(images), opts)

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
            self.runtime, self.runtime.contexts(images), classes=classes, preset=preset, **options
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

        return run_refer(
            self.runtime, self.runtime.contexts(images), list(texts), preset=preset, **options
        )

    def run(self, image: Any, tasks: Sequence[dict | str]) -> dict:
        """Several heads on one image with one shared encoder pass: ``{task name: result}``.

        ``tasks``: e.g. ``["anomaly", {"task": "openvocab", "classes": ["cat", "sofa"]},
        {"task": "refer", "text": "the cat on the left"}]`` (see ``zsdense.engine.specs``).
        """
        from zsdense.engine.specs import run_tasks

        return run_tasks(self.runtime, image, tasks)


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
    "registers",
    "registers_count",
    "registers_mode",
    "registers_batch",
    "allocator",
)


def _split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    seg = {k: kwargs.pop(k) for k in list(kwargs) if k in _SEGMENTER_KW}
    return seg, kwargs
