"""The TFLite converter's side of an export: snapping weights to the plan, float conversion, target fixes.

`snap_to_plan` puts each layer's weights on its planned integer grid,
`to_float_tflite` converts the model, `replace_gelu` swaps an exact GELU for
its tanh form where a runtime lacks the op, and `prepare_for_target` checks a
converted file against what the target runs.

>>> float_bytes = to_float_tflite(model)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from typing import Any, List, Optional, Tuple

import numpy as np

from keras_mpq.base import batching
from keras_mpq.base import layers as layers_lib
from keras_mpq.base.compat import keras, tf
from keras_mpq.base.errors import UnsupportedModelError
from keras_mpq.base.types import FLOAT_BITS, QuantizationPlan
from keras_mpq.model import inputs as inputs_lib

# --------------------------------------------------------------------------- conversion


def snap_to_plan(model, plan: QuantizationPlan):
  """A copy of ``model`` whose planned kernels sit exactly on their bit grid.

  Idempotent: weights already on the grid come back unchanged.
  """
  clone = keras.models.clone_model(model)
  clone.set_weights(model.get_weights())
  for layer in clone.layers:
    bits = plan.weight_bits.get(layer.name)
    if bits is None or bits == FLOAT_BITS:
      continue
    for attr, axes in layers_lib.weight_spec(layer):
      var = getattr(layer, attr)
      var.assign(layers_lib.quantize_array(var.numpy(), bits, axes)[0])
  return clone


def to_float_tflite(model, batch_size: Optional[int] = None) -> bytes:
  """Converts a tf_keras model to a float TFLite flatbuffer (batch fixed if given)."""
  if len(model.inputs) == 1:
    shape = [batch_size] + list(model.inputs[0].shape[1:])
    spec = tf.TensorSpec(shape, tf.float32, name=model.inputs[0].name.split(":")[0])
    fn = tf.function(lambda t: model(t, training=False)).get_concrete_function(spec)
  else:  # one TensorSpec per input, named after it (the signature's keys)
    specs = [tf.TensorSpec([batch_size] + list(t.shape[1:]), tf.float32, name=name)
             for t, name in zip(model.inputs, inputs_lib.input_names(model))]
    fn = tf.function(lambda *ts: model(list(ts), training=False)).get_concrete_function(*specs)
  # The converter saves its trackable object as a SavedModel first; a bare module
  # holding the variables gives the same flatbuffer, byte for byte, 3-5x faster
  # than the Keras model (whose every layer is traced again for serialization).
  holder = tf.Module()
  holder.model_variables = list(model.variables)
  converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], holder)
  try:
    with quiet():
      data = bytes(converter.convert())
  except Exception as e:  # converter errors are long C++ dumps
    raise UnsupportedModelError(
        f"TFLiteConverter could not convert model {model.name!r}: "
        f"{str(e).strip().splitlines()[-1][:300]}") from None
  if len(model.outputs) > 1:
    data = order_outputs(data, [str(n) for n in model.output_names])
  if len(model.inputs) > 1:
    data = order_inputs(data, inputs_lib.input_names(model))
  return data


def _reorder_and_pack(model, side: str, ordered: List[int], names: List[str],
                      size_hint: int) -> bytes:
  """Sets subgraph 0's ``side`` ('inputs'/'outputs') to ``ordered``, names them, packs the file.

  Each tensor gets its Keras name, and each signature listing the same
  tensors lists them in that order under those names.
  """
  import flatbuffers  # pylint: disable=g-import-not-at-top
  sg = model.subgraphs[0]
  setattr(sg, side, np.asarray(ordered, np.int32))
  for t, name in zip(ordered, names):
    sg.tensors[t].name = name.encode()
  for signature in model.signatureDefs or []:
    by_tensor = {int(m.tensorIndex): m for m in getattr(signature, side) or []}
    if set(by_tensor) == set(ordered):
      setattr(signature, side, [by_tensor[t] for t in ordered])
      for m, name in zip(getattr(signature, side), names):
        m.name = name.encode()
  builder = flatbuffers.Builder(size_hint + 4096)
  builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
  return bytes(builder.Output())


def order_inputs(model_bytes: bytes, names: List[str]) -> bytes:
  """The converted file with its inputs in the Keras model's order, named as its inputs.

  The converter lists a model's several inputs sorted by name (``afeat``
  before ``zimage`` whatever the model's order), each tensor named
  ``serving_default_<name>:0``; this puts them in ``model.inputs`` order and
  names each input tensor exactly as the Keras input, so a runtime's input
  ``i`` is the model's input ``i`` (what a stripped TFLite Micro file, which
  has no names, is fed by) and `keras_mpq.export.runtime.run_tflite` can match
  a dict by name.
  """
  from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
  sg = model.subgraphs[0]
  ins = [int(t) for t in sg.inputs]
  by_name = {}
  for signature in model.signatureDefs or []:
    for m in signature.inputs or []:
      by_name[(m.name or b"").decode("utf-8", "replace")] = int(m.tensorIndex)
  for t in ins:
    name = (sg.tensors[t].name or b"").decode("utf-8", "replace")
    stem = name.rsplit(":", 1)[0]
    for n in names:
      if stem in (n, f"serving_default_{n}"):
        by_name.setdefault(n, t)
  if len(ins) != len(names) or any(by_name.get(n) not in ins for n in names) or len(
      {by_name[n] for n in names}) != len(names):
    raise UnsupportedModelError(
        f"Expected the converted file's {len(ins)} inputs to carry the model's input names "
        f"{names}. Received input tensors "
        f"{[(sg.tensors[t].name or b'').decode('utf-8', 'replace') for t in ins]}; "
        "please report it with the model.")
  return _reorder_and_pack(model, "inputs", [by_name[n] for n in names], names,
                           len(model_bytes))


def order_outputs(model_bytes: bytes, names: List[str]) -> bytes:
  """The converted file with its outputs in the Keras model's order, named as its outputs.

  The converter lists a model's several outputs in an order of its own, each
  named ``StatefulPartitionedCall:k`` after its place ``k`` in the model; this
  puts them back in the model's order and gives each output tensor (and
  signature entry) the Keras output's name, so a runtime's output ``i`` is
  the model's output ``i`` and `keras_mpq.validate_tflite` can match by name.
  """
  from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
  sg = model.subgraphs[0]
  outs = [int(t) for t in sg.outputs]
  places = []
  for t in outs:
    name = (sg.tensors[t].name or b"").decode("utf-8", "replace")
    tail = name.rsplit(":", 1)[-1]
    places.append(int(tail) if ":" in name and tail.isdigit() else None)
  if len(outs) != len(names) or sorted(p for p in places if p is not None) != list(
      range(len(names))):
    raise UnsupportedModelError(
        f"Expected the converted file's {len(outs)} outputs to name their place in the "
        f"model's {len(names)} outputs {names}. Received output tensors "
        f"{[(sg.tensors[t].name or b'').decode('utf-8', 'replace') for t in outs]}; "
        "please report it with the model.")
  return _reorder_and_pack(model, "outputs", [outs[places.index(k)] for k in range(len(names))],
                           names, len(model_bytes))


@contextlib.contextmanager
def quiet():
  """Silences absl/TF logging (ai-edge-quantizer prints sizes at INFO level)."""
  logger = logging.getLogger()
  old = logger.level
  logger.setLevel(logging.ERROR)
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    old_absl = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:  # pragma: no cover
    absl_logging = None
  try:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
      # ai-edge-quantizer's calibrator keeps all tensors on purpose; LiteRT warns.
      warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
      yield
  finally:
    logger.setLevel(old)
    if absl_logging is not None:
      absl_logging.set_verbosity(old_absl)

GELU_TANH_COEFF = 0.044715
_SQRT_2_OVER_PI_X2 = 2.0 * math.sqrt(2.0 / math.pi)


@keras.utils.register_keras_serializable(package="keras_mpq")
def gelu_tanh_form(x):
  """GELU's tanh form, ``x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))``, from MUL/ADD/LOGISTIC.

  Equal to ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``; written with
  the sigmoid so that the converter does not fuse it back into a GELU op
  (which TFLite Micro has no kernel for).
  """
  return x * tf.sigmoid(_SQRT_2_OVER_PI_X2 * (x + GELU_TANH_COEFF * x * x * x))


def _is_gelu(fn) -> bool:
  name = getattr(fn, "__name__", "") or ""
  return name == "gelu"


def replace_gelu(model) -> Tuple[Any, List[str]]:
  """A copy of ``model`` whose GELU activations use `gelu_tanh_form`; and the layers changed."""
  changed: List[str] = []

  def clone(layer):
    new = layer.__class__.from_config(layer.get_config())
    if _is_gelu(getattr(layer, "activation", None)):
      new.activation = gelu_tanh_form
      changed.append(layer.name)
    return new

  if not any(_is_gelu(getattr(l, "activation", None)) for l in model.layers):
    return model, []
  copy = keras.models.clone_model(model, clone_function=clone)
  copy.set_weights(model.get_weights())
  return copy, changed


_GLOBAL_POOLS = {keras.layers.AveragePooling1D: keras.layers.GlobalAveragePooling1D,
                 keras.layers.AveragePooling2D: keras.layers.GlobalAveragePooling2D}


def _covers_input(layer) -> bool:
  """True if an average pool's one window covers its whole (known) input: a global mean."""
  if type(layer) not in _GLOBAL_POOLS:
    return False
  spatial = tuple(layer.input_shape[1:-1] if layer.data_format == "channels_last"
                  else layer.input_shape[2:])
  pool, strides = tuple(layer.pool_size), tuple(layer.strides)
  out = tuple(layer.output_shape[1:-1] if layer.data_format == "channels_last"
              else layer.output_shape[2:])
  return (None not in spatial and pool == spatial and all(o == 1 for o in out)
          and all(s >= p for s, p in zip(strides, pool)))


def global_pools(model) -> Tuple[Any, List[str]]:
  """A copy of ``model`` whose whole-input average pools are global average pools; the layers changed.

  TFLite's AVERAGE_POOL_2D writes its output on its input's scale (a
  restriction of the int8 kernel), so the pooled features, which span a small
  part of the input's range, get few steps (a keyword spotter's 64 pooled
  features: a fifth of the steps the Keras model gave them). A pool whose one
  window covers the input is a mean, and MEAN quantizes its output on a scale
  of its own, as the Keras model does (its output quantizer). Same values,
  same layer name.

  >>> copy, changed = global_pools(model)  # doctest: +SKIP
  """
  changed: List[str] = []

  def clone(layer):
    if _covers_input(layer):
      changed.append(layer.name)
      return _GLOBAL_POOLS[type(layer)](data_format=layer.data_format, keepdims=True,
                                        name=layer.name)
    return layer.__class__.from_config(layer.get_config())

  if not any(_covers_input(l) for l in model.layers):
    return model, []
  copy = keras.models.clone_model(model, clone_function=clone)
  copy.set_weights(model.get_weights())
  return copy, changed


GELU_MATCH_TOLERANCE = 1e-2
"""Largest output change, relative to the output's range, for the GELU
replacement to count as equivalent (the tanh form differs from the erf form
by at most ~1e-3 per activation)."""


def prepare_for_target(model, target: str, x: np.ndarray) -> Tuple[Any, List[str]]:
  """The model as it will be converted for ``target``, and notes on what was replaced.

  On every target, an average pool over its whole input becomes a global
  average pool (`global_pools`). For 'mcu' and 'ethos-u', GELU activations (no TFLite Micro kernel) become
  `gelu_tanh_form` when the model's outputs on ``x`` then change by at most
  `GELU_MATCH_TOLERANCE` of their range; otherwise the layer is refused.
  """
  model, pooled = global_pools(model)
  notes = [f"{name}: an average pool over the whole input, written as MEAN (its output "
           "on a scale of its own)" for name in pooled]
  if target == "mobile":
    return model, notes
  replaced, changed = replace_gelu(model)
  if not changed:
    return model, notes
  sample = batching.take(x, slice(0, 256))
  before = np.asarray(model.predict(sample, verbose=0, batch_size=256), np.float64)
  after = np.asarray(replaced.predict(sample, verbose=0, batch_size=256), np.float64)
  span = float(before.max() - before.min()) or 1.0
  change = float(np.max(np.abs(after - before))) / span
  if not np.isfinite(change) or change > GELU_MATCH_TOLERANCE:
    raise UnsupportedModelError(
        f"Expected operators TFLite Micro runs (target={target!r}). Received: GELU in "
        f"layers {changed}; its tanh form changes the outputs by {change:.2%} of their "
        f"range (more than {GELU_MATCH_TOLERANCE:.0%}). Use another activation, or "
        "export with target='mobile'.")
  return replaced, notes + [
      f"{name}: GELU (no TFLite Micro kernel) written in its tanh form "
      f"from MUL/ADD/LOGISTIC; outputs change by {change:.2e} of their range"
      for name in changed]


def same_tflm_outputs(a: bytes, b: bytes, x: np.ndarray, n: int = 8) -> bool:
  from keras_mpq.export import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
  sample = batching.take(x, slice(0, n))
  ya = runtime_lib.run_tflite(a, sample, runtime="tflm")
  yb = runtime_lib.run_tflite(b, sample, runtime="tflm")
  ya, yb = (v if isinstance(v, list) else [v] for v in (ya, yb))
  return len(ya) == len(yb) and all(
      p.shape == q.shape and bool(np.array_equal(p, q)) for p, q in zip(ya, yb))
