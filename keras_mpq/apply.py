"""Applies a `QuantizationPlan` to a tf_keras model through tfmot, calibrated and ready to use.

The line is: fold BatchNorm into the layer before it (exact, as TFLite does),
annotate every layer with its keras_mpq `QuantizeConfig`, `quantize_apply` with
`MixedPrecisionScheme`, then calibrate activation ranges on data. The result's
accuracy right after `apply_plan` is the post-training accuracy: no model is
ever returned with the default [-6, 6] ranges.

Example:

>>> import keras_mpq
>>> plan = keras_mpq.QuantizationPlan({"conv1": 8, "conv2": 4, "conv3": 4,
...                                     "fc1": 4, "logits": 8})
>>> qmodel = keras_mpq.apply_plan(model, plan, calibration_data=x)  # doctest: +SKIP
>>> qmodel.evaluate(x_test, y_test)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from keras_mpq import act_ranges, analytic_bias, model_io, quantizers, weight_quant
from keras_mpq.compat import keras, tf, tfmot
from keras_mpq.types import (FLOAT_BITS, InvalidInputError, QuantizationPlan,
                             UnsupportedModelError, check_weight_bits)

_QuantizeWrapper = tfmot.quantization.keras.QuantizeWrapper
_QuantizeLayer = quantizers.TfmotQuantizeLayer  # tfmot 0.8 does not export it publicly

INPUT_QUANTIZER = "input_quantizer"
"""Name of the layer that quantizes the model input, as the .tflite file does:
the Keras model then sees exactly the input values the exported file sees (an
input range that is too narrow shows in ``result.model.evaluate``)."""
_QuantizeAnnotate = tfmot.quantization.keras.QuantizeAnnotate if hasattr(
    tfmot.quantization.keras, "QuantizeAnnotate") else None


# --------------------------------------------------------------------------- graph rebuild


def _model_nodes(model, layer):
  """The inbound nodes of ``layer`` that belong to ``model``'s graph."""
  keys = getattr(model, "_network_nodes", None)
  nodes = []
  for i, node in enumerate(layer._inbound_nodes):  # pylint: disable=protected-access
    if keys is None or f"{layer.name}_ib-{i}" in keys:
      nodes.append(node)
  return nodes


def _graph_layers(model):
  """Checks the model is a flat Sequential/functional graph; returns its layers."""
  model_io.check_graph_model(model)
  return model.layers


def rebuild(model, transform: Callable, name: Optional[str] = None,
            input_hook: Optional[Callable] = None):
  """Rebuilds a flat functional/Sequential graph layer by layer.

  ``transform(layer)`` returns ``(new_layer, weights)`` to call ``new_layer``
  and set ``weights`` (a list, a callable taking the built new layer and
  returning the list, or None to keep its fresh weights), or ``(None, None)``
  to drop the layer and pass its single input through. ``input_hook(t)``, if
  given, maps each new input tensor to what the input's consumers read.
  """
  _graph_layers(model)
  tensor_map: Dict[int, object] = {}
  new_inputs = []
  for t in model.inputs:
    new_t = keras.Input(batch_shape=t.shape, dtype=t.dtype,
                        name=t.name.split(":")[0].split("/")[0])
    tensor_map[id(t)] = input_hook(new_t) if input_hook is not None else new_t
    new_inputs.append(new_t)

  def mapped(x):
    if id(x) in tensor_map:
      return tensor_map[id(x)]
    if hasattr(x, "_keras_history"):
      raise UnsupportedModelError(
          f"Tensor {getattr(x, 'name', x)!r} is used in model {model.name!r} but not "
          "produced inside it. Expected a self-contained functional model.")
    return x

  pending = []
  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    nodes = _model_nodes(model, layer)
    if len(nodes) != 1:
      raise UnsupportedModelError(
          f"Layer {layer.name!r} is called {len(nodes)} times in the model. "
          "Expected each layer to be used once (shared layers are not supported).")
    node = nodes[0]
    args = tf.nest.map_structure(mapped, node.call_args)
    kwargs = tf.nest.map_structure(mapped, node.call_kwargs)
    new_layer, weights = transform(layer)
    if new_layer is None:
      (inp,) = tf.nest.flatten(args)
      out = inp
    else:
      out = new_layer(*args, **kwargs)
      if weights is not None:
        pending.append((new_layer, weights))
    for old_t, new_t in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(out)):
      tensor_map[id(old_t)] = new_t
  outputs = tf.nest.map_structure(lambda t: tensor_map[id(t)], model.outputs)
  if len(outputs) == 1:
    outputs = outputs[0]
  new_model = keras.Model(new_inputs, outputs, name=name or model.name)
  for layer, weights in pending:
    layer.set_weights(weights(layer) if callable(weights) else weights)
  return new_model


def layer_output(model, layer):
  """``layer``'s output tensor in ``model``'s graph (a layer may also live in others).

  tfmot keeps the input ``QuantizeLayer`` instance of the model it
  transformed when the input has several consumers, so ``layer.output``
  would name that other graph's tensor.
  """
  nodes = _model_nodes(model, layer)
  return nodes[0].outputs if len(nodes) == 1 else layer.output


def _clone_layer(layer):
  return layer.__class__.from_config(layer.get_config())


def _consumers(model, layer) -> List:
  """Layers of ``model`` that take ``layer``'s output."""
  out = []
  for node in layer._outbound_nodes:  # pylint: disable=protected-access
    consumer = node.outbound_layer
    if consumer in model.layers:
      out.append(consumer)
  return out


# --------------------------------------------------------------------------- BatchNorm folding

_FOLD_AXIS = {  # kernel axis (or axes reshape) of the output channel, per layer type
    keras.layers.Dense: "last", keras.layers.Conv1D: "last", keras.layers.Conv2D: "last",
    keras.layers.DepthwiseConv2D: "depthwise", keras.layers.SeparableConv2D: "pointwise",
    keras.layers.SeparableConv1D: "pointwise", keras.layers.Conv2DTranspose: "transpose",
}


def _bn_stats(bn):
  """``(mean, var, gamma, beta)`` of a BatchNormalization (gamma 1, beta 0 when absent)."""
  weights = {w.name.split("/")[-1].split(":")[0]: w.numpy() for w in bn.weights}
  mean, var = weights["moving_mean"], weights["moving_variance"]
  return (mean, var, weights.get("gamma", np.ones_like(mean)),
          weights.get("beta", np.zeros_like(mean)))


def _bn_factors(bn):
  mean, var, gamma, beta = _bn_stats(bn)
  factor = gamma / np.sqrt(var + bn.epsilon)
  return factor, beta - mean * factor


def _on_last_axis(bn) -> bool:
  axis = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
  rank = len(bn.input_shape)
  return len(axis) == 1 and axis[0] % rank == rank - 1


def _batchnorm_priors(model, fold_into) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """``(beta, |gamma|)`` of each last-axis BatchNorm, under the name of the layer whose
  output it describes after folding (its producer, or itself where it stays)."""
  producer_of = {bn.name: producer for producer, bn in fold_into.items()}
  priors = {}
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization) and _on_last_axis(layer):
      _, _, gamma, beta = _bn_stats(layer)
      priors[producer_of.get(layer.name, layer.name)] = (
          beta.astype(np.float64), np.abs(gamma).astype(np.float64))
  return priors


def _foldable(model, layer) -> bool:
  """A BatchNorm on the last axis whose only input is a linear weight layer used only by it."""
  if not isinstance(layer, keras.layers.BatchNormalization) or not _on_last_axis(layer):
    return False
  nodes = _model_nodes(model, layer)
  if len(nodes) != 1:
    return False
  inbound = tf.nest.flatten(nodes[0].inbound_layers)
  if len(inbound) != 1 or type(inbound[0]) not in _FOLD_AXIS:
    return False
  producer = inbound[0]
  if getattr(producer, "activation", None) not in (None, keras.activations.linear):
    return False
  return len(_consumers(model, producer)) == 1


def fold_batchnorm(model):
  """Folds each BatchNormalization into the weight layer before it (exactly).

  ``W' = W * gamma / sqrt(var + eps)`` per output channel and
  ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``; the folded layer keeps
  its name and gains a bias. A BatchNorm that cannot be folded stays (and is
  quantized at its output). Returns a new model; ``model`` is unchanged. The
  BatchNorm statistics stay known to ``bias_correction="analytic"``
  (`keras_mpq.analytic_bias`).

  Example:

  >>> folded = fold_batchnorm(model)  # doctest: +SKIP
  >>> np.allclose(folded.predict(x), model.predict(x), atol=1e-4)  # doctest: +SKIP
  True
  """
  _graph_layers(model)
  fold_into = {}
  for layer in model.layers:
    if _foldable(model, layer):
      producer = tf.nest.flatten(_model_nodes(model, layer)[0].inbound_layers)[0]
      fold_into[producer.name] = layer
  folded_bns = {bn.name for bn in fold_into.values()}

  def transform(layer):
    if layer.name in folded_bns:
      return None, None
    if layer.name not in fold_into:
      return _clone_layer(layer), layer.get_weights()
    factor, shift = _bn_factors(fold_into[layer.name])
    config = layer.get_config()
    config["use_bias"] = True
    new_layer = layer.__class__.from_config(config)
    kind = _FOLD_AXIS[type(layer)]
    old = layer.get_weights()
    bias = old[-1] if layer.use_bias else np.zeros_like(factor)
    if kind == "last":
      weights = [old[0] * factor]
    elif kind == "transpose":
      weights = [old[0] * factor[None, None, :, None]]
    elif kind == "depthwise":
      k = old[0]
      weights = [k * factor.reshape(k.shape[-2], k.shape[-1])]
    else:  # pointwise of a separable conv
      weights = [old[0], old[1] * factor]
    return new_layer, weights + [bias * factor + shift]

  folded = rebuild(model, transform)
  analytic_bias.remember(folded, _batchnorm_priors(model, fold_into), model)
  return folded


# --------------------------------------------------------------------------- annotate and apply


def _fused_producers(model) -> set:
  """Names of layers whose output TFLite fuses with the ReLU/ReLU6 right after them."""
  names = set()
  for layer in model.layers:
    if quantizers.is_fusable_activation(layer):
      inbound = tf.nest.flatten(_model_nodes(model, layer)[0].inbound_layers)
      if len(inbound) == 1 and len(_consumers(model, inbound[0])) == 1:
        if quantizers.layer_role(inbound[0]) in ("weights", "output"):
          names.add(inbound[0].name)
  return names


def plan_layers(model) -> List[str]:
  """Names of the layers a plan must give bits to (the quantizable weight layers)."""
  return [layer.name for layer in quantizers.quantizable_layers(model)]


def check_plan(model, plan: QuantizationPlan) -> None:
  """Raises if the plan names unknown layers or misses quantizable ones."""
  wanted = set(plan_layers(model))
  given = set(plan.weight_bits)
  unknown = sorted(given - wanted)
  if unknown:
    raise InvalidInputError(
        f"The plan names layers that are not quantizable weight layers of model "
        f"{model.name!r}: {unknown}. Quantizable layers: {sorted(wanted)}")
  missing = sorted(wanted - given)
  if missing:
    raise InvalidInputError(
        f"The plan gives no bits to layers {missing}. Give every quantizable layer "
        f"bits (use {FLOAT_BITS} to keep one float).")


def quantize_model(model, plan: QuantizationPlan):
  """Wraps ``model`` (BatchNorm already folded) with tfmot per ``plan``; not calibrated.

  Most users want `apply_plan`, which folds and calibrates too.
  """
  check_plan(model, plan)
  fused = _fused_producers(model)
  input_bits = plan.default_activation_bits

  def add_input_quantizer(unwrapped):
    if len(unwrapped.inputs) != 1:  # multi-input models are refused at calibration
      return unwrapped
    return rebuild(
        unwrapped, lambda layer: (_clone_layer(layer), layer.get_weights()),
        input_hook=lambda t: _QuantizeLayer(
            quantizers.ActivationQuantizer(input_bits), name=INPUT_QUANTIZER)(t))

  def annotate(layer):
    config = quantizers.config_for_layer(
        layer, plan.weight_bits.get(layer.name), plan.act_bits(layer.name),
        quantize_output=layer.name not in fused)
    if config is None:
      return layer
    return tfmot.quantization.keras.quantize_annotate_layer(layer, config)

  with quantizers.quantize_scope():
    annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    qmodel = tfmot.quantization.keras.quantize_apply(
        annotated, scheme=quantizers.MixedPrecisionScheme(add_input_quantizer))
  analytic_bias.carry(model, qmodel)
  return qmodel


def _act_quant_vars(qmodel) -> List[Tuple[object, Dict[str, tf.Variable]]]:
  """(layer, {'min','max','on'}) for every activation quantizer in ``qmodel``.

  The input quantizer (a tfmot ``QuantizeLayer``) comes first.
  """
  found = []
  for layer in qmodel.layers:
    if isinstance(layer, _QuantizeLayer) and isinstance(
        layer.quantizer, quantizers.ActivationQuantizer):
      found.append((layer, layer.quantizer_vars))
    elif isinstance(layer, _QuantizeWrapper):
      outq = getattr(layer, "_output_quantizers", None)
      if outq and isinstance(outq[0], quantizers.ActivationQuantizer):
        found.append((layer, layer._output_quantizer_vars))  # pylint: disable=protected-access
  return found


def _activation_bits(layer) -> int:
  """Bits of the activation quantizer of ``layer`` (a QuantizeLayer or wrapper)."""
  if isinstance(layer, _QuantizeLayer):
    return layer.quantizer.num_bits
  return layer._output_quantizers[0].num_bits  # pylint: disable=protected-access


def set_activation_quantization(qmodel, enabled: bool) -> None:
  """Switches every activation quantizer on or off (no retracing)."""
  for _, v in _act_quant_vars(qmodel):
    v["on"].assign(1.0 if enabled else 0.0)


def set_range_tracking(qmodel, enabled: bool) -> None:
  """Lets training move activation ranges (EMA) or freezes them; no retracing.

  Calibrated ranges are followed by an exponential moving average while the
  quantized model trains; ``enabled=False`` freezes them where they are.

  >>> set_range_tracking(qmodel, False)  # doctest: +SKIP
  """
  for _, v in _act_quant_vars(qmodel):
    if "ema" in v:
      v["ema"].assign(1.0 if enabled else 0.0)


def activation_ranges(qmodel) -> Dict[str, Tuple[float, float]]:
  """The current (min, max) of each activation quantizer, by inner layer name.

  >>> activation_ranges(qmodel)["conv1"]  # doctest: +SKIP
  (-1.93, 2.71)
  """
  return {quantized_name(layer): (float(v["min"].numpy()), float(v["max"].numpy()))
          for layer, v in _act_quant_vars(qmodel)}


def quantized_name(layer) -> str:
  """The Keras layer a quantized layer stands for (the wrapped layer's name)."""
  inner = getattr(layer, "layer", None)
  return inner.name if inner is not None else layer.name


def _as_batches(x, batch_size):
  x = np.asarray(x)
  for start in range(0, len(x), batch_size):
    yield x[start:start + batch_size]


def check_data(model, x, what: str = "data") -> np.ndarray:
  """Checks ``x`` is a non-empty float array matching the model's input shape."""
  if len(model.inputs) != 1:
    raise UnsupportedModelError(
        f"Expected a model with one input. Received: model {model.name!r} with "
        f"{len(model.inputs)} inputs; multi-input models are not supported yet.")
  try:
    x = np.asarray(x, dtype=np.float32)
  except (TypeError, ValueError) as e:
    raise InvalidInputError(f"Expected {what} as a numeric array. Received: {e}") from None
  expected = tuple(model.inputs[0].shape[1:])
  if x.ndim != len(expected) + 1 or any(
      e is not None and e != s for e, s in zip(expected, x.shape[1:])):
    raise InvalidInputError(
        f"Expected {what} of shape (N, {', '.join(str(e) for e in expected)}) for "
        f"model {model.name!r}. Received: shape {x.shape}")
  if len(x) == 0:
    raise InvalidInputError(f"Expected at least one sample in {what}. Received: 0")
  if not np.all(np.isfinite(x)):
    raise InvalidInputError(f"{what} contains NaN or Inf values.")
  return x


# One traced range probe per (quantized model, keep_values): tracing a large model
# takes seconds (EfficientNetB0 at 96x96: ~8 s), and the sensitivity search
# calibrates the same model once per measured plan.
_RANGE_PROBES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _range_probe(qmodel, pairs, keep_values: bool):
  """A ``tf.function`` batch -> (mins, maxs, outputs) of the quantizers' inputs, cached."""
  probes = _RANGE_PROBES.setdefault(qmodel, {})
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
  (`keras_mpq.act_ranges.MAX_VALUES` in all) when ``keep_values``.
  """
  pairs = _act_quant_vars(qmodel)
  if not pairs:
    return [], np.zeros(0), np.zeros(0), []
  set_activation_quantization(qmodel, False)
  ranges = _range_probe(qmodel, pairs, keep_values)
  lo = np.full(len(pairs), np.inf)
  hi = np.full(len(pairs), -np.inf)
  batches = list(_as_batches(x, batch_size))
  per_batch = act_ranges.MAX_VALUES // max(len(batches), 1)
  values = [[] for _ in pairs]
  # Each calibrated model gets its own function, so TF's "retracing in a loop"
  # warning fires across apply_plan calls although no function retraces.
  tf_logger, level = tf.get_logger(), tf.get_logger().level
  tf_logger.setLevel("ERROR")
  try:
    for i, batch in enumerate(batches):
      mins, maxs, outs = ranges(tf.constant(batch))
      lo = np.minimum(lo, np.array([m.numpy() for m in mins]))
      hi = np.maximum(hi, np.array([m.numpy() for m in maxs]))
      for j, o in enumerate(outs):
        values[j].append(act_ranges.sample_values(o.numpy(), per_batch, seed=i))
  finally:
    tf_logger.setLevel(level)
    set_activation_quantization(qmodel, True)
  return pairs, lo, hi, values


def observed_ranges(qmodel, x, batch_size: int = 64) -> Dict[str, Tuple[float, float]]:
  """The min/max each activation quantizer sees on ``x`` (its `calibrate` subset), by layer (nothing set).

  >>> observed_ranges(qmodel, x)["conv1"]  # doctest: +SKIP
  (0.0, 5.91)
  """
  x = act_ranges.range_subset(check_data(qmodel, x, "data"))
  pairs, lo, hi, _ = _measure(qmodel, x, batch_size, keep_values=False)
  return {quantized_name(layer): (float(a), float(b)) for (layer, _), a, b in zip(pairs, lo, hi)}


def calibrate(qmodel, x, batch_size: int = 64,
              range_policy: Optional[str] = None) -> Dict[str, Tuple[float, float]]:
  """Sets every activation range from ``x`` under ``range_policy``; returns them.

  Ranges are measured with the weights quantized as planned and activations
  float (each quantizer switched off while measuring, then back on), on at
  most `keras_mpq.act_ranges.MAX_RANGE_SAMPLES` of ``x`` (the subset the
  exported file's calibration takes too). The
  policy (`keras_mpq.act_ranges`; None: its current default, min/max unless
  changed) applies to every layer output; the model input keeps its min/max,
  as the .tflite's input does.
  """
  policy = act_ranges.check_range_policy(range_policy)
  x = act_ranges.range_subset(check_data(qmodel, x, "calibration data"))
  pairs, lo, hi, values = _measure(qmodel, x, batch_size, keep_values=policy != "minmax")
  result = {}
  for j, ((layer, v), a, b) in enumerate(zip(pairs, lo, hi)):
    if policy != "minmax" and layer.name != INPUT_QUANTIZER:
      chosen = act_ranges.choose_range(
          np.concatenate(values[j]),
          _activation_bits(layer), policy)
      a, b = chosen.low, chosen.high
    v["min"].assign(float(a))
    v["max"].assign(float(b))
    result[quantized_name(layer)] = (float(a), float(b))
  return result


def apply_plan(model, plan: QuantizationPlan, calibration_data, fold_bn: bool = True,
               batch_size: int = 64, weight_method: Optional[str] = None,
               bias_correction: Optional[bool] = None, range_policy: Optional[str] = None,
               progress: bool = False, tune_steps: Optional[int] = None,
               tune_temperature: float = 1.0, seed: int = 0):
  """Quantizes ``model`` per ``plan`` with tfmot and calibrates its activation ranges.

  Args:
    model: a tf_keras Sequential or functional model.
    plan: bits per quantizable layer (names of ``model``'s layers).
    calibration_data: inputs ``x`` (N, ...) used to set activation ranges and,
      layer by layer, to optimize the weights (`optimize_weights`).
    fold_bn: fold BatchNorm into the preceding layers first (as TFLite does).
    batch_size: calibration batch size.
    weight_method: 'rtn' (round to nearest on the max-abs grid), 'mse'
      (per-channel clipping search), 'gptq' (clipping, then GPTQ rounding) or
      'adaround' (GPTQ's integers refined by AdaRound at 2-3 bits);
      default `DEFAULT_WEIGHT_METHOD`.
    bias_correction: correct each layer's mean output shift: True (or
      'empirical') on the calibration data, with each layer's inputs from the
      layers before it already quantized; 'analytic': from the BatchNorm
      statistics where the layer's input follows a BatchNorm (DFQ,
      `keras_mpq.analytic_bias`), empirically elsewhere; False: none
      (default `DEFAULT_BIAS_CORRECTION`).
    range_policy: activation ranges: 'minmax', 'percentile' or 'mse'
      (`keras_mpq.act_ranges`; default its `DEFAULT_RANGE_POLICY`).
    progress: a progress bar over the layers' weight optimization.
    tune_steps: steps of `keras_mpq.distill.tune` after calibration (each
      layer's per-channel scales and bias tuned so the model's outputs match
      the float model's; the integers stay): None for its default for the
      model's size, 0 for none. `keras_mpq.distill.tune_report` says what it did.
    tune_temperature: the tuning loss's temperature (`keras_mpq.distill.tune`).
    seed: the tuning's held-out split and batch order.

  Returns:
    A tf_keras model of tfmot ``QuantizeWrapperV2`` layers, compiled-ready:
    usable with ``evaluate``, ``fit`` (quantization-aware fine-tuning) and
    `keras_mpq.export_tflite`.

  Example:

  >>> plan = QuantizationPlan.uniform(plan_layers(model), 4)  # doctest: +SKIP
  >>> qmodel = apply_plan(model, plan, x[:256])  # doctest: +SKIP
  """
  if not isinstance(plan, QuantizationPlan):
    raise InvalidInputError(
        f"Expected a keras_mpq.QuantizationPlan. Received: {type(plan).__name__}")
  base = fold_batchnorm(model) if fold_bn else model
  qmodel = quantize_model(base, plan)
  x = check_data(qmodel, calibration_data, "calibration data")
  optimize_weights(qmodel, x, weight_method, bias_correction, batch_size=batch_size,
                   progress=progress)
  calibrate(qmodel, x, batch_size=batch_size, range_policy=range_policy)
  if tune_steps != 0:
    from keras_mpq import distill  # pylint: disable=g-import-not-at-top
    tuned = distill.tune(qmodel, base, x, steps=tune_steps, seed=seed,
                         temperature=tune_temperature, progress=progress)
    if tuned["kept"]:  # the ranges the file's calibration will find for the tuned weights
      calibrate(qmodel, x, batch_size=batch_size, range_policy=range_policy)
  return qmodel


# --------------------------------------------------------------------------- weight optimization

WEIGHT_METHODS = weight_quant.METHODS
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
# GPTQ and bias correction as real ones do, and the data-free default is the same
# quantizer (benchmarks/results/quantizer.md, issue 13); with the first generator's
# inputs they misled both, and damped GPTQ without bias correction was the default.
DATA_FREE_WEIGHT_METHOD = DEFAULT_WEIGHT_METHOD
DATA_FREE_BIAS_CORRECTION = DEFAULT_BIAS_CORRECTION
_WEIGHT_REPORTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


BIAS_CORRECTIONS = (True, False, "empirical", "analytic")


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


@contextlib.contextmanager
def weight_defaults(weight_method: Optional[str] = None,
                    bias_correction: Optional[bool] = None) -> Iterator[None]:
  """Temporarily changes `DEFAULT_WEIGHT_METHOD` / `DEFAULT_BIAS_CORRECTION` (None keeps one).

  What the sensitivity table's `WeightBank` and `apply_plan` use when not told.

  >>> with weight_defaults("rtn", False):  # doctest: +SKIP
  ...   table = keras_mpq.measure_sensitivity(model, (x, y))
  """
  global DEFAULT_WEIGHT_METHOD, DEFAULT_BIAS_CORRECTION  # pylint: disable=global-statement
  method, correct = check_weight_method(weight_method, bias_correction)
  saved = DEFAULT_WEIGHT_METHOD, DEFAULT_BIAS_CORRECTION
  DEFAULT_WEIGHT_METHOD, DEFAULT_BIAS_CORRECTION = method, correct
  try:
    yield
  finally:
    DEFAULT_WEIGHT_METHOD, DEFAULT_BIAS_CORRECTION = saved


def _weight_wrappers(qmodel) -> List:
  return [l for l in qmodel.layers if isinstance(l, _QuantizeWrapper)
          and isinstance(l.quantize_config, quantizers.MixedPrecisionConfig)]


def _kernels_of(wrapper) -> List[Tuple[tf.Variable, Tuple[int, ...]]]:
  return [(var, q.reduce_axes) for var, q, _ in wrapper._weight_vars  # pylint: disable=protected-access
          if isinstance(q, quantizers.WeightQuantizer)]


def _bias_of(wrapper) -> Optional[tf.Variable]:
  inner = wrapper.layer
  return inner.bias if getattr(inner, "use_bias", False) and inner.bias is not None else None


def _stats_kind(wrapper) -> Optional[str]:
  """'matrix' / 'depthwise' for single-kernel layers whose inputs give a Hessian, else None."""
  return weight_quant.stats_kind(wrapper.layer) if len(_kernels_of(wrapper)) == 1 else None


def _input_stats(qmodel, wrappers, x, batch_size: int, seed: int = 0):
  """`weight_quant.InputStats` of each wrapper's inputs in ``qmodel`` as it stands; one pass."""
  wrappers = [w for w in wrappers if _stats_kind(w) is not None]
  if not wrappers:
    return {}
  outs = [w.input for w in wrappers]
  probe = keras.Model(qmodel.inputs, outs)
  rng = np.random.default_rng(seed)
  stats: Dict[str, Any] = {}
  for batch in _as_batches(x, batch_size):
    values = probe(tf.constant(batch), training=False)
    values = values if isinstance(values, (list, tuple)) else [values]
    for w, v in zip(wrappers, values):
      name = w.layer.name
      stats[name] = weight_quant.accumulate(stats.get(name), w.layer, np.asarray(v), rng=rng)
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
  wrappers = _weight_wrappers(qmodel)
  bits_now = {w.layer.name: get_weight_bits_of(w) for w in wrappers}
  todo = [w for w in wrappers if bits_now[w.layer.name] != FLOAT_BITS]
  rows: List[Dict[str, Any]] = []
  if not todo:
    _WEIGHT_REPORTS[qmodel] = rows
    return rows
  needs_data = method != "rtn" or correct
  acts = [v["on"].numpy() for _, v in _act_quant_vars(qmodel)]
  set_activation_quantization(qmodel, False)
  bar = None
  if progress:
    from tqdm import auto as tqdm_auto  # pylint: disable=g-import-not-at-top
    bar = tqdm_auto.tqdm(total=len(todo), desc=f"weights ({method})", unit="layer",
                         leave=False)
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
      for var, axes in _kernels_of(w):
        kernel = var.numpy()
        originals.append((kernel, axes))
        result = weight_quant.quantize_kernel(
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
      bias = _bias_of(w)
      analytic = (analytic_bias.column_means(qmodel, w.layer) if correct == "analytic"
                  and bias is not None else None)
      means = None  # (E[x] of the float model's inputs, of the quantized model's)
      if analytic is not None:  # DFQ: float inputs on both sides, from the BN statistics
        means, how = (analytic, None), "analytic"
      elif correct and stats is not None and bias is not None and name in float_means:
        means, how = (float_means[name], stats.mean), "empirical"
      if means is not None:
        kernel, axes = originals[0]
        quantized = quantizers.quantize_array(_kernels_of(w)[0][0].numpy(), bits, axes)[0]
        delta, note = weight_quant.bias_correction(kernel, quantized, axes, *means, kind)
        if note:
          row["notes"].append(note)
        else:
          bias.assign(bias.numpy() + delta.reshape(bias.shape))
          row["bias_corrected"] = True
          row["bias_correction"] = how
      elif correct and bias is None:
        row["notes"].append("no bias to correct")
      rows.append(row)
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
    for (_, v), on in zip(_act_quant_vars(qmodel), acts):
      v["on"].assign(on)
  _WEIGHT_REPORTS[qmodel] = rows
  return rows


def weight_report(qmodel) -> List[Dict[str, Any]]:
  """The rows `optimize_weights` produced for ``qmodel`` (empty when it never ran)."""
  return list(_WEIGHT_REPORTS.get(qmodel, []))


def weight_integers(qmodel) -> Dict[str, Dict[str, np.ndarray]]:
  """The integers each quantized kernel of ``qmodel`` holds now: ``{layer: {attr: ints}}``.

  What the fake quantizer computes (max-abs per channel at the layer's bits),
  in Keras kernel layout; layers at FLOAT_BITS are left out.
  """
  out: Dict[str, Dict[str, np.ndarray]] = {}
  for w in _weight_wrappers(qmodel):
    bits = get_weight_bits_of(w)
    if bits == FLOAT_BITS:
      continue
    out[w.layer.name] = {_short_name(var): quantizers.quantize_array(var.numpy(), bits, axes)[1]
                         for var, axes in _kernels_of(w)}
  return out


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
    self.wrappers = {w.layer.name: w for w in _weight_wrappers(qmodel)}
    self.originals = {name: ([v.numpy() for v, _ in _kernels_of(w)],
                             None if _bias_of(w) is None else _bias_of(w).numpy())
                      for name, w in self.wrappers.items()}
    self.stats = {}
    if self.method != "rtn" or self.correct:
      acts = [v["on"].numpy() for _, v in _act_quant_vars(qmodel)]
      set_activation_quantization(qmodel, False)
      try:
        with weight_bits_override(qmodel, {n: FLOAT_BITS for n in self.wrappers}):
          self.stats = _input_stats(qmodel, list(self.wrappers.values()), x, batch_size, seed)
      finally:
        for (_, v), on in zip(_act_quant_vars(qmodel), acts):
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
      for k0, (_, axes) in zip(kernels0, _kernels_of(wrapper)):
        r = weight_quant.quantize_kernel(k0, bits, axes, self.method,
                                         stats if self.method != "rtn" else None)
        kernels.append(r.values)
      bias = bias0
      analytic = (analytic_bias.column_means(self.qmodel, wrapper.layer)
                  if self.correct == "analytic" and bias0 is not None else None)
      mean = analytic if analytic is not None else (stats.mean if stats is not None else None)
      if self.correct and mean is not None and bias0 is not None:
        delta, note = weight_quant.bias_correction(
            kernels0[0], kernels[0], _kernels_of(wrapper)[0][1], mean, None,
            weight_quant.stats_kind(wrapper.layer))
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
      for (var, _), value in zip(_kernels_of(wrapper), kernels):
        var.assign(value)
      if bias is not None:
        _bias_of(wrapper).assign(bias)


# --------------------------------------------------------------------------- bits access


def _wrapper_bits_vars(wrapper) -> List[tf.Variable]:
  """The bits variables of one tfmot wrapper's keras_mpq weight quantizers."""
  return [qv["bits"] for _, q, qv in wrapper._weight_vars  # pylint: disable=protected-access
          if isinstance(q, quantizers.WeightQuantizer)]


def _weight_bits_vars(qmodel) -> Dict[str, List[tf.Variable]]:
  out = {}
  for layer in qmodel.layers:
    if isinstance(layer, _QuantizeWrapper):
      vs = _wrapper_bits_vars(layer)
      if vs:
        out[layer.layer.name] = vs
  return out


def get_weight_bits(qmodel) -> Dict[str, int]:
  """Current weight bits of each quantized layer (FLOAT_BITS when float)."""
  return {name: int(round(float(vs[0].numpy())))
          for name, vs in _weight_bits_vars(qmodel).items()}


def set_weight_bits(qmodel, bits: Mapping[str, int]) -> None:
  """Sets layers' weight bits in place: a variable write, no retracing."""
  table = _weight_bits_vars(qmodel)
  for name, b in bits.items():
    if name not in table:
      raise InvalidInputError(
          f"Layer {name!r} is not a quantized weight layer of this model. "
          f"Layers: {sorted(table)}")
    b = check_weight_bits(b, f"bits[{name!r}]")
    for v in table[name]:
      v.assign(float(b))


@contextlib.contextmanager
def weight_bits_override(qmodel, bits: Mapping[str, int]) -> Iterator[None]:
  """Temporarily sets some layers' bits; restores them in ``finally``.

  >>> with weight_bits_override(qmodel, {"conv2": 2}):  # doctest: +SKIP
  ...   loss = evaluate(qmodel)
  """
  saved = get_weight_bits(qmodel)
  try:
    set_weight_bits(qmodel, bits)
    yield
  finally:
    set_weight_bits(qmodel, {k: saved[k] for k in bits})


def current_plan(qmodel, **info) -> QuantizationPlan:
  """The plan the quantized model carries now (weight and activation bits)."""
  act = {}
  for layer, _ in _act_quant_vars(qmodel):
    if isinstance(layer, _QuantizeWrapper) and quantizers.is_weight_layer(layer.layer):
      act[layer.layer.name] = layer._output_quantizers[0].num_bits  # pylint: disable=protected-access
  for layer in qmodel.layers:
    if isinstance(layer, _QuantizeWrapper) and isinstance(
        layer.quantize_config, quantizers.MixedPrecisionConfig):
      act.setdefault(layer.layer.name, layer.quantize_config.activation_bits)
  return QuantizationPlan(get_weight_bits(qmodel), act, info=info)


# --------------------------------------------------------------------------- bake and report


def _short_name(var) -> str:
  return var.name.split("/")[-1].split(":")[0]


def bake(qmodel):
  """A plain float tf_keras model whose weights sit exactly on the quantization grid.

  Removes the tfmot wrappers (keeping inner layer names) and writes each
  quantized kernel as its dequantized values at the layer's current bits.
  This is what `keras_mpq.export_tflite` converts: a max-abs per-channel
  quantizer re-derives the same scales and integers from it.
  """
  def transform(layer):
    if isinstance(layer, _QuantizeLayer):
      return None, None  # the converter quantizes the input itself
    if not isinstance(layer, _QuantizeWrapper):
      return _clone_layer(layer), layer.get_weights()
    inner = layer.layer
    bits_of = {}
    for var, q, qv in layer._weight_vars:  # pylint: disable=protected-access
      bits_of[_short_name(var)] = (int(round(float(qv["bits"].numpy()))), q.reduce_axes)
    by_name = {_short_name(v): v for v in layer.weights}

    def weights_for(new_layer):
      values = []
      for new_var in new_layer.weights:
        name = _short_name(new_var)
        value = by_name[name].numpy()
        if name in bits_of:
          value = quantizers.quantize_array(value, *bits_of[name])[0]
        values.append(value)
      return values

    return _clone_layer(inner), weights_for

  return rebuild(qmodel, transform, name=qmodel.name)


def layer_report(qmodel) -> List[Dict[str, object]]:
  """One row per layer: name, type, role, weight bits, activation bits.

  ``role`` is 'weights' (quantized weights), 'output' (output quantized),
  'passthrough' (range-preserving, nothing to quantize) or 'unsupported'
  (left float: TFLite keeps it float, the report shows it).
  """
  rows = []
  for layer in qmodel.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    if isinstance(layer, _QuantizeLayer):
      rows.append({"layer": layer.name, "type": "input", "role": "input",
                   "weight_bits": None, "activation_bits": layer.quantizer.num_bits})
      continue
    if isinstance(layer, _QuantizeWrapper):
      inner, cfg = layer.layer, layer.quantize_config
      outq = getattr(layer, "_output_quantizers", None)
      rows.append({
          "layer": inner.name, "type": type(inner).__name__,
          "role": "weights" if isinstance(cfg, quantizers.MixedPrecisionConfig) else "output",
          "weight_bits": get_weight_bits_of(layer),
          "activation_bits": outq[0].num_bits if outq else None,
      })
    else:
      role = quantizers.layer_role(layer)
      rows.append({"layer": layer.name, "type": type(layer).__name__,
                   "role": "fused" if role in ("weights", "output") else role,
                   "weight_bits": None, "activation_bits": None})
  return rows


def get_weight_bits_of(wrapper) -> Optional[int]:
  vs = _wrapper_bits_vars(wrapper)
  return int(round(float(vs[0].numpy()))) if vs else None


def unsupported_layers(model) -> List[str]:
  """Names of layers keras_mpq leaves float because no config supports them."""
  return [l.name for l in model.layers if quantizers.layer_role(l) == "unsupported"]
