"""Trained-prompt checkpoints: safetensors + JSON metadata, the training state for ``--resume``,
and an exporter to the layout Crane's ``train.py`` saves.

- ``epoch_N.safetensors`` / ``best.safetensors``: the prompt learner's state dict (Crane's keys:
  ctx_pos, ctx_neg, tokenized_prompts_*, token_prefix/suffix_*, compound_prompts_text.*) with
  JSON metadata under the ``zsdense`` key: recipe, base model id and SHA-256 (when known),
  epoch, metrics. ``zsdense anomaly --prompts FILE`` loads it; a CLIP other than the base
  model is refused.
- ``state.safetensors``: the same tensors plus the Adam moments and step counts and the
  data-order generator state; with the metadata it continues a run bit for bit.
- :func:`save_jafar`: a JAFAR upsampler (``zsdense train-upsampler``'s files, or the released
  ``{"jafar": state_dict}`` layout).
- :func:`export_published`: ``{'prompt_learner': state_dict}`` saved with ``torch.save``, which
  Crane's ``test.py`` and :func:`zsdense.text.anomaly_prompts.load_learned_prompts` both load.

Every file is written to a temporary name and renamed (``zsdense.io.writers.atomic_path``).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from zsdense.errors import ConfigError, WeightsError
from zsdense.io.writers import atomic_path
from zsdense.text.anomaly_prompts import PROMPT_META_KEY, read_prompt_metadata

FORMAT = "zsdense-prompts/1"
_OPT = "optimizer."
_RNG = "rng.data_order"


def base_model_info(clip) -> dict[str, Any]:
    """``{"id", "sha256", "arch"}`` of the CLIP the prompts are trained on."""
    return {
        "id": clip.base_model_id,
        "sha256": getattr(clip, "weights_sha256", None),
        "arch": clip.arch,
    }


def _meta_header(meta: dict[str, Any]) -> dict[str, str]:
    return {PROMPT_META_KEY: json.dumps({"format": FORMAT, **meta}, sort_keys=True)}


def _cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_prompts(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write a prompt checkpoint (safetensors, metadata JSON) atomically."""
    from safetensors.torch import save_file

    p = Path(path)
    with atomic_path(p) as tmp:
        save_file(_cpu(state_dict), str(tmp), metadata=_meta_header(meta))
    return p


def load_prompts(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) of a prompt checkpoint written by :func:`save_prompts`."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: checkpoint not found")
    try:
        sd = load_file(str(p), device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"{p}: not a readable safetensors checkpoint ({exc})") from None
    meta = read_prompt_metadata(p)
    return {k: v for k, v in sd.items() if not k.startswith((_OPT, "rng."))}, meta


def save_state(
    path: str | Path,
    learner: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    meta: dict,
) -> Path:
    """Everything ``--resume`` needs: parameters, buffers, Adam state, data-order RNG state."""
    from safetensors.torch import save_file

    tensors = dict(learner.state_dict())
    names = dict((id(p), n) for n, p in learner.named_parameters())
    for p, st in optimizer.state.items():
        n = names[id(p)]
        for key, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(float(v))
            tensors[f"{_OPT}{n}.{key}"] = t
    tensors[_RNG] = generator.get_state()
    p = Path(path)
    with atomic_path(p) as tmp:
        save_file(_cpu(tensors), str(tmp), metadata=_meta_header(meta))
    return p


def load_state(
    path: str | Path,
    learner: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> dict:
    """Restore what :func:`save_state` wrote into fresh objects; returns the metadata."""
    from safetensors.torch import load_file

    p = Path(path)
    try:
        t = load_file(str(p), device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"{p}: cannot read the training state ({exc})") from None
    meta = read_prompt_metadata(p)
    sd = {k: v for k, v in t.items() if not k.startswith((_OPT, "rng."))}
    try:
        learner.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{p}: the saved prompts do not fit this model ({exc})") from None
    dev = next(learner.parameters()).device
    for n, prm in learner.named_parameters():
        st = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            k = f"{_OPT}{n}.{key}"
            if k in t:
                st[key] = t[k] if key == "step" else t[k].to(dev)
        if st:
            optimizer.state[prm] = st
    generator.set_state(t[_RNG])
    return meta


def check_resume_settings(out: str | Path, saved: dict, now: dict) -> None:
    """ConfigError naming the first setting of ``now`` that differs from the ``saved`` state's:
    a resume never mixes two settings (shared by every resumable training in zsdense.train)."""
    for key, value in now.items():
        was = saved.get(key)
        if json.dumps(was, sort_keys=True) == json.dumps(value, sort_keys=True):
            continue
        if isinstance(was, dict) and isinstance(value, dict):
            diff = sorted(k for k in set(was) | set(value) if was.get(k) != value.get(k))
            what = ", ".join(f"{k}: {was.get(k)!r} -> {value.get(k)!r}" for k in diff)
        else:
            what = f"{was!r} -> {value!r}"
        raise ConfigError(
            f"--resume: the run in {out} was started with another {key} ({what}); a "
            f"resume never mixes two settings: use the same options or a new --out"
        )


def check_out_for_training(
    out: Path, state_file: str, resume: bool, started_glob: str = ""
) -> Path:
    """The training state's path under ``out``, refusing a ``--resume`` with nothing to resume
    (naming the epochs a stopped run wrote, when ``started_glob`` finds any) and a fresh run
    over an existing one. Returns the state path."""
    state_path = out / state_file
    if resume and not state_path.is_file():
        started = sorted(p.name for p in out.glob(started_glob)) if started_glob else []
        why = (
            f" ({', '.join(started)} written, but the run stopped before that epoch's "
            "resume point): start it again without --resume"
            if started
            else "; nothing to resume"
        )
        raise ConfigError(f"--resume: {state_path} not found{why}")
    if not resume and state_path.is_file():
        raise ConfigError(
            f"{out} already holds a training run ({state_file}); pass --resume to "
            f"continue it or choose another --out"
        )
    return state_path


LOG_FILE = "train.jsonl"  # one JSON line per epoch (prompts) or per logged step (JAFAR)
RUN_FILE = "run.json"  # what the run was given: settings, data, models, device


def write_training_log(out: Path, history: list[dict]) -> None:
    """``train.jsonl`` of ``out``: the history so far, one sorted-key JSON line per entry."""
    with atomic_path(out / LOG_FILE) as tmp:
        tmp.write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in history))


def write_run_info(trainer: Any, **extra: Any) -> None:
    """``run.json`` of ``trainer.out``: its settings, data, held-out folders, models and device,
    with the trainer's own ``extra`` fields (counts, recipe, precision...)."""
    info = {
        "settings": trainer.settings,
        "data": [str(d) for d in trainer.data],
        "val": list(trainer.options.val),
        "models": trainer.rt.config.models,
        "device": str(trainer.device),
        **extra,
    }
    with atomic_path(trainer.out / RUN_FILE) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def training_runtime(runtime: Any):
    """The runtime a trainer runs on: the caller's (a Runtime or a Segmenter), else the CPU in
    float32."""
    from zsdense.runtime import Runtime, runtime_of

    return runtime_of(runtime) if runtime is not None else Runtime(device="cpu", precision="fp32")


def save_jafar(model, path: str | Path, meta: dict | None = None) -> Path:
    """Write an upsampler atomically: ``.safetensors`` with the metadata JSON (backbone, head
    count...), or any other suffix as the released layout ``{"jafar": state_dict}`` exactly
    (``torch.save``; the authors' loaders read it; no metadata). ``model``: a
    :class:`~zsdense.dense.jafar.JAFAR`; :func:`~zsdense.dense.jafar.load_jafar` reads it back."""
    p = Path(path)
    sd = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    from zsdense.dense.jafar_files import FORMAT, META_KEY, STATE_DICT_KEY

    info = {"format": FORMAT, **model.config.to_json(), **(meta or {})}
    with atomic_path(p) as tmp:
        if p.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp), metadata={META_KEY: json.dumps(info, sort_keys=True)})
        else:
            torch.save({STATE_DICT_KEY: sd}, str(tmp))
    return p


def export_published(src: str | Path, dst: str | Path) -> Path:
    """A zsdense prompt checkpoint -> ``{'prompt_learner': state_dict}`` as Crane's train.py
    saves it (``torch.save``; token ids int32; Crane's key order)."""
    sd, _ = load_prompts(src)
    order = [
        "ctx_pos",
        "ctx_neg",
        "tokenized_prompts_pos",
        "tokenized_prompts_neg",
        "token_prefix_pos",
        "token_suffix_pos",
        "token_prefix_neg",
        "token_suffix_neg",
    ]
    missing = [k for k in order if k not in sd]
    if missing:
        raise WeightsError(f"{src}: not a prompt-learner checkpoint (missing {missing})")
    deep = sorted(
        (k for k in sd if k.startswith("compound_prompts_text.")),
        key=lambda k: int(k.split(".")[1]),
    )
    out = OrderedDict((k, sd[k].int() if k.startswith("tokenized") else sd[k]) for k in order)
    out.update((k, sd[k]) for k in deep)
    p = Path(dst)
    with atomic_path(p) as tmp:
        torch.save({"prompt_learner": out}, str(tmp))
    return p


__all__ = [
    "FORMAT",
    "base_model_info",
    "export_published",
    "load_prompts",
    "load_state",
    "save_prompts",
    "save_state",
]
