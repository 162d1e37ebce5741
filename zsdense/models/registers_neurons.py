"""Register neurons and the encoder they belong to (:mod:`zsdense.models.registers`): the
encoder identity (:class:`EncoderId`, read from a zsdense wrapper by a duck-typed adapter), the
:class:`NeuronSet` kept in ``neurons.json``, and the list the reference ships for DINOv2-L
(:data:`DINOV2_L_HUB_NEURONS`) with the resolution of a ``--registers`` value."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from zsdense.errors import ConfigError

FORMAT = "zsdense.registers.neurons"
FORMAT_VERSION = 1
REFERENCE_REPO = "nickjiang2378/test-time-registers"
REFERENCE_COMMIT = "860df43515c8d8e9e90952af25a46c26e4469570"


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
        return asdict(self)

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
