"""The weights table: every checkpoint zsdense knows, as data (names, hub ids, URLs, SHA-256).

Nothing here touches the disk or the network: :mod:`zsdense.models.registry` finds, hashes and
downloads the files this table describes, :mod:`zsdense.models.weights_load` reads them. A new
checkpoint is one row in one of the tables below (or a new table plus its loop in
:func:`build_checkpoints`).

Hashes: the SAM, OpenAI CLIP (``.pt``), DINOv2 (without registers, small/base/large) and Crane
SHA-256 values are the published ones (OpenAI's are part of the download URL; the HF ones are
the LFS object ids). Where no published value could be verified the hash is ``None`` and
``verify`` says "unknown hash" rather than pretending.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zsdense.errors import unknown

__all__ = [
    "CHECKPOINTS",
    "CRANE",
    "CRANE_COMMIT",
    "DINOV2",
    "JAFAR",
    "JAFAR_RELEASE_URL",
    "OPENAI_CLIP",
    "SAM",
    "Checkpoint",
    "FileSpec",
    "JafarRelease",
    "build_checkpoints",
    "get_checkpoint",
    "hf_url",
]


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
    kind: str  # "clip" | "dinov2" | "sam" | "prompts" | "upsampler"
    arch: str
    files: tuple[FileSpec, ...]
    hub_id: str | None = None
    license: str = ""
    description: str = ""
    alternates: tuple[FileSpec, ...] = field(default=())
    hub_revision: str = "main"


HF = "https://huggingface.co"


def hf_url(repo: str, filename: str, revision: str = "main") -> str:
    """The download URL of ``filename`` in the HF hub repository ``repo``."""
    return f"{HF}/{repo}/resolve/{revision}/{filename}"


# OpenAI CLIP: (arch, timm hub repo that open_clip 3.x downloads from, OpenAI file, its SHA-256).
# open_clip prefers the HF hub and, for the default file name, tries the safetensors version
# (open_clip_model.safetensors) first: that is what is registered as the primary file.
OPENAI_CLIP: tuple[tuple[str, str, str, str], ...] = (
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
DINOV2: tuple[tuple[str, str, str | None], ...] = (
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
    # giant: published in the same form; its LFS SHA-256 could not be verified here
    ("dinov2-giant", "facebook/dinov2-giant", None),
    ("dinov2-reg-small", "facebook/dinov2-with-registers-small", None),
    ("dinov2-reg-base", "facebook/dinov2-with-registers-base", None),
    ("dinov2-reg-large", "facebook/dinov2-with-registers-large", None),
    ("dinov2-reg-giant", "facebook/dinov2-with-registers-giant", None),
)

# SAM: arch -> (file, sha256, size in bytes or None).
SAM: tuple[tuple[str, str, str, int | None], ...] = (
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
CRANE_COMMIT = "39181f9f718a28c1b06b5aa72bfb81e74b9a2cc3"
CRANE: tuple[tuple[str, str, int, str], ...] = (
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

# JAFAR feature upsamplers (PaulCouairon/JAFAR, GitHub release "Weights"; each file is
# {"jafar": state_dict}). The file names are timm model names and decide the backbone: the
# README's "ViT-B-16" and "ViT-B-16-DINO" labels are swapped (vit_base_patch16_224.dino.pth is the
# DINO one), and the CLIP upsampler was trained on timm's vit_base_patch16_clip_384 default tag,
# laion2b_ft_in12k_in1k: the LAION-2B CLIP ViT-B/16 image tower fine-tuned on ImageNet-12k/1k at
# 384 px, not a zero-shot CLIP (OpenAI's or open_clip's). No SHA-256 is published for the
# release assets, so the hashes are unknown (``verify`` says so).
JAFAR_RELEASE_URL = "https://github.com/PaulCouairon/JAFAR/releases/download/Weights"


@dataclass(frozen=True)
class JafarRelease:
    """A released JAFAR upsampler: its file, the timm backbone whose features it was trained
    on, the zsdense encoder that computes those features (None: none does), the feature width
    and patch size, and the image normalisation the backbone (and so JAFAR) expects."""

    name: str
    filename: str
    backbone: str
    encoder: str | None
    feature_dim: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

JAFAR: tuple[JafarRelease, ...] = (
    JafarRelease(
        "jafar-dinov2-small",
        "vit_small_patch14_dinov2.lvd142m.pth",
        "vit_small_patch14_dinov2.lvd142m",
        "dinov2-small",
        384,
        14,
        *_IMAGENET,
        "JAFAR upsampler for DINOv2 ViT-S/14",
    ),
    JafarRelease(
        "jafar-dinov2-base",
        "vit_base_patch14_dinov2.lvd142m.pth",
        "vit_base_patch14_dinov2.lvd142m",
        "dinov2-base",
        768,
        14,
        *_IMAGENET,
        "JAFAR upsampler for DINOv2 ViT-B/14",
    ),
    JafarRelease(
        "jafar-dinov2-reg-small",
        "vit_small_patch14_reg4_dinov2.pth",
        "vit_small_patch14_reg4_dinov2.lvd142m",
        "dinov2-reg-small",
        384,
        14,
        *_IMAGENET,
        "JAFAR upsampler for DINOv2 ViT-S/14 with registers",
    ),
    JafarRelease(
        "jafar-clip-b16-laion2b-in1k",
        "vit_base_patch16_clip_384.pth",
        "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",
        None,
        768,
        16,
        *_OPENAI,
        "JAFAR upsampler for the LAION-2B CLIP ViT-B/16 fine-tuned on ImageNet-12k/1k (384 px; "
        "not a zero-shot CLIP)",
    ),
    JafarRelease(
        "jafar-dino-b16",
        "vit_base_patch16_224.dino.pth",
        "vit_base_patch16_224.dino",
        None,
        768,
        16,
        *_IMAGENET,
        "JAFAR upsampler for DINO ViT-B/16",
    ),
)


def build_checkpoints() -> dict[str, Checkpoint]:
    """The registry entries, by name, built from the tables above."""
    entries = [
        *(_openai_clip(*row) for row in OPENAI_CLIP),
        *(_dinov2(*row) for row in DINOV2),
        *(_sam(*row) for row in SAM),
        *(_crane(*row) for row in CRANE),
        *(_jafar(rel) for rel in JAFAR),
    ]
    return {c.name: c for c in entries}


def _openai_clip(arch: str, repo: str, openai_file: str, openai_sha: str) -> Checkpoint:
    """An OpenAI CLIP row: open_clip safetensors on the HF hub, OpenAI's .pt and the .bin as
    alternates."""
    digest_dir = f"https://openaipublic.azureedge.net/clip/models/{openai_sha}"
    safetensors = "open_clip_model.safetensors"
    return Checkpoint(
        name=f"clip-{arch}-openai",
        kind="clip",
        arch=arch,
        files=(FileSpec(safetensors, hf_url(repo, safetensors), None),),
        hub_id=repo,
        license="MIT (OpenAI CLIP)",
        description=f"OpenAI CLIP {arch} (open_clip format from the HF hub)",
        alternates=(
            FileSpec(openai_file, f"{digest_dir}/{openai_file}", openai_sha),
            FileSpec(
                "open_clip_pytorch_model.bin",
                hf_url(repo, "open_clip_pytorch_model.bin"),
                None,
            ),
        ),
    )


def _dinov2(name: str, repo: str, sha: str | None) -> Checkpoint:
    """A DINOv2 row: config and safetensors from the HF hub."""
    size = repo.rsplit("-", 1)[-1]
    return Checkpoint(
        name=name,
        kind="dinov2",
        arch=repo,
        files=(
            FileSpec("config.json", hf_url(repo, "config.json"), None),
            FileSpec("model.safetensors", hf_url(repo, "model.safetensors"), sha),
        ),
        hub_id=repo,
        license="Apache-2.0",
        description=f"DINOv2 ViT-{size[0].upper()}/14"
        + (" with registers" if "registers" in repo else ""),
    )


def _sam(arch: str, filename: str, sha: str, nbytes: int | None) -> Checkpoint:
    """A SAM row: the published .pth from Meta."""
    url = f"https://dl.fbaipublicfiles.com/segment_anything/{filename}"
    return Checkpoint(
        name=f"sam-{arch}",
        kind="sam",
        arch=arch,
        files=(FileSpec(filename, url, sha, nbytes),),
        license="Apache-2.0",
        description=f"Segment Anything ViT-{arch[4:].upper()}",
    )


def _crane(name: str, folder: str, epoch: int, sha: str) -> Checkpoint:
    """A Crane row: a prompt-learner checkpoint at the pinned commit of Crane's repository."""
    url = (
        f"https://raw.githubusercontent.com/AlirezaSalehy/Crane/{CRANE_COMMIT}/checkpoints/"
        f"{folder}/epoch_{epoch}.pth"
    )
    return Checkpoint(
        name=name,
        kind="prompts",
        arch="ViT-L-14-336",
        files=(FileSpec(f"{folder}_epoch_{epoch}.pth", url, sha),),
        license="MIT (Crane)",
        description=f"Crane{'+' if folder.endswith('cranep') else ''} prompt learner, "
        f"{folder.split('_')[2]}, epoch {epoch}",
    )


def _jafar(rel: JafarRelease) -> Checkpoint:
    """A JAFAR release asset."""
    return Checkpoint(
        name=rel.name,
        kind="upsampler",
        arch=rel.backbone,
        files=(FileSpec(rel.filename, f"{JAFAR_RELEASE_URL}/{rel.filename}", None),),
        license="see github.com/PaulCouairon/JAFAR (not verified here)",
        description=f"{rel.description} (timm {rel.backbone})",
    )


CHECKPOINTS: dict[str, Checkpoint] = build_checkpoints()


def get_checkpoint(name: str) -> Checkpoint:
    """The registry entry ``name``; a ConfigError listing the known names if there is none."""
    try:
        return CHECKPOINTS[name]
    except KeyError:
        raise unknown("checkpoint", name, CHECKPOINTS) from None
