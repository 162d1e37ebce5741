"""Evaluation metrics with the exact protocols of the papers zsdense reproduces.

Anomaly detection / segmentation (image and pixel level):

- AUROC and AP with scikit-learn's definitions (``roc_auc_score``, ``average_precision_score``),
  F1-max = max over the precision-recall curve of 2PR/(P+R) ignoring non-finite values
  (``precision_recall_curve`` semantics). Implemented here with numpy only: scikit-learn is a
  test dependency, not a runtime one.
- AUPRO in two forms, each under its own name:
  :func:`aupro_papers` (Crane / AnomalyCLIP / APRIL-GAN code: 200 thresholds
  ``numpy.arange(min, max, (max - min) / 200)``, prediction ``map > t``, PRO = mean over every
  8-connected ground-truth region of the covered fraction, FPR = false positives / negatives,
  keep points with FPR < 0.3, min-max rescale those FPRs to [0, 1], trapezoid area) and
  :func:`aupro_mvtec` (the MVTec AD definition: the exact PRO(FPR) curve over every distinct
  score, integrated up to FPR = 0.3 and divided by 0.3).

Both forms also exist as streaming accumulators, because a category of thousands of 518x518
maps should not be held in memory at once:

- :class:`PixelAccumulator` keeps histograms of the scores of positive pixels, negative pixels
  and region-weighted positive pixels over ``bins`` equal bins of a range fixed up front
  (default 16384 bins over [0, 1], the range of anomaly probabilities). Its metrics are the
  exact metrics of the scores quantised to their bin, so AUROC differs from the exact value by
  at most the fraction of (positive, negative) pairs that share a bin (about 1e-4 or less with
  the default bins on smooth maps). Values outside the range are counted in the edge bins
  (``n_clipped`` says how many); when the range is unknown, run a first pass with
  :class:`RangeTracker`, or keep the maps on disk and make two passes (``zsdense eval`` does).
- :class:`AuproAccumulator` computes the papers' AUPRO exactly from the category's min and max
  (a first pass), with per-threshold counts instead of the stack of maps.

Segmentation: :class:`IoUAccumulator` (mmseg ``IoUMetric``: intersection and union summed per
class over the dataset, IoU = sum I / sum U, classes with a zero union are NaN and ignored by the
mean, ``ignore_index`` pixels dropped, labels outside ``[0, num_classes)`` dropped as
``torch.histc`` drops them). Referring: :class:`ReferAccumulator` (oIoU = sum I / sum U over all
sentences, mIoU = mean per-sentence IoU with an empty union counting 0, precision at IoU
thresholds 0.5 / 0.7 / 0.9 counting IoU >= threshold).

The modules: :mod:`~zsdense.metrics.image` (ranking metrics: AUROC, AP, F1-max, curves),
:mod:`~zsdense.metrics.region` (GT regions, both AUPROs), :mod:`~zsdense.metrics.pixel` (a
category's pixel metrics, exact or streamed) and :mod:`~zsdense.metrics.segmentation` (mIoU,
referring). Every public name is importable from :mod:`zsdense.metrics`.

Degenerate inputs (only one class present) give NaN instead of raising, so one empty category
does not abort a whole evaluation; the tables show NaN.
"""

from zsdense.metrics.image import (
    auroc,
    average_precision,
    f1_max,
    f1_max_threshold,
    image_metrics,
    pr_curve,
    roc_curve,
)
from zsdense.metrics.pixel import DEFAULT_BINS, PixelAccumulator, RangeTracker, pixel_metrics
from zsdense.metrics.region import (
    AUPRO_FPR_LIMIT,
    PAPERS_AUPRO_STEPS,
    AuproAccumulator,
    aupro_mvtec,
    aupro_papers,
    label_regions,
    papers_thresholds,
    pro_curve_mvtec,
    pro_curve_papers,
)
from zsdense.metrics.segmentation import IoUAccumulator, ReferAccumulator, mean_iou, refer_metrics

__all__ = [
    "auroc",
    "average_precision",
    "f1_max",
    "f1_max_threshold",
    "roc_curve",
    "pr_curve",
    "image_metrics",
    "pixel_metrics",
    "aupro_papers",
    "aupro_mvtec",
    "pro_curve_papers",
    "pro_curve_mvtec",
    "papers_thresholds",
    "label_regions",
    "PixelAccumulator",
    "AuproAccumulator",
    "RangeTracker",
    "IoUAccumulator",
    "mean_iou",
    "ReferAccumulator",
    "refer_metrics",
    "DEFAULT_BINS",
    "PAPERS_AUPRO_STEPS",
    "AUPRO_FPR_LIMIT",
]
