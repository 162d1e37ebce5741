"""Readers of evaluation datasets: which image goes with which ground truth.

Readers only list files and decode ground truth; they never run a model. One module per family:

- :mod:`~zsdense.eval.datasets.anomaly` (:func:`read_anomaly`): MVTec AD layout, VisA's
  ``split_csv/1cls.csv``, and a plain folder layout (its mask folders are never taken for test
  images). Each yields :class:`AnomalySample` (image, mask or None, label 0/1, category, defect).
- :mod:`~zsdense.eval.datasets.segmentation` (:func:`read_segmentation`): a generic ``images/``
  + ``labels/`` (or ``masks/``) layout and the mmseg conventions of VOC, Pascal Context,
  COCO-Object, ADE20K and Cityscapes. Labels are read raw (palette indices of a ``P`` PNG, never
  RGB), with ``reduce_zero_label`` (0 -> 255, others -1) where the benchmark uses it (ADE20K,
  Context-59).
- :mod:`~zsdense.eval.datasets.referring` (:func:`read_referring`): JSONL lines
  ``{"image", "text", "mask" | "rle" | "polygon", "id"}`` and RefCOCO/+/g's ``refs(*).p``
  pickle (loaded with :mod:`zsdense.safe_pickle`) with COCO ``instances.json``.

Layouts are detected automatically (``layout="auto"``); when nothing matches, a
:class:`~zsdense.errors.ConfigError` says which layouts were tried and what they look like.
"""

from __future__ import annotations

from zsdense.eval.datasets.anomaly import (
    MASK_DIRS,
    AnomalySample,
    detect_anomaly_layout,
    load_anomaly_mask,
    read_anomaly,
    read_anomaly_folder,
    read_mvtec,
    read_visa,
    train_good_images,
)
from zsdense.eval.datasets.files import IMAGE_EXTS
from zsdense.eval.datasets.referring import (
    ReferSample,
    decode_rle,
    detect_refer_layout,
    polygons_to_mask,
    read_refcoco,
    read_refer_jsonl,
    read_referring,
)
from zsdense.eval.datasets.segmentation import (
    SEG_LAYOUT_CHOICES,
    SEG_LAYOUTS,
    SegDataset,
    SegSample,
    class_display_name,
    detect_seg_layout,
    load_label,
    read_class_file,
    read_segmentation,
    reduce_zero_label,
)
from zsdense.eval.protocols import (
    ANOMALY_LAYOUT_CHOICES,
    ANOMALY_LAYOUTS,
    REFER_LAYOUT_CHOICES,
    REFER_LAYOUTS,
)

__all__ = [
    "IMAGE_EXTS",
    "AnomalySample",
    "ANOMALY_LAYOUTS",
    "detect_anomaly_layout",
    "read_anomaly",
    "read_mvtec",
    "read_visa",
    "read_anomaly_folder",
    "train_good_images",
    "MASK_DIRS",
    "load_anomaly_mask",
    "SegSample",
    "SegDataset",
    "SEG_LAYOUTS",
    "SEG_LAYOUT_CHOICES",
    "ANOMALY_LAYOUT_CHOICES",
    "REFER_LAYOUT_CHOICES",
    "detect_seg_layout",
    "read_segmentation",
    "read_class_file",
    "class_display_name",
    "load_label",
    "reduce_zero_label",
    "ReferSample",
    "REFER_LAYOUTS",
    "detect_refer_layout",
    "read_referring",
    "read_refer_jsonl",
    "read_refcoco",
    "decode_rle",
    "polygons_to_mask",
]
