"""The built-in anomaly scorers, one module each, registered when imported.

:mod:`zsdense.tasks.anomaly_registry` imports them on the first scorer lookup (like plug-ins
found through an entry point): ``crane`` (Crane, Crane+), ``musc`` (MuSc), ``anomalydino``
(AnomalyDINO) and ``crane_fewshot`` (Crane+ fused with AnomalyDINO).
"""
