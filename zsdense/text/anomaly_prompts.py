"""Normal / abnormal text vectors for anomaly segmentation: prompt ensembles and learned prompts.

Two sources give ``T = [t_normal, t_abnormal]`` (2, D), each row L2-normalised:

- the training-free ensemble (WinCLIP / APRIL-GAN states × templates, ``prompts/anomaly_prompts
  .json``): every prompt embedded and L2-normalised, averaged per state group, normalised again;
- Crane's learned prompts (prompt-learner checkpoints, format in ``shared/data/crane/README.md``):
  ``[start token, 12 learned context vectors, "object." / "damaged object." + padding]`` through
  the CLIP text transformer, with 4 learned "deep" tokens replacing positions 1..4 at the input
  of text blocks 2..9 (rounded to float16 first, as Crane's ``.half()`` does), then ln_final and
  the text projection at the end-of-text position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from zsdense.errors import ConfigError, WeightsError

ENSEMBLE_FILE = "anomaly_prompts.json"
DEFAULT_OBJECT = "object"


# ---- ensembles -----------------------------------------------------------------------------


@lru_cache(maxsize=4)
def load_ensembles() -> dict:
    """The ensemble table shipped as package data (``zsdense.prompts/anomaly_prompts.json``)."""
    from importlib import resources

    try:
        text = resources.files("zsdense.prompts").joinpath(ENSEMBLE_FILE).read_text("utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as exc:  # pragma: no cover - broken install
        raise ConfigError(
            f"package data {ENSEMBLE_FILE} is missing ({exc}); reinstall zsdense"
        ) from None
    data = json.loads(text)
    return {k: v for k, v in data.items() if not k.startswith("_")}


def load_ensemble_file(path: str | Path) -> dict:
    """A user ensemble: ``{"normal_states": [...], "abnormal_states": [...], "templates": [...]}``
    (or a table of such groups, as ``anomaly_prompts.json``: the first group is used)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--prompts {p}: cannot read the prompt ensemble ({exc})") from None
    keys = ("normal_states", "abnormal_states", "templates")
    if isinstance(data, dict) and not all(k in data for k in keys):
        groups = [v for k, v in data.items() if not k.startswith("_") and isinstance(v, dict)]
        data = groups[0] if groups else data
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) and data.get(k) and all(isinstance(x, str) for x in data[k])
        for k in keys
    ):
        raise ConfigError(
            f"--prompts {p}: an ensemble file needs non-empty string lists "
            f"{', '.join(keys)} (see prompts/anomaly_prompts.json)"
        )
    return data


def ensemble_prompts(object_name: str | None, ensemble: str = "april-gan") -> tuple[list, list]:
    """(normal prompts, abnormal prompts): every template × state, with the object name.

    ``ensemble``: a shipped ensemble name (``april-gan``, ``winclip``) or a ``.json`` file with
    ``normal_states``, ``abnormal_states`` and ``templates`` (``{}`` = object / state).
    """
    if str(ensemble).endswith(".json"):
        e = load_ensemble_file(ensemble)
    else:
        table = load_ensembles()
        if ensemble not in table:
            raise ConfigError(
                f"unknown prompt ensemble {ensemble!r}; choose one of: {', '.join(sorted(table))}"
                f" or a .json file"
            )
        e = table[ensemble]
    name = (object_name or DEFAULT_OBJECT).strip().replace("_", " ") or DEFAULT_OBJECT
    groups = []
    for key in ("normal_states", "abnormal_states"):
        groups.append([t.format(s.format(name)) for s in e[key] for t in e["templates"]])
    return groups[0], groups[1]


@torch.no_grad()
def ensemble_text_features(clip, object_name: str | None, ensemble: str = "april-gan"):
    """T (2, D): mean of L2-normalised prompt embeddings per state group, re-normalised."""
    normal, abnormal = ensemble_prompts(object_name, ensemble)
    rows = []
    for group in (normal, abnormal):
        e = clip.encode_text(group)  # (P, D), L2-normalised
        rows.append(F.normalize(e.mean(dim=0), dim=-1))
    return torch.stack(rows, dim=0)


# ---- learned prompts -----------------------------------------------------------------------


@dataclass(frozen=True)
class LearnedPrompts:
    """A Crane / AnomalyCLIP-style prompt learner: per state (0 normal, 1 abnormal) the token
    embeddings of the full prompt (77, C) and its end-of-text position, plus deep prompts."""

    prompts: torch.Tensor  # (2, 77, C): [prefix, ctx, suffix] for normal, abnormal
    eot: torch.Tensor  # (2,) long: end-of-text positions (argmax of the token ids)
    deep: tuple[torch.Tensor, ...]  # each (n_deep, C), for text blocks 2..(1+len)
    source: str = ""

    @property
    def width(self) -> int:
        return int(self.prompts.shape[-1])

    @property
    def num_learned(self) -> int:
        """Learnable parameters (ctx vectors + deep prompts): 43,008 for Crane's checkpoints."""
        n_ctx = int(self.n_ctx)
        return 2 * n_ctx * self.width + sum(int(d.numel()) for d in self.deep)

    n_ctx: int = 12
    # trained by zsdense (safetensors metadata): the CLIP they were trained on, when recorded
    base_model: str | None = None
    base_sha256: str | None = None


PROMPT_META_KEY = "zsdense"  # safetensors metadata entry holding a trained checkpoint's JSON


_REQUIRED = (
    "ctx_pos",
    "ctx_neg",
    "token_prefix_pos",
    "token_prefix_neg",
    "token_suffix_pos",
    "token_suffix_neg",
    "tokenized_prompts_pos",
    "tokenized_prompts_neg",
)


def learned_prompts_from_state_dict(
    sd: dict[str, torch.Tensor], source: str = ""
) -> LearnedPrompts:
    """Validate and assemble a prompt-learner state dict; WeightsError naming what is wrong."""
    where = source or "prompt checkpoint"
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise WeightsError(
            f"{where}: not a Crane/AnomalyCLIP prompt-learner checkpoint (missing "
            f"{', '.join(missing)}); expected a dict 'prompt_learner' with ctx_pos, ctx_neg, "
            f"token_prefix_*, token_suffix_*, tokenized_prompts_*, compound_prompts_text.*"
        )
    states = []
    for tag in ("pos", "neg"):
        ctx = sd[f"ctx_{tag}"].float()
        pre = sd[f"token_prefix_{tag}"].float()
        suf = sd[f"token_suffix_{tag}"].float()
        tok = sd[f"tokenized_prompts_{tag}"]
        if ctx.dim() != 4 or pre.dim() != 4 or suf.dim() != 4:
            raise WeightsError(
                f"{where}: ctx_{tag}/token_prefix_{tag}/token_suffix_{tag} must be 4-D "
                f"(1, 1, n, C); got {tuple(ctx.shape)}, {tuple(pre.shape)}, {tuple(suf.shape)}"
            )
        widths = {ctx.shape[-1], pre.shape[-1], suf.shape[-1]}
        if len(widths) != 1:
            raise WeightsError(f"{where}: inconsistent embedding widths {sorted(widths)} ({tag})")
        if ctx.shape[:2] != (1, 1) or pre.shape[:3] != (1, 1, 1) or suf.shape[:2] != (1, 1):
            raise WeightsError(
                f"{where}: only single-prompt learners (1, 1, n, C) are supported; got ctx_{tag} "
                f"{tuple(ctx.shape)}, token_prefix_{tag} {tuple(pre.shape)}"
            )
        length = pre.shape[2] + ctx.shape[2] + suf.shape[2]
        tok = tok.reshape(-1)
        if tok.numel() != length:
            raise WeightsError(
                f"{where}: prompt length {length} ({tag}: 1 + {ctx.shape[2]} + {suf.shape[2]}) "
                f"does not match tokenized_prompts_{tag} length {tok.numel()}"
            )
        states.append((torch.cat([pre[0, 0], ctx[0, 0], suf[0, 0]], dim=0), int(tok.argmax())))
    if states[0][0].shape != states[1][0].shape:
        raise WeightsError(f"{where}: normal and abnormal prompts differ in shape")
    width = states[0][0].shape[-1]
    n_ctx = sd["ctx_pos"].shape[2]
    deep = []
    i = 0
    while f"compound_prompts_text.{i}" in sd:
        d = sd[f"compound_prompts_text.{i}"].float()
        if d.dim() != 2 or d.shape[-1] != width:
            raise WeightsError(
                f"{where}: compound_prompts_text.{i} has shape {tuple(d.shape)}, expected "
                f"(n, {width})"
            )
        deep.append(d)
        i += 1
    if deep and len({d.shape[0] for d in deep}) != 1:
        raise WeightsError(f"{where}: deep prompts have different lengths")
    lp = LearnedPrompts(
        prompts=torch.stack([states[0][0], states[1][0]], dim=0),
        eot=torch.tensor([states[0][1], states[1][1]], dtype=torch.long),
        deep=tuple(deep),
        source=source,
        n_ctx=int(n_ctx),
    )
    return lp


def load_learned_prompts(path: str | Path) -> LearnedPrompts:
    """Load a prompt-learner ``.pth`` (``torch.load(weights_only=True)``, never plain pickle)."""
    from zsdense.models.registry import load_state_dict_file

    p = Path(path)
    sd = load_state_dict_file(p)
    lp = learned_prompts_from_state_dict(sd, source=str(p))
    meta = read_prompt_metadata(p)
    base = meta.get("base_model") if isinstance(meta.get("base_model"), dict) else {}
    if base:
        lp = replace(lp, base_model=base.get("id"), base_sha256=base.get("sha256"))
    return lp


def read_prompt_metadata(path: str | Path) -> dict:
    """The JSON metadata zsdense stores in a trained ``.safetensors`` checkpoint ({} if none)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get(PROMPT_META_KEY)
    except Exception as exc:  # noqa: BLE001 - any unreadable header is the user's file problem
        raise WeightsError(f"{p}: not a readable safetensors file ({exc})") from None
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise WeightsError(f"{p}: its '{PROMPT_META_KEY}' metadata is not JSON") from None
    return meta if isinstance(meta, dict) else {}


def resolve_learned_prompts(
    spec: str, *, weights_dir: str | None = None, download: bool | None = None
) -> LearnedPrompts:
    """``spec`` = a file path (``.pth`` / ``.pt`` / ``.safetensors``) or a registry name
    (``crane-mvtec``, ``crane+-visa``...)."""
    p = Path(spec).expanduser()
    if p.suffix in (".pth", ".pt", ".safetensors", ".bin") or p.exists():
        if not p.is_file():
            raise ConfigError(f"--prompts {spec}: file not found")
        return load_learned_prompts(p)
    from zsdense.models import registry

    path = registry.resolve(spec, weights_dir=weights_dir, download=download)
    lp = load_learned_prompts(path)
    return replace(lp, source=spec)


def check_text_tower(clip, lp: LearnedPrompts) -> None:
    """ConfigError unless ``clip``'s text tower can host these learned prompts."""
    clip_id = getattr(clip, "base_model_id", None)
    if lp.base_model is not None and clip_id is not None and lp.base_model != clip_id:
        raise ConfigError(
            f"learned prompts {lp.source} were trained on the base model {lp.base_model!r}, "
            f"but this CLIP is {clip_id!r}: prompts only fit the CLIP they were trained with; "
            f"run with the same --models / architecture, or train prompts for this model"
        )
    clip_sha = getattr(clip, "weights_sha256", None)
    if lp.base_sha256 and clip_sha and lp.base_sha256 != clip_sha:
        raise ConfigError(
            f"learned prompts {lp.source} were trained on CLIP weights with SHA-256 "
            f"{lp.base_sha256}, but the loaded weights have {clip_sha}: a different checkpoint"
        )
    model = clip.model
    width = int(model.ln_final.weight.shape[0])
    ctx_len = int(model.positional_embedding.shape[0])
    n_blocks = len(model.transformer.resblocks)
    if lp.width != width or lp.prompts.shape[1] != ctx_len:
        raise ConfigError(
            f"learned prompts {lp.source or ''} are for a text width {lp.width} / context "
            f"{lp.prompts.shape[1]}, but the CLIP {clip.arch} text tower has width {width} / "
            f"context {ctx_len}; use --prompts ensemble or the matching CLIP (ViT-L-14-336)"
        )
    if len(lp.deep) + 1 > n_blocks:
        raise ConfigError(
            f"learned prompts {lp.source} need {len(lp.deep) + 1} text blocks, the CLIP text "
            f"tower has {n_blocks}"
        )


class _Fp16RoundTrip(torch.autograd.Function):
    """``x.half().float()`` whose backward also rounds the incoming gradient to fp16.

    This is what Crane's ``.half()`` on the expanded deep prompt followed by a concatenation
    with float32 tokens does under autograd: the values are rounded in the forward and, in the
    backward, each per-sequence gradient is rounded to fp16 before the expand sums them
    (fixtures ``crane_train`` README §1, T9).
    """

    @staticmethod
    def forward(ctx, x):  # noqa: D401 - autograd signature
        return x.half().to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.half().to(grad.dtype)


def fp16_round_trip(x: torch.Tensor, *, round_grad: bool = True) -> torch.Tensor:
    """Round ``x`` to fp16 and back (and, with ``round_grad``, its gradient as well)."""
    if round_grad and torch.is_grad_enabled() and x.requires_grad:
        return _Fp16RoundTrip.apply(x)
    return x.half().to(x.dtype)


def encode_prompt_embeddings(
    clip,
    prompts_mlc: torch.Tensor,
    eot_m: torch.Tensor,
    deep: tuple[torch.Tensor, ...] | list[torch.Tensor],
    *,
    deep_fp16: bool = True,
) -> torch.Tensor:
    """Text-tower outputs (M, D), not normalised, for M prompt-embedding sequences (M, 77, C).

    The deep prompts replace positions ``1..n_deep`` at the input of text blocks 2..1+len(deep)
    (each expanded over the M sequences, rounded to fp16 per copy when ``deep_fp16``, as
    Crane's ``.half()``; under autograd the gradients are rounded too). Differentiable with
    respect to ``prompts_mlc`` and ``deep``: prompt training (``zsdense.train``) uses it, and
    :func:`learned_text_features` is this function without gradients.
    """
    model = clip.model
    dev = clip.device
    dtype = model.ln_final.weight.dtype
    x = prompts_mlc.to(dev, dtype) + model.positional_embedding.to(dtype)  # (M, 77, C)
    mask = model.attn_mask.to(dev) if getattr(model, "attn_mask", None) is not None else None
    deep = [d.to(dev) for d in deep]
    n_deep = deep[0].shape[0] if deep else 0
    for i, blk in enumerate(model.transformer.resblocks):
        if 1 <= i <= len(deep):
            d = deep[i - 1].to(dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            if deep_fp16:
                d = fp16_round_trip(d)  # Crane's .half()
            x = torch.cat([x[:, :1], d, x[:, 1 + n_deep :]], dim=1)
        x = blk(x, attn_mask=mask)
    x = model.ln_final(x)
    idx = eot_m.to(dev)
    x = x[torch.arange(x.shape[0], device=dev), idx]  # (M, C)
    proj = model.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


@torch.no_grad()
def learned_text_features(clip, lp: LearnedPrompts, *, deep_fp16: bool = True) -> torch.Tensor:
    """T (2, D) from learned prompts through ``clip``'s text tower (deep prompts inserted)."""
    check_text_tower(clip, lp)
    x = encode_prompt_embeddings(clip, lp.prompts, lp.eot, lp.deep, deep_fp16=deep_fp16)
    return F.normalize(x.float(), dim=-1)
