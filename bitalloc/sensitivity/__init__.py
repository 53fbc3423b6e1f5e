"""Sensitivity: how much the model's loss grows when each unit is quantized, by four score families.

``collect.measure_errors`` runs one calibration pass and returns an error table (``table.ErrorTable``)
holding every family's predictions (``hessian``, ``hessian_diag``, ``baq``, ``spectral``,
``importance``, ``fisher``, ``gradient``) and their measured-truth calibration ``combined``;
docs/sensitivity.md gives each formula, its cost and how well it ranks units against measured truth.

Nothing is imported here: ``sensitivity.table`` (numpy only) is read on the re-solve path, which
must not pay for torch; the pass itself lives in ``sensitivity.collect``.
"""
