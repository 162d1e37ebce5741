"""Methods as plug-ins: registries that fill themselves on first use.

Every task family keeps its methods and presets in a :class:`Registry` (open-vocabulary methods
and presets, referring methods and presets, anomaly scorers...). A registry is a plain mapping
for its readers, but its first read anywhere in the process runs :func:`load_plugins` once:

1. every module of the built-in package ``zsdense.methods`` (one file per built-in method; a
   new built-in is a new file there and nothing else);
2. the target of every entry point of the group ``zsdense.methods`` (:data:`ENTRY_POINT_GROUP`)
   of the installed distributions: a module (imported; it registers at import time) or a
   callable taking no argument (called once). A third-party package declares, in its
   ``pyproject.toml``::

       [project.entry-points."zsdense.methods"]
       mymethod = "my_package.zsdense_plugin"          # a module, or "pkg.mod:register"

The loader only imports targets: what a target registers, and in which family, is up to it
(``zsdense.dense.methods.register_method``, ``zsdense.tasks.refer_methods.register_refer_method``
or any other family's ``register_*``). So ``import zsdense`` loads nothing; the CLI loads the
plug-ins before it parses a command's options (so ``--preset`` offers theirs).

A plug-in that fails (import error, an exception while registering, a name already taken) is
reported once as a :class:`PluginWarning` naming the distribution, the entry point and the
error; whatever it registered before failing is withdrawn, and every other method keeps working.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from zsdense.errors import ConfigError, unknown

ENTRY_POINT_GROUP = "zsdense.methods"
BUILTIN_PACKAGE = "zsdense.methods"
BUILTIN_OWNER = "zsdense"  # the owner of what the built-in modules register

V = TypeVar("V")


class PluginWarning(UserWarning):
    """A plug-in of the ``zsdense.methods`` entry-point group could not be loaded."""


@dataclass(frozen=True)
class PluginStatus:
    """One loaded (or failed) source of methods, for ``zsdense info``."""

    name: str  # entry-point name, or the built-in module
    dist: str  # distribution (``zsdense`` for the built-ins)
    target: str  # "module" or "module:attribute"
    error: str | None = None  # None: loaded


_lock = threading.RLock()
_state: dict[str, Any] = {"loaded": False, "loading": False}
_owner: list[str] = []  # stack: who registers now (a plug-in being loaded), innermost last
_status: list[PluginStatus] = []
_registries: list[Registry] = []


class Registry(MutableMapping, Generic[V]):
    """A name -> entry mapping that loads the plug-ins before its first read.

    Writes (registering) never trigger a load, so the built-ins and plug-ins can register while
    the loader runs. Each entry remembers who registered it (the plug-in being loaded, else
    ``zsdense``), so a plug-in that fails half-way is withdrawn completely.
    """

    def __init__(self, what: str, initial: dict[str, V] | None = None) -> None:
        self.what = what  # "open-vocabulary preset", "referring method"... (messages)
        self._data: dict[str, V] = {}
        self._owners: dict[str, str] = {}
        _registries.append(self)
        for k, v in (initial or {}).items():
            self[k] = v

    # reads load the plug-ins first
    def __getitem__(self, key: str) -> V:
        load_plugins()
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        load_plugins()
        return iter(list(self._data))

    def __len__(self) -> int:
        load_plugins()
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        load_plugins()
        return key in self._data

    # writes record their owner
    def __setitem__(self, key: str, value: V) -> None:
        self._data[key] = value
        self._owners[key] = _owner[-1] if _owner else BUILTIN_OWNER

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self._owners.pop(key, None)

    def setdefault(self, key: str, default: V) -> V:  # type: ignore[override]
        """Like dict.setdefault, without loading the plug-ins (registration runs inside it)."""
        if key not in self._data:
            self[key] = default
        return self._data[key]

    def pop(self, key: str, *default: Any) -> Any:  # type: ignore[override]
        if key in self._data:
            self._owners.pop(key, None)
        return self._data.pop(key, *default)

    def current(self) -> dict[str, V]:
        """A copy of what is registered now (no plug-in load)."""
        return dict(self._data)

    def lookup(self, key: str) -> V:
        """The entry, or a ConfigError naming the registered ones (what a user mistyped)."""
        try:
            return self[key]
        except KeyError:
            raise unknown(self.what, key, self) from None

    def registered(self, key: str) -> bool:
        """True if ``key`` is registered now (no plug-in load: for the register functions)."""
        return key in self._data

    def owner(self, key: str) -> str | None:
        """Who registered ``key``: ``zsdense`` or the plug-in's ``dist:entry-point``."""
        return self._owners.get(key)

    def withdraw(self, owner: str) -> list[str]:
        """Remove every entry registered by ``owner``; returns their names."""
        gone = [k for k, o in self._owners.items() if o == owner]
        for k in gone:
            self._data.pop(k, None)
            self._owners.pop(k, None)
        return gone

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {sorted(self._data)})"


@contextlib.contextmanager
def registering_as(owner: str):
    """Entries registered inside the block belong to ``owner`` (withdrawn with it)."""
    _owner.append(owner)
    try:
        yield
    finally:
        _owner.pop()


def _withdraw(owner: str) -> None:
    for reg in _registries:
        reg.withdraw(owner)


def _builtin_modules() -> list[str]:
    pkg = importlib.import_module(BUILTIN_PACKAGE)
    return [
        f"{BUILTIN_PACKAGE}.{m.name}"
        for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name)
        if not m.name.startswith("_")
    ]


def _entry_points() -> list:
    from importlib import metadata

    eps = metadata.entry_points()
    if hasattr(eps, "select"):
        found = list(eps.select(group=ENTRY_POINT_GROUP))
    else:  # pragma: no cover - Python < 3.10 API shape
        found = list(eps.get(ENTRY_POINT_GROUP, []))
    seen, out = set(), []
    for ep in found:  # a dist seen twice on sys.path lists its entry points twice
        key = (_dist_name(ep), ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            out.append(ep)
    return sorted(out, key=lambda e: (_dist_name(e), e.name))


def _dist_name(ep) -> str:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) or (dist.metadata["Name"] if dist is not None else None)
    return str(name) if name else "unknown distribution"


def _run_target(obj: Any, what: str) -> None:
    if inspect.ismodule(obj):
        return
    if callable(obj):
        obj()
        return
    raise TypeError(f"{what} is neither a module nor a callable (got {type(obj).__name__})")


def _load_one(name: str, dist: str, target: str, load: Callable[[], Any]) -> None:
    owner = BUILTIN_OWNER if dist == BUILTIN_OWNER else f"{dist}:{name}"
    try:
        with registering_as(owner):
            _run_target(load(), target)
    except Exception as exc:  # noqa: BLE001 - a broken plug-in must not break the others
        _withdraw(owner)
        err = f"{type(exc).__name__}: {exc}"
        _status.append(PluginStatus(name, dist, target, err))
        warnings.warn(
            f"zsdense plug-in {name!r} of the distribution {dist!r} ({target}) failed to load "
            f"and is ignored: {err}",
            PluginWarning,
            stacklevel=3,
        )
        return
    _status.append(PluginStatus(name, dist, target))


def load_plugins() -> list[PluginStatus]:
    """Load the built-in methods and the ``zsdense.methods`` entry points, once per process.

    Safe to call often (it returns at once after the first call) and from several threads;
    a registry read inside a plug-in being loaded sees what is registered so far.
    """
    if _state["loaded"]:
        return list(_status)
    with _lock:
        if _state["loaded"] or _state["loading"]:
            return list(_status)
        _state["loading"] = True
        try:
            for mod in _builtin_modules():
                _load_one(mod, BUILTIN_OWNER, mod, lambda m=mod: importlib.import_module(m))
            for ep in _entry_points():
                _load_one(ep.name, _dist_name(ep), ep.value, ep.load)
        finally:
            _state["loading"] = False
            _state["loaded"] = True
    return list(_status)


def deferred(target: str, *args: Any) -> Callable[..., Any]:
    """A stand-in for the callable ``module:attribute``, imported when first called (with
    ``args``, the attribute is a factory called once to make the callable). A method's file
    registers it so that declaring a method costs no import of its heavy code: the registries
    (and ``--help``, which lists their choices) never load torch."""
    made: list[Callable[..., Any]] = []

    def call(*a: Any, **kw: Any) -> Any:
        if not made:
            module, _, attr = target.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            made.append(obj(*args) if args else obj)
        return made[0](*a, **kw)

    call.__name__ = target.rpartition(":")[2]
    call.__qualname__ = call.__name__
    call.__doc__ = f"{target}{args if args else ''}, imported when first called"
    return call


def plugin_status() -> list[PluginStatus]:
    """What :func:`load_plugins` loaded or refused (loads them first)."""
    return load_plugins()


def reload_plugins() -> list[PluginStatus]:
    """Withdraw every entry-point plug-in and load the group again (tests, a new install in a
    running process). The built-ins stay."""
    if not _state["loaded"]:
        return load_plugins()
    with _lock:
        for st in _status:
            if st.dist != BUILTIN_OWNER:
                _withdraw(f"{st.dist}:{st.name}")
        builtins = [s for s in _status if s.dist == BUILTIN_OWNER]
        _status.clear()
        _status.extend(builtins)
        _state["loading"] = True
        try:
            for ep in _entry_points():
                module = ep.value.partition(":")[0].strip()
                sys.modules.pop(module, None)  # import it again: it registers at import time
                _load_one(ep.name, _dist_name(ep), ep.value, ep.load)
        finally:
            _state["loading"] = False
            _state["loaded"] = True
    return list(_status)


def plugins_loaded() -> bool:
    """True once :func:`load_plugins` ran in this process."""
    return bool(_state["loaded"])


# ---- what every method family does with its registries --------------------------------------


def withdraw_method(
    name: str, methods: MutableMapping, presets: Registry, *preset_tables: MutableMapping
) -> list[str]:
    """Remove method ``name`` from ``methods`` and every preset of ``presets`` that uses it,
    with its rows in ``preset_tables`` (descriptions...); returns the presets removed. Reads
    what is registered now (no plug-in load): for tests and plug-in reloads."""
    methods.pop(name, None)
    gone = [key for key, p in presets.current().items() if p.method == name]
    for key in gone:
        presets.pop(key)
        for table in preset_tables:
            table.pop(key, None)
    return gone


def presets_table(
    header: Sequence[str],
    presets: Registry,
    methods: Mapping,
    row: Callable[[str, Any, Any], Sequence[str]],
) -> str:
    """A Markdown table (README, ``zsdense info --methods``): one row per preset whose method
    is registered, ``row(preset name, preset, method)`` giving its cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, p in presets.items():
        m = methods.get(p.method)
        if m is not None:
            lines.append("| " + " | ".join(row(key, p, m)) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class MethodFamily:
    """A task family's three registries, a method's and its presets' life cycle over them:
    ``methods`` (name -> method entry, with a ``description``), ``presets`` (name -> preset,
    whose ``method`` names its method) and ``descriptions`` (preset name -> its own text).

    ``what`` / ``preset_what`` name them in errors ("referring method", "referring preset")."""

    what: str
    preset_what: str
    methods: Registry
    presets: Registry
    descriptions: Registry

    @classmethod
    def over(cls, presets: Registry, what: str, preset_what: str) -> MethodFamily:
        """A family whose presets live in ``presets``, with new method and description
        registries."""
        return cls(
            what, preset_what, Registry(what), presets, Registry(f"{preset_what} description")
        )

    def check_new(self, name: str, replace_existing: bool) -> None:
        """A ConfigError if a method ``name`` is registered and may not be replaced."""
        if self.methods.registered(name) and not replace_existing:
            raise ConfigError(f"{self.what} {name!r} is already registered")

    def build_presets(
        self,
        name: str,
        preset: Any,
        presets: Mapping[str, Any] | None,
        build: Callable[[str, Any], tuple[Any, str]],
        replace_existing: bool,
    ) -> dict[str, tuple[Any, str]]:
        """Method ``name``'s presets, built (``build(preset name, spec) -> (preset,
        description)``) but not yet registered: ``presets`` as given, else one preset named
        after the method from ``preset`` (or the defaults). Names taken are a ConfigError."""
        if preset is not None and presets is not None:
            raise ConfigError(f"{self.what} {name!r}: give preset= or presets=, not both")
        table = dict(presets) if presets is not None else {name: preset or {}}
        built = {pname: build(pname, spec) for pname, spec in table.items()}
        for pname in built:
            if self.presets.registered(pname) and not replace_existing:
                raise ConfigError(f"{self.preset_what} {pname!r} is already registered")
        return built

    def add(self, name: str, entry: Any, built: Mapping[str, tuple[Any, str]]) -> Any:
        """Register method ``entry`` as ``name`` with its built presets (a preset without a
        description of its own shares the method's)."""
        self.methods[name] = entry
        for pname, (p, desc) in built.items():
            self.presets[pname] = p
            self.descriptions[pname] = desc or entry.description
        return entry

    def add_preset(
        self,
        name: str,
        method: str,
        spec: Mapping[str, Any],
        build: Callable[[str, Any], tuple[Any, str]],
        replace_existing: bool,
    ) -> Any:
        """Register one more preset ``name`` of the registered ``method``."""
        m = self.methods.lookup(method)
        if self.presets.registered(name) and not replace_existing:
            raise ConfigError(f"{self.preset_what} {name!r} is already registered")
        p, desc = build(name, spec)
        self.presets[name] = p
        self.descriptions[name] = desc or m.description
        return p

    def withdraw(self, name: str) -> list[str]:
        """Remove method ``name`` and its presets (:func:`withdraw_method`)."""
        return withdraw_method(name, self.methods, self.presets, self.descriptions)

    def table(self, header: Sequence[str], row: Callable[[str, Any, Any], Sequence[str]]) -> str:
        """The family's Markdown table (:func:`presets_table`)."""
        return presets_table(header, self.presets, self.methods, row)
