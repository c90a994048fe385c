"""Per-layer mixed-precision quantizers and `QuantizeConfig`s for tfmot, and the layer registry.

The weight quantizer keeps its bit-width in a non-trainable *variable* of the
wrapper (``<weight>_wbits``), not in a Python attribute. Changing a layer's
bits is then a variable assignment: one compiled model serves every
(layer, bits) pair the sensitivity search evaluates, with no retracing, and
two layers never share a bit-width by accident (the trap of tfmot's
class-level n-bit registry). ``FLOAT_BITS`` (32) in that variable means the
weight passes through unquantized.

Weights: per-output-channel, symmetric, narrow range (levels -q..q with
q = 2^(b-1) - 1), scale = max|w| / q per channel: the grid TFLite and
ai-edge-quantizer use, so a baked weight re-quantizes to the same integers.
The error-minimizing quantizer (`keras_mpq.quantization.weights`: clipping, GPTQ)
tells this quantizer its scales through the kernel itself: `keras_mpq.quantization.apply`
stores each optimized kernel dequantized, with +-q in every channel, so the
max-abs rule here re-derives exactly its scales and integers at every step
(fake quantization, `bake`, export).
Activations: asymmetric 8-bit or symmetric 16-bit fake quantization with
min/max variables set by calibration and tracked by EMA while fine-tuning.

Example:

>>> from keras_mpq.base.compat import keras
>>> from keras_mpq.quantization import configs
>>> layer = keras.layers.Dense(4)
>>> config = configs.config_for_layer(layer, weight_bits=4, activation_bits=8)
>>> config.weight_bits
4
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import (
  QuantizeLayer as TfmotQuantizeLayer,  # pylint: disable=g-import-not-at-top,wrong-import-position
)

from keras_mpq.base.compat import keras, tf, tfmot
from keras_mpq.base.layers import fake_quant_weights, layer_role, weight_spec
from keras_mpq.base.types import check_activation_bits, check_weight_bits

_Quantizer = tfmot.quantization.keras.quantizers.Quantizer
_QuantizeConfig = tfmot.quantization.keras.QuantizeConfig


# --------------------------------------------------------------------------- quantizers


class WeightQuantizer(_Quantizer):
  """Per-channel symmetric weight quantizer whose bit-width is a variable.

  Args:
    num_bits: initial bit-width (2..8, or FLOAT_BITS for pass-through).
    reduce_axes: kernel axes reduced to one scale per output channel.
  """

  def __init__(self, num_bits: int, reduce_axes: Sequence[int]):
    self.num_bits = check_weight_bits(num_bits, "num_bits")
    self.reduce_axes = tuple(int(a) for a in reduce_axes)

  def build(self, tensor_shape, name, layer):
    bits = layer.add_weight(
        f"{name}_wbits", shape=(), dtype=tf.float32, trainable=False,
        initializer=keras.initializers.Constant(float(self.num_bits)))
    return {"bits": bits}

  def __call__(self, inputs, training, weights, **kwargs):
    return fake_quant_weights(inputs, weights["bits"], self.reduce_axes)

  def get_config(self):
    return {"num_bits": self.num_bits, "reduce_axes": list(self.reduce_axes)}

  def __eq__(self, other):
    return isinstance(other, WeightQuantizer) and self.get_config() == other.get_config()

  def __ne__(self, other):
    return not self.__eq__(other)


class ActivationQuantizer(_Quantizer):
  """Activation fake quantizer: 8-bit asymmetric or 16-bit symmetric.

  Its range lives in ``<name>_amin`` / ``<name>_amax`` variables, set by
  `keras_mpq.quantization.calibrate.calibrate` and followed by an exponential moving average
  while training. ``<name>_aon`` (1 or 0) switches it on or off without
  retracing, so the same model also measures float-activation contexts.
  ``<name>_aema`` (1 or 0) lets training move the range or freezes it
  (`keras_mpq.callbacks.FreezeRanges`), also without retracing. All four are
  variables of the layer, so they are saved and loaded with the model.
  """

  def __init__(self, num_bits: int = 8, ema_decay: float = 0.999):
    self.num_bits = check_activation_bits(num_bits, "num_bits")
    self.ema_decay = float(ema_decay)

  def build(self, tensor_shape, name, layer):
    def var(suffix, value):
      return layer.add_weight(
          f"{name}_{suffix}", shape=(), dtype=tf.float32, trainable=False,
          initializer=keras.initializers.Constant(value))
    return {"min": var("amin", -6.0), "max": var("amax", 6.0), "on": var("aon", 1.0),
            "ema": var("aema", 1.0)}

  def __call__(self, inputs, training, weights, **kwargs):
    amin, amax = weights["min"], weights["max"]
    if training:
      # decay 1 (frozen) when the wrapper's ema variable is 0: no retracing needed.
      track = weights["ema"] if "ema" in weights else 1.0
      decay = tf.where(track > 0.5, tf.constant(self.ema_decay, tf.float32), 1.0)
      inputs_f = tf.cast(inputs, tf.float32)
      batch_min = tf.reduce_min(inputs_f)
      batch_max = tf.reduce_max(inputs_f)
      amin.assign(decay * amin + (1.0 - decay) * batch_min)
      amax.assign(decay * amax + (1.0 - decay) * batch_max)
    lo, hi = tf.minimum(amin, 0.0), tf.maximum(amax, 0.0)
    if self.num_bits == 16:
      bound = tf.maximum(-lo, hi)
      lo, hi = -bound, bound
    hi = tf.maximum(hi, lo + 1e-6)
    quantized = tf.quantization.fake_quant_with_min_max_vars(
        inputs, lo, hi, num_bits=self.num_bits, narrow_range=self.num_bits == 16)
    return tf.where(weights["on"] > 0.5, quantized, inputs)

  def get_config(self):
    return {"num_bits": self.num_bits, "ema_decay": self.ema_decay}

  def __eq__(self, other):
    return (isinstance(other, ActivationQuantizer)
            and self.get_config() == other.get_config())

  def __ne__(self, other):
    return not self.__eq__(other)


# --------------------------------------------------------------------------- configs


class MixedPrecisionConfig(_QuantizeConfig):
  """QuantizeConfig of one weight layer: its weight bits, its activation bits.

  Built from immutable data (``get_config`` / ``from_config`` round-trip), one
  instance per layer; nothing is shared between layers.

  Args:
    weight_bits: 2..8, or FLOAT_BITS to keep the weights float.
    activation_bits: 8 or 16, for the layer's output.
    weight_attrs: ((attribute, reduce_axes), ...) as `weight_spec` gives.
    quantize_output: False when a fused activation quantizes after this layer.
  """

  def __init__(self, weight_bits: int, activation_bits: int = 8,
               weight_attrs=(("kernel", (0, 1, 2)),), quantize_output: bool = True):
    self.weight_bits = check_weight_bits(weight_bits, "weight_bits")
    self.activation_bits = check_activation_bits(activation_bits)
    self.weight_attrs = tuple((str(a), tuple(int(x) for x in axes))
                              for a, axes in weight_attrs)
    self.quantize_output = bool(quantize_output)

  def get_weights_and_quantizers(self, layer):
    return [(getattr(layer, attr), WeightQuantizer(self.weight_bits, axes))
            for attr, axes in self.weight_attrs]

  def get_activations_and_quantizers(self, layer):
    return []

  def set_quantize_weights(self, layer, quantize_weights):
    if len(quantize_weights) != len(self.weight_attrs):
      raise ValueError(
          f"Expected {len(self.weight_attrs)} quantized weights for layer "
          f"{layer.name!r}. Received: {len(quantize_weights)}")
    for (attr, _), w in zip(self.weight_attrs, quantize_weights):
      setattr(layer, attr, w)

  def set_quantize_activations(self, layer, quantize_activations):
    pass

  def get_output_quantizers(self, layer):
    return [ActivationQuantizer(self.activation_bits)] if self.quantize_output else []

  def get_config(self):
    return {"weight_bits": self.weight_bits, "activation_bits": self.activation_bits,
            "weight_attrs": [[a, list(axes)] for a, axes in self.weight_attrs],
            "quantize_output": self.quantize_output}

  def __eq__(self, other):
    return (isinstance(other, MixedPrecisionConfig)
            and self.get_config() == other.get_config())

  def __ne__(self, other):
    return not self.__eq__(other)


class OutputConfig(_QuantizeConfig):
  """QuantizeConfig that quantizes only a layer's output (Add, ReLU, pooling, ...)."""

  def __init__(self, activation_bits: int = 8):
    self.activation_bits = check_activation_bits(activation_bits)

  def get_weights_and_quantizers(self, layer):
    return []

  def get_activations_and_quantizers(self, layer):
    return []

  def set_quantize_weights(self, layer, quantize_weights):
    pass

  def set_quantize_activations(self, layer, quantize_activations):
    pass

  def get_output_quantizers(self, layer):
    return [ActivationQuantizer(self.activation_bits)]

  def get_config(self):
    return {"activation_bits": self.activation_bits}

  def __eq__(self, other):
    return isinstance(other, OutputConfig) and self.get_config() == other.get_config()

  def __ne__(self, other):
    return not self.__eq__(other)


def config_for_layer(layer, weight_bits: Optional[int] = None, activation_bits: int = 8,
                     quantize_output: bool = True):
  """The QuantizeConfig keras_mpq uses for ``layer``, or None (left unwrapped).

  Weight layers need ``weight_bits``; output-quantized layers get an
  `OutputConfig`; pass-through and unsupported layers get None.
  """
  role = layer_role(layer)
  if role == "weights":
    if weight_bits is None:
      raise ValueError(f"Layer {layer.name!r} has weights: pass weight_bits.")
    return MixedPrecisionConfig(weight_bits, activation_bits, weight_spec(layer),
                                quantize_output)
  if role == "output" and quantize_output:
    return OutputConfig(activation_bits)
  return None


CUSTOM_OBJECTS = {
    "WeightQuantizer": WeightQuantizer,
    "ActivationQuantizer": ActivationQuantizer,
    "MixedPrecisionConfig": MixedPrecisionConfig,
    "OutputConfig": OutputConfig,
}


class QuantizeWrapperV2(tfmot.quantization.keras.QuantizeWrapperV2):
  """tfmot's ``QuantizeWrapperV2`` that rebuilds with the variables it was saved with.

  ``QuantizeWrapperV2.build`` tracks the inner layer's weights when that
  layer is already built, as it is in a model from ``quantize_apply``, but
  not when the wrapper is rebuilt from a config (its inner layer is built
  later). The ``.keras`` format stores a layer's variables by position, so
  such a model could be saved (9 variables for a Conv2D) but not loaded (7
  expected). Building the inner layer first makes both the same. The class
  keeps tfmot's name: ``.keras`` files name their variables' folders after it.
  """

  def build(self, input_shape):
    if not self.layer.built:
      self.layer.build(input_shape)
    super().build(input_shape)


class QuantizeLayer(TfmotQuantizeLayer):
  """tfmot's ``QuantizeLayer`` (the input quantizer) that builds its variables once.

  ``QuantizeLayer.build`` never marks the layer built, so a layer rebuilt from
  a ``.keras`` config is built again when first called and holds its range
  variables twice (9 expected, 5 saved). The class keeps tfmot's name, as
  `QuantizeWrapperV2` does.
  """

  def build(self, input_shape):
    if self.built:
      return
    super().build(input_shape)
    self.built = True


@contextlib.contextmanager
def quantize_scope():
  """Scope to load models quantized by keras_mpq (``.keras``, ``.h5`` or SavedModel).

  Example:

  >>> import keras_mpq  # doctest: +SKIP
  >>> result.model.save("quantized.keras")  # doctest: +SKIP
  >>> with keras_mpq.quantize_scope():  # doctest: +SKIP
  ...   model = keras.models.load_model("quantized.keras")
  """
  with tfmot.quantization.keras.quantize_scope(CUSTOM_OBJECTS):
    with keras.utils.custom_object_scope({"QuantizeWrapperV2": QuantizeWrapperV2,
                                          "QuantizeLayer": QuantizeLayer}):
      yield


# --------------------------------------------------------------------------- scheme


class _LayoutTransformer:
  """keras_mpq folds BatchNorm itself, before annotation; ``transform`` may add layers.

  ``transform(model) -> model`` runs on the unwrapped model inside
  ``quantize_apply`` (keras_mpq.quantization.apply uses it to put an input quantizer after
  the model input, where tfmot builds a fresh ``QuantizeLayer`` from it).
  """

  def __init__(self, transform=None):
    self.transform = transform

  def apply(self, model, layer_quantize_map):
    if self.transform is not None:
      model = self.transform(model)
    return model, layer_quantize_map


class _NoDefaultsRegistry(tfmot.quantization.keras.QuantizeRegistry):
  """Every layer keras_mpq quantizes is annotated explicitly: no hidden defaults."""

  def get_quantize_config(self, layer):
    return None

  def supports(self, layer):
    return False


class MixedPrecisionScheme(tfmot.quantization.keras.QuantizeScheme):
  """tfmot scheme for `quantize_apply`: explicit per-layer configs only.

  Args:
    layout_transform: optional ``model -> model`` applied to the unwrapped
      model before wrapping (no layer is changed by default).
  """

  def __init__(self, layout_transform=None):
    self.layout_transform = layout_transform

  def get_layout_transformer(self):
    return _LayoutTransformer(self.layout_transform)

  def get_quantize_registry(self):
    return _NoDefaultsRegistry()
