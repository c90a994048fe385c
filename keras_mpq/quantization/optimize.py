"""Weight error minimization, layer by layer: each layer's integers from its measured inputs.

`optimize_weights` quantizes each layer's kernel with
`keras_mpq.quantization.weights.quantize_kernel` (round to nearest, clipping
search, GPTQ, AdaRound) on the inputs it sees with the layers before it
already quantized, then corrects its bias; `WeightBank` does the same per
(layer, bits) for the sensitivity table.

>>> report = optimize_weights(qmodel, x, "gptq")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from keras_mpq.base import batching, choices, model_data
from keras_mpq.base import layers as layers_lib
from keras_mpq.base.compat import keras, tf
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.progress import Bar
from keras_mpq.base.types import FLOAT_BITS
from keras_mpq.quantization import analytic_bias as analytic_bias_lib
from keras_mpq.quantization import weights as weights_lib
from keras_mpq.quantization.access import (
  act_quant_vars,
  bias_of,
  get_weight_bits_of,
  kernels_of,
  set_activation_quantization,
  set_weight_bits,
  weight_bits_override,
  weight_wrappers,
)

# --------------------------------------------------------------------------- weight optimization

WEIGHT_METHODS = weights_lib.METHODS
# AdaRound on GPTQ's integers at 2-3 bits (GPTQ above): on the MNIST CNNs with
# synthetic data, +0.6 points on average at uniform 3 bits and +1 at 2 bits over GPTQ,
# the same at 4 (benchmarks/results/quantizer.md).
DEFAULT_WEIGHT_METHOD = "adaround"
DEFAULT_BIAS_CORRECTION = True
SEQUENTIAL_PASSES = 16
"""Most passes over the calibration data `optimize_weights` makes: up to this many
weight layers, each layer's inputs are measured after all layers before it are
quantized; above it, layers go in this many groups, each group's inputs measured
in one pass after the groups before it (the cost grows with passes x model size)."""

# With synthetic calibration data (`keras_mpq.quantize` without data). Since the
# labeled generator matches the BatchNorm statistics (weight 100), its inputs serve
# GPTQ as real ones do (benchmarks/results/quantizer.md, issue 13). Bias correction
# comes from the BatchNorm statistics where a layer's input follows one (DFQ's
# analytic form, `keras_mpq.quantization.analytic_bias`; empirical on the synthetic
# data elsewhere, so a model without BatchNorm is corrected as before): the
# statistics are the model's own record of its training inputs' means, which the
# synthetic data only approximates. Measured against the empirical form (BENCHMARKS.md,
# *DFQ bias correction* and the pretrained zoo's 'empirical' rows): even on the
# MNIST CNNs, ahead on MobileNetV2 and one pretrained keyword spotter, behind on the
# other (4-bit agreement 93.7 against 96.7%, both above real-data calibration).
DATA_FREE_WEIGHT_METHOD = DEFAULT_WEIGHT_METHOD
DATA_FREE_BIAS_CORRECTION = "analytic"
WEIGHT_REPORT = "weight report"
"""`keras_mpq.base.model_data` key: the rows `optimize_weights` reported for a model."""


BIAS_CORRECTIONS = (True, False) + choices.values(choices.BiasCorrection)


def check_weight_method(method, bias_correction, data_free: bool = False
                        ) -> Tuple[str, Union[bool, str]]:
  """(method, bias_correction) with None resolved to the defaults (data-free ones if asked).

  ``bias_correction`` comes back as True (empirical), False or 'analytic'.
  """
  if method is None:
    method = DATA_FREE_WEIGHT_METHOD if data_free else DEFAULT_WEIGHT_METHOD
  if method not in WEIGHT_METHODS:
    raise InvalidInputError(
        f"Expected weight_method in {WEIGHT_METHODS}. Received: weight_method={method!r}")
  if bias_correction is None:
    bias_correction = DATA_FREE_BIAS_CORRECTION if data_free else DEFAULT_BIAS_CORRECTION
  if isinstance(bias_correction, str) and bias_correction in BIAS_CORRECTIONS:
    return method, True if bias_correction == "empirical" else "analytic"
  if not isinstance(bias_correction, (bool, np.bool_)):
    raise InvalidInputError(
        f"Expected bias_correction in {BIAS_CORRECTIONS}. Received: {bias_correction!r}")
  return method, bool(bias_correction)


def _stats_kind(wrapper) -> Optional[str]:
  """'matrix' / 'depthwise' for single-kernel layers whose inputs give a Hessian, else None."""
  return weights_lib.stats_kind(wrapper.layer) if len(kernels_of(wrapper)) == 1 else None


def _input_stats(qmodel, wrappers, x, batch_size: int, seed: int = 0):
  """`weight_quant.InputStats` of each wrapper's inputs in ``qmodel`` as it stands; one pass."""
  wrappers = [w for w in wrappers if _stats_kind(w) is not None]
  if not wrappers:
    return {}
  outs = [w.input for w in wrappers]
  probe = keras.Model(qmodel.inputs, outs)
  rng = np.random.default_rng(seed)
  stats: Dict[str, Any] = {}
  for batch in batching.batches(x, batch_size):
    values = probe(tf.nest.map_structure(tf.constant, batch), training=False)
    values = values if isinstance(values, (list, tuple)) else [values]
    for w, v in zip(wrappers, values):
      name = w.layer.name
      stats[name] = weights_lib.accumulate(stats.get(name), w.layer, np.asarray(v), rng=rng)
  return stats


def optimize_weights(qmodel, x, weight_method: Optional[str] = None,
                     bias_correction: Optional[bool] = None, batch_size: int = 64,
                     seed: int = 0, progress: bool = False) -> List[Dict[str, Any]]:
  """Optimizes each quantized kernel (and bias) of ``qmodel`` in place, layer by layer.

  In model order, each layer's inputs come from the model with the layers
  before it already quantized (activations float); models with more than
  `SEQUENTIAL_PASSES` weight layers go in that many groups (one pass each,
  the group's own layers float while it is measured). Its kernel is replaced by
  `weight_quant.quantize_kernel`'s dequantized values at the layer's bits
  (so the max-abs fake quantizer reproduces those integers exactly) and its
  bias by the empirical bias correction. Layers planned float are left
  alone. Returns one row per layer (also kept for `weight_report`).

  With 'mse' or 'gptq' the kernels then hold the optimized values, so
  changing a layer's bits afterwards re-quantizes those (re-run `apply_plan`
  for a different plan); with 'rtn' the float kernels stay.

  >>> rows = optimize_weights(qmodel, x[:256], "gptq")  # doctest: +SKIP
  >>> rows[0]["method"]  # doctest: +SKIP
  'gptq'
  """
  method, correct = check_weight_method(weight_method, bias_correction)
  wrappers = weight_wrappers(qmodel)
  bits_now = {w.layer.name: get_weight_bits_of(w) for w in wrappers}
  todo = [w for w in wrappers if bits_now[w.layer.name] != FLOAT_BITS]
  rows: List[Dict[str, Any]] = []
  if not todo:
    model_data.put(qmodel, WEIGHT_REPORT, rows)
    return rows
  needs_data = method != "rtn" or correct
  acts = [v["on"].numpy() for _, v in act_quant_vars(qmodel)]
  set_activation_quantization(qmodel, False)
  bar = Bar(len(todo), f"weights ({method})", bool(progress), unit="layer")
  try:
    float_means = {}
    if correct:
      with weight_bits_override(qmodel, {w.layer.name: FLOAT_BITS for w in todo}):
        float_means = {k: s.mean for k, s in _input_stats(qmodel, todo, x, batch_size,
                                                          seed).items()}
    chunk = -(-len(todo) // max(int(SEQUENTIAL_PASSES), 1))
    pending: Dict[str, Any] = {}
    for index, w in enumerate(todo):
      name = w.layer.name
      bits = bits_now[name]
      kind = _stats_kind(w)
      if needs_data and index % chunk == 0:
        # One pass measures the inputs of the next ``chunk`` layers, with every
        # layer before them already quantized (chunk is 1 up to SEQUENTIAL_PASSES
        # layers) and the chunk itself float: a layer's bias correction must not
        # also undo the error of a chunk-mate that corrects itself (measured with
        # the chunk quantized, bias correction cost MobileNetV2 points).
        group = todo[index:index + chunk]
        with weight_bits_override(qmodel, {g.layer.name: FLOAT_BITS for g in group}):
          pending = _input_stats(qmodel, group, x, batch_size, seed)
      stats = pending.get(name) if needs_data and kind is not None else None
      row: Dict[str, Any] = {"layer": name, "bits": bits, "requested": method,
                             "bias_corrected": False, "notes": []}
      originals = []
      for var, axes in kernels_of(w):
        kernel = var.numpy()
        originals.append((kernel, axes))
        result = weights_lib.quantize_kernel(
            kernel, bits, axes, method, stats if method != "rtn" else None)
        if method != "rtn":  # round to nearest is what the fake quantizer does already
          var.assign(result.values)
        row.setdefault("method", result.method)
        row["measure"] = result.measure
        row["error"] = row.get("error", 0.0) + result.error
        row["rtn_error"] = row.get("rtn_error", 0.0) + result.rtn_error
        row["channels"] = result.channels
        row["notes"].extend(result.notes)
      if kind is None and method != "rtn":
        row["notes"].append(f"{type(w.layer).__name__}: weight error only (no input Hessian)")
      bias = bias_of(w)
      analytic = (analytic_bias_lib.column_means(qmodel, w.layer) if correct == "analytic"
                  and bias is not None else None)
      means = None  # (E[x] of the float model's inputs, of the quantized model's)
      if analytic is not None:  # DFQ: float inputs on both sides, from the BN statistics
        means, how = (analytic, None), "analytic"
      elif correct and stats is not None and bias is not None and name in float_means:
        means, how = (float_means[name], stats.mean), "empirical"
      if means is not None:
        kernel, axes = originals[0]
        quantized = layers_lib.quantize_array(kernels_of(w)[0][0].numpy(), bits, axes)[0]
        delta, note = weights_lib.bias_correction(kernel, quantized, axes, *means, kind)
        if note:
          row["notes"].append(note)
        else:
          bias.assign(bias.numpy() + delta.reshape(bias.shape))
          row["bias_corrected"] = True
          row["bias_correction"] = how
      elif correct and bias is None:
        row["notes"].append("no bias to correct")
      rows.append(row)
      bar.update(1)
  finally:
    bar.close()
    for (_, v), on in zip(act_quant_vars(qmodel), acts):
      v["on"].assign(on)
  model_data.put(qmodel, WEIGHT_REPORT, rows)
  return rows


def weight_report(qmodel) -> List[Dict[str, Any]]:
  """The rows `optimize_weights` produced for ``qmodel`` (empty when it never ran)."""
  return list(model_data.get(qmodel, WEIGHT_REPORT, []))


class WeightBank:
  """Optimized kernels and biases per (layer, bits), swapped into a model's variables.

  Built once on a quantized model whose kernels are still the float ones: the
  inputs of every layer are measured with all layers float, and each
  (layer, bits) is quantized with `weight_quant.quantize_kernel` (and bias
  corrected) the first time it is asked for. `set_weight_bits` writes the
  bits variable and the matching kernel and bias: variable assignments, no
  retracing. FLOAT_BITS restores the float values.

  >>> bank = WeightBank(qmodel, x, "gptq")  # doctest: +SKIP
  >>> bank.set_weight_bits({"conv2": 3})  # doctest: +SKIP
  """

  def __init__(self, qmodel, x, weight_method: Optional[str] = None,
               bias_correction: Optional[bool] = None, batch_size: int = 64, seed: int = 0):
    self.method, self.correct = check_weight_method(weight_method, bias_correction)
    self.qmodel = qmodel
    self.wrappers = {w.layer.name: w for w in weight_wrappers(qmodel)}
    self.originals = {name: ([v.numpy() for v, _ in kernels_of(w)],
                             None if bias_of(w) is None else bias_of(w).numpy())
                      for name, w in self.wrappers.items()}
    self.stats = {}
    if self.method != "rtn" or self.correct:
      acts = [v["on"].numpy() for _, v in act_quant_vars(qmodel)]
      set_activation_quantization(qmodel, False)
      try:
        with weight_bits_override(qmodel, {n: FLOAT_BITS for n in self.wrappers}):
          self.stats = _input_stats(qmodel, list(self.wrappers.values()), x, batch_size, seed)
      finally:
        for (_, v), on in zip(act_quant_vars(qmodel), acts):
          v["on"].assign(on)
    self._cache: Dict[Tuple[str, int], Tuple[List[np.ndarray], Optional[np.ndarray]]] = {}

  def values(self, name: str, bits: int):
    """(kernels, bias) of ``name`` at ``bits`` (computed once, then cached)."""
    if bits == FLOAT_BITS:
      return self.originals[name]
    key = (name, int(bits))
    if key not in self._cache:
      wrapper = self.wrappers[name]
      kernels0, bias0 = self.originals[name]
      stats = self.stats.get(name)
      kernels = []
      for k0, (_, axes) in zip(kernels0, kernels_of(wrapper)):
        r = weights_lib.quantize_kernel(k0, bits, axes, self.method,
                                         stats if self.method != "rtn" else None)
        kernels.append(r.values)
      bias = bias0
      analytic = (analytic_bias_lib.column_means(self.qmodel, wrapper.layer)
                  if self.correct == "analytic" and bias0 is not None else None)
      mean = analytic if analytic is not None else (stats.mean if stats is not None else None)
      if self.correct and mean is not None and bias0 is not None:
        delta, note = weights_lib.bias_correction(
            kernels0[0], kernels[0], kernels_of(wrapper)[0][1], mean, None,
            weights_lib.stats_kind(wrapper.layer))
        if note is None:
          bias = bias0 + delta.reshape(bias0.shape)
      self._cache[key] = (kernels, bias)
    return self._cache[key]

  def set_weight_bits(self, bits: Mapping[str, int]) -> None:
    """`set_weight_bits` plus the matching optimized kernel and bias of each layer."""
    set_weight_bits(self.qmodel, bits)
    for name, b in bits.items():
      if name not in self.wrappers:
        continue
      kernels, bias = self.values(name, int(b))
      wrapper = self.wrappers[name]
      for (var, _), value in zip(kernels_of(wrapper), kernels):
        var.assign(value)
      if bias is not None:
        bias_of(wrapper).assign(bias)
