"""The valid input range of a model: read off its preprocessing, given, or assumed.

Every data-driven stage depends on it: synthetic data stays inside it, real
data is checked against it, and the input quantizer of the Keras model and of
the exported file covers it. Where it comes from, in order:

* an explicit ``input_range=(low, high)`` (it wins, with a warning when the
  model's own preprocessing says otherwise);
* a ``Rescaling`` layer the input goes straight into (``Rescaling(1/255)``
  means raw [0, 255]; ``Rescaling(1/127.5, offset=-1)`` also means [0, 255])
  or a ``Normalization`` layer (mean +- 3 std, widest over channels);
* otherwise [0, 1], reported as *assumed*.

Example:

>>> from keras_mpq.base.compat import keras
>>> m = keras.Sequential([keras.Input((4,)), keras.layers.Rescaling(1 / 255),
...                       keras.layers.Dense(2)])
>>> resolve_input_range(m)[:2]
(0.0, 255.0)
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from keras_mpq.base.compat import keras, tf
from keras_mpq.base.errors import InvalidInputError

DEFAULT_INPUT_RANGE = (0.0, 1.0)
# Normalization layers: the raw range taken as mean +- this many std.
NORMALIZATION_STDS = 3.0


def _as_tf_keras(model):
  """A Keras 3 model rebuilt in tf_keras (`keras_mpq.model.load.load_model`), else ``model``."""
  from keras_mpq.base.compat import is_keras3_model  # pylint: disable=g-import-not-at-top
  if is_keras3_model(model):
    from keras_mpq.model import load as load_lib  # pylint: disable=g-import-not-at-top
    return load_lib.load_model(model)
  return model


def _check_range(value, name="input_range") -> Tuple[float, float]:
  try:
    low, high = (float(v) for v in value)
  except (TypeError, ValueError):
    raise InvalidInputError(
        f"Expected {name}=(low, high), two finite numbers with low < high, e.g. "
        f"(0, 255). Received: {name}={value!r}") from None
  if not (math.isfinite(low) and math.isfinite(high) and low < high):
    raise InvalidInputError(
        f"Expected {name}=(low, high), two finite numbers with low < high, e.g. "
        f"(0, 255). Received: {name}={value!r}")
  return low, high


def _input_consumers(model) -> List[Any]:
  """Layers of ``model`` that take the model's input tensor directly."""
  target = model.inputs[0].ref()
  found = []
  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    try:
      tensors = tf.nest.flatten(layer.input)
    except (AttributeError, ValueError, RuntimeError):
      continue
    if any(hasattr(t, "ref") and t.ref() == target for t in tensors):
      found.append(layer)
  return found


def _preprocessing_layer(model, depth=0):
  """The Rescaling/Normalization layer the input goes straight into, if any."""
  consumers = _input_consumers(model)
  if len(consumers) != 1:
    return None
  layer = consumers[0]
  if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
    return layer
  if isinstance(layer, keras.Model) and getattr(layer, "inputs", None) and depth < 4:
    return _preprocessing_layer(layer, depth + 1)
  return None


def infer_input_range(model) -> Optional[Tuple[float, float, str]]:
  """``(low, high, source)`` from the model's input preprocessing, or None.

  Example:

  >>> from keras_mpq.base.compat import keras
  >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Rescaling(1 / 127.5, offset=-1),
  ...                       keras.layers.Dense(2)])
  >>> infer_input_range(m)[:2]
  (0.0, 255.0)
  """
  layer = _preprocessing_layer(_as_tf_keras(model))
  if isinstance(layer, keras.layers.Rescaling):
    scale = np.asarray(layer.scale, np.float64).ravel()
    offset = np.asarray(layer.offset, np.float64).ravel()
    if np.any(scale == 0):
      return None
    target = (-1.0, 1.0) if np.all(offset < 0) else (0.0, 1.0)
    ends = np.stack([(t - offset) / scale for t in target])  # (2, channels)
    low, high = float(ends.min()), float(ends.max())
    return low, high, (f"Rescaling layer {layer.name!r} maps [{low:g}, {high:g}] "
                       f"to [{target[0]:g}, {target[1]:g}]")
  if isinstance(layer, keras.layers.Normalization) and not getattr(layer, "invert", False):
    mean, var = getattr(layer, "mean", None), getattr(layer, "variance", None)
    if mean is None or var is None:
      return None
    mean = np.asarray(mean, np.float64).ravel()
    std = np.sqrt(np.maximum(np.asarray(var, np.float64).ravel(), 0.0))
    low = float(np.min(mean - NORMALIZATION_STDS * std))
    high = float(np.max(mean + NORMALIZATION_STDS * std))
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
      return None
    return low, high, (f"Normalization layer {layer.name!r}: mean +- "
                       f"{NORMALIZATION_STDS:g} std = [{low:g}, {high:g}]")
  return None


def _resolve(model, given):
  """(low, high, source, assumed): the argument, else inferred, else [0, 1]."""
  inferred = infer_input_range(model)
  if given is not None:
    low, high = _check_range(given)
    if inferred is not None and not np.allclose((low, high), inferred[:2], rtol=1e-6):
      warnings.warn(
          f"input_range={given!r} overrides the range read off the model "
          f"({inferred[2]}).", stacklevel=4)
    return low, high, "input_range argument", False
  if inferred is not None:
    return inferred[0], inferred[1], inferred[2], False
  return (*DEFAULT_INPUT_RANGE, "assumed [0, 1]: no Rescaling/Normalization at the "
          "input and no input_range given", True)


def resolve_input_range(model, input_range=None) -> Tuple[float, float, str, bool]:
  """``(low, high, source, assumed)``: the valid input range ``quantize`` uses.

  An explicit ``input_range`` wins (with a warning when the model's
  Rescaling/Normalization layer says otherwise); else the range read off
  that layer; else [0, 1], with ``assumed=True``.

  >>> from keras_mpq.base.compat import keras
  >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
  >>> resolve_input_range(m)[3], resolve_input_range(m, (-1, 1))[:2]
  (True, (-1.0, 1.0))
  """
  return _resolve(model, input_range)


RANGE_TOLERANCE = 0.01
"""Share of the input range's width that data may stray outside it (rounding)."""


def check_data_range(x: np.ndarray, low: float, high: float, source: str,
                     assumed: bool, what: str = "data") -> Dict[str, Any]:
  """Checks that inputs ``x`` lie in the model's input range ``[low, high]``.

  Data outside the range (beyond `RANGE_TOLERANCE` of its width) is an
  error that names both ranges, the classic case being uint8 pixels 0..255
  for a model that takes [0, 1]. Data that fills less than 2% of the range
  (pixels in [0, 1] for a model that takes 0..255) gives a warning. Returns
  the data's range and where the model's came from, for the report.

  >>> check_data_range(np.array([[0.0, 0.5]]), 0.0, 1.0, "given", False)["data_range"]
  [0.0, 0.5]
  """
  lo, hi = float(np.min(x)), float(np.max(x))
  width = high - low
  if lo < low - RANGE_TOLERANCE * width or hi > high + RANGE_TOLERANCE * width:
    if assumed:
      fix = (f"If the model takes [{lo:g}, {hi:g}], pass input_range=({lo:g}, {hi:g}) "
             "(--input_range=LO,HI); if it takes [0, 1], rescale the data")
    else:
      fix = (f"Rescale the data to [{low:g}, {high:g}], or pass input_range=(lo, hi) "
             "if the model's range is different")
    raise InvalidInputError(
        f"Expected {what} inside the model's input range [{low:g}, {high:g}] ({source}). "
        f"Received: {what} in [{lo:g}, {hi:g}]. {fix}.")
  if hi - lo < 0.02 * width:
    warnings.warn(
        f"{what} spans [{lo:g}, {hi:g}], under 2% of the model's input range "
        f"[{low:g}, {high:g}] ({source}): check that the data is on the model's scale.",
        stacklevel=2)
  return {"data_range": [lo, hi], "input_range": [low, high], "source": source,
          "assumed": assumed}
