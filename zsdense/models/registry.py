"""The weights registry: every checkpoint zsdense can load, where it comes from, and its hash.

A checkpoint has a name (``sam-vit_b``, ``clip-ViT-B-16-openai``, ``dinov2-reg-base``...), the
files it consists of (one file, or ``config.json`` + ``model.safetensors`` for an HF directory),
the URL each file is published at and, where it could be verified, its SHA-256.

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
after their hash checks out. Checkpoints load through :func:`load_state_dict_file`, which never
unpickles arbitrary objects (safetensors, ``torch.load(weights_only=True)``, or TorchScript's own
loader for OpenAI's original JIT archives).

Hashes: the SAM, OpenAI CLIP (``.pt``), DINOv2 (without registers) and Crane SHA-256 values are
the published ones (OpenAI's are part of the download URL; the HF ones are the LFS object ids).
Where no published value could be verified the hash is ``None`` and ``verify`` says "unknown
hash" rather than pretending.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.error
import urllib.request
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zsdense.errors import ConfigError, WeightsError

__all__ = [
    "CHECKPOINTS",
    "Checkpoint",
    "FileSpec",
    "VerifyResult",
    "find",
    "get_checkpoint",
    "is_offline",
    "load_state_dict_file",
    "resolve",
    "search_locations",
    "sha256_file",
    "verify",
    "weights_dirs",
]

# ---------------------------------------------------------------------------------------------
# Registry entries
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSpec:
    """One published file: local file name, download URL, SHA-256 (None if unverified), size."""

    filename: str
    url: str
    sha256: str | None
    size: int | None = None


@dataclass(frozen=True)
class Checkpoint:
    """A named checkpoint: the files it consists of and where they come from.

    ``alternates`` are other published forms of a single-file checkpoint that load to the same
    weights (e.g. OpenAI's original ``ViT-B-16.pt`` for the open_clip safetensors file); any one
    of ``files`` or an alternate satisfies the checkpoint.
    """

    name: str
    kind: str  # "clip" | "dinov2" | "sam" | "prompts"
    arch: str
    files: tuple[FileSpec, ...]
    hub_id: str | None = None
    license: str = ""
    description: str = ""
    alternates: tuple[FileSpec, ...] = field(default=())
    hub_revision: str = "main"


_HF = "https://huggingface.co"


def _hf_url(repo: str, filename: str, revision: str = "main") -> str:
    return f"{_HF}/{repo}/resolve/{revision}/{filename}"


# OpenAI CLIP: (arch, timm hub repo that open_clip 3.x downloads from, OpenAI file, its SHA-256).
# open_clip prefers the HF hub and, for the default file name, tries the safetensors version
# (open_clip_model.safetensors) first: that is what is registered as the primary file.
_OPENAI_CLIP = (
    (
        "ViT-B-16",
        "timm/vit_base_patch16_clip_224.openai",
        "ViT-B-16.pt",
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    ),
    (
        "ViT-L-14-336",
        "timm/vit_large_patch14_clip_336.openai",
        "ViT-L-14-336px.pt",
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
    ),
    (
        "ViT-L-14",
        "timm/vit_large_patch14_clip_224.openai",
        "ViT-L-14.pt",
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    ),
    (
        "ViT-B-32",
        "timm/vit_base_patch32_clip_224.openai",
        "ViT-B-32.pt",
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    ),
)

# DINOv2 on the HF hub: name -> (repo, model.safetensors LFS sha256 or None if unverified).
_DINOV2 = (
    (
        "dinov2-small",
        "facebook/dinov2-small",
        "ae1e99fcefd534ed978cdeb8326f08030c96e28b7a81ffcbc98a857c84d14be1",
    ),
    (
        "dinov2-base",
        "facebook/dinov2-base",
        "d73036b56966966d07975d696bde331762f37297e2f095de8cea0040c3aa0841",
    ),
    (
        "dinov2-large",
        "facebook/dinov2-large",
        "399fba97a95f22c36834418bc69373364a99af3a1153da1c0fb31db567c92e23",
    ),
    ("dinov2-reg-small", "facebook/dinov2-with-registers-small", None),
    ("dinov2-reg-base", "facebook/dinov2-with-registers-base", None),
    ("dinov2-reg-large", "facebook/dinov2-with-registers-large", None),
)

# SAM: arch -> (file, sha256, size in bytes or None).
_SAM = (
    (
        "vit_b",
        "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375042383,
    ),
    (
        "vit_l",
        "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        None,
    ),
    (
        "vit_h",
        "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2564550879,
    ),
)

# Crane prompt learners (repository AlirezaSalehy/Crane at a fixed commit):
# name -> (folder in the repository, epoch, sha256).
_CRANE_COMMIT = "39181f9f718a28c1b06b5aa72bfb81e74b9a2cc3"
_CRANE = (
    (
        "crane-mvtec",
        "trained_on_mvtec_crane",
        5,
        "dc9bf1584c8abd8744f39e9607fdea8a04c8d30aa147de595d22bf444488e4c8",
    ),
    (
        "crane-mvtec-epoch1",
        "trained_on_mvtec_crane",
        1,
        "e6b84fa9bbbc9161f161d206611051e56c46768ec6c00dc7fed019c9b36a66db",
    ),
    (
        "crane-visa",
        "trained_on_visa_crane",
        5,
        "66d070e3b72b61704495bdadd0f8c4979b62a23ca7211cfe08bd08ec7c0ab831",
    ),
    (
        "crane-visa-epoch1",
        "trained_on_visa_crane",
        1,
        "66e740da08875bf6b500dee72d6ff0c2dbc80079ad7cecaf25da74a536978f86",
    ),
    (
        "crane+-mvtec",
        "trained_on_mvtec_cranep",
        5,
        "9163f13a9c0a75ac63de16239b850cf70d366b5591b083bea2c0c41e76beed53",
    ),
    (
        "crane+-mvtec-epoch1",
        "trained_on_mvtec_cranep",
        1,
        "233cc4e623716f1aa26ebe374dd11aa7d77205266a52902837857c5a0fdc9e21",
    ),
    (
        "crane+-visa",
        "trained_on_visa_cranep",
        5,
        "732c7d1b76745950c56b0f9846f46f297619dcbb1db69a61e7b8fa5609ac10ab",
    ),
    (
        "crane+-visa-epoch1",
        "trained_on_visa_cranep",
        1,
        "fa359b2419c851339d3f79684924d55d1ae61fe858a5845b9665e21b873dd5fa",
    ),
)


def _build_registry() -> dict[str, Checkpoint]:
    reg: dict[str, Checkpoint] = {}
    for arch, repo, openai_file, openai_sha in _OPENAI_CLIP:
        digest_dir = f"https://openaipublic.azureedge.net/clip/models/{openai_sha}"
        reg[f"clip-{arch}-openai"] = Checkpoint(
            name=f"clip-{arch}-openai",
            kind="clip",
            arch=arch,
            files=(
                FileSpec(
                    "open_clip_model.safetensors",
                    _hf_url(repo, "open_clip_model.safetensors"),
                    None,
                ),
            ),
            hub_id=repo,
            license="MIT (OpenAI CLIP)",
            description=f"OpenAI CLIP {arch} (open_clip format from the HF hub)",
            alternates=(
                FileSpec(openai_file, f"{digest_dir}/{openai_file}", openai_sha),
                FileSpec(
                    "open_clip_pytorch_model.bin",
                    _hf_url(repo, "open_clip_pytorch_model.bin"),
                    None,
                ),
            ),
        )
    for name, repo, sha in _DINOV2:
        size = repo.rsplit("-", 1)[-1]
        reg[name] = Checkpoint(
            name=name,
            kind="dinov2",
            arch=repo,
            files=(
                FileSpec("config.json", _hf_url(repo, "config.json"), None),
                FileSpec("model.safetensors", _hf_url(repo, "model.safetensors"), sha),
            ),
            hub_id=repo,
            license="Apache-2.0",
            description=f"DINOv2 ViT-{size[0].upper()}/14"
            + (" with registers" if "registers" in repo else ""),
        )
    for arch, filename, sha, nbytes in _SAM:
        reg[f"sam-{arch}"] = Checkpoint(
            name=f"sam-{arch}",
            kind="sam",
            arch=arch,
            files=(
                FileSpec(
                    filename,
                    f"https://dl.fbaipublicfiles.com/segment_anything/{filename}",
                    sha,
                    nbytes,
                ),
            ),
            license="Apache-2.0",
            description=f"Segment Anything ViT-{arch[4:].upper()}",
        )
    for name, folder, epoch, sha in _CRANE:
        url = (
            f"https://raw.githubusercontent.com/AlirezaSalehy/Crane/{_CRANE_COMMIT}/checkpoints/"
            f"{folder}/epoch_{epoch}.pth"
        )
        reg[name] = Checkpoint(
            name=name,
            kind="prompts",
            arch="ViT-L-14-336",
            files=(FileSpec(f"{folder}_epoch_{epoch}.pth", url, sha),),
            license="MIT (Crane)",
            description=f"Crane{'+' if folder.endswith('cranep') else ''} prompt learner, "
            f"{folder.split('_')[2]}, epoch {epoch}",
        )
    return reg


CHECKPOINTS: dict[str, Checkpoint] = _build_registry()


def get_checkpoint(name: str) -> Checkpoint:
    """The registry entry ``name``; a ConfigError listing the known names if there is none."""
    try:
        return CHECKPOINTS[name]
    except KeyError:
        raise ConfigError(
            f"unknown checkpoint {name!r}; known checkpoints: {', '.join(sorted(CHECKPOINTS))}"
        ) from None


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
    errors: list[str] = []
    for specs in _options(ck):
        try:
            return _download(ck, specs, weights_dir, progress)
        except WeightsError:
            raise
        except (urllib.error.URLError, OSError, ValueError) as exc:
            errors.append(f"{', '.join(s.url for s in specs)}: {exc}")
        except Exception as exc:  # huggingface_hub's own errors (offline, 404, ...)
            errors.append(f"{', '.join(s.url for s in specs)}: {type(exc).__name__}: {exc}")
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


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

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
