"""Test-time registers (Jiang, Dravid, Efros, Gandelsman, "Vision Transformers Don't Need Trained
Registers", NeurIPS 2025; code ``nickjiang2378/test-time-registers``): training-free registers for
a frozen CLIP or DINOv2.

A few MLP "register neurons" create the high-norm outlier tokens that frozen ViTs put in
low-information background patches. At test time R extra zero tokens are appended after the
patches; inside each chosen layer's MLP activation the chosen neurons' outlier activation is
moved into those tokens and removed from the image patches. The neurons are found on images
(:mod:`zsdense.models.registers_find`, ``zsdense registers find``) and kept in a
:class:`NeuronSet` (``neurons.json``) tied to the encoder they were found for.

How it runs (hooks over the pristine libraries; no open_clip or transformers code is copied):

- **tokens**: a forward hook on the identity dropout module that ends the embedding stage
  appends R zero tokens: open_clip's ``visual.patch_dropout`` (after ``+ positional_embedding``,
  before ``ln_pre``, so a zero token becomes ``ln_pre.bias``, as in the reference) and
  transformers' ``embeddings.dropout`` (after the positional embedding; DINOv2 has no norm
  there). zsdense's own token paths (:meth:`ClipModel.embed`, ``DinoModel._hub_embeddings``,
  MuSc's DINOv2 streams) call those modules, so every path gets the tokens;
- **the edit**: a forward hook on each chosen layer's activation module (open_clip
  ``resblocks[l].mlp.gelu``; transformers ``encoder.layer[l].mlp.activation_fn``) edits its
  output (B, T+R, K) in place (:func:`intervene_`);
- **the exit**: the model wrappers' ``strip_registers`` drops the R tokens wherever patch tokens
  leave the encoder (``DinoModel.tokens``, Crane's maps, the last-block methods, MuSc, HybridGL),
  so maps, masks and token grids keep their sizes. Blocks in between carry the registers at the
  end of the sequence, after the patches; zsdense's own attention variants treat them as they
  treat the class token (attended to, never masked, no neighbourhood term).

The edit (README §1.3 of the reference fixtures), per chosen layer with idx = its neurons:

1. ``m = sign_max(O[:, :, idx])``: **one scalar** per image over all its tokens (class token and
   registers included) and all chosen neurons: the signed value of largest magnitude
   (a tie gives the negative one);
2. every register gets ``scale·m`` in every chosen neuron; with ``scale`` a list of R numbers,
   register i gets ``scale[i]·sign_max(current slice)``, recomputed after each write, so the
   values compound (``[1.5, 1, 0.5, 2]`` gives 1.5m, 1.5m, 0.75m, 3m);
3. the patch positions (after the class token, and after trained registers when they are kept
   in front, before the test-time registers) per ``mode``: ``zero`` (set to 0), ``mean`` (the
   per-neuron mean over those positions), ``only_outliers`` (values above mean + std, unbiased,
   replaced by the mean), ``same`` (untouched). The class token is never edited.

**Batches.** Each image of a batch is edited as if it ran alone (``batch="per-image"``, the
default). The reference code edits **only batch item 0** (``output[0, ...]``): the other images of
a batch get the zero tokens but no edit, and differ from their own single-image runs by up to 1.44
on the fixtures. ``batch="reference"`` reproduces that defect, for comparisons only.

**Trained-register DINOv2** (``dinov2-reg-*``): by default (``layout="append"``) the trained
registers stay where transformers puts them (after the class token), are never edited, and R new
zero tokens are appended. ``layout="reference"`` reproduces the reference code (fixtures §6-T8):
its token layout is ``[CLS, patches, trained registers]``, nothing is appended, and the *last R*
trained registers act as the test-time registers (R <= their number); with R < 4 the other
trained registers are edited like patches. ``strip_registers`` restores transformers' order.

R = 0 means "off": nothing is installed and every output is bit-identical to the plain model
(the reference raises in one hook and skips in the other).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from zsdense.config import REGISTER_BATCHES, REGISTER_MODES
from zsdense.errors import ConfigError
from zsdense.models.registers_neurons import (
    DINOV2_L_HUB_NEURONS,
    FORMAT,
    FORMAT_VERSION,
    REFERENCE_COMMIT,
    REFERENCE_REPO,
    EncoderId,
    NeuronSet,
    _Adapter,
    _normalize_neurons,
    encoder_id,
    load_neurons,
    resolve_neurons,
    shipped_neurons,
)

MODES = REGISTER_MODES  # ("zero", "mean", "only_outliers", "same")
BATCH_BEHAVIOURS = REGISTER_BATCHES  # ("per-image", "reference")
LAYOUTS = ("append", "reference")

__all__ = [
    "BATCH_BEHAVIOURS",
    "FORMAT",
    "FORMAT_VERSION",
    "REFERENCE_COMMIT",
    "REFERENCE_REPO",
    "DINOV2_L_HUB_NEURONS",
    "LAYOUTS",
    "MODES",
    "EncoderId",
    "NeuronSet",
    "RegisterSpec",
    "RegistersHandle",
    "attach_registers",
    "attached_record",
    "edit_activation",
    "encoder_id",
    "intervene_",
    "load_neurons",
    "registers_applied",
    "resolve_neurons",
    "shipped_neurons",
    "sign_max",
]

# ---- the intervention ------------------------------------------------------------------------


def sign_max(x: torch.Tensor) -> torch.Tensor:
    """The signed value of largest magnitude of each ``x[b]`` (over every other dimension).

    As the reference's ``sign_max``: max if ``|max| > |min|`` else min (a tie gives the min).
    Returns shape (B,) in ``x``'s dtype.
    """
    flat = x.reshape(x.shape[0], -1)
    pmax = flat.amax(dim=1)
    nmin = flat.amin(dim=1)
    return torch.where(pmax.abs() > nmin.abs(), pmax, nmin)


def _times(m: torch.Tensor, s: float, dtype: torch.dtype) -> torch.Tensor:
    if m.dtype == torch.float32 or m.dtype == torch.float64:
        return m * s  # as the reference: a Python float times the float32 scalar
    return (m.float() * s).to(dtype)  # reduced precision: multiply in float32, round once


def intervene_(
    act: torch.Tensor,
    idx: torch.Tensor,
    *,
    num_registers: int,
    prefix: int = 1,
    mode: str = "zero",
    scale: float | Sequence[float] = 1.0,
    first_only: bool = False,
) -> torch.Tensor:
    """Move the outlier activation of neurons ``idx`` into the registers, in place.

    ``act`` (B, T, K): an MLP activation whose last ``num_registers`` tokens are the registers and
    whose positions ``prefix : T - num_registers`` are the patches (``prefix`` = 1 for the class
    token, 1 + trained registers where those stay in front). Per image (or, with ``first_only``,
    for image 0 alone, the reference's defect): ``m = sign_max(act[b, :, idx])``; the registers
    get ``scale·m`` (a list: register i gets ``scale[i]·sign_max`` of the slice as edited so far);
    the patches per ``mode`` (module docstring). Statistics are taken in float32 and written back
    in ``act``'s dtype. Returns ``act``. A sequence with no patch position (e.g. the class token
    alone) is left untouched: the class token is never edited and the MLP is token-wise.
    """
    r = int(num_registers)
    t = act.shape[1]
    if r <= 0 or idx.numel() == 0 or t <= prefix + r:
        return act
    if mode not in MODES:
        raise ConfigError(f"register mode must be one of {', '.join(MODES)}, not {mode!r}")
    o = act[:1] if first_only else act
    stop = t - r
    if isinstance(scale, (list, tuple)):
        if len(scale) != r:
            raise ConfigError(f"a scale list needs one value per register ({r}), got {len(scale)}")
        for i, s in enumerate(scale):
            m = sign_max(o[:, :, idx])
            o[:, stop + i, idx] = _times(m, float(s), o.dtype)[:, None]
    else:
        m = sign_max(o[:, :, idx])
        o[:, stop:, idx] = _times(m, float(scale), o.dtype)[:, None, None]
    if mode == "same":
        return act
    if mode == "zero":
        o[:, prefix:stop, idx] = 0
        return act
    patches = o[:, prefix:stop, idx].float()  # (b, N, k)
    mu = patches.mean(dim=1, keepdim=True)
    if mode == "mean":
        o[:, prefix:stop, idx] = mu.to(o.dtype)
    else:  # only_outliers
        sd = patches.std(dim=1, keepdim=True)  # unbiased, as torch.std
        o[:, prefix:stop, idx] = torch.where(patches > mu + sd, mu, patches).to(o.dtype)
    return act


def _is_scale_list(scale: Any) -> bool:
    return isinstance(scale, (list, tuple))


@dataclass(frozen=True)
class RegisterSpec:
    """What to apply: neurons, R registers, mode, scale, batch behaviour, token layout.

    ``neurons``: a :class:`NeuronSet` (checked against the model when attached), a plain
    ``{layer: [neurons]}`` (only checked for range), or None / empty (append the R zero tokens
    and edit nothing: the reference's "registers, no edit"). ``num_registers`` 0 = off.
    ``mode``: zero | mean | only_outliers | same. ``scale``: a number, or one number per
    register (compounding, see :func:`intervene_`). ``batch``: ``per-image`` (default) or
    ``reference`` (only image 0 edited: the reference's defect). ``layout``: ``append``
    (default) or ``reference`` (trained-register DINOv2 as the reference lays it out).
    """

    neurons: Any = None
    num_registers: int = 1
    mode: str = "zero"
    scale: float | tuple[float, ...] = 1.0
    batch: str = "per-image"
    layout: str = "append"

    def __post_init__(self) -> None:
        r = self.num_registers
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ConfigError(f"the number of registers must be an integer >= 0, not {r!r}")
        if self.mode not in MODES:
            raise ConfigError(f"register mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.batch not in BATCH_BEHAVIOURS:
            raise ConfigError(
                f"register batch behaviour must be one of {', '.join(BATCH_BEHAVIOURS)}, "
                f"not {self.batch!r}"
            )
        if self.layout not in LAYOUTS:
            raise ConfigError(
                f"register layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}"
            )
        scale = self.scale
        if _is_scale_list(scale):
            scale = tuple(float(s) for s in scale)
            if len(scale) != r:
                raise ConfigError(
                    f"a scale list needs one value per register ({r}), got {len(scale)}"
                )
        else:
            scale = float(scale)
        if not all(math.isfinite(s) for s in (scale if isinstance(scale, tuple) else (scale,))):
            raise ConfigError("register scale must be finite")
        object.__setattr__(self, "scale", scale)

    @property
    def layers(self) -> tuple:
        """((layer, (neurons...)), ...) of the neurons (empty when none)."""
        n = self.neurons
        if n is None:
            return ()
        if isinstance(n, NeuronSet):
            return n.layers
        return _normalize_neurons(n)

    @property
    def active(self) -> bool:
        return self.num_registers > 0

    def record(self) -> dict:
        """JSON-able description for a run's settings: R, mode, scale, batch, layout, and the
        neurons (count, layers, fingerprint, encoder name, provenance's first sentence)."""
        out: dict[str, Any] = {
            "num_registers": self.num_registers,
            "mode": self.mode,
            "scale": list(self.scale) if isinstance(self.scale, tuple) else self.scale,
            "batch": self.batch,
            "layout": self.layout,
            "neurons": sum(len(ns) for _, ns in self.layers),
            "layers": [li for li, _ in self.layers],
        }
        n = self.neurons
        if isinstance(n, NeuronSet):
            out.update(
                fingerprint=n.fingerprint,
                encoder=n.encoder.name,
                provenance=n.provenance.split(". ")[0],
            )
        else:
            canon = json.dumps([[li, list(ns)] for li, ns in self.layers])
            out["fingerprint"] = hashlib.sha256(canon.encode()).hexdigest()
        return out

    @property
    def key(self) -> str:
        """A short stable string identifying what this spec does (cache keys)."""
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:16]


# module -> the layer edit hooked on it (MuSc runs some activations by hand: edit_activation)
_EDITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def edit_activation(module: torch.nn.Module, act: torch.Tensor) -> torch.Tensor:
    """Apply the register edit hooked on activation ``module`` to ``act`` computed without
    calling the module (a block run with another activation function); identity when none."""
    edit = _EDITS.get(module)
    return act if edit is None else edit(module, (), act)


class _LayerEdit:
    def __init__(self, handle: RegistersHandle, layer: int, neurons: Sequence[int]):
        self.handle = handle
        self.layer = layer
        self._idx = torch.tensor(list(neurons), dtype=torch.long)
        self._on: dict = {}

    def idx(self, device: torch.device) -> torch.Tensor:
        got = self._on.get(device)
        if got is None:
            got = self._on[device] = self._idx.to(device)
        return got

    def __call__(self, module, inputs, out):
        h = self.handle
        if out.requires_grad and torch.is_grad_enabled():
            out = out.clone()  # never edit a tensor autograd may still need
        return intervene_(
            out,
            self.idx(out.device),
            num_registers=h.edit_registers,
            prefix=h.prefix,
            mode=h.spec.mode,
            scale=h.spec.scale,
            first_only=h.spec.batch == "reference",
        )


class RegistersHandle:
    """Test-time registers attached to one model wrapper (hooks installed); :meth:`remove`
    restores the plain model. Made by :func:`attach_registers`."""

    def __init__(self, model: Any, spec: RegisterSpec, adapter: _Adapter):
        self.model = model
        self.spec = spec
        self.adapter = adapter
        r = spec.num_registers
        self.reorder = spec.layout == "reference" and adapter.trained > 0
        # tokens appended after the patches (the trained registers are reused when reordered)
        self.extra_tokens = 0 if self.reorder else r
        # registers the edit writes (the last tokens of the sequence)
        self.edit_registers = r
        # the class token (and trained registers kept in front) precede the patches
        self.prefix = 1 if self.reorder else 1 + adapter.trained
        self._hooks: list = []
        self._edits: list[_LayerEdit] = []

    def _tokens_hook(self, module, inputs, out):
        if self.reorder:
            n = self.adapter.trained
            return torch.cat([out[:, :1], out[:, 1 + n :], out[:, 1 : 1 + n]], dim=1)
        zeros = out.new_zeros(out.shape[0], self.extra_tokens, out.shape[2])
        return torch.cat([out, zeros], dim=1)

    def strip(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T', C) tokens as the blocks carry them -> without the test-time registers, in the
        plain model's order (transformers' ``[CLS, trained registers, patches]`` for DINOv2)."""
        t = tokens.shape[1]
        if self.reorder:
            n = self.adapter.trained
            return torch.cat([tokens[:, :1], tokens[:, t - n :], tokens[:, 1 : t - n]], dim=1)
        if t <= self.extra_tokens:
            raise RuntimeError(f"{t} tokens cannot hold {self.extra_tokens} test-time registers")
        return tokens[:, : t - self.extra_tokens]

    def install(self) -> None:
        a = self.adapter
        self._hooks.append(a.token_module.register_forward_hook(self._tokens_hook))
        for layer, neurons in self.spec.layers:
            edit = _LayerEdit(self, layer, neurons)
            module = a.acts[layer]
            if module in _EDITS:
                raise ConfigError("test-time registers are already attached to this model")
            self._hooks.append(module.register_forward_hook(edit))
            _EDITS[module] = edit
            self._edits.append(edit)
        self.model._registers = self

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for edit in self._edits:
            module = self.adapter.acts[edit.layer]
            if _EDITS.get(module) is edit:
                del _EDITS[module]
        self._edits.clear()
        if getattr(self.model, "_registers", None) is self:
            self.model._registers = None

    def __enter__(self) -> RegistersHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class _Off:
    """The handle of R = 0: nothing installed."""

    extra_tokens = 0

    def remove(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def attach_registers(model: Any, spec: RegisterSpec) -> RegistersHandle | _Off:
    """Install ``spec`` on a zsdense ``ClipModel`` / ``DinoModel``; returns a handle whose
    ``remove()`` (or ``with``) restores the plain model.

    Refused (:class:`ConfigError`): a :class:`NeuronSet` found for another encoder, neurons out of
    range, a model that already has registers attached, ``layout="reference"`` with more
    registers than the model's trained registers. ``num_registers=0`` installs nothing.
    The model wrappers are shared per process: prefer :func:`registers_applied` around the
    forward passes that should see the registers.
    """
    if not isinstance(spec, RegisterSpec):
        raise ConfigError(f"attach_registers needs a RegisterSpec, not {type(spec).__name__}")
    adapter = _Adapter(model)
    if not spec.active:
        return _Off()
    if getattr(model, "_registers", None) is not None:
        raise ConfigError("test-time registers are already attached to this model")
    if isinstance(spec.neurons, NeuronSet):
        spec.neurons.check_encoder(model)
    for layer, ns in spec.layers:
        if layer >= adapter.num_layers or max(ns) >= adapter.mlp_dim:
            raise ConfigError(
                f"register neurons: layer {layer} / neuron {max(ns)} outside the model's "
                f"{adapter.num_layers} layers × {adapter.mlp_dim} neurons"
            )
    if spec.layout == "reference" and adapter.trained and spec.num_registers > adapter.trained:
        raise ConfigError(
            f"layout='reference' reuses the model's {adapter.trained} trained registers as the "
            f"test-time registers: at most {adapter.trained}, not {spec.num_registers}"
        )
    handle = RegistersHandle(model, spec, adapter)
    try:
        handle.install()
    except BaseException:
        handle.remove()
        raise
    return handle


def attached_record(model: Any) -> dict | None:
    """What test-time registers ``model`` (a zsdense wrapper) runs with: the attached spec's
    :meth:`RegisterSpec.record`, or None when none are attached (what a memory bank records
    about its backbone)."""
    handle = getattr(model, "_registers", None)
    spec = getattr(handle, "spec", None)
    return spec.record() if isinstance(spec, RegisterSpec) else None


@contextlib.contextmanager
def registers_applied(model: Any, spec: RegisterSpec | None) -> Iterator[Any]:
    """``with registers_applied(model, spec): ...`` runs the block with test-time registers
    (``spec`` None or R = 0: the plain model) and removes them afterwards, even on error."""
    if spec is None:
        yield _Off()
        return
    handle = attach_registers(model, spec)
    try:
        yield handle
    finally:
        handle.remove()
