"""Reading checkpoint files into plain state dicts, never unpickling arbitrary objects.

Apart from :mod:`zsdense.models.registry` (which finds, hashes and downloads the files): this
module only turns a file on disk into a ``{name: tensor}`` dict.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from zsdense.errors import WeightsError

if TYPE_CHECKING:  # torch is imported when a file is loaded (the CLI's --help stays fast)
    import torch

__all__ = ["frozen", "load_state_dict_file"]

_WRAPPER_KEYS = ("state_dict", "model", "prompt_learner")
_JIT_META_KEYS = ("input_resolution", "context_length", "vocab_size")


def _is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive (a zip with ``code/`` and ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _is_tensor_dict(obj: object) -> bool:
    import torch

    return isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file as a flat {name: tensor} dict on the CPU, never running pickle code.

    - ``.safetensors``: safetensors.
    - TorchScript archives (OpenAI's original ``ViT-*.pt``): ``torch.jit.load`` and its
      ``state_dict()``. TorchScript's deserializer only rebuilds tensors and TorchScript types,
      it does not call arbitrary Python, so this is as safe as weights_only.
    - anything else: ``torch.load(map_location="cpu", weights_only=True)``.

    Common wrappers are unwrapped (a dict whose ``state_dict`` / ``model`` / ``prompt_learner``
    entry is the tensor dict, e.g. Crane's ``{"prompt_learner": {...}}``), and a ``module.``
    prefix (DataParallel) is stripped. Anything else raises WeightsError naming the file.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: checkpoint file not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as exc:
            raise WeightsError(
                f"{p}: not a readable safetensors file ({exc}); it is corrupt or incomplete: "
                f"delete it and fetch it again"
            ) from None
    if _is_torchscript(p):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sd = dict(torch.jit.load(str(p), map_location="cpu").state_dict())
        except Exception as exc:
            raise WeightsError(f"{p}: cannot read this TorchScript archive ({exc})") from None
        for k in _JIT_META_KEYS:
            sd.pop(k, None)
        obj: object = sd
    else:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:
            text = str(exc)
            refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            if refused:
                raise WeightsError(
                    f"{p}: torch.load(weights_only=True) refused this file: it holds the Python "
                    f"object {refused.group(1)}, not only tensors, and zsdense does not unpickle "
                    f"such objects (they can run code). Convert it to a plain state dict or "
                    f"safetensors."
                ) from None
            import pickle

            detail = (
                "invalid pickle data"
                if isinstance(exc, pickle.UnpicklingError)
                else (text.splitlines() or [type(exc).__name__])[0]
            )
            raise WeightsError(
                f"{p}: not a readable PyTorch checkpoint ({detail}); it is corrupt or "
                f"incomplete: delete it and fetch it again"
            ) from None
    if isinstance(obj, dict) and not _is_tensor_dict(obj):
        for key in _WRAPPER_KEYS:
            if _is_tensor_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_tensor_dict(obj) or not obj:
        kind = type(obj).__name__
        raise WeightsError(
            f"{p}: weights_only loading gave a {kind} that is not a plain dict of tensors; "
            f"zsdense only loads state dicts (optionally under a 'state_dict' or 'model' key)"
        )
    sd = obj  # type: ignore[assignment]
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """An encoder as zsdense loads it: fp32 weights (a bf16 run casts them once, at load:
    ``zsdense.models._cast``), eval mode, no gradients (what training trains is built apart)."""
    return model.float().eval().requires_grad_(False)
