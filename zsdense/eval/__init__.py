"""Evaluation as a library: dataset readers and one module per protocol.

```python
from zsdense import Segmenter
from zsdense.eval import evaluate_anomaly

table = evaluate_anomaly("mvtec_ad/", "runs/mvtec", Segmenter(device="cuda"), preset="crane")
print(table.format())          # per category, then the mean (x100, as the papers print)
table.rows[0]["pixel_auroc"]   # plain dicts; also written to metrics_anomaly.{json,csv,md}
```

Predictions run through the batch engine into ``<out>/predictions/<task>/`` (progress, one bad
image fails only itself, resume after a kill); a rerun with the same settings predicts nothing
and only recomputes the metrics.
"""

from __future__ import annotations

from zsdense.eval.anomaly import ANOMALY_METRICS, EVAL_SIZE, evaluate_anomaly
from zsdense.eval.common import EvalInterrupted, MetricTable
from zsdense.eval.openvocab import evaluate_openvocab
from zsdense.eval.refer import evaluate_refer

__all__ = [
    "ANOMALY_METRICS",
    "EVAL_SIZE",
    "EvalInterrupted",
    "MetricTable",
    "evaluate_anomaly",
    "evaluate_openvocab",
    "evaluate_refer",
]
