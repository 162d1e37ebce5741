"""JAFAR state dicts and upsampler files: the configuration read from tensor shapes, strict
loading, reading (never unpickling objects) and atomic writing (:mod:`zsdense.dense.jafar`)."""

from __future__ import annotations

from pathlib import Path

import torch

from zsdense.dense.jafar_layers import DEFAULT_HEADS, JafarConfig
from zsdense.dense.jafar_model import DEFAULT_CHUNK_BYTES, JAFAR
from zsdense.errors import ConfigError, WeightsError
from zsdense.models.weights_load import frozen

STATE_DICT_KEY = "jafar"  # the released files are {"jafar": state_dict}
META_KEY = "zsdense"  # safetensors metadata entry (JSON) of zsdense's own upsampler files
FORMAT = "zsdense-jafar/1"


def reference_key_order(config: JafarConfig) -> list[str]:
    """The released state dict's key order for ``config`` (= ``JAFAR.state_dict()``)."""
    return list(JAFAR(config).state_dict())


def config_from_state_dict(
    sd: dict[str, torch.Tensor], source: str = "state dict", num_heads: int | None = None
) -> JafarConfig:
    """Constructor arguments read from the tensor shapes (the head count is in no shape: the
    released models use 4, zsdense's own files record theirs)."""
    try:
        w0 = sd["image_encoder.0.weight"]
        kf = sd["key_features_encoder.0.weight"]
    except KeyError as exc:
        raise WeightsError(
            f"{source}: not a JAFAR state dict (no {exc.args[0]!r}); expected the released "
            f"layout {{'jafar': state_dict}} with image_encoder.*, key_encoder.*, "
            f"query_encoder.*, key_features_encoder.*, cross_decode.*, sft_key.*, rope.freqs"
        ) from None
    if w0.dim() != 4 or kf.dim() != 4:
        raise WeightsError(f"{source}: JAFAR encoder weights must be 4-d conv kernels")
    try:
        return JafarConfig(
            v_dim=int(kf.shape[1]),
            qk_dim=int(w0.shape[0]),
            num_heads=int(num_heads or DEFAULT_HEADS),
            kernel_size=int(w0.shape[-1]),
            input_dim=int(w0.shape[1]),
        )
    except ConfigError as exc:
        raise WeightsError(f"{source}: unusable JAFAR shapes ({exc})") from None


def jafar_from_state_dict(
    sd: dict[str, torch.Tensor],
    source: str = "state dict",
    *,
    num_heads: int | None = None,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
) -> JAFAR:
    """A JAFAR module (float32, eval, frozen) with ``sd`` loaded strictly."""
    cfg = config_from_state_dict(sd, source, num_heads)
    model = JAFAR(cfg, chunk_bytes=chunk_bytes)
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    wrong = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(want[k].shape)})"
        for k in want
        if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)
    ]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}")
        if wrong:
            parts.append(f"wrong shapes {', '.join(wrong[:4])}")
        raise WeightsError(
            f"{source}: does not fit a JAFAR upsampler (qk_dim {cfg.qk_dim}, {cfg.v_dim}-channel "
            f"features, {len(want)} tensors): " + "; ".join(parts)
        )
    model.load_state_dict({k: sd[k].float() for k in want}, strict=True)
    return frozen(model)


def _is_tensor_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
    )


def read_jafar_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, zsdense metadata or {}) of an upsampler file, never unpickling objects.

    ``.safetensors``: zsdense's own format (metadata JSON under ``"zsdense"``). Anything else:
    ``torch.load(weights_only=True)`` of the released ``{"jafar": state_dict}`` layout (or a
    bare state dict).
    """
    import json

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: upsampler file not found")
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            sd = load_file(str(p), device="cpu")
            with safe_open(str(p), framework="pt") as f:
                raw = (f.metadata() or {}).get(META_KEY)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise WeightsError(f"{p}: not a readable safetensors file ({exc})") from None
        try:
            meta = json.loads(raw) if raw else {}
        except ValueError:
            raise WeightsError(f"{p}: its '{META_KEY}' metadata is not JSON") from None
        return sd, meta if isinstance(meta, dict) else {}
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        text = str(exc)
        if "GLOBAL" in text or "weights_only" in text.lower():
            raise WeightsError(
                f"{p}: torch.load(weights_only=True) refused this file: it holds Python objects, "
                f"not only tensors (the reference's training checkpoints model_<N>steps.pth hold "
                f"an omegaconf DictConfig). zsdense does not unpickle such files; in a trusted "
                f"environment extract the weights with torch.save({{'jafar': torch.load(f, "
                f"weights_only=False)['jafar']}}, 'upsampler.pth')"
            ) from None
        raise WeightsError(
            f"{p}: not a readable PyTorch checkpoint ({text.splitlines()[0] if text else exc!r}); "
            f"it is corrupt or incomplete: fetch it again"
        ) from None
    meta: dict = {}
    if isinstance(obj, dict) and STATE_DICT_KEY in obj:
        extra = obj.get(META_KEY)
        if isinstance(extra, dict):
            meta = dict(extra)
        obj = obj[STATE_DICT_KEY]
    if not _is_tensor_dict(obj):
        raise WeightsError(
            f"{p}: not a JAFAR upsampler file: expected {{'jafar': state_dict}} (the released "
            f"layout) or a plain state dict of tensors, found {type(obj).__name__}"
        )
    return dict(obj), meta
