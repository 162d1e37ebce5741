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

import importlib
from typing import TYPE_CHECKING, Any

from zsdense.eval.protocols import ANOMALY_METRICS, EVAL_SIZE

if TYPE_CHECKING:
    from zsdense.eval.anomaly import evaluate_anomaly
    from zsdense.eval.common import EvalInterrupted, MetricTable
    from zsdense.eval.openvocab import evaluate_openvocab
    from zsdense.eval.refer import evaluate_refer

# loaded on first use: the protocols import the engine and the models (torch), which neither
# ``zsdense eval --help`` nor the dataset readers need
_LAZY = {
    "evaluate_anomaly": "zsdense.eval.anomaly",
    "EvalInterrupted": "zsdense.eval.common",
    "MetricTable": "zsdense.eval.common",
    "evaluate_openvocab": "zsdense.eval.openvocab",
    "evaluate_refer": "zsdense.eval.refer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zsdense.eval' has no attribute {name!r}")


__all__ = [
    "ANOMALY_METRICS",
    "EVAL_SIZE",
    "EvalInterrupted",
    "MetricTable",
    "evaluate_anomaly",
    "evaluate_openvocab",
    "evaluate_refer",
]
