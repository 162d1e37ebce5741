"""Anomaly segmentation head: Crane / Crane+ maps and scores, batch mutual scoring, decisions.

``run_anomaly(rt, ctxs, object_name=..., preset=...)`` is what ``Segmenter.anomaly_batch`` and
the CLI call. Per image it returns an :class:`AnomalyResult` at the original image size:

- ``anomaly_map`` (H, W) float32: the abnormal probability map, computed at the preset's input
  size (518), Gaussian-smoothed there (σ=4, scipy's reflect mode) and resized bilinearly;
- ``score``: Crane's score-based pooling (or MuSc's max-of-map score, min-max normalised over
  the set and smoothed over CLIP neighbours);
- ``mask = anomaly_map >= threshold``; ``label = score >= image_threshold`` (None without one).

Decisions. ``threshold``: a fixed value, else one calibrated from known-good images
(``calibrate_with``: the max over their maps, or the ``calibrate_percentile``-th percentile of
their pixels), else 0.5 on the probability map (``ANOMALY_DEFAULT_THRESHOLD``; for ``musc``,
whose maps are distances, pass a threshold or calibrate). ``image_threshold``: a fixed value, else
calibrated from the good images' scores the same way, else None (no label). Every result records
the thresholds used and where they came from in ``meta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zsdense.config import ANOMALY_DEFAULT_THRESHOLD, AnomalyPreset
from zsdense.dense.musc_backbones import resolve_backbone
from zsdense.errors import ConfigError
from zsdense.io.instances import instance_masks, mask_instances, to_supervision
from zsdense.io.writers import write_outputs
from zsdense.options import AnomalyOptions, OutputOptions, parse_layers, resolve_anomaly_preset
from zsdense.tasks.common import batched_get, model_input
from zsdense.tasks.musc import run_musc

__all__ = ["AnomalyResult", "run_anomaly", "parse_layers", "resolve_preset", "load_encoders"]


@dataclass
class AnomalyResult:
    """One image's anomaly output, at the original image size (numpy, JSON-able meta)."""

    score: float
    anomaly_map: np.ndarray  # (H, W) float32
    mask: np.ndarray  # (H, W) bool
    label: bool | None
    threshold: float
    image_threshold: float | None
    meta: dict = field(default_factory=dict)
    model_map: np.ndarray | None = field(default=None, repr=False)  # (S, S) smoothed, at input size

    def write(
        self, stem, image: np.ndarray, out: OutputOptions, params: dict | None = None
    ) -> dict:
        """Mask, float map and overlay next to ``stem``; the scores and decisions for the
        manifest (the thresholds used and where they came from, the defect area)."""
        outputs = write_outputs(
            stem,
            image,
            fmt=out.fmt,
            overlay=out.overlay,
            mask=self.mask,
            float_map=self.anomaly_map,
            heat=self.anomaly_map,
            caption=f"anomaly score {float(self.score):.3f}",
            random_weights=bool(self.meta.get("random_weights")),
        )
        scores: dict[str, Any] = {"score": float(self.score)}
        if self.label is not None:
            scores["label"] = bool(self.label)
        scores["threshold"] = float(self.threshold)
        scores["threshold_source"] = self.meta.get("threshold_source")
        scores["image_threshold"] = self.image_threshold
        scores["label"] = self.label
        scores["defect_area"] = round(float(self.mask.mean()), 6) if self.mask.size else 0.0
        return {
            "outputs": outputs,
            "scores": scores,
            "meta": dict(self.meta),
            "instances": self.instances,
        }

    @property
    def instances(self) -> list[dict]:
        """The defects: connected components of the mask with box, area and the max / mean of
        the anomaly map over each (:func:`zsdense.io.instances.mask_instances`)."""
        return mask_instances(self.mask, self.anomaly_map)

    def to_supervision(self):
        """The defects as ``supervision.Detections`` (class "anomaly", confidence = the max of
        the map over the defect); needs ``pip install 'zsdense[supervision]'``."""
        insts = self.instances
        return to_supervision(
            insts, instance_masks(self.mask, insts), self.mask.shape, class_names=("anomaly",)
        )


# ---- options (parsed and validated in zsdense.options) ---------------------------------------

resolve_preset = resolve_anomaly_preset


# ---- text side -----------------------------------------------------------------------------


def choose_checkpoint(cfg: AnomalyPreset, domain: str, dataset: str | None) -> str:
    """The published protocol: MVTec -> the VisA-trained prompts, medical -> the medical ones."""
    if domain == "medical":
        return cfg.checkpoint_medical
    if dataset and dataset.lower().replace("-", "").replace("_", "") in ("mvtec", "mvtecad"):
        return cfg.checkpoint_mvtec
    return cfg.checkpoint


def text_features(
    rt,
    clip,
    cfg: AnomalyPreset,
    object_name: str | None,
    *,
    domain: str = "industrial",
    dataset: str | None = None,
    explicit: bool = False,
) -> tuple[torch.Tensor, dict]:
    """T (2, D) on the CLIP device and a meta dict saying which prompts were used.

    ``cfg.prompts``: ``learned`` (the preset's registry checkpoint for this domain/dataset),
    ``ensemble``, a registry name or a ``.pth`` path. Learned prompts need a text tower of their
    width (768: ViT-L/14); when the default ``learned`` meets another width (the ``tiny`` models)
    the ensemble is used instead and the meta says so. An explicit checkpoint that does not fit
    is a ConfigError.
    """
    from zsdense.text import anomaly_prompts as ap

    spec = cfg.prompts
    meta: dict = {}
    if spec == "learned":
        name = choose_checkpoint(cfg, domain, dataset)
        text_width = int(clip.model.ln_final.weight.shape[0])
        if text_width != 768 and not explicit:
            meta["prompts_note"] = (
                f"learned prompts ({name}) need a 768-wide text tower; this CLIP ({clip.arch}) "
                f"has {text_width}: used the '{cfg.prompt_ensemble}' ensemble instead"
            )
            spec = "ensemble"
        else:
            spec = name
    if spec == "ensemble" or str(spec).endswith(".json"):
        ens = cfg.prompt_ensemble if spec == "ensemble" else str(spec)
        key = ("anomaly-ensemble", clip.arch, ens, object_name or "")
        if key not in rt.text_cache:
            rt.text_cache[key] = ap.ensemble_text_features(clip, object_name, ens)
        meta.update(
            prompts="ensemble",
            prompt_ensemble=ens,
            object=object_name or ap.DEFAULT_OBJECT,
        )
        return rt.text_cache[key], meta
    key = ("anomaly-learned", clip.arch, spec, cfg.deep_prompt_fp16)
    if key not in rt.text_cache:
        lp = ap.resolve_learned_prompts(
            spec, weights_dir=rt.config.weights_dir, download=rt.config.download
        )
        rt.text_cache[key] = ap.learned_text_features(clip, lp, deep_fp16=cfg.deep_prompt_fp16)
    meta.update(prompts="learned", prompt_checkpoint=spec)
    if object_name:
        meta["object_note"] = "learned prompts are object-agnostic: --object is not used"
    return rt.text_cache[key], meta


def load_encoders(rt, options: AnomalyOptions) -> None:
    """Load every model and prompt checkpoint the options need (a run's setup, before its first
    image: missing weights fail the run once instead of every image)."""
    cfg = options.config()
    clip = rt.clip(cfg.clip_arch)
    if cfg.method == "musc":
        _kind, dino_name = resolve_backbone(cfg.musc_backbone)
        if dino_name is not None:
            rt.dinov2(dino_name)
        return
    if cfg.use_dattn:
        rt.dinov2(cfg.dino_name)
    text_features(
        rt,
        clip,
        cfg,
        options.object_name,
        domain=options.domain,
        dataset=options.dataset,
        explicit=options.prompts_explicit,
    )


# ---- crane / crane+ ------------------------------------------------------------------------


def _crane_batch_features(rt, cfg: AnomalyPreset, ctxs: list) -> list[dict]:
    from zsdense.dense.crane import (
        crane_features,
        dino_input_from_clip,
        scale_block,
        scale_layers,
    )

    clip = rt.clip(cfg.clip_arch)
    n_layers = clip.num_layers
    start = scale_block(cfg.eattn_start_block, n_layers)
    layers = None if cfg.eattn_layers is None else scale_layers(cfg.eattn_layers, n_layers)
    x01 = model_input(ctxs, cfg.image_size, rt.device)
    x = clip.normalize(x01)
    dino_feats = None
    with rt.autocast():
        if cfg.use_dattn:
            dino = rt.dinov2(cfg.dino_name)
            d_in = dino.normalize(dino_input_from_clip(x, clip.mean, clip.std))
            dino_feats = dino.patch_features(d_in).float()
        f = crane_features(
            clip,
            x,
            start_block=start,
            attn_type=cfg.attn_type,
            layers=layers,
            dino_feats_bchw=dino_feats,
            dattn_beta=cfg.dattn_beta,
            dattn_gamma=cfg.dattn_gamma,
            dattn_mean=cfg.dattn_mean,
            dattn_value_source=cfg.dattn_value_source,
        )
    maps = torch.stack([m.float() for m in f.maps], dim=1)  # (B, L, N, D)
    glob = f.global_embed.float()
    info = {
        "start_block": start,
        "layers": list(layers) if layers else "as-run",
        "map_names": f.names,
        "grid": list(f.grid),
    }
    return [
        {"maps": maps[i], "global": glob[i], "grid": f.grid, "info": info} for i in range(len(ctxs))
    ]


@torch.no_grad()
def crane_model_maps(
    rt, cfg: AnomalyPreset, ctxs: list, text: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Smoothed maps (B, S, S) at the input size and scores (B,) for a batch of contexts."""
    from zsdense.dense.crane import crane_maps
    from zsdense.dense.smoothing import smooth_maps

    key = (
        "anomaly-crane",
        cfg.clip_arch,
        cfg.image_size,
        cfg.attn_type,
        cfg.eattn_start_block,
        cfg.eattn_layers,
        cfg.use_dattn,
        cfg.dino_name,
        cfg.dattn_beta,
        cfg.dattn_gamma,
        cfg.dattn_mean,
        cfg.dattn_value_source,
        tuple(id(c) for c in ctxs) if cfg.use_dattn and cfg.dattn_mean == "batch" else None,
    )
    feats = batched_get(ctxs, key, lambda cs: _crane_batch_features(rt, cfg, cs))
    maps = torch.stack([f["maps"] for f in feats], dim=1)  # (L, B, N, D)
    glob = torch.stack([f["global"] for f in feats], dim=0)
    size = (cfg.image_size, cfg.image_size)
    r = crane_maps(
        list(maps),
        text.float().to(maps.device),
        glob,
        grid=feats[0]["grid"],
        size=size,
        soft_mean=cfg.soft_mean,
        temperature=cfg.temperature,
        alpha=cfg.fusion_alpha,
    )
    smoothed = smooth_maps(r.anomaly_map, cfg.sigma, cfg.smoothing_backend)
    return smoothed, r.anomaly_score, dict(feats[0]["info"])


# ---- decisions -----------------------------------------------------------------------------


def resize_map(map_hw: torch.Tensor, size_hw: tuple[int, int]) -> np.ndarray:
    """(S, S) -> (H, W) float32 numpy, bilinear (align_corners=False)."""
    m = map_hw.float()
    if tuple(m.shape[-2:]) != tuple(size_hw):
        m = F.interpolate(m[None, None], size=tuple(size_hw), mode="bilinear", align_corners=False)[
            0, 0
        ]
    return m.cpu().numpy().astype(np.float32, copy=False)


def calibrate_threshold(values: Sequence[np.ndarray], percentile: float | None = None) -> float:
    """Max of known-good values (maps or scores), or their ``percentile``-th percentile."""
    flat = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values])
    if flat.size == 0:
        raise ConfigError("calibration needs at least one known-good image")
    if percentile is None:
        return float(flat.max())
    if not 0.0 <= float(percentile) <= 100.0:
        raise ConfigError(f"--calibrate-percentile must be in [0, 100], got {percentile}")
    return float(np.percentile(flat, float(percentile)))


def _calibration_images(source: Any) -> list:
    """A folder / file / glob / list of paths or arrays -> a list of image inputs."""
    if isinstance(source, (str, Path)):
        from zsdense.io import list_inputs

        items = list_inputs([source])
        if not items:
            raise ConfigError(f"--calibrate-with {source}: no images found")
        return [it.path for it in items]
    return list(source)


def calibration(rt, cfg: AnomalyPreset, object_name, source, percentile, run_kw) -> dict:
    """Thresholds from known-good images (computed once per runtime, source and settings)."""
    key = (
        "anomaly-calibration",
        cfg,
        object_name,
        str(source) if isinstance(source, (str, Path)) else id(source),
        percentile,
        tuple(sorted((k, str(v)) for k, v in run_kw.items())),
    )

    def compute() -> dict:
        ctxs = rt.contexts(_calibration_images(source))
        res = _run_core(rt, cfg, ctxs, object_name, run_kw)
        return {
            "threshold": calibrate_threshold([r[0] for r in res], percentile),
            "image_threshold": calibrate_threshold([np.array([r[1]]) for r in res], percentile),
            "n_images": len(ctxs),
            "rule": "max" if percentile is None else f"percentile {percentile}",
        }

    return rt.memo(key, compute)


# ---- the run -------------------------------------------------------------------------------


@torch.no_grad()
def _run_core(rt, cfg: AnomalyPreset, ctxs: list, object_name, run_kw: dict):
    """[(map (H, W) float32, score, model map (S, S) tensor, meta)] for the contexts."""
    domain = run_kw.get("domain") or "industrial"
    if cfg.method == "musc":
        maps, scores, info = run_musc(rt, cfg, ctxs, dataset=run_kw.get("dataset"))
        meta = {"musc": info}
    else:
        clip = rt.clip(cfg.clip_arch)
        text, tmeta = text_features(
            rt,
            clip,
            cfg,
            object_name,
            domain=domain,
            dataset=run_kw.get("dataset"),
            explicit=run_kw.get("_prompts_explicit", False),
        )
        bs = int(run_kw.get("batch_size") or rt.config.batch_size)
        maps_l, scores_l = [], []
        info: dict = {}
        for i in range(0, len(ctxs), bs):
            m, s, info = crane_model_maps(rt, cfg, ctxs[i : i + bs], text)
            maps_l.append(m.cpu())
            scores_l.append(s.cpu())
        maps = torch.cat(maps_l, dim=0)
        scores = torch.cat(scores_l, dim=0)
        meta = {**tmeta, "eattn": info}
    out = []
    for c, m, s in zip(ctxs, maps, scores):
        out.append((resize_map(m, c.size), float(s), m, meta))
    return out


def run_anomaly(
    rt, ctxs: Sequence, options: AnomalyOptions | None = None, /, **kwargs: Any
) -> list[AnomalyResult]:
    """Anomaly results for ``ctxs`` (see the module docstring).

    ``options``: an :class:`~zsdense.options.AnomalyOptions`, or keyword arguments mapped onto
    one: ``preset``, ``object_name``, ``domain`` (industrial | medical: the medical fusion order
    and checkpoint), ``dataset`` (``"mvtec"`` selects the VisA-trained prompts as the papers do),
    ``threshold``, ``image_threshold``, ``calibrate_with``, ``calibrate_percentile``,
    ``batch_size``, ``keep_model_map`` (attach the smoothed map at the input size), and any
    :class:`~zsdense.config.AnomalyPreset` field (``attn_type``, ``eattn_layers`` e.g.
    ``"6,12,18,24"``, ``dattn_mean``, ``soft_mean``, ``sigma``, ``prompts``...).
    """
    if options is None:
        options = AnomalyOptions.from_mapping(kwargs)
    elif kwargs:
        raise ConfigError("give an AnomalyOptions or keyword options, not both")
    cfg = options.config()
    if cfg.method not in ("crane", "musc"):
        raise ConfigError(
            f"preset {options.preset!r} ({cfg.method}) is not a zero-shot method: run it through "
            "Segmenter.anomaly or zsdense.tasks.anomaly_methods.run"
        )
    domain = options.domain
    object_name = options.object_name
    run_kw = {
        "domain": domain,
        "dataset": options.dataset,
        "batch_size": options.batch_size,
        "_prompts_explicit": options.prompts_explicit,
    }
    ctxs = list(ctxs)
    if not ctxs:
        return []

    # decisions
    thr = options.threshold
    ithr = options.image_threshold
    thr_src = "fixed" if thr is not None else None
    ithr_src = "fixed" if ithr is not None else None
    calib = None
    if options.calibrate_with is not None and (thr is None or ithr is None):
        calib = calibration(
            rt, cfg, object_name, options.calibrate_with, options.calibrate_percentile, run_kw
        )
        if thr is None:
            thr, thr_src = calib["threshold"], "calibrated"
        if ithr is None:
            ithr, ithr_src = calib["image_threshold"], "calibrated"
    if thr is None:
        thr, thr_src = ANOMALY_DEFAULT_THRESHOLD, "default"
    thr = float(thr)
    ithr = None if ithr is None else float(ithr)

    core = _run_core(rt, cfg, ctxs, object_name, run_kw)
    results = []
    for amap, score, model_map, meta in core:
        m = dict(rt.result_meta())
        m.update(meta)
        m.update(
            preset=cfg.name,
            method=cfg.method,
            domain=domain,
            image_size=cfg.image_size,
            clip_arch=cfg.clip_arch,
            soft_mean=cfg.soft_mean,
            sigma=cfg.sigma,
            threshold=thr,
            threshold_source=thr_src,
            image_threshold=ithr,
            image_threshold_source=ithr_src,
        )
        if cfg.method == "crane":
            m.update(
                attn_type=cfg.attn_type,
                eattn_layers=("as-run" if cfg.eattn_layers is None else list(cfg.eattn_layers)),
            )
            if cfg.use_dattn:
                m.update(
                    dino=cfg.dino_name,
                    dattn_mean=cfg.dattn_mean,
                    dattn_value_source=cfg.dattn_value_source,
                )
        if calib is not None:
            m["calibration"] = {k: calib[k] for k in ("n_images", "rule")}
        if thr_src == "default" and cfg.method == "musc":
            m["threshold_note"] = (
                "musc maps are patch distances, not probabilities: pass "
                "--threshold or --calibrate-with for a meaningful mask"
            )
        results.append(
            AnomalyResult(
                score=score,
                anomaly_map=amap,
                mask=amap >= thr,
                label=None if ithr is None else bool(score >= ithr),
                threshold=thr,
                image_threshold=ithr,
                meta=m,
                model_map=model_map.numpy() if options.keep_model_map else None,
            )
        )
    return results
