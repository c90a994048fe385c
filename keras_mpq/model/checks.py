"""Checks that refuse a model keras_mpq cannot quantize, before the slow stages.

`check_model` (a functional or Sequential tf_keras model with quantizable
layers), `check_graph_model`, `check_token_input` (no integer token inputs),
and `fingerprint`, the stable hash a cache keys a model by.

>>> check_model(model)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from keras_mpq.base import layers as layers_lib
from keras_mpq.base.compat import is_keras3_model, keras, tf
from keras_mpq.base.errors import InvalidInputError, UnsupportedModelError
from keras_mpq.model import outputs as outputs_lib

# --------------------------------------------------------------------------- checks


def check_graph_model(model) -> None:
  """Raises unless ``model`` is a built, flat tf_keras Sequential or functional model.

  The structural part of `check_model`; every stage that walks the layer
  graph (BatchNorm folding, quantization) relies on it.

  >>> from keras_mpq.base.compat import keras
  >>> check_graph_model(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))
  """
  if is_keras3_model(model):
    raise InvalidInputError(
        "Expected a tf_keras model. Received: a Keras 3 model; convert it with "
        "keras_mpq.load_model(model) first.")
  if not isinstance(model, keras.Model):
    raise InvalidInputError(
        f"Expected a tf_keras Model. Received: model of type {type(model).__name__}")
  if not getattr(model, "_is_graph_network", False):
    raise UnsupportedModelError(
        f"Expected a Sequential or functional model with a known input shape. "
        f"Received: model {model.name!r} of type {type(model).__name__}, which is "
        "subclassed or not built. Rebuild it with the functional API "
        "(keras.Model(inputs, outputs)) or give a Sequential model keras.Input(shape).")
  network_nodes = getattr(model, "_network_nodes", None)
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      raise UnsupportedModelError(
          f"Expected a flat model. Received: layer {layer.name!r} is a nested model "
          f"({type(layer).__name__}). Pass it through keras_mpq.load_model(model), which "
          "inlines nested Sequential and functional models, or rebuild it with the "
          "sub-model's layers inlined.")
    if network_nodes is not None:
      calls = sum(1 for i in range(len(layer._inbound_nodes))  # pylint: disable=protected-access
                  if f"{layer.name}_ib-{i}" in network_nodes)
      if calls > 1:
        raise UnsupportedModelError(
            f"Expected each layer to be called once. Received: layer {layer.name!r} "
            f"({type(layer).__name__}) is shared: it is called {calls} times in "
            f"model {model.name!r}. Shared layers are not supported (one layer, one "
            "bit-width, one activation range); give each call its own layer.")


def check_model(model) -> "keras.Model":
  """Raises a clear error if keras_mpq cannot quantize ``model``; returns it otherwise.

  Requirements: a tf_keras Sequential or functional model (not subclassed,
  no nested models), one or several inputs, outputs that `keras_mpq.model.outputs.heads_of`
  can read (float, at least ``(batch, units)``),
  at least one quantizable layer (Dense, Conv1D, Conv2D, DepthwiseConv2D,
  SeparableConv2D, Conv2DTranspose), and finite weights.

  Example:

  >>> from keras_mpq.base.compat import keras
  >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
  >>> check_model(m) is m
  True
  """
  check_graph_model(model)
  outputs_lib.heads_of(model)  # refuses outputs nothing can measure (rank 0, integers)
  if not layers_lib.quantizable_layers(model):
    raise UnsupportedModelError(
        "Expected a model with at least one quantizable layer (Dense, Conv1D, Conv2D, "
        "DepthwiseConv2D, SeparableConv2D, Conv2DTranspose). Received: model "
        f"{model.name!r} with layers {[type(l).__name__ for l in model.layers]}")
  for layer in model.layers:
    for weight in layer.weights:
      values = np.asarray(weight)
      if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise InvalidInputError(
            f"Expected finite weights. Received: layer {layer.name!r} has {bad} NaN or "
            f"Inf values in {weight.name!r}. Retrain or reload the model.")
  return model


def check_token_input(model) -> None:
  """Refuses, before synthesis, a model whose input is token ids (no synthetic data).

  >>> from keras_mpq.base.compat import keras
  >>> m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
  >>> check_token_input(m)
  """
  embeddings = [l.name for l in model.layers if isinstance(l, keras.layers.Embedding)]
  integer = [t for t in model.inputs if not tf.as_dtype(t.dtype).is_floating]
  if embeddings or integer:
    what = (f"an Embedding layer ({embeddings[0]!r})" if embeddings
            else f"an integer input ({integer[0].dtype})")
    raise UnsupportedModelError(
        "Expected a model with a continuous input (images, audio, sensor values) "
        f"for synthetic calibration data. Received: model {model.name!r} takes "
        f"token ids ({what}); synthesis shapes inputs by gradient descent and "
        "cannot make discrete tokens. Quantizing models with token inputs is not "
        "supported yet: Embedding layers are kept float and integer inputs cannot "
        "be calibrated. Pass a model whose input is a float tensor.")


# --------------------------------------------------------------------------- fingerprint


def fingerprint(model) -> str:
  """A stable hash (16 hex digits of a SHA-256) of ``model``'s config and weights.

  Equal for the same architecture, layer names and weight values, in any
  process (a saved and reloaded model keeps its fingerprint); different when
  any weight changes. Used to key caches of resumable runs.

  Example:

  >>> from keras_mpq.base.compat import keras
  >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
  >>> fingerprint(m) == fingerprint(m)
  True
  >>> len(fingerprint(m))
  16
  """
  h = hashlib.sha256()
  try:
    config = model.get_config()
  except Exception:  # pylint: disable=broad-except
    config = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
  if isinstance(config, dict):
    config = {k: v for k, v in config.items() if k != "name"}
  h.update(json.dumps(config, sort_keys=True, default=_json_default).encode("utf-8"))
  for i, weights in enumerate(model.get_weights()):
    weights = np.ascontiguousarray(weights)
    h.update(f"|{i}:{weights.dtype.str}:{weights.shape}|".encode("ascii"))
    h.update(weights.tobytes())
  return h.hexdigest()[:16]


def _json_default(obj: Any) -> Any:
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, (tf.TensorShape, tf.DType)):
    return str(obj)
  return f"<{type(obj).__module__}.{type(obj).__qualname__}>"
