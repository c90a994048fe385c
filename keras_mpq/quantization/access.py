"""The quantized model's accessors: wrapping with tfmot, reading and setting bits and ranges.

`quantize_model` wraps a float model with keras_mpq's `QuantizeConfig`s;
`set_weight_bits`/`get_weight_bits` change a layer's bits through its
variables (no rebuild, no retrace); `activation_ranges`, `current_plan`,
`layer_report`, and `bake`, which writes the fake-quantized weights into a
plain float model for export.

>>> qmodel = quantize_model(folded, plan)  # doctest: +SKIP
>>> set_weight_bits(qmodel, {"conv2": 4})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from keras_mpq.base import layers as layers_lib
from keras_mpq.base.compat import keras, tf, tfmot
from keras_mpq.base.errors import InvalidInputError, UnsupportedModelError
from keras_mpq.base.types import FLOAT_BITS, QuantizationPlan, check_weight_bits
from keras_mpq.model.graph import clone_layer, rebuild
from keras_mpq.quantization import analytic_bias as analytic_bias_lib
from keras_mpq.quantization import configs as configs_lib
from keras_mpq.quantization.fold import fused_producers

_QuantizeWrapper = tfmot.quantization.keras.QuantizeWrapper
_QuantizeLayer = configs_lib.TfmotQuantizeLayer  # tfmot 0.8 does not export it publicly

INPUT_QUANTIZER = "input_quantizer"
"""Name of the layer that quantizes the model input, as the .tflite file does:
the Keras model then sees exactly the input values the exported file sees (an
input range that is too narrow shows in ``result.model.evaluate``)."""


def input_quantizer_name(input_name: str, several: bool) -> str:
  """The input quantizer's layer name: `INPUT_QUANTIZER`, or with several inputs
  ``input_quantizer_<input name>`` (one per input, each with its own range)."""
  return f"{INPUT_QUANTIZER}_{input_name}" if several else INPUT_QUANTIZER


def is_input_quantizer(layer) -> bool:
  """True for a layer that quantizes a model input (`input_quantizer_name`)."""
  return isinstance(layer, _QuantizeLayer) and (
      layer.name == INPUT_QUANTIZER or layer.name.startswith(INPUT_QUANTIZER + "_"))


_QuantizeAnnotate = tfmot.quantization.keras.QuantizeAnnotate if hasattr(
    tfmot.quantization.keras, "QuantizeAnnotate") else None


def plan_layers(model) -> List[str]:
  """Names of the layers a plan must give bits to (the quantizable weight layers)."""
  return [layer.name for layer in layers_lib.quantizable_layers(model)]


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
  if not any(layers_lib.layer_role(l) in ("weights", "output") for l in model.layers):
    raise UnsupportedModelError(
        "Expected at least one layer keras_mpq quantizes (Dense, Conv1D, Conv2D, "
        "DepthwiseConv2D, SeparableConv1D/2D, Conv1DTranspose, Conv2DTranspose, or an "
        f"Add, Concatenate, pooling, UpSampling1D/2D...). Received: model {model.name!r} "
        "whose layers are all passthrough or unsupported (unsupported: "
        f"{unsupported_layers(model) or 'none'}); 3-D layers such as Conv3D, "
        "Conv3DTranspose and UpSampling3D are not supported.")
  fused = fused_producers(model)
  input_bits = plan.default_activation_bits

  def add_input_quantizer(unwrapped):
    several = len(unwrapped.inputs) > 1
    return rebuild(
        unwrapped, lambda layer: (clone_layer(layer), layer.get_weights()),
        input_hook=lambda t: _QuantizeLayer(
            configs_lib.ActivationQuantizer(input_bits),
            name=input_quantizer_name(t.name.split(":")[0].split("/")[0], several))(t))

  def annotate(layer):
    config = configs_lib.config_for_layer(
        layer, plan.weight_bits.get(layer.name), plan.act_bits(layer.name),
        quantize_output=layer.name not in fused)
    if config is None:
      return layer
    return tfmot.quantization.keras.quantize_annotate_layer(layer, config)

  with configs_lib.quantize_scope():
    annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    qmodel = tfmot.quantization.keras.quantize_apply(
        annotated, scheme=configs_lib.MixedPrecisionScheme(add_input_quantizer))
  analytic_bias_lib.carry(model, qmodel)
  return qmodel


def act_quant_vars(qmodel) -> List[Tuple[object, Dict[str, tf.Variable]]]:
  """(layer, {'min','max','on'}) for every activation quantizer in ``qmodel``.

  The input quantizer (a tfmot ``QuantizeLayer``) comes first.
  """
  found = []
  for layer in qmodel.layers:
    if isinstance(layer, _QuantizeLayer) and isinstance(
        layer.quantizer, configs_lib.ActivationQuantizer):
      found.append((layer, layer.quantizer_vars))
    elif isinstance(layer, _QuantizeWrapper):
      outq = getattr(layer, "_output_quantizers", None)
      if outq and isinstance(outq[0], configs_lib.ActivationQuantizer):
        found.append((layer, layer._output_quantizer_vars))  # pylint: disable=protected-access
  return found


def activation_bits_of(layer) -> int:
  """Bits of the activation quantizer of ``layer`` (a QuantizeLayer or wrapper)."""
  if isinstance(layer, _QuantizeLayer):
    return layer.quantizer.num_bits
  return layer._output_quantizers[0].num_bits  # pylint: disable=protected-access


def set_activation_quantization(qmodel, enabled: bool) -> None:
  """Switches every activation quantizer on or off (no retracing)."""
  for _, v in act_quant_vars(qmodel):
    v["on"].assign(1.0 if enabled else 0.0)


def set_range_tracking(qmodel, enabled: bool) -> None:
  """Lets training move activation ranges (EMA) or freezes them; no retracing.

  Calibrated ranges are followed by an exponential moving average while the
  quantized model trains; ``enabled=False`` freezes them where they are.

  >>> set_range_tracking(qmodel, False)  # doctest: +SKIP
  """
  for _, v in act_quant_vars(qmodel):
    if "ema" in v:
      v["ema"].assign(1.0 if enabled else 0.0)


def activation_ranges(qmodel) -> Dict[str, Tuple[float, float]]:
  """The current (min, max) of each activation quantizer, by inner layer name.

  >>> activation_ranges(qmodel)["conv1"]  # doctest: +SKIP
  (-1.93, 2.71)
  """
  return {quantized_name(layer): (float(v["min"].numpy()), float(v["max"].numpy()))
          for layer, v in act_quant_vars(qmodel)}


def quantized_name(layer) -> str:
  """The Keras layer a quantized layer stands for (the wrapped layer's name)."""
  inner = getattr(layer, "layer", None)
  return inner.name if inner is not None else layer.name


def weight_wrappers(qmodel) -> List:
  return [l for l in qmodel.layers if isinstance(l, _QuantizeWrapper)
          and isinstance(l.quantize_config, configs_lib.MixedPrecisionConfig)]


def kernels_of(wrapper) -> List[Tuple[tf.Variable, Tuple[int, ...]]]:
  return [(var, q.reduce_axes) for var, q, _ in wrapper._weight_vars  # pylint: disable=protected-access
          if isinstance(q, configs_lib.WeightQuantizer)]


def bias_of(wrapper) -> Optional[tf.Variable]:
  inner = wrapper.layer
  return inner.bias if getattr(inner, "use_bias", False) and inner.bias is not None else None


def weight_integers(qmodel) -> Dict[str, Dict[str, np.ndarray]]:
  """The integers each quantized kernel of ``qmodel`` holds now: ``{layer: {attr: ints}}``.

  What the fake quantizer computes (max-abs per channel at the layer's bits),
  in Keras kernel layout; layers at FLOAT_BITS are left out.
  """
  out: Dict[str, Dict[str, np.ndarray]] = {}
  for w in weight_wrappers(qmodel):
    bits = get_weight_bits_of(w)
    if bits == FLOAT_BITS:
      continue
    out[w.layer.name] = {_short_name(var): layers_lib.quantize_array(var.numpy(), bits, axes)[1]
                         for var, axes in kernels_of(w)}
  return out


# --------------------------------------------------------------------------- bits access


def _wrapper_bits_vars(wrapper) -> List[tf.Variable]:
  """The bits variables of one tfmot wrapper's keras_mpq weight quantizers."""
  return [qv["bits"] for _, q, qv in wrapper._weight_vars  # pylint: disable=protected-access
          if isinstance(q, configs_lib.WeightQuantizer)]


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
  for layer, _ in act_quant_vars(qmodel):
    if isinstance(layer, _QuantizeWrapper) and layers_lib.is_weight_layer(layer.layer):
      act[layer.layer.name] = layer._output_quantizers[0].num_bits  # pylint: disable=protected-access
  for layer in qmodel.layers:
    if isinstance(layer, _QuantizeWrapper) and isinstance(
        layer.quantize_config, configs_lib.MixedPrecisionConfig):
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
      return clone_layer(layer), layer.get_weights()
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
          value = layers_lib.quantize_array(value, *bits_of[name])[0]
        values.append(value)
      return values

    return clone_layer(inner), weights_for

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
          "role": "weights" if isinstance(cfg, configs_lib.MixedPrecisionConfig) else "output",
          "weight_bits": get_weight_bits_of(layer),
          "activation_bits": outq[0].num_bits if outq else None,
      })
    else:
      role = layers_lib.layer_role(layer)
      rows.append({"layer": layer.name, "type": type(layer).__name__,
                   "role": "fused" if role in ("weights", "output") else role,
                   "weight_bits": None, "activation_bits": None})
  return rows


def get_weight_bits_of(wrapper) -> Optional[int]:
  vs = _wrapper_bits_vars(wrapper)
  return int(round(float(vs[0].numpy()))) if vs else None


def unsupported_layers(model) -> List[str]:
  """Names of layers keras_mpq leaves float because no config supports them."""
  return [l.name for l in model.layers if layers_lib.layer_role(l) == "unsupported"]
