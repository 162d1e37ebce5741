"""NACLIP: k-k attention with a Gaussian neighbourhood, no residual/FFN, PAMR (CLIP only)."""

from zsdense.config import OPENVOCAB_DATASETS
from zsdense.dense.methods import register_method
from zsdense.plugins import deferred

register_method(
    "naclip",
    deferred("zsdense.dense.lastblock:clip_only_features", "naclip"),
    description="k-k attention + Gaussian neighbourhood, no residual/FFN",
    reference="NACLIP, WACV 2025",
    presets={"naclip": dict(short_side=336, crop=224, stride=112, pamr=True, pad_multiple=16)},
    datasets={
        **{ds: dict(prob_thd=0.0) for ds in OPENVOCAB_DATASETS},
        "voc21": dict(prob_thd=0.0, whole_image=True),
        "voc20": dict(prob_thd=0.0, whole_image=True),
    },
)
