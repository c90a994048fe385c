"""The valid input range of a model: read off its preprocessing, given, or assumed.

Every data-driven stage depends on it: synthetic data stays inside it, real
data is checked against it, and the input quantizer of the Keras model and of
the exported file covers it. Where it comes from, in order:

* an explicit ``input_range=(low, high)`` (it wins, with a warning when the
  model's own preprocessing says otherwise);
* a ``Rescaling`` layer the input goes straight into (``Rescaling(1/255)``
  means raw [0, 255]; ``Rescaling(1/127.5, offset=-1)`` also means [0, 255])
  or a ``Normalization`` layer (mean +- 3 std, widest over channels);
* otherwise estimated from the BatchNorm after the first weight layer
  (`estimate_from_batchnorm`: its running mean and variance say what the
  inputs it was trained on looked like), reported as *assumed*;
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
from keras_mpq.model import batchnorm as batchnorm_lib
from keras_mpq.model import inputs as inputs_lib

DEFAULT_INPUT_RANGE = (0.0, 1.0)
COMMON_RANGES = ((0.0, 255.0), (-128.0, 127.0))
"""Large input scales models are usually trained on (raw pixels, int8 features);
`estimate_from_batchnorm` picks one when it fits (unit scales are decided apart)."""
FALLBACK_STDS = 3.0
"""Where no common range fits the estimate, the range taken: mean +- this many std."""
SIGNED_UNIT_MEAN = 0.05
"""A unit-scale estimate with a mean below minus this is taken as [-1, 1] inputs (the
keras.applications MobileNet convention, x / 127.5 - 1): inputs in [0, 1] cannot
have a negative mean, and a BatchNorm that kept part of its initial mean 0 only
shrinks the estimate toward 0, never across it."""
LARGE_SCALE_MEAN = 2.0
LARGE_SCALE_STD = 10.0
"""`estimate_from_batchnorm` speaks only for inputs whose estimated mean exceeds
`LARGE_SCALE_MEAN` in magnitude or whose std exceeds `LARGE_SCALE_STD` (raw
pixels, int8 features): a BatchNorm's running statistics start at mean 0 and
variance 1 and keep part of that start in a briefly trained model, which blurs
the difference between [0, 1] and [-1, 1] inputs but not a scale of 100."""
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


def _input_consumers(model, index: int = 0) -> List[Any]:
  """Layers of ``model`` that take its input ``index`` directly."""
  target = model.inputs[index].ref()
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


def _preprocessing_layer(model, depth=0, index: int = 0):
  """The Rescaling/Normalization layer input ``index`` goes straight into, if any."""
  consumers = _input_consumers(model, index)
  if len(consumers) != 1:
    return None
  layer = consumers[0]
  if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
    return layer
  if isinstance(layer, keras.Model) and getattr(layer, "inputs", None) and depth < 4:
    return _preprocessing_layer(layer, depth + 1)
  return None


def infer_input_range(model, index: int = 0) -> Optional[Tuple[float, float, str]]:
  """``(low, high, source)`` from the preprocessing of input ``index``, or None.

  Example:

  >>> from keras_mpq.base.compat import keras
  >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Rescaling(1 / 127.5, offset=-1),
  ...                       keras.layers.Dense(2)])
  >>> infer_input_range(m)[:2]
  (0.0, 255.0)
  """
  layer = _preprocessing_layer(_as_tf_keras(model), index=index)
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


def _first_weight_layer_and_batchnorm(model, index: int = 0):
  """(weight layer, BatchNormalization) where input ``index`` feeds a Conv/Dense whose only consumer is a BN."""
  layers = _input_consumers(model, index)
  while len(layers) == 1 and isinstance(layers[0], (keras.layers.ZeroPadding1D,
                                                     keras.layers.ZeroPadding2D,
                                                     keras.layers.Flatten, keras.layers.Reshape)):
    layers = [node.outbound_layer for node in layers[0]._outbound_nodes]  # pylint: disable=protected-access
  if len(layers) != 1:
    return None
  layer = layers[0]
  if not isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Dense)) or \
      isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
                         keras.layers.Conv2DTranspose)):
    return None
  consumers = [node.outbound_layer for node in layer._outbound_nodes]  # pylint: disable=protected-access
  if len(consumers) != 1 or not isinstance(consumers[0], keras.layers.BatchNormalization):
    return None
  if getattr(layer, "activation", None) not in (None, keras.activations.linear):
    return None
  return layer, consumers[0]


def estimate_from_batchnorm(model, index: int = 0) -> Optional[Tuple[float, float, str]]:
  """``(low, high, source)`` of the inputs the model was trained on, from its first BatchNorm; or None.

  ``index``: which input, for a model with several (each is estimated from
  the BatchNorm after its own first weight layer).

  A BatchNorm right after the first weight layer keeps the running mean
  ``mu_c`` and variance ``var_c`` of that layer's outputs ``w_c . x + b_c``
  on the training inputs. So ``mu_c - b_c = m * sum(w_c)`` gives the inputs'
  mean ``m`` (least squares over channels), and ``var_c = a ||w_c||^2 + c
  (sum w_c)^2`` (independent plus fully correlated inputs, fitted with
  nonnegative least squares) their variance ``a + c``. A large-scale estimate
  takes the one of `COMMON_RANGES` that holds ``m`` well inside and could give
  ``std`` (a nonnegative range for a positive mean, else a signed one), else
  ``m +- 3 std``. None when there is no such BatchNorm, its
  statistics are degenerate (zero, NaN), or the estimate is of unit scale
  (`LARGE_SCALE_MEAN`, `LARGE_SCALE_STD`) with a mean that is not negative
  (the [0, 1] default stands; a negative one gives [-1, 1], `SIGNED_UNIT_MEAN`).

  >>> from keras_mpq.base.compat import keras
  >>> m = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
  ...                       keras.layers.BatchNormalization(), keras.layers.Flatten(),
  ...                       keras.layers.Dense(2)])
  >>> estimate_from_batchnorm(m) is None  # fresh BN statistics (mean 0, variance 1): no scale
  True
  """
  from scipy import optimize as scipy_optimize  # pylint: disable=g-import-not-at-top
  found = _first_weight_layer_and_batchnorm(_as_tf_keras(model), index)
  if found is None:
    return None
  layer, bn = found
  weights = layer.get_weights()
  kernel = np.asarray(weights[0], np.float64)
  bias = np.asarray(weights[1], np.float64) if layer.use_bias else np.zeros(kernel.shape[-1])
  mean, var = batchnorm_lib.running_statistics(bn)
  cin, cout = kernel.shape[-2], kernel.shape[-1]
  if mean.size != cout or cout < 2 or batchnorm_lib.state(bn) != batchnorm_lib.USABLE:
    return None  # untrained or broken statistics: nothing to read
  taps = kernel.reshape(-1, cin, cout)
  sums = taps.sum(axis=(0, 1))  # (cout,)
  if np.sum(sums ** 2) <= 0:
    return None
  m = float(np.dot(sums, mean - bias) / np.sum(sums ** 2))
  design = np.stack([(taps ** 2).sum(axis=(0, 1)), sums ** 2], axis=1)
  coef, _ = scipy_optimize.nnls(design, np.maximum(var, 0.0))
  std = float(np.sqrt(coef.sum()))
  if not (math.isfinite(m) and math.isfinite(std) and std > 0):
    return None
  if abs(m) <= LARGE_SCALE_MEAN and std <= LARGE_SCALE_STD:
    if m < -SIGNED_UNIT_MEAN:  # no [0, 1] data has a negative mean: [-1, 1] pixels
      return -1.0, 1.0, (f"estimated [-1, 1] from BatchNorm {bn.name!r} after {layer.name!r}: "
                         f"its training inputs had mean {m:.3g} (below 0) and std {std:.3g}")
    return None
  feasible = [(low, high) for low, high in COMMON_RANGES
              if low + 0.05 * (high - low) <= m <= high - 0.05 * (high - low)
              and (high - low) / 50 <= std <= 0.6 * (high - low)]
  # Raw pixels sit on [0, 255] with a positive mean; int8 features (and
  # mean-subtracted pixels) on [-128, 127], mean near 0 or below.
  preferred = [r for r in feasible if (r[0] >= 0) == (m >= 0)]
  best = (preferred or feasible or [None])[0]
  if best is None:
    best = (m - FALLBACK_STDS * std, m + FALLBACK_STDS * std)
  return best[0], best[1], (f"estimated [{best[0]:g}, {best[1]:g}] from BatchNorm "
                            f"{bn.name!r} after {layer.name!r}: its training inputs had "
                            f"mean {m:.3g} and std {std:.3g}")


def _resolve(model, given, index: int = 0, name: str = "input_range"):
  """(low, high, source, assumed): the argument, else inferred, else [0, 1]."""
  inferred = infer_input_range(model, index)
  if given is not None:
    low, high = _check_range(given, name)
    if inferred is not None and not np.allclose((low, high), inferred[:2], rtol=1e-6):
      warnings.warn(
          f"{name}={given!r} overrides the range read off the model "
          f"({inferred[2]}).", stacklevel=4)
    return low, high, f"{name} argument", False
  if inferred is not None:
    return inferred[0], inferred[1], inferred[2], False
  estimated = estimate_from_batchnorm(model, index)
  if estimated is not None:
    return estimated[0], estimated[1], estimated[2], True
  return (*DEFAULT_INPUT_RANGE, "assumed [0, 1]: no Rescaling/Normalization at the "
          "input and no input_range given", True)


def resolve_input_range(model, input_range=None) -> Tuple[float, float, str, bool]:
  """``(low, high, source, assumed)``: the valid input range ``quantize`` uses.

  An explicit ``input_range`` wins (with a warning when the model's
  Rescaling/Normalization layer says otherwise); else the range read off
  that layer; else the range its first BatchNorm's statistics imply
  (`estimate_from_batchnorm`), else [0, 1]; these two with ``assumed=True``.

  >>> from keras_mpq.base.compat import keras
  >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
  >>> resolve_input_range(m)[3], resolve_input_range(m, (-1, 1))[:2]
  (True, (-1.0, 1.0))
  """
  return _resolve(model, input_range)


def resolve_input_ranges(model, input_range=None) -> List[Tuple[float, float, str, bool]]:
  """`resolve_input_range` for each of ``model``'s inputs, in ``model.inputs`` order.

  ``input_range`` for a model with several inputs: None (each input's own
  default, by the same rules as one input's: its Rescaling/Normalization
  layer, else its first BatchNorm, else [0, 1]); one ``(low, high)`` for
  every input; a list with one ``(low, high)`` or None per input; or a dict
  by input name (inputs it leaves out get their default). A model with one
  input takes ``(low, high)`` as `resolve_input_range` does (or a dict or a
  list with its one range).

  >>> from keras_mpq.base.compat import keras
  >>> a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
  >>> m = keras.Model([a, b], keras.layers.Dense(1)(
  ...     keras.layers.Concatenate()([keras.layers.Rescaling(1 / 255)(a), b])))
  >>> [r[:2] for r in resolve_input_ranges(m, {"b": (-1, 1)})]
  [(0.0, 255.0), (-1.0, 1.0)]
  """
  model = _as_tf_keras(model)
  names = inputs_lib.input_names(model)
  given = per_input_ranges(input_range, names)
  label = (lambda n: "input_range") if len(names) == 1 else (
      lambda n: f"input_range[{n!r}]")
  return [_resolve(model, g, i, label(n)) for i, (n, g) in enumerate(zip(names, given))]


def per_input_ranges(input_range, names) -> List[Optional[Any]]:
  """``input_range`` as one given range (or None) per input named ``names``; refuses bad forms."""
  n = len(names)
  if input_range is None:
    return [None] * n
  if isinstance(input_range, dict):
    unknown = sorted(set(map(str, input_range)) - set(names))
    if unknown:
      raise InvalidInputError(
          f"Expected input_range keyed by the model's input names {list(names)}. Received: "
          f"unknown names {unknown}. Give each input's (low, high) under its name.")
    return [input_range.get(name) for name in names]
  if isinstance(input_range, str):
    raise InvalidInputError(
        f"Expected input_range=(low, high). Received: input_range={input_range!r}")
  try:
    items = list(input_range)
  except TypeError:
    raise InvalidInputError(
        f"Expected input_range=(low, high). Received: input_range={input_range!r}") from None
  pair = len(items) == 2 and all(isinstance(v, (int, float, np.number)) and
                                 not isinstance(v, bool) for v in items)
  if pair:  # one range for every input
    return [tuple(items)] * n
  if len(items) == n and all(v is None or (not isinstance(v, str) and np.ndim(v) == 1)
                             for v in items):
    return items
  if n == 1:
    return [input_range]  # `_check_range` says what is wrong with it
  raise InvalidInputError(
      f"Expected input_range as one (low, high), a list of {n} (low, high) (one per input "
      f"{list(names)}) or a dict by input name. Received: input_range={input_range!r}")


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
