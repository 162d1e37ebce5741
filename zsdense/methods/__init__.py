"""The built-in methods, one file each: what a method is, its encoders and its presets.

Every module of this package is imported the first time a method or preset registry is read
(:func:`zsdense.plugins.load_plugins`), then the ``zsdense.methods`` entry points of installed
plug-ins. So a new built-in method is a new file here and nothing else: its presets become
``--preset`` choices, rows of ``zsdense info --methods`` and of the README's tables.

A file registers with the family's function:

* open-vocabulary: :func:`zsdense.dense.methods.register_method` (a feature function over CLIP
  windows, presets, per-dataset settings);
* referring: :func:`zsdense.tasks.refer_methods.register_refer_method` (a function
  ``(runtime, image context, parsed expression, preset) -> ReferResult``, presets).

The algorithms themselves live where their layer is (``zsdense.dense``, ``zsdense.tasks``); a
file here only declares them. Nothing in the library imports this package by name.
"""
