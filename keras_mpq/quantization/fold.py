"""BatchNorm folding: each BatchNorm merged into the layer before it, its statistics kept.

The folded model keeps the BatchNorm statistics it removed, with the model
(`keras_mpq.base.model_data`): the analytic bias correction reads them.

>>> folded = fold_batchnorm(model)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from keras_mpq.base import layers as layers_lib
from keras_mpq.base.compat import keras, tf
from keras_mpq.model.graph import (
  clone_layer,
  consumers_of,
  graph_layers,
  model_nodes,
  rebuild,
)
from keras_mpq.quantization import analytic_bias as analytic_bias_lib

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
  nodes = model_nodes(model, layer)
  if len(nodes) != 1:
    return False
  inbound = tf.nest.flatten(nodes[0].inbound_layers)
  if len(inbound) != 1 or type(inbound[0]) not in _FOLD_AXIS:
    return False
  producer = inbound[0]
  if getattr(producer, "activation", None) not in (None, keras.activations.linear):
    return False
  return len(consumers_of(model, producer)) == 1


def fold_batchnorm(model):
  """Folds each BatchNormalization into the weight layer before it (exactly).

  ``W' = W * gamma / sqrt(var + eps)`` per output channel and
  ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``; the folded layer keeps
  its name and gains a bias. A BatchNorm that cannot be folded stays (and is
  quantized at its output). Returns a new model; ``model`` is unchanged. The
  BatchNorm statistics stay known to ``bias_correction="analytic"``
  (`keras_mpq.quantization.analytic_bias`).

  Example:

  >>> folded = fold_batchnorm(model)  # doctest: +SKIP
  >>> np.allclose(folded.predict(x), model.predict(x), atol=1e-4)  # doctest: +SKIP
  True
  """
  graph_layers(model)
  fold_into = {}
  for layer in model.layers:
    if _foldable(model, layer):
      producer = tf.nest.flatten(model_nodes(model, layer)[0].inbound_layers)[0]
      fold_into[producer.name] = layer
  folded_bns = {bn.name for bn in fold_into.values()}

  def transform(layer):
    if layer.name in folded_bns:
      return None, None
    if layer.name not in fold_into:
      return clone_layer(layer), layer.get_weights()
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
  analytic_bias_lib.remember(folded, _batchnorm_priors(model, fold_into), model)
  return folded


# --------------------------------------------------------------------------- annotate and apply


def fused_producers(model) -> set:
  """Names of layers whose output TFLite fuses with the ReLU/ReLU6 right after them."""
  names = set()
  for layer in model.layers:
    if layers_lib.is_fusable_activation(layer):
      inbound = tf.nest.flatten(model_nodes(model, layer)[0].inbound_layers)
      if len(inbound) == 1 and len(consumers_of(model, inbound[0])) == 1:
        if layers_lib.layer_role(inbound[0]) in ("weights", "output"):
          names.add(inbound[0].name)
  return names
