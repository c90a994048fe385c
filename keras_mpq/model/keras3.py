"""Keras 3 models rebuilt as tf_keras models (tfmot wraps only tf_keras), layer by layer.

The rebuilt model has the same layer names and weights, and is checked to
give the same outputs as the Keras 3 model on random inputs.

>>> tf_keras_model = keras3_to_tf_keras(keras3_model)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from keras_mpq.base.compat import keras, tf
from keras_mpq.base.errors import (
  InvalidInputError,
  KerasMpqError,
  UnsupportedModelError,
)

WHAT_TO_DO = ("Rebuild the model with standard Keras layers, or pass a tf_keras "
               "model (import tf_keras) built from standard layers.")


def first_line(exc: BaseException) -> str:
  text = str(exc).strip() or type(exc).__name__
  return text.splitlines()[0][:300]



# Keras 3 activation names whose tf_keras function computes the same thing.
# (Keras 3 'hard_sigmoid' is relu6(x + 3) / 6, tf_keras' is a different line,
# so it is deliberately absent here and rebuilt from layers below, as are
# 'relu6', 'hard_silu' and 'leaky_relu', which tf_keras lacks.)
_SAME_ACTIVATIONS = {
    "linear": "linear", "relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh",
    "softmax": "softmax", "silu": "swish", "swish": "swish", "elu": "elu",
    "selu": "selu", "softplus": "softplus", "softsign": "softsign",
    "exponential": "exponential", "gelu": "gelu", "mish": "mish",
}
# Keras 3 activations without a same-named tf_keras function, rebuilt from
# standard layers (`_ActivationBlock`): name -> block kind.
_BLOCK_ACTIVATIONS = {
    "relu6": "relu6", "hard_sigmoid": "hard_sigmoid", "hard_silu": "hard_silu",
    "hard_swish": "hard_silu", "leaky_relu": "leaky_relu",
}
# Raw keras.ops arithmetic rebuilt as layers (`_Converter.call_arithmetic`).
_ARITHMETIC_OPS = ("Add", "Subtract", "Multiply", "Divide", "TrueDivide")
# Base-layer keyword arguments tf_keras accepts on every layer.
_BASE_LAYER_KWARGS = {"name", "dtype", "trainable", "dynamic", "activity_regularizer",
                      "input_shape", "batch_input_shape", "batch_size", "input_dim"}


# ----------------------------------------------------------------- Keras 3 -> tf_keras


def keras3_to_tf_keras(model, tolerance: float = 1e-4, seed: int = 0) -> "keras.Model":
  """Rebuilds a Keras 3 Sequential/functional model as tf_keras with the same weights.

  Walks the Keras 3 graph in order; each layer is recreated in tf_keras from its
  own ``get_config`` (dtype policies, initializer and activation names
  translated), called on the mapped tensors, and given the Keras 3 layer's
  weights. Nested Keras 3 models are inlined, so the result is flat. The two
  models are then run on the same random inputs and must agree.

  Args:
    model: a built Keras 3 ``Sequential`` or functional model of standard layers.
    tolerance: the largest allowed max-abs output difference, relative to the
      largest output magnitude when that exceeds 1.
    seed: seed of the random check inputs.

  Returns:
    A tf_keras functional ``Model`` with the same layer names and weights.

  Raises:
    UnsupportedModelError: a subclassed model, a ``Lambda`` or custom layer, a
      raw ``keras.ops`` call in the graph, a Keras 3-quantized layer, or outputs
      that differ beyond ``tolerance``.

  Example:

  >>> import keras  # Keras 3
  >>> k3 = keras.Sequential([keras.Input((8,), name="x"), keras.layers.Dense(3, name="fc")])
  >>> [l.name for l in keras3_to_tf_keras(k3).layers]
  ['x', 'fc']
  """
  import keras as keras3  # pylint: disable=g-import-not-at-top
  if isinstance(model, keras.Model):
    return model
  if not isinstance(model, keras3.Model):
    raise InvalidInputError(
        f"Expected a Keras 3 model. Received: model of type {type(model).__name__}")
  _check_keras3_graph(model, keras3)
  converter = _Converter(keras3)
  inputs = [converter.make_input(x) for x in model.inputs]
  outputs = converter.run(model, inputs)
  try:
    new = keras.Model(inputs if len(inputs) > 1 else inputs[0],
                      outputs if len(outputs) > 1 else outputs[0], name=model.name)
  except Exception as e:  # pylint: disable=broad-except
    raise UnsupportedModelError(
        f"Could not rebuild Keras 3 model {model.name!r} in tf_keras: {first_line(e)}. "
        + WHAT_TO_DO) from None
  converter.copy_weights()
  diff, scale = _output_difference(model, new, seed)
  if not diff <= tolerance * scale:
    raise UnsupportedModelError(
        f"Expected the tf_keras rebuild of Keras 3 model {model.name!r} to match it. "
        f"Received: max abs output difference {diff:.3g} on random inputs (allowed "
        f"{tolerance * scale:.3g}). Some layer behaves differently in tf_keras. "
        + WHAT_TO_DO)
  return new


def _check_keras3_graph(model, keras3) -> None:
  if not (isinstance(model, keras3.Sequential) or hasattr(model, "_nodes_by_depth")):
    raise UnsupportedModelError(
        f"Expected a Sequential or functional Keras 3 model. Received: model "
        f"{model.name!r} of subclassed type {type(model).__name__}, whose layers "
        "cannot be read as a graph. Rebuild it with the functional API "
        "(keras.Model(inputs, outputs)), or pass a tf_keras model.")
  try:
    inputs = model.inputs
  except Exception:  # pylint: disable=broad-except
    inputs = None
  if not inputs:
    raise UnsupportedModelError(
        f"Expected a built Keras 3 model with a known input shape. Received: model "
        f"{model.name!r} is not built. Start it with keras.Input(shape) or call "
        "model.build(input_shape).")


class _Converter:
  """Maps Keras 3 layers to tf_keras layers while walking the Keras 3 graph."""

  def __init__(self, keras3):
    self.keras3 = keras3
    self.layers: Dict[int, Any] = {}  # id(Keras 3 layer) -> (tf_keras layer, post layer)
    self.pairs: List[Tuple[Any, Any]] = []  # (Keras 3 layer, tf_keras layer) to copy
    self.names: set = set()

  def unique(self, name: str, scope: Optional[str] = None) -> str:
    if name in self.names and scope:
      name = f"{scope}_{name}"
    base, i = name, 1
    while name in self.names:
      name, i = f"{base}_{i}", i + 1
    self.names.add(name)
    return name

  def make_input(self, tensor):
    layer = getattr(tensor, "_keras_history", None)
    name = layer.operation.name if layer is not None else None
    shape = tuple(tensor.shape)
    dtype = str(tensor.dtype)
    sparse = bool(getattr(tensor, "sparse", False))
    return keras.Input(batch_shape=shape, dtype=dtype, sparse=sparse,
                       name=self.unique(name or "input"))

  def run(self, model, inputs: List[Any]) -> List[Any]:
    """Applies ``model``'s graph to tf_keras tensors; returns the flat outputs."""
    keras3 = self.keras3
    if isinstance(model, keras3.Sequential):
      x = inputs[0]
      for layer in model.layers:
        x = self.call(layer, (x,), {}, scope=model.name)
      return tf.nest.flatten(x)
    if not hasattr(model, "_nodes_by_depth"):
      raise UnsupportedModelError(
          f"Expected nested models to be Sequential or functional. Received: "
          f"{model.name!r} of subclassed type {type(model).__name__}. " + WHAT_TO_DO)
    tensors = {id(x): y for x, y in zip(model.inputs, inputs)}
    nodes_by_depth = model._nodes_by_depth  # pylint: disable=protected-access
    for depth in sorted(nodes_by_depth, reverse=True):
      for node in nodes_by_depth[depth]:
        if not node.operation or node.is_input:
          continue
        if any(id(x) not in tensors for x in node.input_tensors):
          continue
        args, kwargs = node.arguments.fill_in(tensors)
        outputs = self.call(node.operation, args, kwargs, scope=model.name)
        for x, y in zip(node.outputs, tf.nest.flatten(outputs)):
          tensors[id(x)] = y
    return [tensors[id(x)] for x in model.outputs]

  def call(self, op, args, kwargs, scope: Optional[str]):
    keras3 = self.keras3
    if isinstance(op, keras3.Model):
      outs = self.run(op, tf.nest.flatten(args))
      return outs[0] if len(outs) == 1 else outs
    if isinstance(op, keras3.layers.InputLayer):
      return args[0] if args else None
    if not isinstance(op, keras3.layers.Layer) and type(op).__name__ in _ARITHMETIC_OPS:
      return self.call_arithmetic(op, args, kwargs)
    if not isinstance(op, keras3.layers.Layer):
      raise UnsupportedModelError(
          f"Expected a graph of Keras layers. Received: operation {op.name!r} "
          f"({type(op).__name__}), a raw keras.ops call inside the model. Replace it "
          "with the matching layer (e.g. keras.layers.Add instead of keras.ops.add), "
          "or pass a tf_keras model.")
    if id(op) not in self.layers:
      self.layers[id(op)] = self.make_layer(op, scope)
    layer, post = self.layers[id(op)]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
      out = layer(*args, **kwargs)
      if post is not None:
        out = post(out)
    except KerasMpqError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise UnsupportedModelError(
          f"Could not rebuild layer {op.name!r} ({type(op).__name__}) in tf_keras: "
          f"{first_line(e)}. " + WHAT_TO_DO) from None
    return out

  def call_arithmetic(self, op, args, kwargs):
    """``x + c``, ``x * c``, ``x - y``, ... (raw keras.ops arithmetic) as tf_keras layers.

    With one tensor and one scalar constant: a ``Rescaling`` (``x * scale +
    offset``), as keras.applications' MobileNetV3 writes ``x + 3.0`` and
    ``x * (1 / 6)``. With two tensors: ``Add``, ``Subtract`` or ``Multiply``.
    """
    kind = type(op).__name__
    operands = list(args) + [kwargs[k] for k in ("x1", "x2") if k in kwargs]
    if len(operands) != 2 or len(kwargs) > 2:
      raise self.raw_op_error(op, "with two operands")
    tensors = [hasattr(v, "shape") and not isinstance(v, (np.ndarray, np.generic))
               for v in operands]
    key = id(op)
    if all(tensors):
      if kind not in ("Add", "Subtract", "Multiply"):
        raise self.raw_op_error(op, "between two tensors")
      if key not in self.layers:
        self.layers[key] = (getattr(keras.layers, kind)(name=self.unique(op.name)), None)
      return self.layers[key][0](operands)
    if not any(tensors):
      raise self.raw_op_error(op, "on a tensor")
    const = operands[1] if tensors[0] else operands[0]
    try:
      c = float(np.asarray(const, dtype=np.float64))
    except (TypeError, ValueError):
      raise self.raw_op_error(op, "with a scalar constant") from None
    x = operands[0] if tensors[0] else operands[1]
    tensor_first = tensors[0]
    if kind == "Add":
      scale, offset = 1.0, c
    elif kind == "Subtract":
      scale, offset = (1.0, -c) if tensor_first else (-1.0, c)
    elif kind == "Multiply":
      scale, offset = c, 0.0
    elif tensor_first and c != 0.0:  # Divide / TrueDivide by a constant
      scale, offset = 1.0 / c, 0.0
    else:
      raise self.raw_op_error(op, "dividing by a nonzero scalar constant")
    if key not in self.layers:
      self.layers[key] = (keras.layers.Rescaling(scale, offset=offset,
                                                 name=self.unique(op.name)), None)
    return self.layers[key][0](x)

  @staticmethod
  def raw_op_error(op, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"Expected a graph of Keras layers, or keras.ops arithmetic ({', '.join(_ARITHMETIC_OPS)}) "
        f"{what}. Received: operation {op.name!r} ({type(op).__name__}), a raw keras.ops "
        "call keras_mpq cannot rebuild. Replace it with the matching layer (e.g. "
        "keras.layers.Add instead of keras.ops.add), or pass a tf_keras model.")

  def make_layer(self, op, scope):
    """The tf_keras layer (and an optional activation layer after it) for ``op``."""
    cls_name = type(op).__name__
    module = type(op).__module__
    if cls_name == "Lambda":
      raise UnsupportedModelError(
          f"Expected a model built from standard layers. Received: layer {op.name!r} "
          "of class Lambda, which wraps arbitrary Python code. " + WHAT_TO_DO)
    if not module.startswith("keras."):
      raise UnsupportedModelError(
          f"Expected a model built from standard layers. Received: layer {op.name!r} "
          f"of custom class {cls_name} (module {module}). " + WHAT_TO_DO)
    tfk_cls = getattr(keras.layers, cls_name, None)
    if tfk_cls is None or not isinstance(tfk_cls, type):
      raise UnsupportedModelError(
          f"Expected layers that exist in tf_keras. Received: layer {op.name!r} of "
          f"Keras 3 class {cls_name}, which has no tf_keras equivalent. " + WHAT_TO_DO)
    config = op.get_config()
    name = self.unique(str(config.get("name", op.name)), scope)
    config["name"] = name
    config, post_activation = _translate_layer_config(config, tfk_cls, op)
    if cls_name == "Activation" and post_activation is not None:
      # The whole layer is the activation: its block, the last layer keeping the name.
      return _ActivationBlock(post_activation, name, self.unique), None
    try:
      layer = tfk_cls.from_config(config)
    except Exception as e:  # pylint: disable=broad-except
      raise UnsupportedModelError(
          f"Could not rebuild layer {op.name!r} ({cls_name}) in tf_keras from its "
          f"config: {first_line(e)}. " + WHAT_TO_DO) from None
    post = None
    if post_activation is not None:
      post = _ActivationBlock(post_activation, self.unique(f"{name}_{post_activation}"),
                              self.unique)
    self.pairs.append((op, layer))
    return layer, post


  def copy_weights(self) -> None:
    for op, layer in self.pairs:
      weights = op.get_weights()
      target = layer.get_weights()
      if [w.shape for w in weights] != [w.shape for w in target]:
        raise UnsupportedModelError(
            f"Could not copy the weights of layer {op.name!r} ({type(op).__name__}): "
            f"Keras 3 has shapes {[tuple(w.shape) for w in weights]}, tf_keras "
            f"{[tuple(w.shape) for w in target]}. " + WHAT_TO_DO)
      layer.set_weights(weights)
      if hasattr(layer, "finalize_state") and weights:
        layer.finalize_state()  # e.g. Normalization recomputes mean/variance


class _ActivationBlock:
  """A Keras 3 activation tf_keras lacks, as standard tf_keras layers.

  ``relu6``: ``ReLU(max_value=6)``. ``hard_sigmoid`` (Keras 3's:
  ``relu6(x + 3) / 6``): ``Rescaling(1, 3)``, ``ReLU(6)``, ``Rescaling(1/6)``.
  ``hard_silu``: ``x * hard_sigmoid(x)`` with a ``Multiply``; TFLite's converter
  fuses that pattern into one HARD_SWISH operator. ``leaky_relu``: Keras 3's
  default slope 0.2. The last layer gets ``name`` (the Keras 3 layer's), so
  the layer that consumers see keeps its name; helper layers are suffixed.
  Calls after the first reuse the same layers (a shared Keras 3 layer stays
  shared).
  """

  def __init__(self, kind: str, name: str, unique):
    self.kind, self.name = kind, name
    if kind == "relu6":
      self.parts = [keras.layers.ReLU(max_value=6.0, name=name)]
    elif kind == "leaky_relu":
      self.parts = [keras.layers.LeakyReLU(alpha=0.2, name=name)]
    elif kind in ("hard_sigmoid", "hard_silu"):
      last = name if kind == "hard_sigmoid" else unique(f"{name}_hard_sigmoid")
      self.parts = [keras.layers.Rescaling(1.0, offset=3.0, name=unique(f"{name}_add3")),
                    keras.layers.ReLU(max_value=6.0, name=unique(f"{name}_relu6")),
                    keras.layers.Rescaling(1.0 / 6.0, name=last)]
      if kind == "hard_silu":
        self.parts.append(keras.layers.Multiply(name=name))
    else:  # pragma: no cover - _translate_layer_config only returns the kinds above
      raise ValueError(kind)

  def __call__(self, x, **kwargs):
    del kwargs  # activations take no training/mask arguments
    h = x
    for part in self.parts:
      h = part([x, h]) if isinstance(part, keras.layers.Multiply) else part(h)
    return h


def _translate_layer_config(config: Dict[str, Any], tfk_cls,
                            op) -> Tuple[Dict[str, Any], Optional[str]]:
  """Keras 3 layer config -> tf_keras config; also returns 'relu6' if split off."""
  config = dict(config)
  post = None
  mode = getattr(op, "quantization_mode", None)
  if config.get("quantization_config") is not None or mode is not None:
    raise UnsupportedModelError(
        f"Expected a float model. Received: layer {op.name!r} quantized by Keras 3 "
        f"(mode {mode!r}). Pass the float model from before model.quantize().")
  if "dtype" in config:
    config["dtype"] = _policy_name(config["dtype"], op)
  for key in list(config):
    if key.endswith("_initializer"):
      value = _translate_object(config[key], keras.initializers)
      if value is None and config[key] is not None:
        del config[key]  # tf_keras default; only matters for re-initialization
      else:
        config[key] = value
    elif key.endswith("_regularizer"):
      config[key] = _translate_object(config[key], keras.regularizers)
    elif key.endswith("_constraint"):
      config[key] = _translate_object(config[key], keras.constraints)
  if "activation" in config:
    activation = config["activation"]
    name = activation if isinstance(activation, str) else None
    if name in _SAME_ACTIVATIONS:
      config["activation"] = _SAME_ACTIVATIONS[name]
    elif name in _BLOCK_ACTIVATIONS:
      config["activation"], post = "linear", _BLOCK_ACTIVATIONS[name]
    else:
      raise UnsupportedModelError(
          f"Expected a standard activation with the same meaning in tf_keras "
          f"({sorted(set(_SAME_ACTIVATIONS) | set(_BLOCK_ACTIVATIONS))}). Received: layer {op.name!r} "
          f"({type(op).__name__}) with activation={activation!r}. " + WHAT_TO_DO)
  accepted = _init_parameters(tfk_cls) | _BASE_LAYER_KWARGS
  for key in list(config):
    if key not in accepted:
      value = config.pop(key)
      if value not in (None, False, 0, "", [], {}, ()):
        raise UnsupportedModelError(
            f"Expected layer options tf_keras supports. Received: layer {op.name!r} "
            f"({type(op).__name__}) with {key}={value!r}, which tf_keras "
            f"{tfk_cls.__name__} does not have. " + WHAT_TO_DO)
  return config, post


def _policy_name(dtype: Any, op) -> Any:
  if isinstance(dtype, dict):
    dtype = (dtype.get("config") or {}).get("name", "float32")
  quantized = ("int8", "int4", "float8", "gptq", "awq")
  if isinstance(dtype, str) and any(q in dtype for q in quantized):
    raise UnsupportedModelError(
        f"Expected a float model. Received: layer {op.name!r} quantized by Keras 3 "
        f"(dtype policy {dtype!r}). Pass the float model before model.quantize().")
  return dtype


def _translate_object(value: Any, namespace) -> Any:
  """A Keras 3 initializer/regularizer/constraint -> tf_keras form, or None."""
  if value is None or isinstance(value, str):
    return value
  if not isinstance(value, dict) or "class_name" not in value:
    return None
  cls = getattr(namespace, value["class_name"], None)
  if not isinstance(cls, type):
    return None
  params = _init_parameters(cls)
  inner = {k: v for k, v in (value.get("config") or {}).items() if k in params}
  result = {"class_name": value["class_name"], "config": inner}
  try:
    namespace.deserialize(result)
  except Exception:  # pylint: disable=broad-except
    return None
  return result


def _init_parameters(cls) -> set:
  """Named ``__init__`` parameters of ``cls`` and, through ``**kwargs``, its bases."""
  names = set()
  for klass in cls.__mro__:
    init = klass.__dict__.get("__init__")
    if init is None:
      continue
    try:
      params = inspect.signature(init).parameters.values()
    except (TypeError, ValueError):
      break
    names.update(p.name for p in params
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self")
    if not any(p.kind == p.VAR_KEYWORD for p in params):
      break
  return names


def _random_inputs(tensors, seed: int) -> List[np.ndarray]:
  rng = np.random.default_rng(seed)
  arrays = []
  for t in tensors:
    shape = [2] + [32 if d is None else int(d) for d in tuple(t.shape)[1:]]
    dtype = np.dtype(str(t.dtype))
    if np.issubdtype(dtype, np.integer):
      arrays.append(rng.integers(0, 10, size=shape).astype(dtype))
    else:
      arrays.append(rng.uniform(0.0, 1.0, size=shape).astype(dtype))
  return arrays


def _output_difference(k3_model, tfk_model, seed: int) -> Tuple[float, float]:
  """Max abs difference of the two models' outputs on random inputs, and the scale."""
  xs = _random_inputs(k3_model.inputs, seed)
  feed = xs if len(xs) > 1 else xs[0]
  try:
    ref = [np.asarray(a, dtype=np.float64) for a in
           tf.nest.flatten(k3_model(feed, training=False))]
    got = [np.asarray(a, dtype=np.float64) for a in
           tf.nest.flatten(tfk_model(feed, training=False))]
  except Exception as e:  # pylint: disable=broad-except
    raise UnsupportedModelError(
        f"Could not run Keras 3 model {k3_model.name!r} and its tf_keras rebuild on "
        f"random inputs of shapes {[x.shape for x in xs]}: {first_line(e)}") from None
  if [a.shape for a in ref] != [a.shape for a in got]:
    return float("inf"), 1.0
  diff = max((float(np.max(np.abs(a - b))) for a, b in zip(ref, got) if a.size), default=0.0)
  scale = max([1.0] + [float(np.max(np.abs(a))) for a in ref if a.size])
  return diff, scale
