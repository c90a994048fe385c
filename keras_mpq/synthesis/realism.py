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
* `batchnorm_check(model, x)`: the check that needs no real data and says
  whether ``x`` looks like what the model was trained on: per BatchNorm
  layer, the mean and variance ``x`` gives its input against the running
  statistics, and how much of the output range the statistics imply (mean
  +- `IMPLIED_STDS` std) ``x`` reaches. Real data of the model's kind fits
  them; data on the wrong scale, or a generator that missed, does not;
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

from keras_mpq.base import batching, model_data
from keras_mpq.base import layers as layers_lib
from keras_mpq.base.compat import keras, tf
from keras_mpq.model import batchnorm as batchnorm_lib


def _measured_layers(model):
  return [l for l in model.layers
          if layers_lib.layer_role(l) in ("weights", "output")]


def activation_statistics(model, x: np.ndarray, batch_size: int = 128
                          ) -> Dict[str, Dict[str, float]]:
  """``{layer: {"min", "max", "mean"}}`` of each quantized layer's output over ``x``."""
  layers = _measured_layers(model)
  if not layers:
    return {}
  fn = _probe(model, PROBE, [l.output for l in layers])
  lo = np.full(len(layers), np.inf)
  hi = np.full(len(layers), -np.inf)
  total = np.zeros(len(layers))
  count = np.zeros(len(layers))
  x = _float32(x)
  for s in batching.batch_slices(batching.num_samples(x), batch_size):
    outs = fn(_constant(batching.take(x, s)))
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


PROBE = "activation statistics probe"
"""`keras_mpq.base.model_data` key: the compiled function `activation_statistics` runs."""


def _probe(model, key: str, tensors):
  """One compiled function per model and ``key`` returning ``tensors``, with a free batch
  size: traced once, however often called."""
  fn = model_data.get(model, key)
  if fn is None:
    probe = keras.Model(model.inputs, tensors)
    specs = [tf.TensorSpec((None,) + tuple(t.shape[1:]), tf.float32) for t in model.inputs]
    fn = tf.function(lambda b: probe(b, training=False),
                     input_signature=[specs[0] if len(specs) == 1 else specs])
    model_data.put(model, key, fn)
  return fn


def _float32(x):
  """Inputs as float32: one array, or a list per input."""
  return batching.map_inputs(lambda a: np.asarray(a, np.float32), x)


def _constant(x):
  return tf.nest.map_structure(tf.constant, x)


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
  if batching.num_samples(x) >= 4:
    out["halves"] = compare_statistics(
        activation_statistics(model, batching.take(x, slice(0, None, 2)), batch_size),
        activation_statistics(model, batching.take(x, slice(1, None, 2)), batch_size))["summary"]
  if x_midway is not None:
    out["convergence"] = compare_statistics(activation_statistics(model, x, batch_size),
                                 activation_statistics(model, x_midway, batch_size))["summary"]
  return out


IMPLIED_STDS = 4.0
"""A BatchNorm output channel's implied range: beta +- this many |gamma|."""
MEAN_Z_LIMIT = 1.0
"""A layer fits when the data's per-channel means sit within this many running std (median)..."""
VAR_RATIO_LIMIT = 4.0
"""...and its variances within this factor of the running variances (median over channels)."""
FIT_SHARE = 0.8
"""The data passes when at least this share of BatchNorm layers fit, and the first fits closely:"""
INPUT_MEAN_Z_LIMIT = 0.5
"""The first BatchNorm (the one nearest the input, which sees the input's scale)
fits closely when its means sit within this many running std...
Deeper layers are normalized by the ones before them, so a wrong input scale
can fail only the first few: real inputs on another scale ([0, 1] photos fed
to a model trained on [-1, 1]: 0.92 std, variance x3.2 at MobileNetV2's first
BatchNorm) pass 49 of its 52 layers. Real inputs of the model's kind, on the
zoo's speech and photo models: at most 0.23 std and x1.3."""
INPUT_VAR_RATIO_LIMIT = 2.5
"""...and its variances within this factor (median over channels). The
labeled generator's data reach x1.8 and x2.0 at the first BatchNorm of the
zoo's two photo MobileNetV2 copies (their means 0.17 and 0.27 std off); [0, 1]
photos fed to them x3.0 and x3.2 (0.91 and 1.18 std); a pure 2x scale error
is x4."""
BN_PROBE = "batchnorm probe"
"""`keras_mpq.base.model_data` key: the compiled function `batchnorm_check` runs."""


def _batchnorms(model):
  return [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)
          and len(l.get_weights()) >= 2 and int(np.prod(l.moving_mean.shape)) > 0]


def batchnorm_check(model, x: np.ndarray, batch_size: int = 128) -> Dict[str, Any]:
  """How ``x`` fits the running statistics of ``model``'s BatchNorm layers (module docstring).

  ``model`` is the float model with its BatchNorm layers (not folded).
  Returns ``{"layers": {name: {...}}, "summary": {...}}``: per layer the
  median over channels of ``|mean - running mean| / running std``
  (``mean_z``), of the variance ratio folded above 1 (``var_ratio``), the
  share of the implied output range the data reaches (``range_cover``) and
  ``fits``; the first checked layer (nearest the input) also gets
  ``input_scale_fits`` under the closer limits `INPUT_MEAN_Z_LIMIT` and
  `INPUT_VAR_RATIO_LIMIT`, since it alone sees the input's scale; the summary
  counts the layers that fit, names the worst and the first (``first_layer``,
  ``input_scale_fits``), lists
  layers whose statistics are degenerate (zero or negative variance, NaN),
  and says ``passed`` (enough layers fit and the first fits closely). Layers still at their initial statistics (mean 0,
  variance 1: an untrained model) are listed as ``untrained`` and not
  checked. A model without BatchNorm gives ``{"layers": {},
  "summary": {"batchnorm_layers": 0}}``: nothing to check against.

  >>> from keras_mpq.base.compat import keras
  >>> m = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(name="bn")])
  >>> _ = m.get_layer("bn").moving_mean.assign([5.0, 5.0, 5.0])  # trained on N(5, 1)
  >>> x = np.random.default_rng(0).normal(5.0, 1.0, size=(256, 3))
  >>> batchnorm_check(m, x)["summary"]["passed"], batchnorm_check(m, x / 5)["summary"]["passed"]
  (True, False)
  """
  bns = _batchnorms(model)
  if not bns:
    return {"layers": {}, "summary": {"batchnorm_layers": 0}}
  fn = _probe(model, BN_PROBE, [bn.input for bn in bns])
  sums = [0.0] * len(bns)
  squares = [0.0] * len(bns)
  lows = [np.inf] * len(bns)
  highs = [-np.inf] * len(bns)
  count = [0] * len(bns)
  x = _float32(x)
  for s in batching.batch_slices(batching.num_samples(x), batch_size):
    outs = fn(_constant(batching.take(x, s)))
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    for i, o in enumerate(outs):
      o = o.numpy().astype(np.float64)
      o = o.reshape(-1, o.shape[-1])
      sums[i] = sums[i] + o.sum(0)
      squares[i] = squares[i] + (o ** 2).sum(0)
      lows[i] = np.minimum(lows[i], o.min(0))
      highs[i] = np.maximum(highs[i], o.max(0))
      count[i] += o.shape[0]
  layers: Dict[str, Any] = {}
  degenerate, untrained = [], []
  for i, bn in enumerate(bns):
    mu, var = batchnorm_lib.running_statistics(bn)
    gamma = np.asarray(bn.gamma.numpy(), np.float64).ravel() if bn.scale else np.ones_like(mu)
    beta = np.asarray(bn.beta.numpy(), np.float64).ravel() if bn.center else np.zeros_like(mu)
    found = batchnorm_lib.state(bn)
    if found != batchnorm_lib.USABLE:
      (degenerate if found == batchnorm_lib.DEGENERATE else untrained).append(bn.name)
      continue
    eps = float(bn.epsilon)
    n = max(count[i], 1)
    mean = sums[i] / n
    data_var = np.maximum(squares[i] / n - mean ** 2, 0.0)
    live = var > 0
    std = np.sqrt(var + eps)
    mean_z = float(np.median(np.abs(mean - mu)[live] / std[live]))
    ratio = np.abs(np.log((data_var[live] + eps) / (var[live] + eps)))
    var_ratio = float(np.exp(np.median(ratio)))
    a = gamma / std  # output = a * (input - mu) + beta
    ends = np.stack([a * (lows[i] - mu) + beta, a * (highs[i] - mu) + beta])
    reached = float(ends.max() - ends.min())
    implied = float(np.max(beta + IMPLIED_STDS * np.abs(gamma)) -
                    np.min(beta - IMPLIED_STDS * np.abs(gamma)))
    layers[bn.name] = {"mean_z": mean_z, "var_ratio": var_ratio,
                       "range_cover": reached / implied if implied > 0 else None,
                       "fits": bool(mean_z <= MEAN_Z_LIMIT and var_ratio <= VAR_RATIO_LIMIT)}
    if np.any(var <= 0):
      layers[bn.name]["zero_variance_channels"] = int(np.sum(var <= 0))
  summary: Dict[str, Any] = {"batchnorm_layers": len(bns), "degenerate": degenerate,
                             "untrained": untrained}
  if layers:
    first = next(iter(layers))  # model.layers is in graph order: nearest the input
    layers[first]["input_scale_fits"] = bool(
        layers[first]["mean_z"] <= INPUT_MEAN_Z_LIMIT
        and layers[first]["var_ratio"] <= INPUT_VAR_RATIO_LIMIT)
    fit = sum(v["fits"] for v in layers.values())
    worst = max(layers, key=lambda n: (layers[n]["mean_z"] / MEAN_Z_LIMIT +
                                       np.log(layers[n]["var_ratio"]) / np.log(VAR_RATIO_LIMIT)))
    summary.update({"fit": int(fit), "checked": len(layers), "worst_layer": worst,
                    "worst_mean_z": layers[worst]["mean_z"],
                    "worst_var_ratio": layers[worst]["var_ratio"],
                    "first_layer": first, "first_mean_z": layers[first]["mean_z"],
                    "first_var_ratio": layers[first]["var_ratio"],
                    "input_scale_fits": layers[first]["input_scale_fits"],
                    "passed": bool(fit >= FIT_SHARE * len(layers)
                                   and layers[first]["input_scale_fits"])})
  else:
    summary["passed"] = None
  return {"layers": layers, "summary": summary}


def describe_batchnorm_check(summary: Mapping[str, Any]) -> Optional[str]:
  """One line for the run summary, or None when the model has no BatchNorm."""
  if not summary or not summary.get("batchnorm_layers"):
    return None
  bad = summary.get("degenerate") or []
  tail = (f"; degenerate statistics (zero variance or NaN) in {', '.join(bad)}: not checked"
          if bad else "")
  fresh = summary.get("untrained") or []
  if fresh:
    tail += (f"; {len(fresh)} BatchNorm layer(s) still at their initial statistics (an "
             "untrained model?): not checked")
  if summary.get("passed") is None:
    return f"realism check: no usable BatchNorm statistics{tail}"
  head = (f"realism check (BatchNorm statistics, no data needed): {summary['fit']} of "
          f"{summary['checked']} layers fit; worst {summary['worst_layer']!r}: means "
          f"{summary['worst_mean_z']:.2g} std off, variance x{summary['worst_var_ratio']:.2g}")
  if summary["passed"]:
    return head + tail
  if summary.get("input_scale_fits") is False:
    first = summary["first_layer"]
    tail += (f"; the first, {first!r}, which sees the input's scale, does not fit closely "
             f"(means {summary['first_mean_z']:.2g} std off, variance "
             f"x{summary['first_var_ratio']:.2g}; at most {INPUT_MEAN_Z_LIMIT:g} and "
             f"x{INPUT_VAR_RATIO_LIMIT:g}): the inputs may be on another scale than the "
             "model was trained on")
  return (head + tail + ". FAILED: the calibration data does not look like what the model "
          "was trained on, so its activation ranges may not hold for real inputs; pass real "
          "inputs (data=x, --data) or check input_range")
