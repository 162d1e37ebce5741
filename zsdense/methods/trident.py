"""Trident: splice-then-segment with CLIP + DINOv2 proxy attention and SAM-guided aggregation.

The pipeline is the open-vocabulary head's own (``zsdense.tasks.openvocab.trident_features``);
this file declares the method, its two presets and the reference's per-dataset settings.
"""

from zsdense.dense.methods import register_method

_WINDOWS = dict(vfm="dinov2-reg-base", sam_arch="vit_b", short_side=448, crop=336, stride=224)

register_method(
    "trident",
    None,
    needs_vfm=True,
    needs_sam=True,
    pipeline="splice-then-segment",
    description="splice-then-segment: CLIP + DINOv2 proxy attention + SAM aggregation",
    reference="Trident, 2024",
    presets={
        "trident": dict(
            _WINDOWS,
            coarse_thresh=0.2,
            description="splice-then-segment: CLIP + DINOv2 proxy attention + SAM aggregation; "
            "--sam-refine as the reference runs it",
        ),
        "trident-fixed": dict(
            _WINDOWS,
            coarse_thresh=0.2,
            reference_prompts=False,
            description="trident with the --sam-refine prompt defects fixed (SAM's own frame, "
            "a (B,1,256,256) dense prompt)",
        ),
    },
    # short side, stride, prob_thd, coarse_thresh, cos_fac, refine_neg_cos (+ SAM strips)
    datasets={
        "voc21": dict(short_side=448, stride=224, prob_thd=0.2, coarse_thresh=0.2, cos_fac=1.2),
        "context60": dict(
            short_side=576, stride=224, prob_thd=0.15, coarse_thresh=0.15, cos_fac=1.2
        ),
        "coco-object": dict(
            short_side=448, stride=224, prob_thd=0.25, coarse_thresh=0.25, cos_fac=1.2
        ),
        "voc20": dict(short_side=336, stride=112, prob_thd=0.0, coarse_thresh=0.2, cos_fac=0.0),
        "context59": dict(
            short_side=576, stride=224, prob_thd=0.0, coarse_thresh=0.15, cos_fac=1.2
        ),
        "coco-stuff": dict(
            short_side=448, stride=224, prob_thd=0.0, coarse_thresh=0.05, cos_fac=1.2
        ),
        "cityscapes": dict(
            short_side=688,
            stride=224,
            prob_thd=0.0,
            coarse_thresh=0.10,
            cos_fac=3.0,
            refine_neg_cos=False,
            sam_strips=2,
        ),
        "ade20k": dict(
            short_side=576,
            stride=224,
            prob_thd=0.0,
            coarse_thresh=0.05,
            cos_fac=1.2,
            refine_neg_cos=False,
        ),
    },
)
