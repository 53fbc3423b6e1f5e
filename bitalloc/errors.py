"""User-facing errors.

Every problem caused by the user's input (a missing file, a corrupt checkpoint, an
unparsable or infeasible budget, a plan for another model) raises a subclass of
:class:`BitallocError`. The CLI turns these into a one-line message and exit code 2;
anything else is a bug and keeps its traceback (exit code 1).
"""

from __future__ import annotations


class BitallocError(Exception):
    """Base class for errors the user can fix; the message is shown verbatim."""


class CheckpointError(BitallocError):
    """The model directory is missing, incomplete, corrupt or of an unsupported architecture."""


class CalibrationError(BitallocError):
    """The calibration or evaluation text is missing, empty or too short."""


class BudgetError(BitallocError):
    """The budget cannot be parsed or no assignment of the candidates meets it."""


class PlanError(BitallocError):
    """A plan file is corrupt, invalid, or does not belong to the model it is used with."""


class ScoresError(BitallocError):
    """A saved error table is corrupt or stale (other model, calibration or candidates)."""


class OutputError(BitallocError):
    """An output path cannot be written."""


class ConstraintError(BitallocError):
    """Pins or bit bounds that contradict each other, the candidates, or the tensors."""
