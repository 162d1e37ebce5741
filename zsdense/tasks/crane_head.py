"""Crane / Crane+ maps and scores (``specs/anomaly.md``): the zero-shot CLIP scorer's work.

Per image: the abnormal probability map computed at the preset's input size (518), Gaussian
smoothed there (σ=4, scipy's reflect mode) and resized bilinearly to the image; the score is
Crane's score-based pooling. Text features are the preset's learned prompts (or the prompt
ensemble), cached per runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from zsdense.config import AnomalyPreset
from zsdense.tasks.anomaly_registry import RawScore
from zsdense.tasks.common import (
    batched_get,
    exact_inputs,
    model_input,
    preset_meta,
    resize_map,
)

if TYPE_CHECKING:
    from zsdense.options import AnomalyOptions


# ---- text side -----------------------------------------------------------------------------


def choose_checkpoint(cfg: AnomalyPreset, domain: str, dataset: str | None) -> str:
    """The published protocol: MVTec -> the VisA-trained prompts, medical -> the medical ones."""
    if domain == "medical":
        return cfg.checkpoint_medical
    if dataset and dataset.lower().replace("-", "").replace("_", "") in ("mvtec", "mvtecad"):
        return cfg.checkpoint_mvtec
    return cfg.checkpoint


def trained_size_note(rt, spec: str, image_size: int) -> str | None:
    """A note when a checkpoint trained by ``zsdense train-prompts`` at one input size is used
    at another (its metadata records the recipe); None otherwise (cached per runtime)."""
    key = ("anomaly-prompt-size-note", str(spec), int(image_size))
    if key in rt.text_cache:
        return rt.text_cache[key]
    note = None
    if Path(str(spec)).suffix == ".safetensors" and Path(str(spec)).is_file():
        from zsdense.text.anomaly_prompts import read_prompt_metadata

        recipe = read_prompt_metadata(spec).get("recipe")
        trained = recipe.get("image_size") if isinstance(recipe, dict) else None
        if isinstance(trained, int) and trained != int(image_size):
            note = (
                f"the prompts {spec} were trained at {trained} px and are used at {image_size} "
                f"px: maps and scores may differ from what training validated (--image-size "
                f"{trained} matches it)"
            )
    rt.text_cache[key] = note
    return note


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
    note = trained_size_note(rt, spec, cfg.image_size)
    if note:
        meta["prompts_size_note"] = note
    if object_name:
        meta["object_note"] = "learned prompts are object-agnostic: --object is not used"
    return rt.text_cache[key], meta


def options_text(rt, opts: AnomalyOptions) -> tuple[torch.Tensor, dict]:
    """:func:`text_features` for the options' preset, object, domain and dataset."""
    cfg = opts.config()
    return text_features(
        rt,
        rt.clip(cfg.clip_arch),
        cfg,
        opts.object_name,
        domain=opts.domain,
        dataset=opts.dataset,
        explicit=opts.prompts_explicit,
    )


def load_encoders(rt, opts: AnomalyOptions) -> None:
    """Load CLIP (and DINOv2 for Crane+) and the prompts: a run's setup, before its first
    image, so missing weights fail the run once instead of every image."""
    cfg = opts.config()
    if cfg.use_dattn:
        rt.dinov2(cfg.dino_name)
    options_text(rt, opts)


def encoders(cfg: AnomalyPreset) -> tuple[str, ...]:
    """The encoders a Crane preset loads."""
    dino = (f"dinov2/{cfg.dino_name}",) if cfg.use_dattn else ()
    return (f"clip/{cfg.clip_arch}", *dino)


# ---- maps and scores -----------------------------------------------------------------------


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
    x01 = model_input(ctxs, cfg.image_size, rt.device, exact=exact_inputs(clip))
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


def _features_key(cfg: AnomalyPreset, ctxs: list) -> tuple:
    """The per-image cache key of Crane's dense tokens (batch-dependent only for D-Attn's
    batch mean, which then keys on the batch's members)."""
    return (
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


@torch.no_grad()
def crane_model_maps(
    rt, cfg: AnomalyPreset, ctxs: list, text: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Smoothed maps (B, S, S) at the input size and scores (B,) for a batch of contexts."""
    from zsdense.dense.crane import crane_maps
    from zsdense.dense.smoothing import smooth_maps

    key = _features_key(cfg, ctxs)
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
        abnormal_only=True,
    )
    smoothed = smooth_maps(r.anomaly_map, cfg.sigma, cfg.smoothing_backend)
    return smoothed, r.anomaly_score, dict(feats[0]["info"])


def crane_meta(cfg: AnomalyPreset) -> dict:
    """The Crane settings a result records."""
    meta = {
        "attn_type": cfg.attn_type,
        "eattn_layers": "as-run" if cfg.eattn_layers is None else list(cfg.eattn_layers),
    }
    if cfg.use_dattn:
        meta.update(
            dino=cfg.dino_name,
            dattn_mean=cfg.dattn_mean,
            dattn_value_source=cfg.dattn_value_source,
        )
    return meta


@torch.no_grad()
def crane_scores(rt, opts: AnomalyOptions, ctxs: list) -> list[RawScore]:
    """Crane(+) raw maps at each image's size, scores and meta, in encoder batches of the
    options' (else the runtime's) batch size."""
    cfg = opts.config()
    text, tmeta = options_text(rt, opts)
    bs = int(opts.batch_size or rt.config.batch_size)
    out: list[RawScore] = []
    for i in range(0, len(ctxs), bs):
        chunk = ctxs[i : i + bs]
        maps, scores, info = crane_model_maps(rt, cfg, chunk, text)
        meta = {**tmeta, "eattn": info, **preset_meta(cfg, opts.domain), **crane_meta(cfg)}
        for c, m, s in zip(chunk, maps.cpu(), scores.cpu()):
            out.append(RawScore(resize_map(m, c.size), float(s), dict(meta), m.numpy()))
    return out


__all__ = [
    "choose_checkpoint",
    "crane_model_maps",
    "crane_scores",
    "encoders",
    "load_encoders",
    "options_text",
    "text_features",
]
