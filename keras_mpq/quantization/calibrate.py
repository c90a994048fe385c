"""Activation ranges from calibration data: measuring, choosing (by policy) and setting them.

>>> ranges = calibrate(qmodel, x, range_policy="minmax")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from keras_mpq.base import act_ranges as act_ranges_lib
from keras_mpq.base import batching, model_data
from keras_mpq.base.compat import keras, tf
from keras_mpq.model import inputs as inputs_lib
from keras_mpq.model.graph import layer_output
from keras_mpq.quantization.access import (
  is_input_quantizer,
  act_quant_vars,
  activation_bits_of,
  quantized_name,
  set_activation_quantization,
)


def check_data(model, x, what: str = "data"):
  """Checks ``x`` against the model's inputs (`keras_mpq.model.inputs.check_inputs`).

  One float32 array for a model with one input; for several, a list of
  float32 arrays in ``model.inputs`` order (``x`` a list or a dict by name).
  """
  return inputs_lib.check_inputs(model, x, what)


# One traced range probe per (quantized model, keep_values): tracing a large model
# takes seconds (EfficientNetB0 at 96x96: ~8 s), and the sensitivity search
# calibrates the same model once per measured plan.


RANGE_PROBES = "range probes"
"""`keras_mpq.base.model_data` key: a quantized model's traced range probes, per batch size."""


def _range_probe(qmodel, pairs, keep_values: bool):
  """A ``tf.function`` batch -> (mins, maxs, outputs) of the quantizers' inputs, cached."""
  probes = model_data.get(qmodel, RANGE_PROBES)
  if probes is None:
    probes = {}
    model_data.put(qmodel, RANGE_PROBES, probes)
  if keep_values not in probes:
    probe = keras.Model(qmodel.inputs, [layer_output(qmodel, layer) for layer, _ in pairs])

    @tf.function(reduce_retracing=True)
    def ranges(batch):
      outs = probe(batch, training=False)
      outs = outs if isinstance(outs, (list, tuple)) else [outs]
      return ([tf.reduce_min(o) for o in outs], [tf.reduce_max(o) for o in outs],
              list(outs) if keep_values else [])

    probes[keep_values] = ranges
  return probes[keep_values]


def _measure(qmodel, x, batch_size: int, keep_values: bool):
  """(pairs, mins, maxs, values) of every activation quantizer's input on ``x``.

  Activation quantization is off while measuring and on again afterwards.
  ``values`` holds, per quantizer, a seeded subset of the values seen
  (`keras_mpq.base.act_ranges.MAX_VALUES` in all) when ``keep_values``.
  """
  pairs = act_quant_vars(qmodel)
  if not pairs:
    return [], np.zeros(0), np.zeros(0), []
  set_activation_quantization(qmodel, False)
  ranges = _range_probe(qmodel, pairs, keep_values)
  lo = np.full(len(pairs), np.inf)
  hi = np.full(len(pairs), -np.inf)
  batches = list(batching.batches(x, batch_size))
  per_batch = act_ranges_lib.MAX_VALUES // max(len(batches), 1)
  values = [[] for _ in pairs]
  # Each calibrated model gets its own function, so TF's "retracing in a loop"
  # warning fires across apply_plan calls although no function retraces.
  tf_logger, level = tf.get_logger(), tf.get_logger().level
  tf_logger.setLevel("ERROR")
  try:
    for i, batch in enumerate(batches):
      mins, maxs, outs = ranges(tf.nest.map_structure(tf.constant, batch))
      lo = np.minimum(lo, np.array([m.numpy() for m in mins]))
      hi = np.maximum(hi, np.array([m.numpy() for m in maxs]))
      for j, o in enumerate(outs):
        values[j].append(act_ranges_lib.sample_values(o.numpy(), per_batch, seed=i))
  finally:
    tf_logger.setLevel(level)
    set_activation_quantization(qmodel, True)
  return pairs, lo, hi, values


def observed_ranges(qmodel, x, batch_size: int = 64) -> Dict[str, Tuple[float, float]]:
  """The min/max each activation quantizer sees on ``x`` (its `calibrate` subset), by layer (nothing set).

  >>> observed_ranges(qmodel, x)["conv1"]  # doctest: +SKIP
  (0.0, 5.91)
  """
  x = act_ranges_lib.range_subset(check_data(qmodel, x, "data"))
  pairs, lo, hi, _ = _measure(qmodel, x, batch_size, keep_values=False)
  return {quantized_name(layer): (float(a), float(b)) for (layer, _), a, b in zip(pairs, lo, hi)}


def calibrate(qmodel, x, batch_size: int = 64,
              range_policy: Optional[str] = None) -> Dict[str, Tuple[float, float]]:
  """Sets every activation range from ``x`` under ``range_policy``; returns them.

  Ranges are measured with the weights quantized as planned and activations
  float (each quantizer switched off while measuring, then back on), on at
  most `keras_mpq.base.act_ranges.MAX_RANGE_SAMPLES` of ``x`` (the subset the
  exported file's calibration takes too). The
  policy (`keras_mpq.base.act_ranges`; None: its current default, min/max unless
  changed) applies to every layer output; the model input keeps its min/max,
  as the .tflite's input does.
  """
  policy = act_ranges_lib.check_range_policy(range_policy)
  x = act_ranges_lib.range_subset(check_data(qmodel, x, "calibration data"))
  pairs, lo, hi, values = _measure(qmodel, x, batch_size, keep_values=policy != "minmax")
  result = {}
  for j, ((layer, v), a, b) in enumerate(zip(pairs, lo, hi)):
    if policy != "minmax" and not is_input_quantizer(layer):
      chosen = act_ranges_lib.choose_range(
          np.concatenate(values[j]),
          activation_bits_of(layer), policy)
      a, b = chosen.low, chosen.high
    v["min"].assign(float(a))
    v["max"].assign(float(b))
    result[quantized_name(layer)] = (float(a), float(b))
  return result
