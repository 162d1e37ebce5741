"""JAFAR (Couairon, Chambon et al., 2025) as a feature upsampler: ``--upsampler jafar[:FILE]``.

``jafar`` alone loads the released upsampler trained on the encoder in use (the weights table:
DINOv2 ViT-S/14, ViT-B/14, ViT-S/14 with registers); ``jafar:FILE`` a file, e.g. one trained
with ``zsdense train-upsampler``. The adapter is :func:`zsdense.dense.upsamplers
.load_jafar_upsampler`.
"""

from zsdense.dense.upsamplers import FeatureUpsampler, register_upsampler
from zsdense.plugins import deferred

register_upsampler(
    FeatureUpsampler(
        "jafar",
        deferred("zsdense.dense.upsamplers:load_jafar_upsampler"),
        "JAFAR: image-guided attention upsampling of the encoder's patch features "
        "(the released upsampler for the encoder, or jafar:FILE)",
        takes_file=True,
    )
)
