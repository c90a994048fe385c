"""Model intake: whatever Keras model or file the user has, a checked tf_keras model out.

tensorflow-model-optimization works on Keras 2 (``tf_keras``); users arrive with
Keras 3 models (``import keras``, or ``tf.keras`` in TF >= 2.16), ``.keras``
archives written by either Keras, legacy ``.h5`` files and Keras SavedModel
directories. `load_model` takes any of these and returns a tf_keras model;
Keras 3 models are rebuilt layer by layer as tf_keras with the same weights
and checked numerically (`keras3_to_tf_keras`). `check_model` says early and
clearly why a model cannot be quantized, and `fingerprint` keys caches.

Files are loaded with ``safe_mode`` on and their configs are scanned first:
a ``Lambda`` layer (whose Python code would have to be run) or a custom class
is refused before any loader sees the file, so nothing from the file runs.

Example:

>>> from keras_mpq import model_io
>>> model = model_io.load_model("model.keras")   # doctest: +SKIP
>>> model_io.check_model(model)                  # doctest: +SKIP
>>> model_io.fingerprint(model)                  # doctest: +SKIP
'3f1c0a9b2e4d5f60'

``keras`` in this module is tf_keras (from `keras_mpq.compat`); Keras 3 is
imported lazily, inside the functions that need it, as ``keras3``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pathlib
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from keras_mpq import quantizers
from keras_mpq.compat import is_keras3_model, keras, tf
from keras_mpq.types import InvalidInputError, KerasMpqError, UnsupportedModelError

__all__ = ["load_model", "keras3_to_tf_keras", "check_model", "fingerprint"]

_EXPECTED = ("a tf_keras or Keras 3 model, or a path to a '.keras' file, an '.h5' "
             "file or a Keras SavedModel directory")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
_WHAT_TO_DO = ("Rebuild the model with standard Keras layers, or pass a tf_keras "
               "model (import tf_keras) built from standard layers.")

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


# --------------------------------------------------------------------------- loading


def load_model(model_or_path) -> "keras.Model":
  """Returns a tf_keras model for a model object or a saved model path.

  Args:
    model_or_path: a tf_keras ``Model`` (returned as is once checked to be
      built); a Keras 3 model (rebuilt with `keras3_to_tf_keras`); or a path
      (``str`` or ``pathlib.Path``) to a ``.keras`` archive (written by Keras 3
      or by tf_keras), an ``.h5`` file, or a Keras SavedModel directory.

  Returns:
    A built tf_keras ``Model``, not compiled.

  Raises:
    InvalidInputError: the path is missing, unreadable, or not a Keras model.
    UnsupportedModelError: the model holds a ``Lambda`` layer, a custom layer
      or anything else that has no standard tf_keras equivalent.

  Example:

  >>> import keras  # Keras 3
  >>> k3 = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
  >>> model = load_model(k3)
  >>> type(model).__module__.startswith("tf_keras")
  True
  """
  if isinstance(model_or_path, keras.Model):
    if not model_or_path.built or not getattr(model_or_path, "inputs", None):
      if getattr(model_or_path, "_is_graph_network", False) or isinstance(
          model_or_path, keras.Sequential):
        raise InvalidInputError(
            f"Expected a built model with a known input shape. Received: model "
            f"{model_or_path.name!r} is not built. Give its first layer an input "
            "shape (keras.Input(shape)) or call model.build(input_shape).")
    return model_or_path
  if is_keras3_model(model_or_path):
    return keras3_to_tf_keras(model_or_path)
  if isinstance(model_or_path, (str, os.PathLike)):
    return _load_path(pathlib.Path(os.fspath(model_or_path)).expanduser())
  raise InvalidInputError(
      f"Expected {_EXPECTED}. Received: model of type {type(model_or_path).__name__}")


def _load_path(path: pathlib.Path):
  """Dispatches on what the path is: SavedModel directory, .keras or .h5 file."""
  if not path.exists():
    raise InvalidInputError(
        f"Expected {_EXPECTED}. Received: path={str(path)!r}, which does not exist.")
  if path.is_dir():
    return _load_saved_model(path)
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError as e:
    raise InvalidInputError(
        f"Expected a readable model file. Received: path={str(path)!r} cannot be "
        f"read ({e.strerror}). Check its permissions.") from None
  suffix = path.suffix.lower()
  if suffix == ".keras" or (suffix not in (".h5", ".hdf5") and head.startswith(_ZIP_MAGIC)):
    if not head.startswith(_ZIP_MAGIC):
      raise InvalidInputError(
          "Expected a '.keras' archive (a zip file holding config.json, written by "
          f"model.save('model.keras')). Received: path={str(path)!r}, which is not a "
          "zip file.")
    return _load_keras_archive(path)
  if suffix in (".h5", ".hdf5") or head.startswith(_HDF5_MAGIC):
    if not head.startswith(_HDF5_MAGIC):
      raise InvalidInputError(
          "Expected an HDF5 model file (written by model.save('model.h5')). "
          f"Received: path={str(path)!r}, which is not an HDF5 file.")
    return _load_h5(path)
  raise InvalidInputError(
      f"Expected {_EXPECTED}. Received: path={str(path)!r}, which is neither a "
      "'.keras' archive nor an HDF5 file.")


def _load_keras_archive(path: pathlib.Path):
  """Loads a .keras zip with the Keras that wrote it (safe mode, config scanned first)."""
  try:
    with zipfile.ZipFile(path) as archive:
      config = json.loads(archive.read("config.json"))
      try:
        metadata = json.loads(archive.read("metadata.json"))
      except KeyError:
        metadata = {}
  except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
    raise InvalidInputError(
        "Expected a '.keras' archive with a model config (config.json), as written "
        f"by model.save('model.keras'). Received: path={str(path)!r} "
        f"({_first_line(e)}).") from None
  _scan_config(config, path)
  version = str(metadata.get("keras_version", ""))
  if version.startswith("2."):
    with _loading(path, "a tf_keras '.keras' archive"):
      model = keras.models.load_model(str(path), compile=False, safe_mode=True)
    return _as_tf_keras_model(model, path)
  import keras as keras3  # pylint: disable=g-import-not-at-top
  with _loading(path, "a Keras 3 '.keras' archive"):
    model = keras3.saving.load_model(str(path), compile=False, safe_mode=True)
  return keras3_to_tf_keras(model)


def _load_h5(path: pathlib.Path):
  """Loads a legacy .h5 model file (config scanned first)."""
  import h5py  # pylint: disable=g-import-not-at-top
  try:
    with h5py.File(path, "r") as f:
      raw_config = f.attrs.get("model_config")
      version = f.attrs.get("keras_version", "")
  except OSError as e:
    raise InvalidInputError(
        f"Expected a readable HDF5 model file. Received: path={str(path)!r} "
        f"({_first_line(e)}).") from None
  if raw_config is None:
    raise InvalidInputError(
        "Expected an HDF5 file holding a whole model (model.save('model.h5')). "
        f"Received: path={str(path)!r} holds weights only (save_weights); build the "
        "model, call model.load_weights(path), and pass the model.")
  if isinstance(raw_config, bytes):
    raw_config = raw_config.decode("utf-8")
  if isinstance(version, bytes):
    version = version.decode("utf-8")
  try:
    config = json.loads(raw_config)
  except ValueError:
    raise InvalidInputError(
        f"Expected an HDF5 model file with a JSON model config. Received: "
        f"path={str(path)!r}, whose model_config is not JSON.") from None
  _scan_config(config, path)
  if str(version).startswith("3."):
    import keras as keras3  # pylint: disable=g-import-not-at-top
    with _loading(path, "a Keras 3 '.h5' file"):
      model = keras3.saving.load_model(str(path), compile=False, safe_mode=True)
    return keras3_to_tf_keras(model)
  with _loading(path, "a tf_keras '.h5' file"):
    model = keras.models.load_model(str(path), compile=False, safe_mode=True)
  return _as_tf_keras_model(model, path)


def _load_saved_model(path: pathlib.Path):
  """Loads a Keras SavedModel directory; refuses a bare tf.saved_model."""
  if not ((path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()):
    raise InvalidInputError(
        f"Expected {_EXPECTED}. Received: path={str(path)!r}, a directory without "
        "saved_model.pb, so not a SavedModel.")
  metadata_path = path / "keras_metadata.pb"
  if not metadata_path.is_file():
    raise InvalidInputError(
        "Expected a Keras model or a SavedModel written by tf_keras model.save(). "
        f"Received: path={str(path)!r}, a SavedModel without Keras metadata "
        "(keras_metadata.pb), as written by tf.saved_model.save or Keras 3 "
        "model.export(); it has no Keras layers to quantize. Pass the Keras model "
        "itself, or save it with model.save('model.keras').")
  from tf_keras.protobuf import saved_metadata_pb2  # pylint: disable=g-import-not-at-top
  metadata = saved_metadata_pb2.SavedMetadata()
  try:
    metadata.ParseFromString(metadata_path.read_bytes())
  except Exception as e:  # pylint: disable=broad-except
    raise InvalidInputError(
        f"Expected a Keras SavedModel. Received: path={str(path)!r}, whose "
        f"keras_metadata.pb cannot be read ({_first_line(e)}).") from None
  for node in metadata.nodes:
    try:
      node_config = json.loads(node.metadata)
    except ValueError:
      continue
    _scan_config(node_config, path)
  with _loading(path, "a tf_keras SavedModel"):
    model = keras.models.load_model(str(path), compile=False)
  return _as_tf_keras_model(model, path)


def _scan_config(config: Any, path: pathlib.Path) -> None:
  """Refuses Lambda layers and custom classes in a saved config, before loading it."""
  stack = [config]
  while stack:
    item = stack.pop()
    if isinstance(item, list):
      stack.extend(item)
      continue
    if not isinstance(item, dict):
      continue
    class_name = item.get("class_name")
    inner = item.get("config")
    name = (inner.get("name") if isinstance(inner, dict) else None) or item.get("name")
    if class_name in ("Lambda", "TFOpLambda", "SlicingOpLambda"):
      raise UnsupportedModelError(
          f"Expected a model built from standard layers. Received: {str(path)!r} holds "
          f"layer {name!r} of class {class_name}, which wraps Python code; keras_mpq "
          "does not load or run code from model files. " + _WHAT_TO_DO)
    module = item.get("module")
    if (isinstance(class_name, str) and isinstance(module, str)
        and module.split(".")[0] not in ("keras", "tf_keras", "builtins", "numpy")):
      raise UnsupportedModelError(
          f"Expected a model built from standard layers. Received: {str(path)!r} holds "
          f"{name or 'an object'!r} of custom class {class_name} (module {module!r}); "
          "keras_mpq does not import code named by model files. " + _WHAT_TO_DO)
    registered = item.get("registered_name")
    if isinstance(registered, str) and ">" in registered:
      raise UnsupportedModelError(
          f"Expected a model built from standard layers. Received: {str(path)!r} holds "
          f"{name or 'an object'!r} of custom registered class {registered}. " + _WHAT_TO_DO)
    stack.extend(item.values())


class _loading:  # pylint: disable=invalid-name
  """Turns a loader's exception into an InvalidInputError naming the path."""

  def __init__(self, path: pathlib.Path, what: str):
    self.path, self.what = path, what

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc is None or isinstance(exc, KerasMpqError) or not isinstance(exc, Exception):
      return False
    raise InvalidInputError(
        f"Expected {self.what} that Keras can load. Received: path={str(self.path)!r}, "
        f"which failed to load: {_first_line(exc)}") from None


def _as_tf_keras_model(model, path: pathlib.Path):
  if not isinstance(model, keras.Model):
    raise InvalidInputError(
        f"Expected a saved Keras model. Received: path={str(path)!r} holds a "
        f"{type(model).__name__}, not a model.")
  return model


def _first_line(exc: BaseException) -> str:
  text = str(exc).strip() or type(exc).__name__
  return text.splitlines()[0][:300]


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
        f"Could not rebuild Keras 3 model {model.name!r} in tf_keras: {_first_line(e)}. "
        + _WHAT_TO_DO) from None
  converter.copy_weights()
  diff, scale = _output_difference(model, new, seed)
  if not diff <= tolerance * scale:
    raise UnsupportedModelError(
        f"Expected the tf_keras rebuild of Keras 3 model {model.name!r} to match it. "
        f"Received: max abs output difference {diff:.3g} on random inputs (allowed "
        f"{tolerance * scale:.3g}). Some layer behaves differently in tf_keras. "
        + _WHAT_TO_DO)
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
          f"{model.name!r} of subclassed type {type(model).__name__}. " + _WHAT_TO_DO)
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
          f"{_first_line(e)}. " + _WHAT_TO_DO) from None
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
          "of class Lambda, which wraps arbitrary Python code. " + _WHAT_TO_DO)
    if not module.startswith("keras."):
      raise UnsupportedModelError(
          f"Expected a model built from standard layers. Received: layer {op.name!r} "
          f"of custom class {cls_name} (module {module}). " + _WHAT_TO_DO)
    tfk_cls = getattr(keras.layers, cls_name, None)
    if tfk_cls is None or not isinstance(tfk_cls, type):
      raise UnsupportedModelError(
          f"Expected layers that exist in tf_keras. Received: layer {op.name!r} of "
          f"Keras 3 class {cls_name}, which has no tf_keras equivalent. " + _WHAT_TO_DO)
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
          f"config: {_first_line(e)}. " + _WHAT_TO_DO) from None
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
            f"{[tuple(w.shape) for w in target]}. " + _WHAT_TO_DO)
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
          f"({type(op).__name__}) with activation={activation!r}. " + _WHAT_TO_DO)
  accepted = _init_parameters(tfk_cls) | _BASE_LAYER_KWARGS
  for key in list(config):
    if key not in accepted:
      value = config.pop(key)
      if value not in (None, False, 0, "", [], {}, ()):
        raise UnsupportedModelError(
            f"Expected layer options tf_keras supports. Received: layer {op.name!r} "
            f"({type(op).__name__}) with {key}={value!r}, which tf_keras "
            f"{tfk_cls.__name__} does not have. " + _WHAT_TO_DO)
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
        f"random inputs of shapes {[x.shape for x in xs]}: {_first_line(e)}") from None
  if [a.shape for a in ref] != [a.shape for a in got]:
    return float("inf"), 1.0
  diff = max((float(np.max(np.abs(a - b))) for a, b in zip(ref, got) if a.size), default=0.0)
  scale = max([1.0] + [float(np.max(np.abs(a))) for a in ref if a.size])
  return diff, scale


# --------------------------------------------------------------------------- checks


def check_graph_model(model) -> None:
  """Raises unless ``model`` is a built, flat tf_keras Sequential or functional model.

  The structural part of `check_model`; every stage that walks the layer
  graph (BatchNorm folding, quantization) relies on it.

  >>> from keras_mpq.compat import keras
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
          f"({type(layer).__name__}). Rebuild the model with the sub-model's layers "
          "inlined, or pass it as a Keras 3 model (keras_mpq.load_model inlines "
          "nested Keras 3 models).")
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
  no nested models), one input and one output of shape ``(batch, classes)``,
  at least one quantizable layer (Dense, Conv1D, Conv2D, DepthwiseConv2D,
  SeparableConv2D, Conv2DTranspose), and finite weights.

  Example:

  >>> from keras_mpq.compat import keras
  >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
  >>> check_model(m) is m
  True
  """
  check_graph_model(model)
  if len(model.inputs) != 1 or len(model.outputs) != 1:
    raise UnsupportedModelError(
        "Expected a model with one input and one output; several inputs or outputs "
        f"are not supported yet. Received: model {model.name!r} with "
        f"{len(model.inputs)} inputs and {len(model.outputs)} outputs.")
  out_shape = tuple(model.outputs[0].shape)
  if len(out_shape) != 2:
    raise UnsupportedModelError(
        "Expected a classifier whose output has shape (batch, classes). Received: "
        f"model {model.name!r} with output shape {out_shape}. Add a classification "
        "head (e.g. GlobalAveragePooling2D then Dense(classes)).")
  if not quantizers.quantizable_layers(model):
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


# Final activations of a classifier head (logits are 'linear').
_CLASSIFIER_ACTIVATIONS = ("linear", "softmax", "sigmoid")


def classifier_head(model) -> str:
  """What a checked model's output is: 'classes' (logits or softmax) or 'binary'.

  ``keras_mpq.quantize`` measures sensitivity as a classification loss, so it
  takes classifiers only: logits or softmax over two or more classes, or one
  sigmoid unit (a binary classifier, handled as two classes). Called before
  the slow stages; refuses regression-like heads (one linear unit, or a last
  activation such as relu or tanh) with what to do instead.

  >>> from keras_mpq.compat import keras
  >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
  >>> classifier_head(m)
  'binary'
  """
  out = model.outputs[0]
  units = out.shape[-1]
  layer = getattr(getattr(out, "_keras_history", None), "layer", None)
  act = final_activation(layer)
  if units == 1 and act == "sigmoid":
    return "binary"
  if units == 1 or act not in _CLASSIFIER_ACTIVATIONS + (None,):
    what = (f"one output unit with activation {act!r}" if units == 1
            else f"{units} outputs with final activation {act!r}")
    raise UnsupportedModelError(
        "Expected a classifier: logits or softmax over 2 or more classes, or one "
        "sigmoid unit (a binary classifier). Received: model "
        f"{model.name!r} ends in layer {getattr(layer, 'name', '?')!r} with {what}, a "
        "regression (non-classification) head. keras_mpq.quantize measures "
        "sensitivity with a classification loss, with synthetic or real data, so it "
        "does not quantize such a model. If it is a binary classifier that outputs "
        "a logit, end it with keras.layers.Activation('sigmoid'). For a regression "
        "model, use the stages that need no labels, with real inputs x: "
        "table = keras_mpq.measure_sensitivity(model, None, metric='weight_mse'); "
        "plan = keras_mpq.allocate(table, budget, keras_mpq.cost_table(model)); "
        "keras_mpq.export_tflite(model, path, plan, calibration_data=x).")
  if act == "sigmoid":
    raise UnsupportedModelError(
        "Expected a single-label classifier (softmax or logits over classes, or one "
        f"sigmoid unit). Received: {units} sigmoid units in layer {layer.name!r} "
        "(multi-label); keras_mpq needs one class per sample.")
  return "classes"


def final_activation(layer) -> Optional[str]:
  """Name of the activation a layer applies last ('softmax' for Softmax), or None."""
  if layer is None:
    return None
  if isinstance(layer, keras.layers.Softmax):
    return "softmax"
  if isinstance(layer, keras.layers.ReLU):
    return "relu"
  act = getattr(layer, "activation", None)
  if act is None:
    return None
  try:
    name = keras.activations.serialize(act)
  except (ValueError, TypeError):
    name = getattr(act, "__name__", None)
  return name if isinstance(name, str) else None


def check_token_input(model) -> None:
  """Refuses, before synthesis, a model whose input is token ids (no synthetic data).

  >>> from keras_mpq.compat import keras
  >>> m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
  >>> check_token_input(m)
  """
  inp = model.inputs[0]
  embeddings = [l.name for l in model.layers if isinstance(l, keras.layers.Embedding)]
  integer = not tf.as_dtype(inp.dtype).is_floating
  if embeddings or integer:
    what = (f"an Embedding layer ({embeddings[0]!r})" if embeddings
            else f"an integer input ({inp.dtype})")
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

  >>> from keras_mpq.compat import keras
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
