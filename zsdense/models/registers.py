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
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Sequence

import torch

from zsdense.config import REGISTER_BATCHES, REGISTER_MODES
from zsdense.errors import ConfigError

MODES = REGISTER_MODES  # ("zero", "mean", "only_outliers", "same")
BATCH_BEHAVIOURS = REGISTER_BATCHES  # ("per-image", "reference")
LAYOUTS = ("append", "reference")
FORMAT = "zsdense.registers.neurons"
FORMAT_VERSION = 1
REFERENCE_REPO = "nickjiang2378/test-time-registers"
REFERENCE_COMMIT = "860df43515c8d8e9e90952af25a46c26e4469570"

__all__ = [
    "BATCH_BEHAVIOURS",
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


# ---- the encoder a neuron set belongs to ------------------------------------------------------


@dataclass(frozen=True)
class EncoderId:
    """Which encoder a neuron set was found for.

    ``family``: ``clip`` | ``dinov2``; ``name``: the zsdense model name (CLIP: the weights'
    registry name such as ``clip-ViT-B-16-openai``, else the architecture, e.g.
    ``tiny-ViT-B-16``; DINOv2: the registry name, e.g. ``dinov2-large``); ``weights_sha256``: the
    SHA-256 of the weights file where known (None for random weights or unknown);
    ``random_weights``; ``num_layers`` and ``mlp_dim`` (K, neurons per layer) fix the shape.
    """

    family: str
    name: str
    weights_sha256: str | None
    random_weights: bool
    num_layers: int
    mlp_dim: int

    def describe(self) -> str:
        sha = f"sha256 {self.weights_sha256[:12]}…" if self.weights_sha256 else None
        what = "random weights" if self.random_weights else (sha or "weights hash unknown")
        return f"{self.family} {self.name} ({what}; {self.num_layers} layers × {self.mlp_dim})"

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "random_weights": self.random_weights,
            "num_layers": self.num_layers,
            "mlp_dim": self.mlp_dim,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EncoderId:
        sha = d.get("weights_sha256")
        return cls(
            family=str(d["family"]),
            name=str(d["name"]),
            weights_sha256=None if sha is None else str(sha),
            random_weights=bool(d.get("random_weights", False)),
            num_layers=int(d["num_layers"]),
            mlp_dim=int(d["mlp_dim"]),
        )

    def mismatch(self, other: EncoderId) -> str | None:
        """Why a neuron set found for ``self`` cannot run on ``other`` (None if it can)."""
        if (self.family, self.name) != (other.family, other.name):
            return "another model"
        if self.random_weights != other.random_weights:
            return "random weights on one side only"
        if self.weights_sha256 and other.weights_sha256:
            if self.weights_sha256 != other.weights_sha256:
                return "other weights (SHA-256 differs)"
        if (self.num_layers, self.mlp_dim) != (other.num_layers, other.mlp_dim):
            return "another shape (layers × MLP neurons)"
        return None


class _Adapter:
    """What the register machinery needs from a zsdense model wrapper (duck-typed: this module
    imports neither wrapper, so neither needs to import it back)."""

    def __init__(self, wrapper: Any):
        self.wrapper = wrapper
        inner = getattr(wrapper, "model", None)
        if inner is not None and hasattr(inner, "visual"):  # ClipModel (open_clip CLIP)
            self.family = "clip"
            vis = inner.visual
            self.blocks = list(vis.transformer.resblocks)
            self.acts = [b.mlp.gelu for b in self.blocks]
            self.mlp_dim = int(self.blocks[0].mlp.c_fc.out_features)
            self.token_module = vis.patch_dropout
            self.trained = 0
        elif inner is not None and hasattr(inner, "encoder") and hasattr(inner, "embeddings"):
            self.family = "dinov2"  # DinoModel (transformers Dinov2[WithRegisters]Model)
            self.blocks = list(inner.encoder.layer)
            mlp = self.blocks[0].mlp
            if not hasattr(mlp, "activation_fn"):
                raise ConfigError(
                    f"test-time registers do not cover {getattr(wrapper, 'name', 'this model')}: "
                    "its MLP is SwiGLU (ViT-g), whose register neurons sit in the gated product "
                    "(the reference hooks mlp.hidden_identity there), not in one activation"
                )
            self.acts = [b.mlp.activation_fn for b in self.blocks]
            self.mlp_dim = int(mlp.fc1.out_features)
            self.token_module = inner.embeddings.dropout
            self.trained = int(getattr(wrapper, "num_registers", 0) or 0)
        else:
            raise ConfigError(
                f"test-time registers need a zsdense CLIP or DINOv2 model, not {type(wrapper)!r}"
            )
        self.num_layers = len(self.blocks)

    def identity(self) -> EncoderId:
        w = self.wrapper
        if self.family == "clip":
            name = getattr(w, "weights_name", None) or str(w.arch)
            sha = getattr(w, "weights_sha256", None)
        else:
            name = str(w.name)
            path = getattr(w, "weights_file", None)
            sha = None
            if path and not getattr(w, "is_random", False):
                from zsdense.models.registry import sha256_file

                sha = sha256_file(path)  # cached by (path, size, mtime)
        random = bool(getattr(w, "is_random", False))
        return EncoderId(
            family=self.family,
            name=name,
            weights_sha256=None if random or not isinstance(sha, str) else sha,
            random_weights=random,
            num_layers=self.num_layers,
            mlp_dim=self.mlp_dim,
        )


def encoder_id(model: Any) -> EncoderId:
    """The :class:`EncoderId` of a zsdense ``ClipModel`` or ``DinoModel``."""
    return _Adapter(model).identity()


def _option_name(ident: EncoderId) -> str:
    """The ``--encoder`` value naming ``ident``'s model (CLIP: its architecture)."""
    name = ident.name.removeprefix("tiny-")
    if ident.family == "clip" and name.startswith("clip-"):
        name = name.removeprefix("clip-").rsplit("-", 1)[0]  # clip-ViT-B-16-openai -> ViT-B-16
    return name


# ---- the neuron set ---------------------------------------------------------------------------


def _normalize_neurons(neurons: Mapping[Any, Sequence[Any]] | Sequence) -> tuple:
    """``{layer: [neurons in rank order]}`` (or pairs) -> ((layer, (n, ...)), ...), validated."""
    items = neurons.items() if isinstance(neurons, Mapping) else neurons
    out: list[tuple[int, tuple[int, ...]]] = []
    seen: set[int] = set()
    for layer, ids in items:
        try:
            li = int(layer)
            ns = tuple(int(n) for n in ids)
        except (TypeError, ValueError):
            raise ConfigError(f"register neurons: bad entry {layer!r}: {ids!r}") from None
        if li in seen:
            raise ConfigError(f"register neurons: layer {li} listed twice")
        if len(set(ns)) != len(ns):
            raise ConfigError(f"register neurons: layer {li} lists a neuron twice")
        if li < 0 or any(n < 0 for n in ns):
            raise ConfigError(f"register neurons: negative layer or neuron in layer {li}")
        seen.add(li)
        if ns:
            out.append((li, ns))
    return tuple(out)


@dataclass(frozen=True)
class NeuronSet:
    """Register neurons ``{layer: [neurons in rank order]}`` for one encoder.

    ``layers``: ((layer, (neuron, ...)), ...) in order of first appearance in the ranking;
    ``encoder``: what they were found for; ``rules``: the search settings and counts (JSON
    values); ``scores``: ((layer, neuron, score), ...) of the selected neurons, rank order, when
    known; ``provenance``: where the list comes from, in words; ``registers``: the register count,
    mode and scale the list is meant to run with (the notebook's R = 1, ``zero``, scale 1).
    Save and load as JSON (``neurons.json``); :meth:`check_encoder` refuses another encoder.
    """

    layers: tuple
    encoder: EncoderId
    rules: Mapping[str, Any] = field(default_factory=dict)
    scores: tuple = ()
    provenance: str = ""
    registers: Mapping[str, Any] = field(
        default_factory=lambda: {"num_registers": 1, "mode": "zero", "scale": 1.0}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _normalize_neurons(self.layers))
        object.__setattr__(self, "rules", MappingProxyType(dict(self.rules)))
        object.__setattr__(self, "registers", MappingProxyType(dict(self.registers)))
        object.__setattr__(
            self, "scores", tuple((int(a), int(b), float(c)) for a, b, c in self.scores)
        )
        for li, ns in self.layers:
            if li >= self.encoder.num_layers or max(ns) >= self.encoder.mlp_dim:
                raise ConfigError(
                    f"register neurons: layer {li} / neuron {max(ns)} outside the encoder's "
                    f"{self.encoder.num_layers} layers × {self.encoder.mlp_dim} neurons"
                )

    @property
    def neurons(self) -> dict[int, list[int]]:
        """A fresh ``{layer: [neurons in rank order]}``."""
        return {li: list(ns) for li, ns in self.layers}

    @property
    def count(self) -> int:
        return sum(len(ns) for _, ns in self.layers)

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the neurons and the encoder identity: a stable key for caches and a
        run's recorded settings (rules, scores and provenance text do not change it)."""
        canon = json.dumps(
            {"neurons": [[li, list(ns)] for li, ns in self.layers], **self.encoder.to_json()},
            sort_keys=True,
        )
        return hashlib.sha256(canon.encode()).hexdigest()

    def check_encoder(self, model_or_id: Any, *, source: str | None = None) -> None:
        """Raise a :class:`ConfigError` unless this set was found for ``model_or_id``'s encoder."""
        other = model_or_id if isinstance(model_or_id, EncoderId) else encoder_id(model_or_id)
        why = self.encoder.mismatch(other)
        if why is None:
            return
        what = f"{source}: the register neurons" if source else "these register neurons"
        raise ConfigError(
            f"{what} were found for {self.encoder.describe()} and cannot be used with "
            f"{other.describe()} ({why}): register neurons belong to one encoder's weights. "
            f"Find neurons for this encoder with: zsdense registers find DATA --encoder "
            f"{_option_name(other)} --out neurons.json"
        )

    # ---- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "neurons": {str(li): list(ns) for li, ns in self.layers},
            "count": self.count,
            "encoder": self.encoder.to_json(),
            "registers": dict(self.registers),
            "rules": dict(self.rules),
            "scores": [list(s) for s in self.scores],
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], *, source: str = "<json>") -> NeuronSet:
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ConfigError(
                f"{source}: not a zsdense register-neuron file (write one with "
                "`zsdense registers find`)"
            )
        if int(d.get("version", 0)) > FORMAT_VERSION:
            raise ConfigError(
                f"{source}: register-neuron file version {d.get('version')} is newer than this "
                f"zsdense reads ({FORMAT_VERSION}); upgrade zsdense"
            )
        try:
            enc = EncoderId.from_json(d["encoder"])
            return cls(
                layers=tuple((int(k), v) for k, v in d["neurons"].items()),
                encoder=enc,
                rules=d.get("rules", {}),
                scores=tuple(tuple(s) for s in d.get("scores", [])),
                provenance=str(d.get("provenance", "")),
                registers=d.get("registers") or {"num_registers": 1, "mode": "zero", "scale": 1},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{source}: damaged register-neuron file ({exc!r})") from None

    def save(self, path: str | Path) -> Path:
        """Write ``neurons.json`` (atomically: a temporary file renamed into place)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(_dumps(self.to_json()) + "\n", encoding="utf-8")
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> NeuronSet:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{p}: cannot read the register-neuron file ({exc.strerror})"
            ) from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: not JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_json(d, source=str(p))

    def __reduce__(self):  # picklable (Ray actors): MappingProxyType fields are not
        return (_neuron_set_from_json, (self.to_json(),))


def _neuron_set_from_json(d: Mapping[str, Any]) -> NeuronSet:
    return NeuronSet.from_json(d)


def _dumps(obj: Any, indent: int = 0) -> str:
    """JSON with one level per line, but lists of numbers (neurons, score rows) on one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, Mapping) and obj:
        body = ",\n".join(
            f"{inner}{json.dumps(str(k))}: {_dumps(v, indent + 1)}" for k, v in obj.items()
        )
        return "{\n" + body + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and obj:
        if all(not isinstance(v, (Mapping, list, tuple)) for v in obj):
            return json.dumps(list(obj))
        body = ",\n".join(inner + _dumps(v, indent + 1) for v in obj)
        return "[\n" + body + "\n" + pad + "]"
    return json.dumps(obj)


def load_neurons(path: str | Path, model: Any | None = None) -> NeuronSet:
    """Load ``neurons.json``; with ``model``, refuse it unless it was found for that encoder."""
    ns = NeuronSet.load(path)
    if model is not None:
        ns.check_encoder(model, source=str(path))
    return ns


# ---- the shipped list ------------------------------------------------------------------------

# ``LARGE_REGISTER_NEURONS`` of dinov2/hub/register_neurons.py in the reference repository: the
# list its hub entry ``dinov2_vitl14_tt_reg`` runs (R = 1, scale 1.0, ``zero``, on
# ``blocks[l].mlp.act``). Layers in the file's order, neurons in its order.
_DINOV2_L_HUB = {
    17: (884, 133, 1427, 3464, 2373, 2436, 841, 3574, 2129, 3355, 4047, 3341, 1330, 4031, 844, 944,
         464),
    16: (2301, 3576, 1940, 3463, 1244, 407, 3152, 2517, 3465),
    15: (1714, 3507, 2492, 2680, 131, 720, 3499, 3062, 2625),
    14: (2110, 1510, 1082, 2711, 2464, 147, 543, 581),
    13: (2400,),
    12: (3168,),
}  # fmt: skip


def _dinov2_l_sha() -> str | None:
    from zsdense.models.weights_table import DINOV2

    return next((sha for name, _repo, sha in DINOV2 if name == "dinov2-large"), None)


DINOV2_L_HUB_NEURONS = NeuronSet(
    layers=tuple(_DINOV2_L_HUB.items()),
    encoder=EncoderId(
        family="dinov2",
        name="dinov2-large",
        weights_sha256=_dinov2_l_sha(),
        random_weights=False,
        num_layers=24,
        mlp_dim=4096,
    ),
    rules={
        "source": "shipped list (hub entry dinov2_vitl14_tt_reg)",
        "reproducible_from_rules": False,
        "repo_config": "dinov2_large.yaml",
        "register_norm_threshold": 150.0,
        "detect_outliers_layer": -2,
        "highest_layer": 17,
        "top_k": 50,
        "apply_sparsity_filter": True,
    },
    provenance=(
        f"LARGE_REGISTER_NEURONS of dinov2/hub/register_neurons.py in {REFERENCE_REPO} at commit "
        f"{REFERENCE_COMMIT}: the 45 neurons its torch-hub entry dinov2_vitl14_tt_reg applies to "
        "DINOv2 ViT-L/14 (dinov2_vitl14; the same weights as facebook/dinov2-large) with one "
        "register, scale 1.0, mode 'zero', on blocks[l].mlp.act. The list does NOT come out of "
        "the repository's yaml rules (dinov2_large.yaml: threshold 150 at layer -2, highest "
        "layer 17, top 50): that rule applied to the ranked file it also ships "
        "(dinov2/dinov2_register_neurons.pt, loaded by no code) shares only 27 of the 45 "
        "neurons; (17, 464), (16, 1940) and (17, 4031) rank 2321, 21729 and 60793 there, and "
        "(12, 3167) stands where the list has (12, 3168). The images it was found on are not "
        "known (unseeded sampling). The repository ships no CLIP list."
    ),
)


def shipped_neurons(model: Any) -> NeuronSet | None:
    """The shipped neuron list for ``model``'s encoder, or None.

    Only DINOv2-L (``dinov2-large``, real weights) has one: the reference's hub list
    (:data:`DINOV2_L_HUB_NEURONS`). No CLIP list is shipped by the reference (its OpenCLIP
    models with test-time registers live in Hugging Face repositories outside the code), and the
    trained-register DINOv2 checkpoints do not need one.
    """
    ident = encoder_id(model)
    if DINOV2_L_HUB_NEURONS.encoder.mismatch(ident) is None:
        return DINOV2_L_HUB_NEURONS
    return None


def resolve_neurons(model: Any, value: str | Path | NeuronSet | None) -> NeuronSet | None:
    """``--registers`` value -> the neuron set to apply to ``model`` (None = off).

    ``off`` / None / ``""``: None; ``auto``: :func:`shipped_neurons` (None where nothing is
    shipped); a :class:`NeuronSet` or a path to ``neurons.json``: checked against ``model``.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off")):
        return None
    if isinstance(value, NeuronSet):
        value.check_encoder(model)
        return value
    if isinstance(value, str) and value.strip().lower() == "auto":
        return shipped_neurons(model)
    return load_neurons(value, model)


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
