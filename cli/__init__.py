"""The zsdense command-line application (installed as ``zsdense.cli``)."""
