"""``--registers``: test-time registers as a runtime setting, resolved where encoders are served.

A :class:`RegisterSetting` is what ``RuntimeConfig.registers`` (``--registers``, repeatable;
``Segmenter(registers=...)``; ``registers`` in ``zsdense run``'s ``[run]`` table) and its
companions ask for:

- entries: ``auto`` and/or neuron files (``neurons.json`` from ``zsdense registers find``, or a
  :class:`~zsdense.models.registers.NeuronSet`). **Each file applies to the encoder it was found
  for** (family, model name, random or real weights; the weights' SHA-256 is checked when the
  encoder loads), so one run can give its CLIP and its DINOv2 each their own list. ``auto``
  gives every other CLIP / DINOv2 the shipped list where one exists (only the reference's
  DINOv2-L hub list, for real-weight ``dinov2-large``) and leaves the rest plain;
- R (``--registers-count``; None: the list's own, 1 for the shipped list), the mode
  (``--registers-mode``; None: the list's own, ``zero``) and the batch behaviour
  (``--registers-batch``: ``per-image``, or ``reference``: only the first image of a batch is
  edited, the reference code's defect, for comparisons only).

The runtime asks :meth:`RegisterSetting.spec_for` which :class:`RegisterSpec` an encoder gets
*before* loading it (from the name the encoder will carry), and :func:`zsdense.models.get_model`
keeps the hooked model under its own cache key: a process never shares one hooked model between
two settings, and an encoder no entry matches is the plain, shared model (bit-identical to off).
SAM never gets registers. A file that matched no encoder of a run is a setup error
(:meth:`RegisterSetting.unused`, checked by the engine after setup).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zsdense.config import register_entries
from zsdense.errors import ConfigError
from zsdense.models.registers import (
    DINOV2_L_HUB_NEURONS,
    NeuronSet,
    RegisterSpec,
    encoder_id,
)

AUTO = "auto"
KINDS = ("clip", "dinov2")  # the encoders registers apply to (never SAM)
SHIPPED = (DINOV2_L_HUB_NEURONS,)  # what `auto` can pick


def served_name(kind: str, name: str, models: str, pretrained: str = "openai") -> str:
    """The :class:`~zsdense.models.registers.EncoderId` name the encoder ``kind``/``name`` of
    model set ``models`` will carry once loaded (``registers.encoder_id``), known before loading:
    CLIP ``clip-<arch>-<pretrained>`` (real weights), ``tiny-<arch>``, ``<arch>`` (random);
    DINOv2 its registry name, ``tiny-`` in front for the tiny set."""
    if kind == "clip":
        if models == "tiny":
            return f"tiny-{name}"
        if models == "random":
            return name
        return f"clip-{name}-{pretrained}"
    return f"tiny-{name}" if models == "tiny" else name


@dataclass(frozen=True)
class Entry:
    """One ``--registers`` value: the neurons (None for ``auto``) and where they came from."""

    source: str  # "auto", a file path (absolute) or "<NeuronSet>"
    neurons: NeuronSet | None = None

    @property
    def is_auto(self) -> bool:
        return self.neurons is None

    def record(self) -> Any:
        if self.neurons is None:
            return AUTO
        enc = self.neurons.encoder
        return {
            "fingerprint": self.neurons.fingerprint,
            "encoder": f"{enc.family} {enc.name}",
            "neurons": self.neurons.count,
        }


@dataclass(frozen=True)
class RegisterSetting:
    """What ``--registers`` and its companions ask for (module docstring)."""

    entries: tuple = ()  # Entry, in the order given
    count: int | None = None
    mode: str | None = None
    batch: str = "per-image"

    @classmethod
    def from_config(cls, cfg: Any) -> RegisterSetting:
        """The setting of a :class:`~zsdense.config.RuntimeConfig`; neuron files are read here
        (a missing or damaged file is a :class:`ConfigError` before any input)."""
        entries: list[Entry] = []
        for v in register_entries(getattr(cfg, "registers", None)):
            if v == AUTO:
                entries.append(Entry(AUTO))
            elif isinstance(v, str):
                path = Path(v).expanduser()
                entries.append(Entry(str(path.resolve()), NeuronSet.load(path)))
            elif isinstance(v, NeuronSet):
                entries.append(Entry("<NeuronSet>", v))
            else:  # pragma: no cover - register_entries lets only these through
                raise ConfigError(f"--registers: cannot use {v!r}")
        seen: dict[tuple, str] = {}
        for e in entries:
            if e.neurons is None:
                continue
            enc = e.neurons.encoder
            key = (enc.family, enc.name, enc.random_weights)
            if key in seen:
                raise ConfigError(
                    f"--registers: {seen[key]} and {e.source} were both found for "
                    f"{enc.family} {enc.name}; give one neuron list per encoder"
                )
            seen[key] = e.source
        return cls(
            entries=tuple(entries),
            count=getattr(cfg, "registers_count", None),
            mode=getattr(cfg, "registers_mode", None),
            batch=getattr(cfg, "registers_batch", "per-image"),
        )

    @property
    def off(self) -> bool:
        """True when no encoder can get registers (no entry, or R = 0)."""
        return not self.entries or self.count == 0

    # ---- which encoder gets what -------------------------------------------------------------
    def match(self, kind: str, name: str, models: str, pretrained: str = "openai") -> Entry | None:
        """The entry that applies to encoder ``kind``/``name`` (None: it runs plain): the file
        found for it, else ``auto``'s shipped list for it (if any)."""
        if self.off or kind not in KINDS:
            return None
        ident = (kind, served_name(kind, name, models, pretrained), models != "default")
        for e in self.entries:
            if e.neurons is not None:
                enc = e.neurons.encoder
                if (enc.family, enc.name, enc.random_weights) == ident:
                    return e
        if any(e.is_auto for e in self.entries):
            for ns in SHIPPED:
                enc = ns.encoder
                if (enc.family, enc.name, enc.random_weights) == ident:
                    return Entry(AUTO, ns)
        return None

    def spec(self, entry: Entry) -> RegisterSpec:
        """The :class:`RegisterSpec` of ``entry``'s neurons with this setting's R, mode and
        batch behaviour (R and mode default to what the list was made to run with)."""
        ns = entry.neurons
        if ns is None:
            raise ConfigError("an `auto` entry has no neurons until matched to an encoder")
        own = dict(ns.registers)
        r = self.count if self.count is not None else int(own.get("num_registers", 1))
        mode = self.mode or str(own.get("mode", "zero"))
        scale = own.get("scale", 1.0)
        if isinstance(scale, (list, tuple)) and len(scale) != r:
            raise ConfigError(
                f"{entry.source}: its scale list {list(scale)} has one value per register for "
                f"R = {len(scale)}; --registers-count {r} cannot use it (omit "
                "--registers-count, or write a list with a single scale)"
            )
        return RegisterSpec(neurons=ns, num_registers=r, mode=mode, scale=scale, batch=self.batch)

    def spec_for(
        self, kind: str, name: str, models: str, pretrained: str = "openai"
    ) -> tuple[RegisterSpec, Entry] | None:
        """(spec, entry) for the encoder, or None when it runs plain."""
        entry = self.match(kind, name, models, pretrained)
        return None if entry is None else (self.spec(entry), entry)

    def unused(self, served: list) -> list[str]:
        """The problems of the file entries that matched none of the ``served`` encoders (zsdense
        model wrappers of the run): one line each, with the closest encoder's refusal."""
        idents = []
        for m in served:
            try:
                idents.append(encoder_id(m))
            except ConfigError:  # SAM, or a model registers do not cover
                continue
        problems = []
        for e in self.entries:
            if e.neurons is None:
                continue
            enc = e.neurons.encoder
            if any(enc.mismatch(i) is None for i in idents):
                continue
            same = [i for i in idents if i.family == enc.family]
            if same:
                try:
                    e.neurons.check_encoder(same[0], source=e.source)
                except ConfigError as exc:
                    problems.append(str(exc))
                    continue
            served_txt = ", ".join(i.describe() for i in idents) or "none"
            problems.append(
                f"{e.source}: the register neurons were found for {enc.describe()}, which this "
                f"run does not use (its CLIP / DINOv2 encoders: {served_txt}); drop it, or run "
                "a preset that uses that encoder"
            )
        return problems

    # ---- records ------------------------------------------------------------------------------
    def record(self) -> dict | None:
        """The requested setting as a run records and compares it (None when off): the entries
        (``auto``, or a file's fingerprint, encoder and neuron count), R, mode, batch."""
        if self.off:
            return None
        return {
            "neurons": [e.record() for e in self.entries],
            "count": self.count,
            "mode": self.mode,
            "batch": self.batch,
        }


def applied_record(spec: RegisterSpec | None, entry: Entry | None, why_not: str = "") -> dict:
    """What one served encoder got: the neurons' source (``auto (shipped list)`` or the file),
    fingerprint, R, mode, scale, batch, layers and neuron count; or ``none`` and why."""
    if spec is None or entry is None:
        return {"registers": "none", "why": why_not}
    rec = spec.record()
    source = "auto (shipped list)" if entry.source == AUTO else entry.source
    out = {"registers": "on", "neurons_from": source}
    out.update(
        {k: rec[k] for k in ("fingerprint", "num_registers", "mode", "scale", "batch", "layers")}
    )
    out["neurons"] = rec["neurons"]
    if "provenance" in rec:
        out["provenance"] = rec["provenance"]
    return out


def why_plain(
    setting: RegisterSetting, kind: str, name: str, models: str, pretrained: str = "openai"
) -> str:
    """Why an encoder runs without registers under ``setting`` (for the run's record)."""
    if setting.count == 0:
        return "--registers-count 0"
    if any(e.is_auto for e in setting.entries):
        return (
            f"auto: no shipped neuron list for {kind} "
            f"{served_name(kind, name, models, pretrained)} "
            "(only real-weight dinov2-large has one)"
        )
    return "no neuron file for this encoder"
