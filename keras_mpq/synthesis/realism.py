"""How real calibration data looks to the model: per-layer activation statistics.

Calibration data decides every data-driven step (activation ranges, bias
correction, sensitivity), so a generator is judged by the activations it
produces, not by how confidently the model labels it. This module measures
them and compares two sets layer by layer:

* `activation_statistics(model, x)`: min, max and mean of every layer's
  output that the quantized model gives its own range (weight layers and the
  layers keras_mpq quantizes at their output);
* `compare_statistics(a, b)`: per layer, the range ratio ``(max-min)_a / (max-min)_b``
  and the mean ratio, plus their spread;
* `self_consistency(model, x, x_midway)`: the measure every data-free run
  reports, needing no real data: how far the ranges move between the two
  halves of the set (sampling noise) and between the set halfway through the
  optimization and at its end (convergence). Ratios near 1 mean the set is
  settled; they say nothing about closeness to real data, which only a
  comparison with real data (``compare_statistics(stats(synthetic), stats(real))``, as
  the benchmark does) can tell.

Example:

>>> from keras_mpq.base.compat import keras
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
>>> x = np.random.default_rng(0).uniform(size=(32, 4)).astype("float32")
>>> s = activation_statistics(model, x)
>>> sorted(s)
['fc']
>>> compare_statistics(s, s)["layers"]["fc"]["range_ratio"]
1.0
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np

from keras_mpq.base import layers as layers_lib
from keras_mpq.base.compat import keras, tf


def _measured_layers(model):
  return [l for l in model.layers
          if layers_lib.layer_role(l) in ("weights", "output")]


def activation_statistics(model, x: np.ndarray, batch_size: int = 128
                          ) -> Dict[str, Dict[str, float]]:
  """``{layer: {"min", "max", "mean"}}`` of each quantized layer's output over ``x``."""
  layers = _measured_layers(model)
  if not layers:
    return {}
  probe = keras.Model(model.inputs, [l.output for l in layers])
  fn = tf.function(lambda b: probe(b, training=False))
  lo = np.full(len(layers), np.inf)
  hi = np.full(len(layers), -np.inf)
  total = np.zeros(len(layers))
  count = np.zeros(len(layers))
  x = np.asarray(x, np.float32)
  for start in range(0, len(x), batch_size):
    outs = fn(tf.constant(x[start:start + batch_size]))
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    for i, o in enumerate(outs):
      o = o.numpy().astype(np.float64)
      lo[i] = min(lo[i], o.min())
      hi[i] = max(hi[i], o.max())
      total[i] += o.sum()
      count[i] += o.size
  return {l.name: {"min": float(lo[i]), "max": float(hi[i]),
                   "mean": float(total[i] / max(count[i], 1))}
          for i, l in enumerate(layers)}


def _ratio(a: float, b: float) -> Optional[float]:
  if b == 0:
    return None if a != 0 else 1.0
  return float(a / b)


def compare_statistics(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]]
            ) -> Dict[str, Any]:
  """Per-layer range and mean ratios of statistics ``a`` over ``b``, with a summary.

  ``summary["range_ratio_min"]`` / ``["range_ratio_max"]`` are the extremes
  over layers; ``summary["worst_layer"]`` is the layer whose range ratio is
  farthest from 1 (in log scale).
  """
  layers = {}
  for name in a:
    if name not in b:
      continue
    ra = a[name]["max"] - a[name]["min"]
    rb = b[name]["max"] - b[name]["min"]
    layers[name] = {"range_ratio": _ratio(ra, rb),
                    "mean_ratio": _ratio(a[name]["mean"], b[name]["mean"])}
  ratios = {n: v["range_ratio"] for n, v in layers.items()
            if v["range_ratio"] is not None and v["range_ratio"] > 0}
  summary: Dict[str, Any] = {"layers": len(layers)}
  if ratios:
    values = np.array(list(ratios.values()))
    worst = max(ratios, key=lambda n: abs(np.log(ratios[n])))
    summary.update({"range_ratio_min": float(values.min()),
                    "range_ratio_median": float(np.median(values)),
                    "range_ratio_max": float(values.max()),
                    "worst_layer": worst})
  return {"layers": layers, "summary": summary}


def self_consistency(model, x: np.ndarray, x_midway: Optional[np.ndarray] = None,
                     batch_size: int = 128) -> Dict[str, Any]:
  """The data-free realism report of a synthetic set (module docstring).

  ``halves``: ranges of the even samples over the odd ones. ``convergence``:
  ranges at the end over halfway (when ``x_midway`` is given).
  """
  out: Dict[str, Any] = {}
  if len(x) >= 4:
    out["halves"] = compare_statistics(activation_statistics(model, x[0::2], batch_size),
                            activation_statistics(model, x[1::2], batch_size))["summary"]
  if x_midway is not None:
    out["convergence"] = compare_statistics(activation_statistics(model, x, batch_size),
                                 activation_statistics(model, x_midway, batch_size))["summary"]
  return out
