"""ProxyCLIP: DINOv2's patch similarity as the attention of CLIP's last block."""

from zsdense.dense.methods import register_method
from zsdense.plugins import deferred

register_method(
    "proxyclip",
    deferred("zsdense.dense.lastblock:proxyclip_features"),
    needs_vfm=True,
    description="DINOv2 patch similarity as CLIP's last-block attention",
    reference="ProxyCLIP, ECCV 2024",
    presets={
        "proxyclip": dict(vfm="dinov2-reg-base", short_side=336, crop=336, stride=112),
    },
    # the reference's configs: short side, and the thresholds of the sets with a background
    datasets={
        "voc21": dict(short_side=336, prob_thd=0.2),
        "context60": dict(short_side=336, prob_thd=0.15),
        "coco-object": dict(short_side=336, prob_thd=0.25),
        "voc20": dict(short_side=336, prob_thd=0.0),
        "context59": dict(short_side=336, prob_thd=0.0),
        "coco-stuff": dict(short_side=336, prob_thd=0.0),
        "cityscapes": dict(short_side=448, crop=224, stride=112, prob_thd=0.0),
        "ade20k": dict(short_side=448, prob_thd=0.0),
    },
)
