"""The training recipes: every constant of Crane's ``train.py`` as run, in one frozen dataclass.

``crane`` and ``crane+`` follow ``reproduce.sh`` at Crane commit 39181f9 (fixtures
``crane_train`` README §1). Block numbers are written for the 24-block ViT-L/14 and scaled to
smaller towers (``zsdense.dense.crane.scale_block``); the text ``depth`` (9: deep prompts into
text blocks 2..9) is capped at the text tower's block count.

Two reference behaviours are changed by default, each behind an option that restores it:

- ``dattn_mean="image"`` (Crane+): the reference takes D-Attn's mean(S) over the whole shuffled
  training batch, so an image's features depend on which images it was batched with and cannot
  be cached; ``"batch"`` reproduces it (fixture case ``crane_plus``).
- ``dice_squeeze_rows=False``: the reference's ``mask.squeeze()`` turns a final batch of one
  image into (S, S), and its Dice then averages over the S rows as if they were S images;
  ``True`` reproduces that. Batches of two or more images are unaffected either way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from zsdense.errors import ConfigError
from zsdense.options import validate_image_size


@dataclass(frozen=True)
class TrainRecipe:
    """Every setting that changes what a training step computes."""

    name: str
    clip_arch: str = "ViT-L-14-336"
    image_size: int = 518
    attn_type: str = "qq+kk+vv"
    eattn_start_block: int = 6  # of 24 (train.py: replace_with_EAttn(to_layer=20))
    eattn_layers: tuple[int, ...] | None = None  # None: as run, aliased block-24 maps
    n_aliased_maps: int = 4  # features_list 6 12 18 24 -> 4 copies of the last refined map
    use_dattn: bool = False
    dino_name: str = "dinov2-reg-base"
    dattn_beta: float = 1.2
    dattn_gamma: float = 3.0
    dattn_mean: str = "image"  # "batch" = as run (not cacheable)
    dattn_value_source: str = "mid"
    n_ctx: int = 12
    t_n_ctx: int = 4
    depth: int = 9  # deep prompts into text blocks 2..depth
    init_std: float = 0.02
    normal_template: str = "object."
    abnormal_template: str = "damaged object."
    pixel_temperature: float = 0.07
    image_temperature: float = 0.01
    interpolation: str = "nearest"
    focal_weight: float = 2.0
    dice_weight: float = 2.0
    image_ce_weight: float = 0.2
    focal_gamma: float = 2.0
    focal_smooth: float = 1e-5
    dice_smooth: float = 1.0
    sbp_alpha: float = 0.5
    deep_fp16: bool = True  # deep prompts and their gradients rounded to fp16
    dice_squeeze_rows: bool = False  # reproduce the batch-of-one Dice defect
    lr: float = 1e-3
    betas: tuple[float, float] = (0.6, 0.999)
    eps: float = 1e-8
    batch_size: int = 8
    epochs: int = 5
    seed: int = 111

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainRecipe:
        """Inverse of :meth:`to_json`; unknown keys are a ConfigError."""
        names = {f.name for f in fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ConfigError(f"unknown recipe fields {bad}")
        kw = dict(d)
        for k in ("eattn_layers", "betas"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)


RECIPES: dict[str, TrainRecipe] = {
    "crane": TrainRecipe(name="crane"),
    # reproduce.sh Crane+: --features_list 24 with DINOv2 -> maps [D-Attn, E-Attn]
    "crane+": TrainRecipe(name="crane+", use_dattn=True, n_aliased_maps=1),
}


def get_recipe(name: str | TrainRecipe, **overrides: Any) -> TrainRecipe:
    """A named recipe with overrides (``None`` values are ignored), validated."""
    if isinstance(name, TrainRecipe):
        base = name
    else:
        if name not in RECIPES:
            raise ConfigError(
                f"unknown training recipe {name!r}; choose one of: {', '.join(sorted(RECIPES))}"
            )
        base = RECIPES[name]
    names = {f.name for f in fields(TrainRecipe)}
    bad = sorted(k for k in overrides if k not in names)
    if bad:
        raise ConfigError(f"unknown recipe options {bad}")
    r = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    validate_recipe(r)
    return r


def validate_recipe(r: TrainRecipe) -> None:
    """ConfigError for settings that cannot run."""
    if r.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {r.epochs}")
    if r.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {r.batch_size}")
    if not r.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {r.lr}")
    validate_image_size(r.image_size)  # the rule `zsdense anomaly` applies to the same models
    if r.dattn_mean not in ("image", "batch"):
        raise ConfigError(f"dattn_mean must be 'image' or 'batch', not {r.dattn_mean!r}")
    if r.interpolation not in ("nearest", "bilinear"):
        raise ConfigError(f"interpolation must be 'nearest' or 'bilinear', not {r.interpolation!r}")
    if r.n_ctx < 1 or r.t_n_ctx < 0 or r.t_n_ctx > r.n_ctx or r.depth < 1:
        raise ConfigError(
            f"prompt sizes n_ctx={r.n_ctx}, t_n_ctx={r.t_n_ctx}, depth={r.depth} are invalid"
        )
    if r.eattn_layers is None and r.n_aliased_maps < 1:
        raise ConfigError("n_aliased_maps must be >= 1")


__all__ = ["RECIPES", "TrainRecipe", "get_recipe", "validate_recipe"]
