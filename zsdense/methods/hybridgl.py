"""HybridGL: hybrid global-local CLIP features of SAM proposals with spatial guidance.

The method is :func:`zsdense.tasks.hybridgl.run_hybridgl`; this file declares it and its two
presets (the settings are :class:`zsdense.config.ReferPreset` fields, ``specs/referring.md``).
"""

from zsdense.plugins import deferred
from zsdense.tasks.referring import register_refer_method

register_refer_method(
    "hybridgl",
    deferred("zsdense.tasks.hybridgl:run_hybridgl"),
    encoders=("clip", "sam"),
    description="SAM proposals scored by hybrid global-local CLIP mask features, relation "
    "guidance and a heat-map coherence",
    reference="HybridGL (training-free, CLIP + SAM)",
    presets={
        "hybridgl": dict(
            description="HybridGL as the reference runs it (its relation and NaN defects "
            "included; no crash without proposals)"
        ),
        "hybridgl+": dict(
            right_relation=True,
            vertical_ramps=True,
            nan_guards=True,
            mix="scaled",
            within_self=False,
            fallback_reading="sensible",
            description="hybridgl with its defects fixed: right/east fires, up/down ramps, NaN "
            "guards, R and C mixed on one scale; without spaCy, near/behind/front relations",
        ),
    },
)
