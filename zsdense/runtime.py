"""The runtime below every head: device, precision, encoders, caches; and how they are chosen.

:class:`Runtime` is what the heads (``zsdense.tasks``), the batch engine, evaluation and training
receive: the device and the resolved precision (with autocast), the encoders (loaded lazily, once
per process), the text-embedding cache, a per-runtime memo for work that belongs to a run rather
than to an image (memory banks, reference and calibration maps), and the per-image context.
``zsdense.api.Segmenter`` is a thin face over one :class:`Runtime`.

Device and precision selection is guarded so CPU runs never touch CUDA APIs.

``--precision auto`` picks, per device, the fastest precision whose deviation from fp32 stays
within the tolerance documented in the README ("Devices and precision"):

- CUDA: bf16 where the GPU supports it, else fp16;
- CPU: bf16 only where the processor has native bf16 matrix instructions (x86 ``avx512_bf16`` or
  AMX ``amx_bf16``, Arm ``bf16``), fp32 elsewhere. Without them oneDNN emulates bf16 and a
  ViT-L/14-336 forward was measured 11× *slower* than fp32 (AMD EPYC without avx512_bf16);
  with avx512_bf16 it was 2.84× faster;
- MPS and anything else: fp32.

``$ZSDENSE_CPU_BF16=native|none`` overrides the detection (tests and CI use it to play a CPU
of the other kind). Otherwise the CPU is asked first through torch's own cpuinfo
(``torch.cpu._is_avx512_bf16_supported``, ``_is_amx_tile_supported``), then ``/proc/cpuinfo``.
Where neither can tell (no x86 helpers, no ``/proc``; e.g. macOS on Arm), a short one-off probe
times a bf16 and an fp32 matrix product and caches the ratio per machine under the user cache
dir (``$XDG_CACHE_HOME/zsdense`` or ``~/.cache/zsdense``; ``$ZSDENSE_CACHE_DIR`` overrides), so
it runs once per machine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from zsdense.config import ALLOCATORS, PRECISIONS, RuntimeConfig, register_entries
from zsdense.context import ImageContext
from zsdense.errors import ConfigError

# The figure quoted when bf16 is forced on a CPU without native support and no probe was run.
DOCUMENTED_BF16_SLOWDOWN = 11.0  # ViT-L/14-336, AMD EPYC without avx512_bf16 / AMX: 61.3 s / 5.3 s
# Flags (as /proc/cpuinfo spells them) that mean bf16 matrix products run natively.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
PROBE_CACHE_FILE = "cpu_bf16_probe.json"
# Environment override of the bf16 detection (tests, CI): "native" or "none".
CPU_BF16_ENV = "ZSDENSE_CPU_BF16"
CPU_BF16_ENV_VALUES = ("native", "none")


class PrecisionWarning(UserWarning):
    """A precision was forced that this machine runs slower than fp32."""


@dataclass(frozen=True)
class CpuBf16Support:
    """Whether this CPU multiplies bf16 matrices natively, and how that was found out."""

    native: bool
    source: str  # "torch cpuinfo", "/proc/cpuinfo", "probe", "probe (cached)"
    detail: str  # the flags found, or the probe's figures
    slowdown: float | None = None  # probed bf16 time / fp32 time (None: not probed)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps if available, else cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but CUDA is not available here")
    return torch.device(device)


# ---- what the CPU can do ----------------------------------------------------------------------


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels were dispatched to (``AVX2``, ``AVX512``, ``DEFAULT``,
    ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - very old or unusual builds
        return "unknown"


def _torch_cpu_flags() -> set[str] | None:
    """bf16-relevant flags from torch's cpuinfo, or None where torch cannot tell (non-x86)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return None
    cpu = getattr(torch, "cpu", None)
    bf16 = getattr(cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(cpu, "_is_amx_tile_supported", None)
    if bf16 is None or amx is None:
        return None
    flags = set()
    if bf16():
        flags.add("avx512_bf16")
    if amx():
        flags.add("amx_bf16")
    return flags


def _proc_cpu_flags() -> set[str] | None:
    """The CPU flags of ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); None without it."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_cache_dir() -> Path:
    """Where the one-off bf16 probe result is kept (per machine)."""
    if os.environ.get("ZSDENSE_CACHE_DIR"):
        return Path(os.environ["ZSDENSE_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "zsdense"


def _probe_key() -> str:
    return "|".join(
        (platform.node(), platform.machine(), _cpu_name(), cpu_capability(), torch.__version__)
    )


def probe_bf16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """bf16 time / fp32 time of a ``size``³ matrix product on this CPU (best of ``repeats``).

    Below 1 bf16 is faster (native support); far above 1 it is emulated. Stops after one bf16
    product already 4× slower than fp32, so it costs well under a second on any CPU."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g)
    b = torch.randn(size, size, generator=g)

    def best(x: torch.Tensor, y: torch.Tensor, give_up: float) -> float:
        torch.mm(x, y)  # warm-up (kernel selection, allocation)
        times: list[float] = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - t0)
            if times[-1] > give_up:
                break
        return min(times)

    with torch.no_grad():
        t32 = max(best(a, b, float("inf")), 1e-9)
        t16 = best(a.bfloat16(), b.bfloat16(), 4.0 * t32)
    return t16 / t32


def _probe_cached(cache_dir: Path | None) -> CpuBf16Support:
    path = (cache_dir or probe_cache_dir()) / PROBE_CACHE_FILE
    key = _probe_key()
    table: dict = {}
    with contextlib.suppress(OSError, ValueError):
        table = json.loads(path.read_text())
    if isinstance(table, dict) and isinstance(table.get(key), (int, float)):
        ratio, source = float(table[key]), "probe (cached)"
    else:
        ratio, source = probe_bf16_slowdown(), "probe"
        table = table if isinstance(table, dict) else {}
        table[key] = ratio
        with contextlib.suppress(OSError):  # a read-only home only costs a re-probe next time
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=1))
            tmp.replace(path)
    detail = f"bf16 matrix product {ratio:.2f}x the fp32 time ({path})"
    return CpuBf16Support(native=ratio < 1.0, source=source, detail=detail, slowdown=ratio)


@functools.lru_cache(maxsize=1)
def _cpu_bf16_support_cached() -> CpuBf16Support:
    return _detect_cpu_bf16(None)


def _from_flags(flags: set[str], source: str) -> CpuBf16Support:
    found = sorted(f for f in NATIVE_BF16_FLAGS if f in flags)
    if found:
        return CpuBf16Support(native=True, source=source, detail=", ".join(found))
    return CpuBf16Support(
        native=False, source=source, detail="no avx512_bf16 / amx_bf16 / bf16 flag"
    )


def _detect_cpu_bf16(cache_dir: Path | None) -> CpuBf16Support:
    if not torch.backends.mkldnn.is_available():  # no oneDNN: flags say nothing, measure
        return _probe_cached(cache_dir)
    flags = _torch_cpu_flags()
    if flags is not None:
        return _from_flags(flags, "torch cpuinfo")
    flags = _proc_cpu_flags()
    if flags is not None:
        return _from_flags(flags, "/proc/cpuinfo")
    return _probe_cached(cache_dir)


def _env_bf16_override() -> CpuBf16Support | None:
    """``$ZSDENSE_CPU_BF16`` (``native`` or ``none``): the answer given by the environment, for
    tests and CI that play a CPU of the other kind (unset or empty: ask the CPU)."""
    value = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if not value:
        return None
    if value not in CPU_BF16_ENV_VALUES:
        raise ConfigError(
            f"${CPU_BF16_ENV}={value!r}: use one of {', '.join(CPU_BF16_ENV_VALUES)} "
            "(or unset it to ask the CPU)"
        )
    native = value == "native"
    detail = "native bf16" if native else "no native bf16"
    return CpuBf16Support(native=native, source=f"${CPU_BF16_ENV}", detail=f"{detail} (set)")


def cpu_bf16_support(*, cache_dir: str | os.PathLike | None = None) -> CpuBf16Support:
    """Does this CPU multiply bf16 natively? ``$ZSDENSE_CPU_BF16`` (``native`` / ``none``)
    answers first when set; then flags (torch's cpuinfo, /proc/cpuinfo); where neither answers,
    a probe timed once per machine and cached (``cache_dir`` or :func:`probe_cache_dir`).
    Cached per process (the environment override is read on every call)."""
    forced = _env_bf16_override()
    if forced is not None:
        return forced
    if cache_dir is not None:
        return _detect_cpu_bf16(Path(cache_dir))
    return _cpu_bf16_support_cached()


# ---- precision -----------------------------------------------------------------------------


def auto_precision(device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype ``--precision auto`` picks on ``device`` and the reason, in words."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA device supports bf16"
        return torch.float16, "CUDA device without bf16 support: fp16"
    if device.type == "cpu":
        sup = cpu_bf16_support()
        if sup.native:
            return torch.bfloat16, f"CPU multiplies bf16 natively ({sup.source}: {sup.detail})"
        return torch.float32, f"CPU has no native bf16 ({sup.source}: {sup.detail})"
    return torch.float32, f"{device.type}: fp32 (the reference path)"


_WARNED: set[str] = set()


def _warn_slow_bf16() -> None:
    """Warn (once per process) that bf16 is emulated on this CPU, with the slowdown."""
    if "cpu-bf16" in _WARNED:
        return
    _WARNED.add("cpu-bf16")
    sup = cpu_bf16_support()
    if sup.slowdown is not None:
        how = f"measured here: a bf16 matrix product takes {sup.slowdown:.1f}x the fp32 time"
    else:
        how = (
            f"documented: about {DOCUMENTED_BF16_SLOWDOWN:.0f}x slower than fp32 for ViT-L/14-336 "
            "on a CPU without native bf16"
        )
    warnings.warn(
        f"--precision bf16 on a CPU without native bf16 ({sup.source}: {sup.detail}) is emulated "
        f"and slow ({how}); use --precision auto or fp32 (Segmenter(precision='auto')).",
        PrecisionWarning,
        stacklevel=3,
    )


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``precision`` on ``device``.

    ``auto``: see :func:`auto_precision`. An explicit ``bf16`` on a CPU without native bf16 is
    honoured but warns once per process with the slowdown. fp32 is the reference path every
    fixture is matched on."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}"
        )
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if device.type == "cpu" and not cpu_bf16_support().native:
            _warn_slow_bf16()
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return auto_precision(device)[0]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autocast for reduced precision; a no-op for fp32 (and for fp16 on CPU, unsupported)."""
    if dtype == torch.float32:
        with torch.no_grad():
            yield
        return
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("--precision fp16 is not supported on CPU; use bf16 or fp32")
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=dtype):
        yield


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def precision_name(dtype: torch.dtype) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for a resolved dtype (the name ``--precision`` takes)."""
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# ---- the runtime object ------------------------------------------------------------------------

TINY_WARNING = "zsdense: models='{}' uses random weights: results are NOT meaningful"


# ---- the C library's allocator -----------------------------------------------------------
# glibc's malloc serves a block above its mmap threshold (at most 32 MiB by default, adjusted as
# blocks are freed) with fresh pages from the kernel and gives them back on free, and it gives
# back the top of its heap past the trim threshold. The encoders' attention scores are such
# blocks (SAM's global attention: 12·4096² values a block, 400 MB in bf16), so every block of
# every image page-faulted its scores in anew: 3.2-5.3 GB of minor faults and 1.5-2.5 s of
# system time an image for hybridgl+ and trident at bf16 (2 cores). Tuned, blocks up to
# TUNED_MALLOC_BYTES come from the heap and the heap keeps what was freed: the next block and
# image reuse it (README, "The memory allocator": 0.79-0.85x the time, and the peak it costs).
M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
TUNED_MALLOC_BYTES = (1 << 31) - 1  # the largest value mallopt takes (an int)
# what is tried, largest first, where a C library refuses a larger threshold
TUNED_MALLOC_FALLBACKS = (TUNED_MALLOC_BYTES, 1 << 30, 256 << 20, 32 << 20)
# environment variables that mean the user tuned malloc already (left alone then)
MALLOC_ENV = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)
PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@dataclass(frozen=True)
class AllocatorState:
    """What the process's allocator is: ``mode`` (``tuned`` | ``system``), whether zsdense
    changed it (``applied``) and, in words, how or why not (``detail``)."""

    mode: str
    applied: bool
    detail: str


_allocator_lock = threading.Lock()
_allocator: AllocatorState | None = None


def _allocator_blocker() -> str | None:
    """Why malloc cannot or should not be tuned here (None: it can)."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    libc, _ = platform.libc_ver()
    if libc != "glibc":
        return f"the C library is not glibc ({libc or 'unknown'})"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in PRELOADED_ALLOCATORS:
        if name in preload:
            return f"LD_PRELOAD loads {name}"
    tuned = [k for k in MALLOC_ENV if os.environ.get(k)]
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        tuned.append("GLIBC_TUNABLES")
    if tuned:
        return f"the environment sets {', '.join(tuned)}"
    return None


def _mallopt():
    import ctypes

    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def tune_allocator(mode: str = "tuned") -> AllocatorState:
    """Set the process's allocator for zsdense's work (``RuntimeConfig.allocator``,
    ``--allocator``); returns :func:`allocator_state`.

    ``tuned`` (glibc on Linux): ``mallopt`` raises the mmap and trim thresholds to
    ``TUNED_MALLOC_BYTES``, so large tensors freed by one block or image are reused by the next
    instead of being returned to the kernel and faulted in again. Measured on the SAM presets at
    bf16 (README, "The memory allocator"). The cost: memory freed stays with the process (its
    resident size stays at its peak until it exits), and the peak can be higher (trident: up to
    +28 %). Left alone, and said so, where another allocator is preloaded, the environment tunes
    malloc already (``MALLOC_*_``, ``GLIBC_TUNABLES``), or the C library is not glibc.
    ``system`` changes nothing.

    Process-wide and once: the first runtime asking ``tuned`` applies it and ``system`` does not
    undo it. Allocation never changes a result."""
    global _allocator
    if mode not in ALLOCATORS:
        raise ConfigError(f"unknown allocator {mode!r}; choose one of: {', '.join(ALLOCATORS)}")
    with _allocator_lock:
        if _allocator is not None and (_allocator.applied or mode == "system"):
            return _allocator
        if mode == "system":
            _allocator = AllocatorState("system", False, "the C library's defaults")
            return _allocator
        why = _allocator_blocker()
        fn = None if why else _mallopt()
        if fn is None:
            why = why or "mallopt is not available"
            _allocator = AllocatorState("system", False, f"the C library's defaults ({why})")
            return _allocator
        for size in TUNED_MALLOC_FALLBACKS:
            if fn(M_MMAP_THRESHOLD, size) == 1:
                fn(M_TRIM_THRESHOLD, size)
                _allocator = AllocatorState(
                    "tuned",
                    True,
                    f"glibc malloc: blocks up to {size / (1 << 20):.0f} MiB from its heap, "
                    "freed memory kept for reuse",
                )
                return _allocator
        _allocator = AllocatorState("system", False, "the C library's defaults (mallopt refused)")
        return _allocator


def release_free_memory() -> None:
    """Tuned: hand the heap's free pages back to the kernel once (glibc ``malloc_trim(0)``).

    Called after an encoder loads: its loading frees large temporaries (float32 weights cast to
    bf16, checkpoint buffers) that inference may not reuse whole; kept resident, they add to the
    run's peak. The address range stays with the heap; only what is reused is faulted in again,
    once. It lowers the peak in some processes, not all: the heap's layout varies (README, "The
    memory allocator"). Nothing where not tuned."""
    if not allocator_state().applied:
        return
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass


def allocator_plan() -> str:
    """What ``--allocator tuned`` (the default) would do in this process, in words
    (``zsdense info``, before any runtime applied it)."""
    why = _allocator_blocker()
    if why is not None:
        return f"runs keep the C library's defaults ({why})"
    return "runs tune glibc's malloc (--allocator tuned, the default; system: its defaults)"


def allocator_state() -> AllocatorState:
    """The allocator as zsdense left it (``system`` where no runtime asked for anything yet)."""
    return _allocator or AllocatorState("system", False, "the C library's defaults")


class Runtime:
    """Device, precision, encoders and caches shared by every head of a process or run.

    Cheap to construct: the device and precision are resolved on first use, encoders load on
    first use (cached per process by :mod:`zsdense.models`, so two runtimes with the same
    settings share one copy). ``text_cache`` holds text embeddings; :meth:`memo` holds what a
    run computes once for all its images (memory banks, reference maps, calibration).
    """

    def __init__(self, config: RuntimeConfig | None = None, **settings) -> None:
        if config is None:
            config = RuntimeConfig(**settings)
        elif settings:
            raise TypeError("pass a RuntimeConfig or keyword settings, not both")
        from zsdense.models import check_model_set

        check_model_set(config.models)
        self.config = config
        tune_allocator(config.allocator)  # process-wide, once (before any encoder allocates)
        self._register_setting = None
        if register_entries(config.registers):  # neuron files read now: errors before any input
            from zsdense.models.registers_setting import RegisterSetting

            self._register_setting = RegisterSetting.from_config(config)
        self._registers_served: dict[str, tuple] = {}  # label -> (model, spec, entry, why not)
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        self._precision_reason = ""
        self.text_cache: dict = {}
        self._memo: dict = {}
        self._warned = False
        self._models_used: dict[str, object] = {}  # "kind/name" -> model (the run's record)

    # ---- device and precision ----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = resolve_device(self.config.device)
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The resolved precision (``auto`` decided here, once)."""
        if self._dtype is None:
            requested = self.config.precision
            if requested == "auto":
                self._dtype, self._precision_reason = auto_precision(self.device)
            else:
                self._dtype = resolve_precision(requested, self.device)
                self._precision_reason = f"--precision {requested}"
        return self._dtype

    @property
    def precision(self) -> str:
        """The resolved precision's name: ``fp32``, ``bf16`` or ``fp16``."""
        return precision_name(self.dtype)

    def precision_record(self) -> dict:
        """What ran and why: the resolved precision, the device type, what was asked for, and
        (CPU) the kernel capability and bf16 support that decided ``auto``."""
        rec = {
            "precision": self.precision,
            "device_type": self.device.type,
            "requested": self.config.precision,
            "reason": self._precision_reason,
        }
        if self.device.type == "cpu":
            rec["cpu_capability"] = cpu_capability()
            rec["cpu_bf16_native"] = cpu_bf16_support().native
        rec["allocator"] = allocator_state().detail  # recorded, never compared (no output changes)
        return rec

    def autocast(self):
        """Context manager: no-grad plus autocast at the resolved precision."""
        return autocast(self.device, self.dtype)

    # ---- model set -----------------------------------------------------------------------------
    @property
    def random_weights(self) -> bool:
        """True for the ``tiny`` and ``random`` model sets (results are not meaningful)."""
        return self.config.models in ("tiny", "random")

    @property
    def tiny(self) -> bool:
        """True for the shrunken ``tiny`` models (heads may use smaller settings to stay fast)."""
        return self.config.models == "tiny"

    def result_meta(self) -> dict:
        """Metadata every result carries (model set, device, resolved precision, random weights)."""
        meta = {"models": self.config.models, "device": str(self.device)}
        meta["precision"] = str(self.dtype).replace("torch.", "")
        if self.random_weights:
            meta["random_weights"] = True
            meta["warning"] = "random weights — not meaningful"
        if self.registers_on:  # per encoder: the neurons' source and fingerprint, R, mode
            keep = ("neurons_from", "fingerprint", "num_registers", "mode", "batch")
            meta["registers"] = {
                label: {k: rec[k] for k in keep} if rec["registers"] == "on" else "none"
                for label, rec in self.registers_applied().items()
            }
        return meta

    # ---- encoders (lazy, cached per process) ------------------------------------------------
    def clip(self, arch: str, pretrained: str = "openai"):
        return self.model("clip", arch, pretrained=pretrained)

    def dinov2(self, name: str = "dinov2-reg-base"):
        return self.model("dinov2", name)

    def sam(self, arch: str = "vit_b"):
        return self.model("sam", arch)

    def model(self, kind: str, name: str, **extra):
        """The encoder ``kind`` (clip, dinov2, sam) ``name`` for this runtime's settings."""
        from zsdense.models import get_model

        if self.random_weights and not self._warned:  # one stderr line per runtime
            self._warned = True
            print(TINY_WARNING.format(self.config.models), file=sys.stderr)
        label = "/".join([kind, name, *(str(v) for v in extra.values())])
        spec = entry = None
        setting = self._register_setting
        pretrained = extra.get("pretrained", "openai")
        if setting is not None and kind != "sam":
            got = setting.spec_for(kind, name, self.config.models, pretrained)
            spec, entry = got if got is not None else (None, None)
        model = get_model(
            kind,
            name,
            models=self.config.models,
            device=str(self.device),
            weights_dir=self.config.weights_dir,
            download=self.config.download,
            dtype=self.dtype,
            registers=spec,
            **extra,
        )
        if label not in self._models_used:  # loaded (or first served): its temporaries freed
            release_free_memory()
        self._models_used[label] = model
        if setting is not None and kind != "sam" and label not in self._registers_served:
            from zsdense.models.registers_setting import why_plain

            why = "" if spec else why_plain(setting, kind, name, self.config.models, pretrained)
            self._registers_served[label] = (model, spec, entry, why)
        return model

    # ---- test-time registers (zsdense.models.registers_setting) -------------------------------
    @property
    def registers_on(self) -> bool:
        """True when ``--registers`` asks for registers (some encoder may still run plain)."""
        return self._register_setting is not None and not self._register_setting.off

    def registers_settings(self) -> dict | None:
        """The requested register setting as a run records and compares it (None when off)."""
        return None if self._register_setting is None else self._register_setting.record()

    def registers_applied(self, labels=None) -> dict:
        """What each CLIP / DINOv2 served so far (or only those of ``labels``) runs with:
        ``{label: {"registers": "on", neurons_from, fingerprint, num_registers, mode, ...}}`` or
        ``{"registers": "none", "why": ...}``. Empty when off."""
        from zsdense.models.registers_setting import applied_record

        if not self.registers_on:
            return {}
        return {
            label: applied_record(spec, entry, why)
            for label, (_, spec, entry, why) in sorted(self._registers_served.items())
            if labels is None or label in labels
        }

    def check_registers_used(self, labels=None) -> None:
        """ConfigError when a ``--registers`` file matched none of the encoders this runtime
        served (or those of ``labels``): a file for another encoder is a setup error."""
        if not self.registers_on:
            return
        served = [m for label, m in self._models_used.items() if labels is None or label in labels]
        problems = self._register_setting.unused(served)
        if problems:
            raise ConfigError("; ".join(problems))

    def weights_record(self, during=None) -> dict[str, str | None]:
        """The encoders this runtime has served — only those asked for while ``during()`` runs
        when given (a run's setup) — with the SHA-256 of their weights where known (None for
        random weights)."""
        used = self._models_used
        if during is not None:
            before = dict(used)
            used.clear()
            try:
                during()
                used, self._models_used = dict(used), {**before, **used}
            except BaseException:
                self._models_used = {**before, **used}
                raise
        out: dict[str, str | None] = {}
        for name, model in sorted(used.items()):
            sha = getattr(model, "weights_sha256", None)
            if callable(sha):
                sha = sha() if not self.random_weights else None
            out[name] = sha if isinstance(sha, str) else None
        return out

    # ---- run-level memo ------------------------------------------------------------------------
    def memo(self, key, compute):
        """``compute()`` once per runtime and ``key``: what a run computes once for every image
        (a memory bank of good references, their maps, a calibration)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    # ---- images -----------------------------------------------------------------------------
    def context(self, image) -> ImageContext:
        """An :class:`ImageContext` for a path, PIL image, array or an existing context."""
        if isinstance(image, ImageContext):
            self._claim(image)
            return image
        from zsdense.io import to_float_rgb

        arr, meta = to_float_rgb(image, max_pixels=self.config.max_pixels)
        return ImageContext(image=arr, meta=meta, registers=self._registers_stamp())

    def _registers_stamp(self) -> str:
        setting = self.registers_settings()
        return "off" if setting is None else json.dumps(setting, sort_keys=True)

    def _claim(self, ctx: ImageContext) -> None:
        """A context made or first used under another register setting drops the encoder
        outputs it cached there (computed with other registers), keeping the image."""
        mine = self._registers_stamp()
        if ctx.registers is not None and ctx.registers != mine:
            ctx.release()
        ctx.registers = mine

    def contexts(self, images) -> list[ImageContext]:
        return [self.context(im) for im in images]


def runtime_of(obj) -> Runtime:
    """The :class:`Runtime` behind ``obj``: a Runtime itself, or a face holding one (a
    ``Segmenter``'s ``.runtime``; anything else is taken as it is, duck-typed). ``None`` gives
    a default runtime."""
    if obj is None:
        return Runtime()
    return getattr(obj, "runtime", obj)
