"""Walking and rebuilding a functional tf_keras model's layer graph.

`rebuild` makes a new functional model from an old one, layer by layer, with
a hook that may replace any layer (BatchNorm folding uses it); `layer_output`
and `consumers_of` answer what feeds what.

>>> graph_layers = [l.name for l in model_nodes_in_order(model)]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

from keras_mpq.base.compat import keras, tf
from keras_mpq.base.errors import UnsupportedModelError
from keras_mpq.model import checks as model_checks_lib

# --------------------------------------------------------------------------- graph rebuild


def model_nodes(model, layer):
  """The inbound nodes of ``layer`` that belong to ``model``'s graph."""
  keys = getattr(model, "_network_nodes", None)
  nodes = []
  for i, node in enumerate(layer._inbound_nodes):  # pylint: disable=protected-access
    if keys is None or f"{layer.name}_ib-{i}" in keys:
      nodes.append(node)
  return nodes


def graph_layers(model):
  """Checks the model is a flat Sequential/functional graph; returns its layers."""
  model_checks_lib.check_graph_model(model)
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
  graph_layers(model)
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
    nodes = model_nodes(model, layer)
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


def inline_nested(model):
  """A flat copy of ``model`` whose nested Sequential/functional models are inlined.

  Each layer of a nested model is cloned from its config (renamed when its
  name is taken) and given its weights; the outputs are the same. A model
  with no nested model, or with a subclassed one, is returned as it is.

  >>> inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")], name="enc")
  >>> inp = keras.Input((4,))
  >>> flat = inline_nested(keras.Model(inp, keras.layers.Dense(2, name="out")(inner(inp))))
  >>> [l.name for l in flat.layers][1:]
  ['fc', 'out']
  """
  nested = [l for l in model.layers if isinstance(l, keras.Model)]
  if not nested or not getattr(model, "_is_graph_network", False) or not all(
      getattr(l, "_is_graph_network", False) for l in nested):
    return model  # nothing to inline, or a subclassed model: `check_graph_model` says so
  taken = {l.name for l in model.layers if not isinstance(l, keras.Model)}
  pending = []

  def unique(name: str, scope: str) -> str:
    if name in taken:
      name = f"{scope}_{name}"
    base, i = name, 1
    while name in taken:
      name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name

  def run(m, inputs, top: bool):
    tensor_map = {id(t): n for t, n in zip(m.inputs, inputs)}

    def mapped(x):
      if id(x) in tensor_map:
        return tensor_map[id(x)]
      if hasattr(x, "_keras_history"):
        raise UnsupportedModelError(
            f"Tensor {getattr(x, 'name', x)!r} is used in model {m.name!r} but not "
            "produced inside it. Expected self-contained nested models.")
      return x

    for layer in m.layers:
      if isinstance(layer, keras.layers.InputLayer):
        continue
      nodes = model_nodes(m, layer)
      if len(nodes) != 1:
        raise UnsupportedModelError(
            f"Expected each layer to be called once. Received: layer {layer.name!r} is "
            f"called {len(nodes)} times in model {m.name!r}.")
      node = nodes[0]
      args = tf.nest.map_structure(mapped, node.call_args)
      kwargs = tf.nest.map_structure(mapped, node.call_kwargs)
      if isinstance(layer, keras.Model):
        outs = run(layer, tf.nest.flatten(args), False)
        out = outs[0] if len(outs) == 1 else outs
      else:
        config = dict(layer.get_config())
        config["name"] = layer.name if top else unique(layer.name, m.name)
        new = layer.__class__.from_config(config)
        out = new(*args, **kwargs)
        pending.append((new, layer.get_weights()))
      for old_t, new_t in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(out)):
        tensor_map[id(old_t)] = new_t
    return [tensor_map[id(t)] for t in m.outputs]

  new_inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype,
                            name=t.name.split(":")[0].split("/")[0]) for t in model.inputs]
  outputs = run(model, new_inputs, True)
  flat = keras.Model(new_inputs if len(new_inputs) > 1 else new_inputs[0],
                     outputs if len(outputs) > 1 else outputs[0], name=model.name)
  for layer, weights in pending:
    layer.set_weights(weights)
  return flat


def layer_output(model, layer):
  """``layer``'s output tensor in ``model``'s graph (a layer may also live in others).

  tfmot keeps the input ``QuantizeLayer`` instance of the model it
  transformed when the input has several consumers, so ``layer.output``
  would name that other graph's tensor.
  """
  nodes = model_nodes(model, layer)
  return nodes[0].outputs if len(nodes) == 1 else layer.output


def clone_layer(layer):
  return layer.__class__.from_config(layer.get_config())


def consumers_of(model, layer) -> List:
  """Layers of ``model`` that take ``layer``'s output."""
  out = []
  for node in layer._outbound_nodes:  # pylint: disable=protected-access
    consumer = node.outbound_layer
    if consumer in model.layers:
      out.append(consumer)
  return out
