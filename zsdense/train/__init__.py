"""Prompt training: Crane's ``train.py`` as run, resumable, with safe checkpoints.

``recipe`` (every constant), ``learner`` (the trainable prompts), ``features`` (the frozen
encoders, cached), ``losses`` and ``step`` (one optimisation step), ``data`` (the training set
and its checks), ``checkpoint`` (safetensors + metadata, the published ``.pth`` layout) and
``loop`` (epochs, resume, validation).
"""
