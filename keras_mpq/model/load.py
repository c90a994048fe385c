"""Model intake: whatever Keras model or file the user has, a checked tf_keras model out.

tensorflow-model-optimization works on Keras 2 (``tf_keras``); users arrive with
Keras 3 models (``import keras``, or ``tf.keras`` in TF >= 2.16), ``.keras``
archives written by either Keras, legacy ``.h5`` files and Keras SavedModel
directories. `load_model` takes any of these and returns a tf_keras model;
Keras 3 models are rebuilt layer by layer as tf_keras with the same weights
and checked numerically (`keras_mpq.model.keras3`); `keras_mpq.model.checks`
then says early and clearly why a model cannot be quantized.

Files are loaded with ``safe_mode`` on and their configs are scanned first:
a ``Lambda`` layer (whose Python code would have to be run) or a custom class
is refused before any loader sees the file, so nothing from the file runs.

Example:

>>> model = load_model("model.keras")   # doctest: +SKIP

``keras`` in this module is tf_keras (from `keras_mpq.base.compat`); Keras 3 is
imported lazily, inside the functions that need it, as ``keras3``.
"""

from __future__ import annotations

import json
import os
import pathlib
import zipfile
from typing import Any

from keras_mpq.base.compat import is_keras3_model, keras
from keras_mpq.base.errors import (
  InvalidInputError,
  KerasMpqError,
  UnsupportedModelError,
)
from keras_mpq.model.keras3 import WHAT_TO_DO, first_line, keras3_to_tf_keras
from keras_mpq.model import graph as graph_lib

_EXPECTED = ("a tf_keras or Keras 3 model, or a path to a '.keras' file, an '.h5' "
             "file or a Keras SavedModel directory")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"


# --------------------------------------------------------------------------- loading


def load_model(model_or_path) -> "keras.Model":
  """Returns a tf_keras model for a model object or a saved model path.

  Args:
    model_or_path: a tf_keras ``Model`` (returned as is once checked to be
      built); a Keras 3 model (rebuilt with `keras3_to_tf_keras`); or a path
      (``str`` or ``pathlib.Path``) to a ``.keras`` archive (written by Keras 3
      or by tf_keras), an ``.h5`` file, or a Keras SavedModel directory.

  Returns:
    A built tf_keras ``Model``, not compiled; nested Sequential or functional
    models inlined (`keras_mpq.model.graph.inline_nested`).

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
  return graph_lib.inline_nested(_load(model_or_path))


def _load(model_or_path):
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
        f"({first_line(e)}).") from None
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
        f"({first_line(e)}).") from None
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
  _refuse_unknown_layers(config, path)
  with _loading(path, "a tf_keras '.h5' file"):
    model = keras.models.load_model(str(path), compile=False, safe_mode=True)
  return _as_tf_keras_model(model, path)


_CONTAINERS = ("Functional", "Sequential", "Model")


def _refuse_unknown_layers(config: Any, path: pathlib.Path) -> None:
  """Names the layers of a tf_keras config whose classes tf_keras does not know (custom layers)."""
  unknown = []
  for item in _config_dicts(config):
    inner = item.get("config")
    class_name = item.get("class_name")
    if isinstance(class_name, str) and isinstance(inner, dict) and "name" in inner and (
        "inbound_nodes" in item or "build_config" in item or class_name in _CONTAINERS):
      known = (class_name in _CONTAINERS or hasattr(keras.layers, class_name)
               or keras.utils.get_registered_object(class_name) is not None)
      if not known:
        unknown.append((inner["name"], class_name))
  if unknown:
    named = ", ".join(f"{n!r} of class {c}" for n, c in unknown[:5])
    classes = ", ".join(f"{c!r}: {c}" for c in dict.fromkeys(c for _, c in unknown))
    raise UnsupportedModelError(
        f"Expected a model built from standard tf_keras layers. Received: {str(path)!r} "
        f"holds custom layer(s) {named}, whose code is not in the file. Load the model "
        f"with its code yourself: model = tf_keras.models.load_model(path, "
        f"custom_objects={{{classes}}}, compile=False), then pass the model object to "
        "keras_mpq (keras_mpq.quantize(model, ...)).")


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
        f"keras_metadata.pb cannot be read ({first_line(e)}).") from None
  for node in metadata.nodes:
    try:
      node_config = json.loads(node.metadata)
    except ValueError:
      continue
    _scan_config(node_config, path)
  with _loading(path, "a tf_keras SavedModel"):
    model = keras.models.load_model(str(path), compile=False)
  return _as_tf_keras_model(model, path)


def _config_dicts(config: Any):
  """Every dict nested anywhere in a saved model config (depth first)."""
  stack = [config]
  while stack:
    item = stack.pop()
    if isinstance(item, list):
      stack.extend(item)
    elif isinstance(item, dict):
      yield item
      stack.extend(item.values())


def _scan_config(config: Any, path: pathlib.Path) -> None:
  """Refuses Lambda layers and custom classes in a saved config, before loading it."""
  for item in _config_dicts(config):
    class_name = item.get("class_name")
    inner = item.get("config")
    name = (inner.get("name") if isinstance(inner, dict) else None) or item.get("name")
    if class_name in ("Lambda", "TFOpLambda", "SlicingOpLambda"):
      raise UnsupportedModelError(
          f"Expected a model built from standard layers. Received: {str(path)!r} holds "
          f"layer {name!r} of class {class_name}, which wraps Python code; keras_mpq "
          "does not load or run code from model files. " + WHAT_TO_DO)
    module = item.get("module")
    if (isinstance(class_name, str) and isinstance(module, str)
        and module.split(".")[0] not in ("keras", "tf_keras", "builtins", "numpy")):
      raise UnsupportedModelError(
          f"Expected a model built from standard layers. Received: {str(path)!r} holds "
          f"{name or 'an object'!r} of custom class {class_name} (module {module!r}); "
          "keras_mpq does not import code named by model files. " + WHAT_TO_DO)
    registered = item.get("registered_name")
    if isinstance(registered, str) and ">" in registered:
      raise UnsupportedModelError(
          f"Expected a model built from standard layers. Received: {str(path)!r} holds "
          f"{name or 'an object'!r} of custom registered class {registered}. " + WHAT_TO_DO)


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
        f"which failed to load: {first_line(exc)}") from None


def _as_tf_keras_model(model, path: pathlib.Path):
  if not isinstance(model, keras.Model):
    raise InvalidInputError(
        f"Expected a saved Keras model. Received: path={str(path)!r} holds a "
        f"{type(model).__name__}, not a model.")
  return model


