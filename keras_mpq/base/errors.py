"""The exceptions keras_mpq raises: each one says what was wrong and what to do.

>>> issubclass(InvalidInputError, KerasMpqError) and issubclass(InvalidInputError, ValueError)
True
"""

from __future__ import annotations

# --------------------------------------------------------------------------- errors


class KerasMpqError(ValueError):
  """Base class of every error keras_mpq raises on purpose.

  The message always says what was wrong and what to do about it. The command
  line prints it without a traceback and exits with status 2.
  """


class InvalidInputError(KerasMpqError):
  """An argument, a file or data the user passed is not usable."""


class InputRangeAssumedWarning(UserWarning):
  """No input range was read off the model or given, so [0, 1] is assumed."""


class UnsupportedModelError(KerasMpqError):
  """The model cannot be handled (no class output, no quantizable layer, ...)."""


class BudgetInfeasibleError(KerasMpqError):
  """No plan meets the budget. ``smallest`` is the smallest achievable value."""

  def __init__(self, message: str, smallest: float):
    super().__init__(message)
    self.smallest = smallest


class FileOverBudgetError(BudgetInfeasibleError):
  """An exported file came out larger than its byte budget (nothing was written).

  ``size`` is the file's size in bytes, ``limit`` the budget; ``smallest``
  (as in `BudgetInfeasibleError`) is ``size``.
  """

  def __init__(self, message: str, size: int, limit: float):
    super().__init__(message, float(size))
    self.size = int(size)
    self.limit = float(limit)


class RamLimitError(KerasMpqError):
  """The model's TFLite Micro arena exceeds the given RAM limit. ``arena`` in bytes."""

  def __init__(self, message: str, arena: int, limit: float):
    super().__init__(message)
    self.arena = int(arena)
    self.limit = float(limit)


class MissingDependencyError(KerasMpqError):
  """An optional runtime or tool is not installed."""
