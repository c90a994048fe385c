"""Walking and rebuilding a functional tf_keras model's layer graph.

`rebuild` makes a new functional model from an old one, layer by layer, with
a hook that may replace any layer (BatchNorm folding uses it); `layer_output`
and `consumers_of` answer what feeds what.

>>> graph_layers = [l.name for l in model_nodes_in_order(model)]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

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


def _new_inputs(model) -> List:
  """Fresh ``keras.Input``s shaped and named like ``model``'s inputs."""
  return [keras.Input(batch_shape=t.shape, dtype=t.dtype,
                      name=t.name.split(":")[0].split("/")[0]) for t in model.inputs]


def _replay(model, inputs: Sequence, call: Callable) -> List:
  """Walks ``model``'s graph on new ``inputs``; returns the new outputs (a list).

  ``call(layer, args, kwargs)`` gives each layer's new output from its call's
  arguments, already mapped to the new tensors. Each layer must be called
  once in the graph.
  """
  tensor_map: Dict[int, object] = {id(t): n for t, n in zip(model.inputs, inputs)}

  def mapped(x):
    if id(x) in tensor_map:
      return tensor_map[id(x)]
    if hasattr(x, "_keras_history"):
      raise UnsupportedModelError(
          f"Tensor {getattr(x, 'name', x)!r} is used in model {model.name!r} but not "
          "produced inside it. Expected a self-contained functional model.")
    return x

  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    nodes = model_nodes(model, layer)
    if len(nodes) != 1:
      raise UnsupportedModelError(
          f"Layer {layer.name!r} is called {len(nodes)} times in model {model.name!r}. "
          "Expected each layer to be used once (shared layers are not supported).")
    node = nodes[0]
    out = call(layer, tf.nest.map_structure(mapped, node.call_args),
               tf.nest.map_structure(mapped, node.call_kwargs))
    for old_t, new_t in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(out)):
      tensor_map[id(old_t)] = new_t
  return [tensor_map[id(t)] for t in model.outputs]


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
  new_inputs = _new_inputs(model)
  pending = []

  def call(layer, args, kwargs):
    new_layer, weights = transform(layer)
    if new_layer is None:
      (inp,) = tf.nest.flatten(args)
      return inp
    if weights is not None:
      pending.append((new_layer, weights))
    return new_layer(*args, **kwargs)

  hooked = [input_hook(t) if input_hook is not None else t for t in new_inputs]
  outputs = _replay(model, hooked, call)
  new_model = keras.Model(new_inputs, outputs[0] if len(outputs) == 1 else outputs,
                          name=name or model.name)
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

  def calls_in(m, top: bool):
    def call(layer, args, kwargs):
      if isinstance(layer, keras.Model):
        outs = _replay(layer, tf.nest.flatten(args), calls_in(layer, False))
        return outs[0] if len(outs) == 1 else outs
      config = dict(layer.get_config())
      config["name"] = layer.name if top else unique(layer.name, m.name)
      new = layer.__class__.from_config(config)
      pending.append((new, layer.get_weights()))
      return new(*args, **kwargs)
    return call

  new_inputs = _new_inputs(model)
  outputs = _replay(model, new_inputs, calls_in(model, True))
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
