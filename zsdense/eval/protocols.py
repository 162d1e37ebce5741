"""Names of the evaluation protocols' metrics and sizes, importable without the models (the
command line's choices and --help read them here)."""

from __future__ import annotations

EVAL_SIZE = 518  # anomaly maps and masks are scored at 518x518 (specs/anomaly.md)
ANOMALY_METRICS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
    "aupro_mvtec",
)
PIXEL_METRICS = frozenset({"pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "aupro_mvtec"})
IMAGE_METRICS = frozenset({"image_auroc", "image_ap", "image_f1_max"})

# dataset layouts (zsdense.eval.datasets reads them; SEG layouts are its conventions table)
ANOMALY_LAYOUTS = ("mvtec", "visa", "folder")
REFER_LAYOUTS = ("jsonl", "refcoco")
ANOMALY_LAYOUT_CHOICES = ("auto", *ANOMALY_LAYOUTS)  # what layout= / --layout accept
REFER_LAYOUT_CHOICES = ("auto", *REFER_LAYOUTS)
