"""Each quantizable layer's size: parameters, weight bytes and multiply-accumulates.

>>> from keras_mpq.model.size import layer_costs
>>> [c.name for c in layer_costs(model)]  # doctest: +SKIP
['conv1', 'conv2', 'fc']
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np

from keras_mpq.base import layers as layers_lib
from keras_mpq.base.compat import keras
from keras_mpq.base.errors import InvalidInputError, UnsupportedModelError
from keras_mpq.base.types import LayerCost

_TRANSPOSED = ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")


# --------------------------------------------------------------------------- per layer


def layer_costs(model, layers: Optional[Sequence[Any]] = None) -> List[LayerCost]:
  """The `LayerCost` of each quantizable layer of a built tf_keras model, in model order.

  Args:
    model: a built ``keras.Model`` (tf_keras) whose layers have weights.
    layers: optional subset, as layer names or layer objects; each must be a
      quantizable layer of ``model`` (see `keras_mpq.base.layers.quantizable_layers`).

  Returns:
    One `LayerCost` per layer: quantized kernel weights, biases, per-channel
    scales and MACs per sample (``None`` when a spatial size is unknown).

  Example:

  >>> from keras_mpq.base.compat import keras
  >>> model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3, name="fc")])
  >>> layer_costs(model)
  [LayerCost(name='fc', layer_type='Dense', n_params=30, n_bias=3, n_scales=3, macs=30)]
  """
  if not isinstance(model, keras.Model):
    raise InvalidInputError(
        "Expected a tf_keras Model (load Keras 3 models with keras_mpq.load_model). "
        f"Received: model of type {type(model).__name__}")
  candidates = layers_lib.quantizable_layers(model)
  if not candidates:
    raise UnsupportedModelError(
        "Expected a model with at least one quantizable layer (Dense, Conv1D, Conv2D, "
        "DepthwiseConv2D, SeparableConv2D, Conv2DTranspose). Received: model "
        f"{model.name!r} with layers {[type(l).__name__ for l in model.layers]}")
  if layers is not None:
    by_name = {l.name: l for l in candidates}
    chosen = []
    for item in layers:
      name = item if isinstance(item, str) else getattr(item, "name", None)
      if name not in by_name or (not isinstance(item, str) and by_name[name] is not item):
        raise InvalidInputError(
            f"Expected quantizable layers of model {model.name!r}. Received: "
            f"layers containing {name if name is not None else item!r}; quantizable "
            f"layers are {sorted(by_name)}")
      chosen.append(by_name[name])
    candidates = chosen
  return [_layer_cost(model, layer) for layer in candidates]


def _layer_cost(model, layer) -> LayerCost:
  spec = layers_lib.weight_spec(layer)
  n_params = 0
  n_scales = 0
  kernel_sizes = []
  for attr, reduce_axes in spec:
    kernel = getattr(layer, attr, None)
    if kernel is None:
      raise UnsupportedModelError(
          f"Expected a built model. Received: layer {layer.name!r} has no {attr!r} yet; "
          "call the model on data or start it with keras.Input(shape) first.")
    shape = tuple(int(d) for d in kernel.shape)
    size = int(np.prod(shape))
    kernel_sizes.append(size)
    n_params += size
    n_scales += int(np.prod([d for i, d in enumerate(shape) if i not in reduce_axes]))
  bias = getattr(layer, "bias", None) if getattr(layer, "use_bias", True) else None
  n_bias = int(np.prod(bias.shape)) if bias is not None else 0
  return LayerCost(name=layer.name, layer_type=type(layer).__name__,
                   n_params=n_params, n_bias=n_bias, n_scales=n_scales,
                   macs=_macs(model, layer, n_params))


def _macs(model, layer, n_params: int) -> Optional[int]:
  """Multiply-accumulates per sample, summed over the layer's calls inside ``model``."""
  nodes = list(getattr(layer, "_inbound_nodes", []))
  network_nodes = getattr(model, "_network_nodes", None)
  if network_nodes:
    nodes = [n for i, n in enumerate(nodes) if f"{layer.name}_ib-{i}" in network_nodes]
  if not nodes:
    return None
  transposed = type(layer).__name__ in _TRANSPOSED
  channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
  total = 0
  for node in nodes:
    shape = node.input_shapes if transposed else node.output_shapes
    if isinstance(shape, list):  # a layer of ours has one input and one output
      shape = shape[0]
    dims = list(shape)[1:]  # drop the batch dimension
    if isinstance(layer, keras.layers.Dense):
      spatial = dims[:-1]
    else:
      spatial = dims[1:] if channels_first else dims[:-1]
    if any(d is None for d in spatial):
      return None
    total += n_params * int(np.prod([int(d) for d in spatial]))
  return int(total)
