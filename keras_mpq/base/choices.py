"""The string choices of keras_mpq's settings, each an enum in one place.

Every setting that takes one of a few names (the export target, the weight
quantizer, bias correction, the activation-range policy, the sensitivity
objective, the search's first context) is a `enum.StrEnum` here; the
modules that use a setting read its allowed values from here, so a new
choice is added once. Members compare equal to their strings, so
``target="mcu"`` and ``target=Target.MCU`` are the same setting.

>>> Target("mcu") == "mcu"
True
>>> values(WeightMethod)
('rtn', 'mse', 'gptq', 'gptq-damped', 'adaround')
"""

from __future__ import annotations

import enum
from typing import Tuple, Type


class Target(enum.StrEnum):
  """What an export is for: phones (LiteRT), microcontrollers (TFLite Micro), Arm Ethos-U."""

  MOBILE = "mobile"
  MCU = "mcu"
  ETHOS_U = "ethos-u"


class WeightMethod(enum.StrEnum):
  """How each layer's weight integers are chosen (`keras_mpq.quantization.weights`)."""

  RTN = "rtn"
  MSE = "mse"
  GPTQ = "gptq"
  GPTQ_DAMPED = "gptq-damped"
  ADAROUND = "adaround"


class BiasCorrection(enum.StrEnum):
  """Bias correction after weight quantization: measured on data, or from BatchNorm statistics."""

  EMPIRICAL = "empirical"
  ANALYTIC = "analytic"


class RangePolicy(enum.StrEnum):
  """How an activation's range is set from calibration data (`keras_mpq.base.act_ranges`)."""

  MINMAX = "minmax"
  PERCENTILE = "percentile"
  MSE = "mse"


class Objective(enum.StrEnum):
  """The task loss the sensitivity measures: KL from the float model, cross-entropy,
  the outputs' distortion (any model), or the user's own loss on their targets."""

  CROSS_ENTROPY = "cross_entropy"
  KL = "kl"
  DISTORTION = "distortion"
  LOSS = "loss"  # the user's loss= on their targets


class HeadKind(enum.StrEnum):
  """What one output of a model is (`keras_mpq.model.outputs.Head`)."""

  SOFTMAX = "softmax"  # probabilities over the last axis
  LOGITS = "logits"  # logits over the last axis
  SIGMOID = "sigmoid"  # independent probabilities, one per unit (binary, per pixel)
  LINEAR = "linear"  # anything else: regression, reconstruction, embedding, box


class Context(enum.StrEnum):
  """First context of the task-interaction search: other layers at the highest bits, or the budget."""

  HIGHEST = "highest"
  BUDGET = "budget"


def values(choice: Type[enum.StrEnum]) -> Tuple[str, ...]:
  """The plain strings of ``choice``, in order (what error messages list)."""
  return tuple(member.value for member in choice)
