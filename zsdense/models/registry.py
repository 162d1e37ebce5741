"""The weights registry: find, hash, download and verify the checkpoints of the weights table.

The table itself (names, hub ids, URLs, SHA-256: plain data) is :mod:`zsdense.models.weights_table`;
reading a file into a state dict is :mod:`zsdense.models.weights_load`. Both are re-exported here
(``registry.CHECKPOINTS``, ``registry.get_checkpoint``, ``registry.load_state_dict_file``) so that
callers need one import.

:func:`resolve` finds a checkpoint on disk or downloads it, in this order:

1. the explicit weights directories (``--weights-dir``, then ``$ZSDENSE_WEIGHTS``, which may hold
   several directories separated by ``os.pathsep``): ``<dir>/<name>/<file>``,
   ``<dir>/<hub_id>/<file>`` and, for file names no other checkpoint uses, ``<dir>/<file>``;
2. the standard caches: the Hugging Face hub cache (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``),
   ``$TORCH_HOME/hub/checkpoints`` and open_clip's ``~/.cache/clip``;
3. a download (unless offline) into the first explicit weights directory if one was given,
   otherwise into the standard cache the file belongs to.

A file whose SHA-256 differs from the registered one is an error, never silently replaced: the
user put it there, so the user decides. Downloads go to ``<file>.part`` and are renamed only
after their hash checks out. Where the table has no verified hash (``None``), ``verify`` says
"unknown hash" rather than pretending.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from zsdense.errors import WeightsError
from zsdense.models.weights_load import load_state_dict_file
from zsdense.models.weights_table import (
    CHECKPOINTS,
    Checkpoint,
    FileSpec,
    get_checkpoint,
)
from zsdense.models.weights_table import HF as _HF

__all__ = [
    "CHECKPOINTS",
    "Checkpoint",
    "FileSpec",
    "VerifyResult",
    "find",
    "forget_failed_downloads",
    "get_checkpoint",
    "hf_hub_cache",
    "is_network_error",
    "is_offline",
    "load_state_dict_file",
    "open_clip_cache",
    "resolve",
    "search_locations",
    "sha256_file",
    "torch_hub_checkpoints",
    "verify",
    "weights_dirs",
]

# ---------------------------------------------------------------------------------------------
# Places
# ---------------------------------------------------------------------------------------------

_TRUTHY = {"1", "true", "yes", "on"}


def is_offline() -> bool:
    """True when ``$ZSDENSE_OFFLINE`` or ``$HF_HUB_OFFLINE`` is set to a truthy value."""
    return any(
        os.environ.get(var, "").strip().lower() in _TRUTHY
        for var in ("ZSDENSE_OFFLINE", "HF_HUB_OFFLINE")
    )


def weights_dirs(weights_dir: str | os.PathLike | None = None) -> list[Path]:
    """The explicit weights directories: ``weights_dir`` first, then those in $ZSDENSE_WEIGHTS."""
    dirs: list[Path] = []
    if weights_dir:
        dirs.append(Path(weights_dir).expanduser())
    for part in os.environ.get("ZSDENSE_WEIGHTS", "").split(os.pathsep):
        if part.strip():
            p = Path(part.strip()).expanduser()
            if p not in dirs:
                dirs.append(p)
    return dirs


def _cache_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg).expanduser() if xdg else Path.home() / ".cache"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache directory, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return _cache_home() / "huggingface" / "hub"


def torch_hub_checkpoints() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch.hub's download cache)."""
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]).expanduser() / "hub" / "checkpoints"
    return _cache_home() / "torch" / "hub" / "checkpoints"


def open_clip_cache() -> Path:
    """open_clip's cache for OpenAI URL downloads (it always uses ``~/.cache/clip``)."""
    return Path.home() / ".cache" / "clip"


def search_locations(weights_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders checkpoints are looked for in, in order (for ``zsdense info`` and messages)."""
    return [*weights_dirs(weights_dir), hf_hub_cache(), torch_hub_checkpoints(), open_clip_cache()]


def _shared_filenames() -> set[str]:
    """File names used by more than one checkpoint: only looked up under a per-name folder."""
    counts = Counter(
        spec.filename for ck in CHECKPOINTS.values() for spec in {*ck.files, *ck.alternates}
    )
    return {fn for fn, n in counts.items() if n > 1}


def _options(ck: Checkpoint) -> list[tuple[FileSpec, ...]]:
    """The file sets that each satisfy ``ck``: its files, then each alternate alone."""
    return [ck.files, *((alt,) for alt in ck.alternates)]


def _hf_repo_of(spec: FileSpec) -> str | None:
    """``org/name`` when ``spec`` is published on the HF hub, else None."""
    if not spec.url.startswith(_HF + "/"):
        return None
    parts = spec.url[len(_HF) + 1 :].split("/")
    return "/".join(parts[:2]) if len(parts) >= 5 and parts[2] == "resolve" else None


def _hf_snapshots(repo: str) -> list[Path]:
    """Snapshot folders of ``repo`` in the HF cache, the one ``refs/main`` names first."""
    root = hf_hub_cache() / ("models--" + repo.replace("/", "--"))
    snaps = root / "snapshots"
    if not snaps.is_dir():
        return []
    ordered: list[Path] = []
    ref = root / "refs" / "main"
    if ref.is_file():
        main = snaps / ref.read_text().strip()
        if main.is_dir():
            ordered.append(main)
    others = sorted(
        (p for p in snaps.iterdir() if p.is_dir() and p not in ordered),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    return ordered + others


@dataclass(frozen=True)
class _Place:
    """A folder where one file set of a checkpoint may lie; ``label`` is what messages show."""

    folder: Path
    specs: tuple[FileSpec, ...]
    label: str


def _places(ck: Checkpoint, weights_dir: str | os.PathLike | None) -> list[_Place]:
    """Every (folder, file set) to look at for ``ck``, in resolution order."""
    shared = _shared_filenames()
    places: list[_Place] = []

    def add(folder: Path, specs: tuple[FileSpec, ...], label: str | None = None) -> None:
        if label is None:
            names = [s.filename for s in specs]
            label = (
                str(folder / names[0]) if len(names) == 1 else f"{folder}/{{{', '.join(names)}}}"
            )
        places.append(_Place(folder, specs, label))

    for d in weights_dirs(weights_dir):
        for specs in _options(ck):
            add(d / ck.name, specs)
            if ck.hub_id:
                add(d / ck.hub_id, specs)
            if not any(s.filename in shared for s in specs):
                add(d, specs)
    for specs in _options(ck):
        repos = {_hf_repo_of(s) for s in specs}
        if len(repos) == 1 and None not in repos:
            repo = repos.pop()
            snaps = _hf_snapshots(repo)
            pattern = hf_hub_cache() / ("models--" + repo.replace("/", "--")) / "snapshots" / "*"
            names = ", ".join(s.filename for s in specs)
            for snap in snaps:
                add(snap, specs)
            if not snaps:  # still say where we looked
                places.append(_Place(pattern, specs, f"{pattern}/{{{names}}}"))
    for specs in _options(ck):
        if len(specs) == 1 and specs[0].filename not in shared:
            fn = specs[0].filename
            add(torch_hub_checkpoints(), specs)
            if fn.endswith(".pt") and "openaipublic" in specs[0].url:
                add(open_clip_cache(), specs)
    return places


# ---------------------------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------------------------

_HASH_CACHE: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime_ns) -> sha256
_HASH_DB_MIN_BYTES = 32 << 20  # big files also remember their hash across processes


def _hash_db_path() -> Path:
    return _cache_home() / "zsdense" / "sha256.json"


def _hash_db_load() -> dict:
    import json

    try:
        data = json.loads(_hash_db_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(key: tuple[str, int, int], digest: str) -> None:
    """Keep a hash for this process and, for big files, in ``~/.cache/zsdense/sha256.json``.

    Hashing a 2.5 GB checkpoint takes seconds; the persistent entry is keyed by the file's real
    path, size and modification time, so any rewrite of the file invalidates it.
    """
    import json

    _HASH_CACHE[key] = digest
    if key[1] < _HASH_DB_MIN_BYTES:
        return
    db = _hash_db_load()
    db[key[0]] = [key[1], key[2], digest]
    target = _hash_db_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(db, indent=0))
        os.replace(tmp, target)
    except OSError:  # a read-only home only costs re-hashing next time
        pass


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (cached by real path, size and modification time)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _HASH_CACHE:
        return _HASH_CACHE[key]
    if st.st_size >= _HASH_DB_MIN_BYTES:
        entry = _hash_db_load().get(key[0])
        if isinstance(entry, list) and len(entry) == 3 and tuple(entry[:2]) == key[1:]:
            _HASH_CACHE[key] = str(entry[2])
            return _HASH_CACHE[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    _remember(key, h.hexdigest())
    return _HASH_CACHE[key]


def _check_file(ck: Checkpoint, spec: FileSpec, path: Path) -> None:
    """Raise WeightsError if ``path`` does not match ``spec``'s size or hash (file untouched)."""
    if spec.size is not None and path.stat().st_size != spec.size:
        raise WeightsError(
            f"{path}: this file is not the checkpoint '{ck.name}' ({spec.filename}): it has "
            f"{path.stat().st_size} bytes, the published file has {spec.size} (incomplete or "
            f"corrupt download?). It was left as it is: delete or replace it, e.g. with "
            f"`zsdense models fetch {ck.name}` after removing it, or download {spec.url}."
        )
    if spec.sha256 is not None:
        actual = sha256_file(path)
        if actual != spec.sha256:
            raise WeightsError(
                f"{path}: SHA-256 mismatch for checkpoint '{ck.name}' ({spec.filename}): "
                f"expected {spec.sha256}, found {actual}. The file is corrupt or a different "
                f"checkpoint; it was left as it is. Delete or replace it (published at "
                f"{spec.url}), then run `zsdense models fetch {ck.name}`."
            )


# ---------------------------------------------------------------------------------------------
# Finding and downloading
# ---------------------------------------------------------------------------------------------


def _result_path(place: _Place) -> Path:
    return place.folder / place.specs[0].filename if len(place.specs) == 1 else place.folder


def find(
    name: str, *, weights_dir: str | os.PathLike | None = None
) -> tuple[Path | None, tuple[FileSpec, ...], list[str]]:
    """Where ``name`` lies on disk without checking hashes or downloading.

    Returns (path or None, the file set found (or the primary one), every place looked at).
    The path is the file for single-file checkpoints, the folder for HF directories.
    """
    ck = get_checkpoint(name)
    searched: list[str] = []
    for place in _places(ck, weights_dir):
        searched.append(place.label)
        if "*" not in str(place.folder) and all(
            (place.folder / s.filename).is_file() for s in place.specs
        ):
            return _result_path(place), place.specs, searched
    return None, ck.files, searched


def _how_to_supply(ck: Checkpoint) -> str:
    names = ", ".join(s.filename for s in ck.files)
    if len(ck.files) > 1:
        where = f"the folder DIR/{ck.name}/ holding {names}"
    else:
        where = f"DIR/{names} or DIR/{ck.name}/{names}"
    urls = "; ".join(s.url for s in ck.files)
    alt = ""
    if ck.alternates:
        alt = " (or instead: " + ", ".join(f"{a.filename} from {a.url}" for a in ck.alternates)
        alt += ")"
    return (
        f"To supply it: run `zsdense models fetch {ck.name}` on a machine with internet access "
        f"and copy the result over, or download {urls}{alt} yourself and put it as {where}, "
        f"where DIR is given with --weights-dir DIR or $ZSDENSE_WEIGHTS."
    )


def _missing_error(ck: Checkpoint, searched: list[str], reason: str) -> WeightsError:
    lines = "\n".join(f"  {s}" for s in searched) or "  (nowhere)"
    return WeightsError(
        f"checkpoint '{ck.name}' ({ck.description or ck.arch}) is not available: {reason}.\n"
        f"Looked in:\n{lines}\n{_how_to_supply(ck)}"
    )


def _download_url(url: str, dest: Path, ck: Checkpoint, spec: FileSpec, progress: bool) -> None:
    """Download to ``dest.part``, check size and SHA-256, then rename to ``dest``."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "zsdense"})
        with urllib.request.urlopen(req, timeout=60) as src, open(part, "wb") as out:
            total = src.headers.get("Content-Length")
            with tqdm(
                total=int(total) if total else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=None if progress else True,  # None: bar only on a terminal
                file=sys.stderr,
            ) as bar:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    digest = h.hexdigest()
    size = part.stat().st_size
    if (spec.sha256 is not None and digest != spec.sha256) or (
        spec.size is not None and size != spec.size
    ):
        part.unlink(missing_ok=True)
        raise WeightsError(
            f"downloaded {url} for checkpoint '{ck.name}' but it does not match the registry "
            f"(SHA-256 {digest}, {size} bytes; expected {spec.sha256}"
            + (f", {spec.size} bytes" if spec.size else "")
            + "). Nothing was saved; try again later or get the file another way. "
            + _how_to_supply(ck)
        )
    os.replace(part, dest)
    st = dest.resolve().stat()
    _remember((str(dest.resolve()), st.st_size, st.st_mtime_ns), digest)


def _download_hf(repo: str, ck: Checkpoint, spec: FileSpec, progress: bool) -> Path:
    """Fetch one file into the HF hub cache with huggingface_hub; check its hash."""
    from huggingface_hub import hf_hub_download

    cache = hf_hub_cache()
    existed = {p / spec.filename for p in _hf_snapshots(repo) if (p / spec.filename).exists()}
    # huggingface_hub draws its own progress bars.
    path = Path(
        hf_hub_download(repo, spec.filename, revision=ck.hub_revision, cache_dir=str(cache))
    )
    try:
        _check_file(ck, spec, path)
    except WeightsError:
        if path not in existed:  # our own fresh download: remove it (link and blob)
            blob = path.resolve()
            path.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
        raise
    return path


def _download(
    ck: Checkpoint,
    specs: tuple[FileSpec, ...],
    weights_dir: str | os.PathLike | None,
    progress: bool,
) -> Path:
    """Download one file set of ``ck`` to where resolve() will find it next time."""
    dirs = weights_dirs(weights_dir)
    shared = _shared_filenames()
    if dirs:
        target = dirs[0]
        if len(specs) > 1 or any(s.filename in shared for s in specs):
            target = target / ck.name
        for s in specs:
            dest = target / s.filename
            if not dest.is_file():
                _download_url(s.url, dest, ck, s, progress)
        return target / specs[0].filename if len(specs) == 1 else target
    repos = {_hf_repo_of(s) for s in specs}
    if len(repos) == 1 and None not in repos:
        repo = repos.pop()
        paths = [_download_hf(repo, ck, s, progress) for s in specs]
        return paths[0] if len(specs) == 1 else paths[0].parent
    (spec,) = specs
    folder = open_clip_cache() if "openaipublic" in spec.url else torch_hub_checkpoints()
    dest = folder / spec.filename
    _download_url(spec.url, dest, ck, spec, progress)
    return dest


#: How long (s) a download that failed for lack of network is not retried in this process: one
#: attempt per checkpoint per run, so a folder of 1000 images fails once, not 1000 times.
NETWORK_FAILURE_TTL_S = 600.0
_NET_ERRNOS = {
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ETIMEDOUT,
    errno.ENETDOWN,
}
_failed: dict[str, tuple[float, str]] = {}
_failed_lock = threading.Lock()


def is_network_error(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception it was raised from) says the network is unreachable:
    a connection refused/reset/timed out, an unreachable host or a name that does not resolve.
    A missing file or an HTTP error (404, 403) is not one."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, urllib.error.HTTPError):
            return False
        if isinstance(cur, urllib.error.URLError) and isinstance(cur.reason, BaseException):
            cur = cur.reason
            continue
        if isinstance(cur, (ConnectionError, TimeoutError, socket.gaierror, socket.timeout)):
            return True
        if isinstance(cur, OSError) and cur.errno in _NET_ERRNOS:
            return True
        if type(cur).__name__ in {"ConnectTimeout", "ConnectionError", "ReadTimeout"}:
            return True  # requests / huggingface_hub, without importing them
        cur = cur.__cause__ or cur.__context__
    return False


def forget_failed_downloads() -> None:
    """Forget the remembered network failures (the next :func:`resolve` tries again)."""
    with _failed_lock:
        _failed.clear()


def resolve(
    name: str,
    *,
    weights_dir: str | os.PathLike | None = None,
    download: bool | None = None,
    progress: bool = True,
) -> Path:
    """Path of checkpoint ``name``: its single file, or the folder holding an HF checkpoint.

    Looks in the weights directories, then the standard caches, then downloads (``download=None``
    means: unless $ZSDENSE_OFFLINE / $HF_HUB_OFFLINE is set). A found file whose size or SHA-256
    differs from the registry raises WeightsError and is left untouched; so does a missing
    checkpoint that cannot be downloaded, with every place searched and how to supply it.
    """
    ck = get_checkpoint(name)
    path, specs, searched = find(name, weights_dir=weights_dir)
    if path is not None:
        folder = path if len(specs) > 1 else path.parent
        for s in specs:
            _check_file(ck, s, folder / s.filename)
        return path
    if download is None:
        download = not is_offline()
        reason = (
            "it is not on this machine and downloads are off ($ZSDENSE_OFFLINE or "
            "$HF_HUB_OFFLINE is set)"
        )
    else:
        reason = "it is not on this machine and downloading was not allowed"
    if not download:
        raise _missing_error(ck, searched, reason)
    with _failed_lock:
        failed = _failed.get(name)
    if failed is not None and time.monotonic() - failed[0] < NETWORK_FAILURE_TTL_S:
        raise WeightsError(failed[1])  # no retry storm: the network was down moments ago
    errors: list[str] = []
    for specs in _options(ck):
        try:
            return _download(ck, specs, weights_dir, progress)
        except WeightsError:
            raise
        except Exception as exc:  # urllib, OSError, huggingface_hub's own errors (404, ...)
            text = (
                str(exc)
                if isinstance(exc, (OSError, ValueError))
                else f"{type(exc).__name__}: {exc}"
            )
            errors.append(f"{', '.join(s.url for s in specs)}: {text}")
            if is_network_error(exc):  # the other sources need the same network: stop here
                err = _missing_error(
                    ck,
                    searched,
                    "it is not on this machine and the network cannot be reached to download it "
                    f"({text}); use --offline with a --weights-dir holding the file",
                )
                with _failed_lock:
                    _failed[name] = (time.monotonic(), str(err))
                raise err from None
    raise _missing_error(
        ck,
        searched,
        "it is not on this machine and the download failed (" + "; ".join(errors) + ")",
    )


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """The state of one file of one checkpoint on this machine.

    ``status``: "ok" (hash matches), "mismatch" (size or hash differ), "unknown hash" (present,
    but no published SHA-256 is registered) or "missing".
    """

    name: str
    filename: str
    path: Path | None
    status: str
    expected: str | None = None
    actual: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "mismatch"


def verify(
    name: str | None = None, weights_dir: str | os.PathLike | None = None
) -> list[VerifyResult]:
    """Check the hash of every file of ``name`` (or of every checkpoint) that is present."""
    names = [name] if name else list(CHECKPOINTS)
    out: list[VerifyResult] = []
    for n in names:
        path, specs, _ = find(n, weights_dir=weights_dir)
        for s in specs:
            if path is None:
                out.append(VerifyResult(n, s.filename, None, "missing", s.sha256))
                continue
            p = (path if len(specs) > 1 else path.parent) / s.filename
            actual = sha256_file(p)
            if s.size is not None and p.stat().st_size != s.size:
                status = "mismatch"
            elif s.sha256 is None:
                status = "unknown hash"
            else:
                status = "ok" if actual == s.sha256 else "mismatch"
            out.append(VerifyResult(n, s.filename, p, status, s.sha256, actual))
    return out
