"""SCLIP: correlative self-attention (q-q + k-k) in CLIP's last block (CLIP only)."""

from zsdense.config import OPENVOCAB_DATASETS
from zsdense.dense.methods import register_method
from zsdense.plugins import deferred

register_method(
    "sclip",
    deferred("zsdense.dense.lastblock:clip_only_features", "sclip"),
    description="correlative self-attention (q-q + k-k) in the last block",
    reference="SCLIP, 2024",
    presets={"sclip": dict(short_side=336, crop=224, stride=112, pad_multiple=16)},
    # the reference's configs: only VOC with its background class is thresholded
    datasets={
        **{ds: dict(prob_thd=0.0) for ds in OPENVOCAB_DATASETS},
        "voc21": dict(logit_scale=65.0, prob_thd=0.1),
    },
)
