"""The quantizable-layer registry and the integer grid: which layers have weights, and how they round.

Weights are quantized per output channel, symmetric: ``q = 2^(b-1) - 1``,
``scale = max|w| / q`` per channel, the grid TFLite uses. A channel whose
max|w| is below `MIN_WEIGHT_BOUND` is dead: its integers are all 0 (scale 1,
as an all-zero channel), since ai-edge-quantizer floors the bound there.

>>> import numpy as np
>>> w, ints, scales = quantize_array(np.array([[1.0, -0.5]]), 8, (1,))
>>> ints.tolist()
[[127, -64]]
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from keras_mpq.base.compat import keras, tf
from keras_mpq.base.types import FLOAT_BITS, check_weight_bits

layers = keras.layers

# --------------------------------------------------------------------------- registry
# For each supported weight layer: the kernel attributes to quantize and, per
# attribute, the axes reduced to get one scale per output channel.

_WEIGHT_LAYERS: Dict[type, Tuple[Tuple[str, Tuple[int, ...]], ...]] = {
    layers.Dense: (("kernel", (0,)),),
    layers.Conv1D: (("kernel", (0, 1)),),
    layers.Conv2D: (("kernel", (0, 1, 2)),),
    layers.DepthwiseConv2D: (("depthwise_kernel", (0, 1)),),
    layers.SeparableConv2D: (("depthwise_kernel", (0, 1)),
                             ("pointwise_kernel", (0, 1, 2))),
    layers.SeparableConv1D: (("depthwise_kernel", (0,)),
                             ("pointwise_kernel", (0, 1))),
    layers.Conv2DTranspose: (("kernel", (0, 1, 3)),),
    layers.Conv1DTranspose: (("kernel", (0, 2)),),
}

# Layers whose output gets its own activation quantizer (as TFLite quantizes them).
_OUTPUT_QUANTIZED = (
    layers.ReLU, layers.Activation, layers.Add, layers.Subtract, layers.Multiply,
    layers.Average, layers.Maximum, layers.Minimum, layers.Concatenate,
    layers.AveragePooling1D, layers.AveragePooling2D, layers.GlobalAveragePooling1D,
    layers.GlobalAveragePooling2D, layers.Softmax, layers.LeakyReLU, layers.PReLU,
    layers.BatchNormalization, layers.UpSampling1D, layers.UpSampling2D,
    layers.Rescaling, layers.Normalization,
)

# Layers that only move or select values: the range of their input carries over,
# so they need no quantizer of their own (TFLite reuses the input's scale).
_PASSTHROUGH = (
    layers.InputLayer, layers.Flatten, layers.Reshape, layers.Dropout,
    layers.SpatialDropout1D, layers.SpatialDropout2D, layers.GaussianNoise,
    layers.GaussianDropout, layers.MaxPooling1D, layers.MaxPooling2D,
    layers.GlobalMaxPooling1D, layers.GlobalMaxPooling2D, layers.ZeroPadding1D,
    layers.ZeroPadding2D, layers.Cropping1D, layers.Cropping2D, layers.Permute,
    layers.Identity,
)

# Activations TFLite fuses into the producing op: the producer's output is not
# quantized separately when one of these is its only consumer.
_FUSABLE_ACTIVATIONS = ("relu", "relu6")


def weight_spec(layer) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
  """(attribute, reduce_axes) for each kernel of a supported weight layer, else ()."""
  return _WEIGHT_LAYERS.get(type(layer), ())


def is_weight_layer(layer) -> bool:
  """True if keras_mpq quantizes this layer's weights (Dense, Conv*, Depthwise, ...)."""
  return type(layer) in _WEIGHT_LAYERS


def quantizable_layers(model) -> List:
  """The model's weight layers keras_mpq can quantize, in model order.

  Example:

  >>> from keras_mpq import model_zoo
  >>> [l.name for l in quantizable_layers(model_zoo.plain_cnn())][:2]
  ['conv1', 'conv2']
  """
  return [layer for layer in model.layers if is_weight_layer(layer)]


def layer_role(layer) -> str:
  """'weights', 'output', 'passthrough' or 'unsupported' (kept float, reported)."""
  if is_weight_layer(layer):
    return "weights"
  if isinstance(layer, _PASSTHROUGH):
    return "passthrough"
  if isinstance(layer, _OUTPUT_QUANTIZED):
    return "output"
  return "unsupported"


def is_fusable_activation(layer) -> bool:
  """A ReLU/ReLU6 layer (or Activation('relu'/'relu6')) TFLite fuses into its producer."""
  if isinstance(layer, layers.ReLU):
    cfg = layer.get_config()
    return (cfg.get("negative_slope", 0.0) == 0.0 and cfg.get("threshold", 0.0) == 0.0
            and cfg.get("max_value") in (None, 6.0))
  if isinstance(layer, layers.Activation):
    return keras.activations.serialize(layer.activation) in _FUSABLE_ACTIVATIONS
  return False


# --------------------------------------------------------------------------- arithmetic


MIN_WEIGHT_BOUND = np.float32(1e-9)
"""Smallest max|w| a weight channel is quantized from; below it the channel is dead.

ai-edge-quantizer computes a channel's scale as ``max(max|w|, 1e-9) / q``
(``tensor_zp_scale_from_min_max``): for a channel below 1e-9 (filters decayed
to ~1e-32 by weight decay) it keeps a 1e-9 / q scale and quantizes the weights
to 0 or a few levels, where the max-abs grid puts +-q (issue 30: 11,594 of
16,384 integers of a person detector differed, max difference 127). Such a
channel contributes at most 1e-9 per input to its output, so keras_mpq
quantizes it to exactly 0: the Keras model and the exported file (snapped to
these zeros before conversion) then agree, and the channel outputs its bias.
"""


def channel_scales(maxabs, qmax):
  """Per-channel scales from max|w|: ``max|w| / qmax``, 1 for dead channels (< `MIN_WEIGHT_BOUND`).

  NaN maps to 1 (the weights are checked elsewhere); dead channels quantize to 0.

  >>> channel_scales(np.array([254.0, 1e-32, 0.0], np.float32), 127.0).tolist()
  [2.0, 1.0, 1.0]
  """
  maxabs = np.asarray(maxabs)
  live = maxabs >= MIN_WEIGHT_BOUND
  return np.where(live, maxabs / qmax, 1.0).astype(maxabs.dtype)


def quantize_array(w: np.ndarray, bits: int, reduce_axes: Sequence[int]):
  """Per-channel symmetric narrow-range quantization in NumPy.

  Returns ``(dequantized, integers, scales)``; ``scales`` keeps the reduced
  axes as size 1 so ``integers * scales == dequantized``. ``FLOAT_BITS``
  returns ``w`` unchanged (integers and scales are None).

  >>> q, i, s = quantize_array(np.array([[0.6, -1.0], [1.0, 0.25]]), 2, (0,))
  >>> i.tolist()
  [[1, -1], [1, 0]]
  """
  bits = check_weight_bits(bits)
  w = np.asarray(w, dtype=np.float32)
  if bits == FLOAT_BITS:
    return w.copy(), None, None
  qmax = float(2 ** (bits - 1) - 1)
  maxabs = np.max(np.abs(w), axis=tuple(reduce_axes), keepdims=True)
  # Dead channels (max|w| < MIN_WEIGHT_BOUND, zeros and subnormals included)
  # get scale 1: their integers are 0, and no scale underflows.
  scales = channel_scales(maxabs, np.float32(qmax)).astype(np.float32)
  ints = np.clip(np.round(w / scales), -qmax, qmax)
  return (ints * scales).astype(np.float32), ints.astype(np.int32), scales


def quantization_error(kernels, bits: int) -> Tuple[float, float, int]:
  """``(||Q_b(W) - W||^2, ||W||^2, n)`` summed over ``(w, reduce_axes)`` kernels, in float64.

  The data-free weight metric and HAWQ's perturbation term both build on it.

  >>> quantization_error([(np.array([[1.0], [0.4]]), (0,))], 2)[0] > 0
  True
  """
  err = norm = 0.0
  count = 0
  for w, axes in kernels:
    w = np.asarray(w, dtype=np.float32)
    q = quantize_array(w, bits, axes)[0]
    err += float(np.sum((q.astype(np.float64) - w) ** 2))
    norm += float(np.sum(w.astype(np.float64) ** 2))
    count += w.size
  return err, norm, count


def fake_quant_weights(w, bits, reduce_axes):
  """TF version of `quantize_array` with a straight-through gradient.

  ``bits`` may be a tensor (the wrapper's bits variable): one graph serves
  every bit-width; ``bits >= FLOAT_BITS`` returns ``w``.
  """
  bits = tf.cast(bits, w.dtype)
  qmax = tf.pow(tf.constant(2.0, w.dtype), bits - 1.0) - 1.0
  maxabs = tf.reduce_max(tf.abs(w), axis=list(reduce_axes), keepdims=True)
  # As `quantize_array`: dead channels (max|w| < MIN_WEIGHT_BOUND) quantize to 0.
  scale = tf.where(maxabs >= float(MIN_WEIGHT_BOUND), maxabs / qmax, tf.ones_like(maxabs))
  q = tf.clip_by_value(tf.round(w / scale), -qmax, qmax) * scale
  q = tf.where(bits >= float(FLOAT_BITS), w, q)
  return w + tf.stop_gradient(q - w)
