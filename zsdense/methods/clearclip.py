"""ClearCLIP: q-q attention without residual and feed-forward in CLIP's last block (CLIP only)."""

from zsdense.config import OPENVOCAB_DATASETS
from zsdense.dense.methods import register_method
from zsdense.plugins import deferred

register_method(
    "clearclip",
    deferred("zsdense.dense.lastblock:clip_only_features", "clearclip"),
    description="q-q attention, no residual, no feed-forward",
    reference="ClearCLIP, ECCV 2024",
    presets={
        "clearclip": dict(short_side=448, crop=448, stride=224, logit_scale=50.0, pad_multiple=16)
    },
    datasets={ds: dict(prob_thd=0.0) for ds in OPENVOCAB_DATASETS},
)
