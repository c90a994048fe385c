"""A BatchNormalization layer's running statistics, and whether they can be read.

Three stages read them as evidence about the data a model was trained on:
the input-range estimate (`keras_mpq.model.input_range`), the synthesis's
BatchNorm term (`keras_mpq.synthesis.losses`) and the realism check
(`keras_mpq.synthesis.realism`). They agree here on what counts as usable.

>>> from keras_mpq.base.compat import keras
>>> bn = keras.layers.BatchNormalization()
>>> bn.build((None, 3))
>>> state(bn)  # still at mean 0, variance 1: never saw data
'untrained'
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

DEGENERATE = "degenerate"
UNTRAINED = "untrained"
USABLE = "usable"


def running_statistics(layer) -> Tuple[np.ndarray, np.ndarray]:
  """``(moving mean, moving variance)`` of a BatchNormalization layer, float64, flat."""
  return (np.asarray(layer.moving_mean.numpy(), np.float64).ravel(),
          np.asarray(layer.moving_variance.numpy(), np.float64).ravel())


def state(layer) -> str:
  """`DEGENERATE` (NaN or Inf, or no variance above 0), `UNTRAINED` (every mean 0 and
  variance 1, the initial values) or `USABLE`."""
  mean, var = running_statistics(layer)
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))) or not np.any(var > 0):
    return DEGENERATE
  if np.all(mean == 0) and np.all(var == 1):
    return UNTRAINED
  return USABLE
