"""TFLite export for phones ('mobile'), microcontrollers ('mcu') and Arm Ethos-U NPUs.

The float tf_keras model (BatchNorm folded) is first snapped to the plan's
grid (per-output-channel symmetric, narrow range, scale = max|w| / (2^(b-1)-1),
the grid `keras_mpq.quantizers` uses; idempotent for weights already on it),
converted to a float flatbuffer with ``tf.lite.TFLiteConverter``, then
quantized by ai-edge-quantizer with one recipe rule per Keras layer (matched
through the op's output tensor name, which carries the layer's name scope).
ai-edge-quantizer's max-abs symmetric channelwise weight quantization computes
scale = max|w| / (2^(n-1)-1) too, so it re-derives the same integers; the
exporter reads them back from the file and compares them, value for value,
with the Keras model's (`check_weight_integers`), and fails naming the tensor
if they differ.

How each planned bit-width is stored depends on what the target's runtime
runs (``CAPABILITIES``, checked against ``export/targets_probe.json``):

* 4 bits: packed INT4 where the runtime runs it for that operator, else the
  same INT4 integers unpacked into INT8 (15 levels, exact).
* 2 and 3 bits: an INT4 container holding 3 or 7 levels where allowed, else
  INT8 holding them. The 2-bit grid nests exactly in INT4's (levels -7, 0, 7);
  3-bit weights are quantized at 3 bits (INT8, levels -3..3) and then
  repacked into INT4 with TFLite Micro's model editor, keeping the exact grid.
* 5..7 bits: INT8 holding 2^b-1 levels. 8 bits: INT8. 32: float (mobile only;
  full-integer targets store such a layer as INT8 and say so).

Example:

>>> from keras_mpq import export_tflite, QuantizationPlan
>>> plan = QuantizationPlan({"conv1": 4, "fc1": 8})          # doctest: +SKIP
>>> result = export_tflite(model, "m.tflite", plan, target="mobile",
...                        calibration_data=x)               # doctest: +SKIP
>>> print(result.table())                                    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from keras_mpq import act_ranges, fileio
from keras_mpq import quantizers
from keras_mpq import tflite_inspect
from keras_mpq.compat import keras, tf
from keras_mpq.types import (FLOAT_BITS, FileOverBudgetError, InvalidInputError,
                             KerasMpqError, MissingDependencyError, QuantizationPlan,
                             RamLimitError,
                             UnsupportedModelError, to_jsonable, ExportResult, LayerExport)

TARGETS = ("mobile", "mcu", "ethos-u")
RUNTIME_OF_TARGET = {"mobile": "litert", "mcu": "tflm", "ethos-u": "vela"}
DEFAULT_VELA_ACCELERATOR = "ethos-u55-128"

# Per runtime, operator and weight container: the activation bit-widths that
# runtime runs, as measured by export/probe_targets.py on this stack
# (tensorflow 2.21, ai-edge-quantizer 0.10, ai-edge-litert 2.3, tflite-micro
# 0.dev20261023). tests/test_export.py checks this table against
# export/targets_probe.json. INT8 weights are the fallback for every layer.
CAPABILITIES: Dict[str, Dict[str, Dict[str, Tuple[int, ...]]]] = {
    # LiteRT runs packed INT4 conv and fully connected with int8 or int16
    # activations; INT4 depthwise with int16 activations runs but computes
    # wrong outputs (relative error ~1.0), so only int8 there.
    "litert": {
        "CONV_2D": {"int4": (8, 16), "int8": (8, 16)},
        "DEPTHWISE_CONV_2D": {"int4": (8,), "int8": (8, 16)},
        "FULLY_CONNECTED": {"int4": (8, 16), "int8": (8, 16)},
    },
    # TFLite Micro: INT4 conv and depthwise with int8 activations; INT4
    # fully connected fails to prepare (fully_connected_common.cc:98).
    "tflm": {
        "CONV_2D": {"int4": (8,), "int8": (8, 16)},
        "DEPTHWISE_CONV_2D": {"int4": (8,), "int8": (8, 16)},
        "FULLY_CONNECTED": {"int4": (), "int8": (8, 16)},
    },
    # Vela 5.2 (ethos-u55-128) crashes (SIGFPE, exit -8) on any INT4 tensor.
    "vela": {
        "CONV_2D": {"int4": (), "int8": (8, 16)},
        "DEPTHWISE_CONV_2D": {"int4": (), "int8": (8, 16)},
        "FULLY_CONNECTED": {"int4": (), "int8": (8, 16)},
    },
}


def supported(target: str, op: str, container: str, activation_bits: int) -> bool:
  """True if ``target``'s runtime runs ``op`` with ``container`` weights at these activation bits.

  >>> supported("mcu", "FULLY_CONNECTED", "int4", 8)
  False
  """
  table = CAPABILITIES[RUNTIME_OF_TARGET[target]]
  return activation_bits in table.get(op, {}).get(container, ())


# --------------------------------------------------------------------------- result types


# --------------------------------------------------------------------------- checks


def _check_args(model, plan, target, calibration_data):
  if target not in TARGETS:
    raise InvalidInputError(f"Expected target in {TARGETS}. Received: target={target!r}")
  if not isinstance(model, keras.Model):
    raise InvalidInputError(
        "Expected a tf_keras Model (float, BatchNorm folded). Received: "
        f"model of type {type(model).__name__}. Load Keras 3 models with "
        "keras_mpq.load_model first.")
  if not isinstance(plan, QuantizationPlan):
    raise InvalidInputError(
        f"Expected a QuantizationPlan. Received: plan of type {type(plan).__name__}")
  names = {l.name for l in model.layers}
  missing = sorted(set(plan.layers) - names)
  if missing:
    raise InvalidInputError(
        f"Expected every planned layer in the model. Received: plan layers {missing} "
        f"that the model does not have; model layers: {sorted(names)}")
  if len(model.inputs) != 1:
    raise UnsupportedModelError(
        f"Expected a model with one input. Received: {len(model.inputs)} inputs.")
  if calibration_data is None:
    raise InvalidInputError(
        "Expected calibration_data (a few hundred typical inputs) to set the "
        "activation ranges. Received: calibration_data=None")
  x = np.asarray(calibration_data)
  want = tuple(model.inputs[0].shape[1:])
  if x.ndim != len(want) + 1 or any(w is not None and w != s for w, s in zip(want, x.shape[1:])):
    raise InvalidInputError(
        f"Expected calibration_data of shape (n, {', '.join(map(str, want))}). "
        f"Received: shape {x.shape}")
  if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
    raise InvalidInputError(
        "Expected finite numeric calibration_data. Received: dtype "
        f"{x.dtype} with non-finite or non-numeric values")
  if len(x) == 0:
    raise InvalidInputError("Expected at least one calibration sample. Received: 0")
  return x.astype(np.float32)


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
    for attr, axes in quantizers.weight_spec(layer):
      var = getattr(layer, attr)
      var.assign(quantizers.quantize_array(var.numpy(), bits, axes)[0])
  return clone


def to_float_tflite(model, batch_size: Optional[int] = None) -> bytes:
  """Converts a tf_keras model to a float TFLite flatbuffer (batch fixed if given)."""
  shape = [batch_size] + list(model.inputs[0].shape[1:])
  spec = tf.TensorSpec(shape, tf.float32, name=model.inputs[0].name.split(":")[0])
  fn = tf.function(lambda t: model(t, training=False)).get_concrete_function(spec)
  # The converter saves its trackable object as a SavedModel first; a bare module
  # holding the variables gives the same flatbuffer, byte for byte, 3-5x faster
  # than the Keras model (whose every layer is traced again for serialization).
  holder = tf.Module()
  holder.model_variables = list(model.variables)
  converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], holder)
  try:
    with _quiet():
      return bytes(converter.convert())
  except Exception as e:  # converter errors are long C++ dumps
    raise UnsupportedModelError(
        f"TFLiteConverter could not convert model {model.name!r}: "
        f"{str(e).strip().splitlines()[-1][:300]}") from None


@contextlib.contextmanager
def _quiet():
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


def _op_config(weight_bits: int, activation_bits: int, skip_checks: bool) -> Dict[str, Any]:
  return {
      "activation_tensor_config": {
          "num_bits": activation_bits, "symmetric": activation_bits == 16,
          "granularity": "TENSORWISE", "dtype": "INT"},
      "weight_tensor_config": {
          "num_bits": weight_bits, "symmetric": True,
          "granularity": "CHANNELWISE", "dtype": "INT"},
      "compute_precision": "INTEGER", "explicit_dequantize": False,
      "skip_checks": skip_checks, "min_weight_elements": 0,
  }


@dataclasses.dataclass(frozen=True)
class _Decision:
  layer: str
  op: str
  output_name: str
  planned_bits: int
  activation_bits: int
  container: str  # 'int4', 'int8' or 'float'
  request_bits: int  # num_bits given to ai-edge-quantizer
  repack_int4: bool
  note: str
  unpack_int8: bool = False  # 4-bit grid quantized as INT4, then stored as INT8


def decide(layer: str, op: str, bits: int, act: int, target: str,
           output_name: str = "") -> _Decision:
  """How one layer's weights will be stored on ``target`` (see module docstring).

  >>> decide("fc", "FULLY_CONNECTED", 4, 8, "mcu").container
  'int8'
  >>> decide("conv", "CONV_2D", 2, 8, "mcu").request_bits
  4
  """
  notes = []
  full_integer = target != "mobile"
  if bits == FLOAT_BITS and not full_integer:
    return _Decision(layer, op, output_name, bits, act, "float", 32, False, "")
  if bits == FLOAT_BITS:
    notes.append("planned float; full-integer target stores it as int8")
    bits = 8
  if not supported(target, op, "int8", act):
    notes.append(f"{op} with int{act} activations does not run on "
                 f"{RUNTIME_OF_TARGET[target]}; activations int8")
    act = 8
  if bits <= 4 and supported(target, op, "int4", act):
    request = {2: 4, 3: 3, 4: 4}[bits]
    return _Decision(layer, op, output_name, bits if not notes else bits, act, "int4",
                     request, bits == 3, "; ".join(notes))
  if bits <= 4:
    notes.append(f"packed int4 {op} does not run on {RUNTIME_OF_TARGET[target]}"
                 f"{' with int16 activations' if act == 16 else ''}; int8 holds the levels")
  # 2 bits nest exactly in the 3-bit grid; 4 bits are quantized on the 4-bit
  # grid (INT4) and then unpacked into INT8, keeping the exact integers.
  request = {2: 3}.get(bits, bits)
  return _Decision(layer, op, output_name, bits, act, "int8", request, False,
                   "; ".join(notes), unpack_int8=bits == 4)


def build_recipe(decisions: Sequence[_Decision], target: str) -> List[Dict[str, Any]]:
  """ai-edge-quantizer recipe: int8 everywhere, then one rule per planned layer.

  Rules match the op's scope, which ai-edge-quantizer builds from the output
  tensor names joined by ';' plus a trailing ';'.
  """
  recipe = [{"regex": ".*", "operation": "*",
             "algorithm_key": "min_max_uniform_quantize",
             "op_config": _op_config(8, 8, False)}]
  for d in decisions:
    regex = "^" + re.escape(d.output_name) + ";$"
    if d.container == "float":
      recipe.append({"regex": regex, "operation": "*", "algorithm_key": "no_quantize"})
      continue
    skip = d.request_bits not in (4, 8) or d.op == "DEPTHWISE_CONV_2D"
    recipe.append({"regex": regex, "operation": d.op,
                   "algorithm_key": "min_max_uniform_quantize",
                   "op_config": _op_config(d.request_bits, d.activation_bits, skip)})
  return recipe


MIN_RANGE_WIDTH = 1e-2
"""Narrowest activation range written: a tensor that was constant during
calibration (a channel zeroed by 2-bit weights, a dead ReLU) would otherwise
get a near-zero scale, which LiteRT refuses ("no_integer_overflow_from_
quantization"). Its values still quantize exactly; only the step widens."""


def _widen_collapsed_ranges(calib) -> None:
  """Widens (in place) every calibrated min/max pair narrower than MIN_RANGE_WIDTH."""
  for qsv in calib.values():
    if not isinstance(qsv, dict) or "min" not in qsv or "max" not in qsv:
      continue
    lo = np.asarray(qsv["min"], np.float32)
    hi = np.asarray(qsv["max"], np.float32)
    narrow = (hi - lo) < MIN_RANGE_WIDTH
    if np.any(narrow):
      center = (lo + hi) / 2
      qsv["min"] = np.where(narrow, np.minimum(lo, center - MIN_RANGE_WIDTH / 2), lo)
      qsv["max"] = np.where(narrow, np.maximum(hi, center + MIN_RANGE_WIDTH / 2), hi)


def _fill_fused_ranges(calib, interp) -> None:
  """Gives tensors of the batch-1 file that the dynamic-batch file lacks their range.

  With a fixed batch the converter fuses more, e.g. a GlobalAveragePooling
  MEAN and the RESHAPE after it (squeeze-excite blocks) into one op whose
  output is named ``'<reshape>;;<mean>'``; the dynamic-batch model used for
  calibration keeps both tensors. The fused output holds the same values as
  its parts, so it takes the range of the first part calibrated.
  """
  for detail in interp.get_tensor_details():
    name = detail["name"]
    if name in calib or ";" not in name:
      continue
    for part in (p for p in re.split(r";+", name) if p):
      if part in calib:
        calib[name] = dict(calib[part])
        break


def _apply_range_policy(calib, calib_bytes: bytes, samples, policy: str) -> None:
  """Replaces (in place) each activation's min/max in ``calib`` by ``policy``'s range."""
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  interp = Interpreter(model_content=calib_bytes, experimental_preserve_all_tensors=True)
  inputs = {d["name"] for d in interp.get_input_details()}
  index = {d["name"]: d["index"] for d in interp.get_tensor_details()}
  runner = interp.get_signature_runner()
  values: Dict[str, List[np.ndarray]] = {}
  per_feed = act_ranges.MAX_VALUES // max(len(samples), 1)
  for feed in samples:
    runner(**feed)
    for name in calib:
      if name in index and name not in inputs:
        try:
          values.setdefault(name, []).append(
              act_ranges.sample_values(interp.get_tensor(index[name]), per_feed))
        except ValueError:  # a tensor the interpreter did not keep
          pass
  for name, parts in values.items():
    qsv = calib[name]
    if not isinstance(qsv, dict) or "min" not in qsv or "max" not in qsv:
      continue
    chosen = act_ranges.choose_range(np.concatenate(parts), 8, policy)
    qsv["min"] = np.full_like(np.asarray(qsv["min"], np.float32), chosen.low)
    qsv["max"] = np.full_like(np.asarray(qsv["max"], np.float32), chosen.high)


def quantize_with_recipe(float_bytes: bytes, recipe, calibration_data: np.ndarray,
                         max_samples: int = act_ranges.MAX_RANGE_SAMPLES, seed: int = 0,
                         calibration_model: Optional[bytes] = None,
                         range_policy: Optional[str] = None) -> bytes:
  """Calibrates and quantizes a float flatbuffer with ai-edge-quantizer.

  Activation ranges are the min/max over the calibration samples (as on the
  Keras side), not ai-edge-quantizer's default moving average: the samples go
  through a dynamic-batch float model (``calibration_model``, else
  ``float_bytes``) in one batch, and the ranges found, keyed by tensor name,
  quantize ``float_bytes`` (which may have batch 1). Another ``range_policy``
  (`keras_mpq.act_ranges`) then narrows each activation's range as the Keras
  model's `calibrate` does; the model input keeps its min/max.
  """
  try:
    from ai_edge_quantizer import quantizer as aeq  # pylint: disable=g-import-not-at-top
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise MissingDependencyError(
        "Expected ai-edge-quantizer and ai-edge-litert for TFLite export. "
        "Install them with: pip install 'ai-edge-quantizer==0.10.*' 'ai-edge-litert==2.3.*'"
    ) from None
  calib_bytes = calibration_model or float_bytes
  interp = Interpreter(model_content=calib_bytes)
  sigs = interp.get_signature_list()
  key = next(iter(sigs))
  input_name = sigs[key]["inputs"][0]
  dynamic = int(interp.get_input_details()[0].get("shape_signature", [1])[0]) == -1
  # The subset the Keras model's calibrate measures on (with the default seed and limit).
  x = act_ranges.range_subset(calibration_data, max_samples, seed)
  step = len(x) if dynamic else 1
  samples = [{input_name: x[i:i + step]} for i in range(0, len(x), step)]
  with _quiet():
    calibrator = aeq.Quantizer(bytearray(calib_bytes), recipe)
    calib = (calibrator.calibrate({key: samples}, num_threads=1)
             if calibrator.need_calibration else None)
    if calib:
      policy = act_ranges.check_range_policy(range_policy)
      if policy != "minmax":
        _apply_range_policy(calib, calib_bytes, samples, policy)
      if calibration_model is not None:
        _fill_fused_ranges(calib, Interpreter(model_content=float_bytes))
      _widen_collapsed_ranges(calib)
    q = aeq.Quantizer(bytearray(float_bytes), recipe)
    result = q.quantize(calib)
  return bytes(result.quantized_model)


def repack_int4(model_bytes: bytes, tensor_names: Sequence[str]) -> bytes:
  """Rewrites INT8 weight tensors whose values fit in 4 bits as packed INT4.

  Uses TFLite Micro's model editor to read and rebuild the flatbuffer and
  ai-edge-quantizer's nibble packing; scales and zero points are unchanged.
  """
  from tflite_micro.tensorflow.lite.micro.compression import model_editor  # pylint: disable=g-import-not-at-top
  from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  from ai_edge_quantizer.transformations import transformation_utils  # pylint: disable=g-import-not-at-top
  wanted = set(tensor_names)
  model = model_editor.read(model_bytes)
  done = set()
  for sg in model.subgraphs:
    for tensor in sg.tensors:
      if tensor.name in wanted and tensor.dtype == schema.TensorType.INT8:
        values = tensor.array
        if values is None or np.abs(values.astype(np.int32)).max() > 7:
          continue
        packed = transformation_utils.pack_data(4, values.reshape(-1).view(np.uint8))
        tensor.buffer.data = np.asarray(packed, np.uint8).tobytes()
        tensor.dtype = schema.TensorType.INT4
        done.add(tensor.name)
  if not done:
    return model_bytes
  return bytes(model.build())


def unpack_int8(model_bytes: bytes, tensor_names: Sequence[str]) -> bytes:
  """Rewrites packed INT4 weight tensors as INT8 holding the same values.

  Scales and zero points are unchanged: a 4-bit grid on a target whose
  runtime has no INT4 kernel for the operator keeps its exact integers.
  """
  from tflite_micro.tensorflow.lite.micro.compression import model_editor  # pylint: disable=g-import-not-at-top
  from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  wanted = set(tensor_names)
  model = model_editor.read(model_bytes)
  done = False
  for sg in model.subgraphs:
    for tensor in sg.tensors:
      if tensor.name in wanted and tensor.dtype == schema.TensorType.INT4 and tensor.buffer:
        n = int(np.prod(tensor.shape, dtype=np.int64))
        values = tflite_inspect.unpack_int4(np.frombuffer(bytes(tensor.buffer.data), np.uint8), n)
        tensor.buffer.data = values.astype(np.int8).tobytes()
        tensor.dtype = schema.TensorType.INT8
        done = True
  return bytes(model.build()) if done else model_bytes


def inline_buffers(model_bytes: bytes, always: bool = False) -> bytes:
  """The file with every constant buffer inside the flatbuffer (none at an offset after it).

  ai-edge-quantizer writes the buffers of a model with 256 KiB or more of
  constant data after the flatbuffer, addressed by offset. The installed
  TFLite Micro runtime loads such a file but computes wrong outputs (a
  MobileNetV2 at 32x32: 0 of 8 classes agreed with Keras; the same file with
  its buffers inlined: 8 of 8), so 'mcu' and 'ethos-u' files are rebuilt with
  the buffers inline and TFLite Micro's 16-byte buffer alignment (``always``:
  every file, so that each weight buffer's size in the file is its data
  rounded up to 16 bytes, as `keras_mpq.costs.storage_bytes` charges it).
  Otherwise a file without offset buffers comes back unchanged.
  """
  reader = tflite_inspect.parse(model_bytes)
  if not always and not any(reader.model.Buffers(i).Offset() > 1 for i in range(reader.n_buffers)):
    return model_bytes
  from tensorflow.lite.tools import flatbuffer_utils as fu  # pylint: disable=g-import-not-at-top
  model = fu.read_model_from_bytearray(bytearray(model_bytes))  # moves offset data inline
  return tflite_inspect.align(bytes(fu.convert_object_to_bytearray(model)))


def _kernel_for_op(layer, op: str):
  """(kernel, reduce_axes) of ``layer`` that TFLite op ``op`` carries, or None."""
  spec = quantizers.weight_spec(layer)
  if len(spec) > 1:  # separable: the depthwise and the 1x1 op
    spec = [s for s in spec if (s[0] == "depthwise_kernel") == (op == "DEPTHWISE_CONV_2D")]
  if len(spec) != 1:
    return None
  attr, axes = spec[0]
  return getattr(layer, attr).numpy(), axes


def _layout_mismatch(expected: np.ndarray, got: np.ndarray) -> Tuple[int, int]:
  """(differing values, max |difference|) under the best axis order of ``expected``.

  TFLite stores kernels transposed (conv OHWI, fully connected (out, in),
  depthwise (1, H, W, C*M)): every permutation of the Keras axes that
  reshapes to the stored shape is tried.
  """
  import itertools  # pylint: disable=g-import-not-at-top
  best = (got.size, int(np.max(np.abs(got))) if got.size else 0)
  if expected.size != got.size:
    return best
  for perm in itertools.permutations(range(expected.ndim)):
    cand = expected.transpose(perm).reshape(got.shape)
    diff = np.abs(cand.astype(np.int64) - got.astype(np.int64))
    n = int(np.count_nonzero(diff))
    if n < best[0]:
      best = (n, int(diff.max()))
      if n == 0:
        break
  return best


def converter_factor(values: Optional[np.ndarray], kernel: np.ndarray) -> float:
  """The scalar the converter multiplied a Keras kernel by, 1.0 when it did not.

  The TFLite converter folds a constant scalar multiply next to a weight op
  into the op's kernel: EfficientNet's ``Rescaling(1/255)``, with the untrained
  ``Normalization`` after it an identity, ends up inside ``stem_conv``'s
  kernel, and the Mul is gone from the graph. The max-abs grid is scale-free,
  so the integers stay the Keras model's and only the scales carry the
  factor. ``values`` is the float file's tensor for that kernel (None when
  it has none). Returns ``c`` when it holds exactly ``c * kernel`` (every
  value, to 1e-5 relative), else 1.0 (and the scale comparison then reports
  any difference).
  """
  peak = float(np.max(np.abs(kernel))) if kernel.size else 0.0
  if values is None or values.size != kernel.size or peak == 0.0:
    return 1.0
  factor = float(np.max(np.abs(values))) / peak
  if not (np.isfinite(factor) and factor > 0) or abs(factor - 1.0) <= 1e-6:
    return 1.0
  got = np.sort(np.abs(values.astype(np.float64)))
  want = np.sort(np.abs(kernel.astype(np.float64).reshape(-1))) * factor
  return factor if np.allclose(got, want, rtol=1e-5, atol=1e-7 * factor * peak) else 1.0


def check_weight_integers(qbytes: bytes, model, decisions: Sequence[_Decision],
                          float_ops, float_bytes: Optional[bytes] = None) -> List[str]:
  """Problems: exported weight tensors whose integers or scales differ from the model's.

  For each quantized layer, the integers the Keras side holds (max-abs per
  channel at the planned bits, `keras_mpq.quantizers.quantize_array`, which
  reproduces `keras_mpq.apply`'s optimized integers exactly) are compared
  value for value with the file's, after the container's exact multiple
  (2-bit levels stored as +-7 in INT4 or +-3 in INT8), and the scales to
  1e-5 relative. Given the float flatbuffer the file was quantized from
  (``float_bytes``), a kernel the converter scaled by a constant (a scalar
  multiply it folded in, `converter_factor`) is expected with its scales
  scaled by that constant. Returns one line per mismatching tensor, naming it.
  """
  reader = tflite_inspect.parse(qbytes)
  float_reader = tflite_inspect.parse(float_bytes) if float_bytes is not None else None
  float_index = ({float_reader.name(t): t for t in range(float_reader.n_tensors)}
                 if float_reader is not None else {})
  index = {reader.name(t): t for t in range(reader.n_tensors)}
  problems = []
  for d in decisions:
    if d.container == "float":
      continue
    bits = 8 if d.planned_bits == FLOAT_BITS else d.planned_bits
    names = [e["weight_name"] for e in float_ops[d.layer] if e["output_name"] == d.output_name]
    found = _kernel_for_op(model.get_layer(d.layer), d.op)
    if not names or found is None:
      continue
    t = index.get(names[0])
    got = reader.int_values(t) if t is not None else None
    if got is None:
      problems.append(f"{names[0]!r} (layer {d.layer!r}): no integer tensor in the file")
      continue
    kernel, axes = found
    _, ints, scales = quantizers.quantize_array(kernel, bits, axes)
    ratio = (2 ** (d.request_bits - 1) - 1) / (2 ** (bits - 1) - 1)
    if ratio != int(ratio):
      problems.append(f"{names[0]!r} (layer {d.layer!r}): {bits}-bit grid stored at "
                      f"{d.request_bits} bits is not an exact multiple")
      continue
    got = got.reshape(reader.shape(t))
    n_bad, worst = _layout_mismatch(ints * int(ratio), got)
    if n_bad:
      problems.append(f"{names[0]!r} (layer {d.layer!r}, {bits} bits): {n_bad} of {got.size} "
                      f"integers differ from the Keras model's (max difference {worst})")
      continue
    q = reader.tensors[t].Quantization()
    stored = np.sort(q.ScaleAsNumpy()) if q is not None and q.ScaleLength() else None
    float_t = float_index.get(names[0])
    factor = (converter_factor(float_reader.float_values(float_t), kernel)
              if float_t is not None else 1.0)
    want = np.sort(np.asarray(scales, np.float64).reshape(-1) / ratio * factor)
    nonzero = np.max(np.abs(kernel), axis=tuple(axes)).reshape(-1) > 0
    if stored is None or stored.size != want.size:
      problems.append(f"{names[0]!r} (layer {d.layer!r}): {0 if stored is None else stored.size} "
                      f"scales stored, expected {want.size}")
    elif np.all(nonzero) and not np.allclose(stored, want, rtol=1e-5, atol=0):
      problems.append(f"{names[0]!r} (layer {d.layer!r}): scales differ from the Keras model's "
                      f"(max relative {np.max(np.abs(stored / want - 1)):.2e})")
  return problems



# --------------------------------------------------------------------------- runtime operators

# The builtin operators the installed TFLite Micro Python runtime registers
# (tflite-micro 0.dev20261023: the tflite::micro::Register_* kernels linked
# into its _runtime.so, listed with `nm -C`). An mcu or ethos-u file may use
# only these; Vela runs every operator it cannot place on the NPU through
# TFLite Micro too. tests/test_export.py checks entries against the runtime.
TFLM_KERNELS = frozenset("""
ABS ADD ADD_N ARG_MAX ARG_MIN ASSIGN_VARIABLE AVERAGE_POOL_2D BATCH_MATMUL
BATCH_TO_SPACE_ND BROADCAST_ARGS BROADCAST_TO CALL_ONCE CAST CEIL CONCATENATION
CONV_2D COS CUMSUM DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE DETECTION_POSTPROCESS
DIV DYNAMIC_UPDATE_SLICE ELU EMBEDDING_LOOKUP EQUAL EXP EXPAND_DIMS FILL FLOOR
FLOOR_DIV FLOOR_MOD FULLY_CONNECTED GATHER GATHER_ND GREATER GREATER_EQUAL
HARD_SWISH IF L2_NORMALIZATION L2_POOL_2D LEAKY_RELU LESS LESS_EQUAL LOG
LOGICAL_AND LOGICAL_NOT LOGICAL_OR LOGISTIC LOG_SOFTMAX MAXIMUM MAX_POOL_2D MEAN
MINIMUM MIRROR_PAD MUL NEG NOT_EQUAL PACK PAD PADV2 PRELU QUANTIZE READ_VARIABLE
REDUCE_MAX REDUCE_MIN RELU RELU6 RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR
REVERSE_V2 ROUND RSQRT SELECT_V2 SHAPE SIN SLICE SOFTMAX SPACE_TO_BATCH_ND
SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE SQUEEZE STRIDED_SLICE
SUB SUM SVDF TANH TRANSPOSE TRANSPOSE_CONV UNIDIRECTIONAL_SEQUENCE_LSTM UNPACK
VAR_HANDLE WHILE ZEROS_LIKE
""".split())

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


GELU_MATCH_TOLERANCE = 1e-2
"""Largest output change, relative to the output's range, for the GELU
replacement to count as equivalent (the tanh form differs from the erf form
by at most ~1e-3 per activation)."""


def _layer_of_tensor(name: str, layer_names: Sequence[str]) -> Optional[str]:
  for layer in layer_names:
    if tflite_inspect.name_has_layer(name, layer):
      return layer
  return None


def check_runtime_ops(float_bytes: bytes, target: str, layer_names: Sequence[str]) -> None:
  """Raises `UnsupportedModelError` naming the layer of each operator ``target``'s runtime lacks.

  'mcu' and 'ethos-u' files run in TFLite Micro (`TFLM_KERNELS`); 'mobile'
  (LiteRT) runs every builtin operator.

  >>> check_runtime_ops(b"", "mobile", [])
  """
  if target == "mobile":
    return
  reader = tflite_inspect.parse(float_bytes)
  missing: Dict[str, List[str]] = {}
  for op in reader.ops:
    if op.op in TFLM_KERNELS:
      continue
    where = "?"
    for t in list(op.outputs) + list(op.inputs):
      if t >= 0:
        where = _layer_of_tensor(reader.name(t), layer_names) or where
        if where != "?":
          break
    missing.setdefault(op.op, []).append(where)
  if missing:
    parts = [f"{op} (layer{'s' if len(set(ls)) > 1 else ''} {', '.join(sorted(set(ls)))})"
             for op, ls in sorted(missing.items())]
    raise UnsupportedModelError(
        f"Expected only operators TFLite Micro has kernels for (target={target!r}). "
        f"Received: {'; '.join(parts)}. Replace those layers with supported ones "
        "(see keras_mpq.export.TFLM_KERNELS), or export with target='mobile'.")


# --------------------------------------------------------------------------- scale checks


def check_scales(model_bytes: bytes) -> List[str]:
  """Problems with the quantization parameters of a file: NaN/Inf or non-positive scales.

  A zero, negative, NaN or infinite scale makes a tensor's integers
  meaningless (a zero-width range). Returns one line per bad tensor, naming
  it; an empty list when every scale is finite and > 0.
  """
  reader = tflite_inspect.parse(model_bytes)
  problems = []
  for t, tensor in enumerate(reader.tensors):
    q = tensor.Quantization()
    if q is None or q.ScaleLength() == 0:
      continue
    scales = q.ScaleAsNumpy()
    bad = ~np.isfinite(scales) | (scales <= 0)
    if np.any(bad):
      kinds = []
      if np.any(np.isnan(scales)):
        kinds.append("NaN")
      if np.any(np.isinf(scales)):
        kinds.append("infinite")
      if np.any(np.isfinite(scales) & (scales <= 0)):
        kinds.append("zero-width (scale <= 0)")
      problems.append(f"tensor {t} {reader.name(t)!r}: {int(bad.sum())} of {scales.size} "
                      f"scales {' / '.join(kinds)}")
  return problems


# --------------------------------------------------------------------------- stripping

STRIP_STEPS = ("names", "signatures", "metadata", "zero_points")
"""What `strip_model` can remove, in order. TFLite Micro reads none of it:
tensor and subgraph names and the model description ('names': each weight
operator's filter tensor keeps its Keras layer's name, and only that, so that
`keras-mpq inspect --plan`, `check_against_plan` and the deployment report
still find each layer's weights; every other tensor name is cut); the
signature defs; the converter's metadata (``CONVERSION_METADATA``,
``min_runtime_version``; an ``OfflineMemoryAllocation`` entry is kept); and
per-channel zero points that are all zero (symmetric weights and biases), cut
to one entry. LiteRT runs a file without names or signatures (inputs and
outputs are found by index), but refuses one whose zero points are cut (it
wants one per scale), so 'zero_points' is for TFLite Micro only; keras_mpq's
own LiteRT paths (`validate_tflite`, `benchmark_latency`) restore them in
memory first (`tflite_inspect.restore_zero_points`)."""

DEFAULT_STRIP = {"mobile": (), "mcu": STRIP_STEPS, "ethos-u": ()}
"""mcu strips by default everything `STRIP_STEPS` lists (each stripped file is
checked to give the same outputs in TFLite Micro). mobile files keep their
names and signature defs: LiteRT's signature runners and other tools read them."""
_KEEP_METADATA = (b"OfflineMemoryAllocation",)


def strip_model(model_bytes: bytes, steps: Sequence[str] = STRIP_STEPS,
                layer_names: Sequence[str] = ()) -> Tuple[bytes, Dict[str, int]]:
  """Removes what TFLite Micro does not read; returns the file and the bytes each step saved.

  Steps are applied in `STRIP_STEPS` order; each saving is measured on the
  rebuilt (aligned) file. See `STRIP_STEPS` for what each step removes. With
  'names', the filter tensor of each weight operator of a layer in
  ``layer_names`` is renamed to that layer's name; all other names are cut.
  """
  unknown = sorted(set(steps) - set(STRIP_STEPS))
  if unknown:
    raise InvalidInputError(
        f"Expected strip steps from {STRIP_STEPS}. Received: {unknown}")
  if not steps:
    return model_bytes, {}
  from tensorflow.lite.tools import flatbuffer_utils as fu  # pylint: disable=g-import-not-at-top
  model = fu.read_model_from_bytearray(bytearray(model_bytes))
  saved: Dict[str, int] = {}
  current = tflite_inspect.align(bytes(fu.convert_object_to_bytearray(model)))
  saved["rebuild"] = len(model_bytes) - len(current)
  for step in STRIP_STEPS:
    if step not in steps:
      continue
    if step == "names":
      keep = {}
      if layer_names:
        for layer, entries in tflite_inspect.layer_weight_ops(model_bytes, layer_names).items():
          for e in entries:
            keep[e["weight_tensor"]] = layer
      model.description = None
      for i, sg in enumerate(model.subgraphs):
        sg.name = None
        for t_index, t in enumerate(sg.tensors):
          t.name = keep.get(t_index) if i == 0 else None
    elif step == "signatures":
      model.signatureDefs = None
    elif step == "metadata":
      keep = [m for m in (model.metadata or []) if m.name in _KEEP_METADATA]
      for m in model.metadata or []:
        if m not in keep:
          model.buffers[m.buffer].data = None
      model.metadata = keep or None
    elif step == "zero_points":
      for sg in model.subgraphs:
        for t in sg.tensors:
          q = t.quantization
          zp = getattr(q, "zeroPoint", None) if q is not None else None
          if zp is not None and len(zp) > 1 and not np.any(zp):
            q.zeroPoint = np.zeros(1, np.int64)
    rebuilt = tflite_inspect.align(bytes(fu.convert_object_to_bytearray(model)))
    saved[step] = len(current) - len(rebuilt)
    current = rebuilt
  return current, saved



# --------------------------------------------------------------------------- main


def _resolve_strip(strip, target) -> Tuple[str, ...]:
  if strip is None:
    return tuple(DEFAULT_STRIP[target])
  if strip is True:
    return STRIP_STEPS if target == "mcu" else tuple(s for s in STRIP_STEPS if s != "zero_points")
  if strip is False:
    return ()
  steps = (strip,) if isinstance(strip, str) else tuple(strip)
  unknown = sorted(set(steps) - set(STRIP_STEPS))
  if unknown:
    raise InvalidInputError(
        f"Expected strip=True, False, None or steps from {STRIP_STEPS}. Received: {strip!r}")
  if "zero_points" in steps and target != "mcu":
    raise InvalidInputError(
        "Expected strip step 'zero_points' only for target='mcu' (LiteRT and Vela want one "
        f"zero point per scale). Received: target={target!r}")
  return steps


def prepare_for_target(model, target: str, x: np.ndarray) -> Tuple[Any, List[str]]:
  """The model as it will be converted for ``target``, and notes on what was replaced.

  For 'mcu' and 'ethos-u', GELU activations (no TFLite Micro kernel) become
  `gelu_tanh_form` when the model's outputs on ``x`` then change by at most
  `GELU_MATCH_TOLERANCE` of their range; otherwise the layer is refused.
  """
  if target == "mobile":
    return model, []
  replaced, changed = replace_gelu(model)
  if not changed:
    return model, []
  sample = x[:256]
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
  return replaced, [f"{name}: GELU (no TFLite Micro kernel) written in its tanh form "
                    f"from MUL/ADD/LOGISTIC; outputs change by {change:.2e} of their range"
                    for name in changed]


def _same_tflm_outputs(a: bytes, b: bytes, x: np.ndarray, n: int = 8) -> bool:
  from keras_mpq import validate  # pylint: disable=g-import-not-at-top
  sample = x[:n]
  ya = validate.run_tflite(a, sample, runtime="tflm")
  yb = validate.run_tflite(b, sample, runtime="tflm")
  return ya.shape == yb.shape and bool(np.array_equal(ya, yb))


def lut_compress(model_bytes: bytes, layers: Sequence[LayerExport], ops,
                 ) -> Tuple[bytes, List[str]]:
  """TFLite Micro lookup-table compression of 2- to 4-bit layers stored as int8.

  Each weight tensor becomes ``bits``-wide indices into a per-channel table
  of its int8 values, decoded at run time by a DECODE operator (into the
  arena: flash shrinks, RAM grows by the decoded tensor). Returns the file
  and the layers compressed.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  spec = importlib.import_module("tflite_micro.tensorflow.lite.micro.compression.spec")
  compress = importlib.import_module("tflite_micro.tensorflow.lite.micro.compression.compress")
  axis = {"FULLY_CONNECTED": 0, "CONV_2D": 0, "DEPTHWISE_CONV_2D": 3}
  specs, done = [], []
  for l in layers:
    if l.planned_bits not in (2, 3, 4) or l.stored_type != "INT8" or l.op not in axis:
      continue
    for entry in ops.get(l.layer, []):
      specs.append(spec.Tensor(0, entry["weight_tensor"], [
          spec.LookUpTableCompression(l.planned_bits, spec.PerChannel(axis[l.op]))]))
    done.append(l.layer)
  if not specs:
    return model_bytes, []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return bytes(compress.compress(model_bytes, specs)), done


def export_tflite(model, path, plan: QuantizationPlan, target: str = "mobile",
                  calibration_data=None, *, accelerator: str = DEFAULT_VELA_ACCELERATOR,
                  max_calibration_samples: int = act_ranges.MAX_RANGE_SAMPLES, seed: int = 0,
                  vela_options: Sequence[str] = (), strip=None, lut: bool = False,
                  max_bytes: Optional[float] = None, ram: Optional[float] = None,
                  deployment: bool = True,
                  range_policy: Optional[str] = None) -> ExportResult:
  """Writes ``model`` quantized as ``plan`` to a .tflite file for ``target``.

  Args:
    model: float tf_keras model, BatchNorm folded (weights may already sit on
      the plan's grid).
    path: output file; written atomically. For 'ethos-u' the Vela-compiled
      file goes here and the TFLite Micro input beside it (``*_mcu.tflite``).
    plan: weight bits per Keras layer (2..8, 32 = float) and activation bits.
    target: 'mobile' (LiteRT), 'mcu' (TFLite Micro: int8 in/out, batch 1) or
      'ethos-u' (the mcu file compiled by Vela for ``accelerator``).
    calibration_data: typical inputs (numpy, model input shape) for the
      activation ranges; at most ``max_calibration_samples`` are used.
    seed: picks the calibration subset repeatably.
    strip: what to remove that the runtime does not read (`STRIP_STEPS`):
      None = the target's default (`DEFAULT_STRIP`: names, signatures,
      metadata and zero points for 'mcu', nothing otherwise),
      True = all the target allows, False = nothing, or a list of steps. A
      stripped mcu file is checked to give the same outputs in TFLite Micro.
    lut: 'mcu' only: TFLite Micro lookup-table compression of 2- to 4-bit
      layers stored as int8 (kept only where the compressed file gives the
      same outputs in TFLite Micro). Off by default although it runs and
      matches in the installed runtime: DECODE decodes the weights into the
      arena, so the flash it saves is paid in RAM (a digits MLP at 2 bits:
      55,328 -> 17,232 B of flash, arena 4,064 -> 54,144 B; benchmarks/
      results/deploy.md), and the byte cost table does not model it.
    max_bytes: the file's byte budget: a larger file raises
      `FileOverBudgetError` and nothing is written.
    ram: RAM limit in bytes for the TFLite Micro arena ('mcu', 'ethos-u'):
      a larger arena raises `RamLimitError` and nothing is written.
    deployment: measure the deployment report (arena, latency); needed for ``ram``.
    range_policy: activation ranges, as the Keras model was calibrated
      ('minmax', 'percentile', 'mse'; `keras_mpq.act_ranges`).

  Returns:
    An `ExportResult` read back from the written file.

  Example:

  >>> plan = QuantizationPlan({"conv1": 4, "logits": 8})     # doctest: +SKIP
  >>> r = export_tflite(model, "m.tflite", plan, "mcu", calibration_data=x)  # doctest: +SKIP
  >>> r.layers[0].storage                                    # doctest: +SKIP
  'int4 packed'
  """
  x = _check_args(model, plan, target, calibration_data)
  steps = _resolve_strip(strip, target)
  if lut and target != "mcu":
    raise InvalidInputError(f"Expected lut=True only for target='mcu'. Received: target={target!r}")
  if ram is not None and not (isinstance(ram, (int, float)) and math.isfinite(ram) and ram > 0):
    raise InvalidInputError(f"Expected ram as a positive number of bytes. Received: ram={ram!r}")
  path = os.fspath(path)
  notes: List[str] = []
  model, replaced = prepare_for_target(model, target, x)
  notes.extend(replaced)
  snapped = snap_to_plan(model, plan)
  batch = None if target == "mobile" else 1
  float_bytes = to_float_tflite(snapped, batch)
  # Before the slow stages: every operator must have a kernel in the target's runtime.
  check_runtime_ops(float_bytes, target, [l.name for l in model.layers])
  calib_bytes = to_float_tflite(snapped, None) if batch is not None else None
  reader = tflite_inspect.parse(float_bytes)
  ops = tflite_inspect.layer_weight_ops(reader, plan.layers)
  decisions = []
  for layer in plan.layers:
    if not ops[layer]:
      notes.append(f"{layer}: no TFLite weight op carries this layer's name; left to the default")
      continue
    for entry in ops[layer]:
      decisions.append(decide(layer, entry["op"], plan.weight_bits[layer],
                              plan.act_bits(layer), target, entry["output_name"]))
  recipe = build_recipe(decisions, target)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", RuntimeWarning)
      qbytes = quantize_with_recipe(float_bytes, recipe, x, max_calibration_samples, seed,
                                    calib_bytes, range_policy=range_policy)
  except KerasMpqError:
    raise
  except Exception as e:
    raise UnsupportedModelError(
        f"ai-edge-quantizer could not quantize this model for {target!r}: "
        f"{type(e).__name__}: {str(e)[:300]}") from None
  # TFLite Micro's model editor (repack_int4, unpack_int8) sees only inline
  # buffers; ai-edge-quantizer puts those of a model with 256 KiB or more of
  # constants after the flatbuffer, where an edit found nothing to change
  # (MobileNetV2's 4-bit Dense stayed INT4 on 'mcu', which TFLite Micro refuses).
  qbytes = inline_buffers(qbytes)
  repack = [d for d in decisions if d.repack_int4]
  if repack:
    weight_names = [e["weight_name"] for d in repack for e in ops[d.layer]]
    try:
      qbytes = repack_int4(qbytes, weight_names)
    except Exception as e:  # pylint: disable=broad-except
      notes.append(f"3-bit layers kept in int8 (int4 repacking failed: {e})")
  unpack = [d for d in decisions if d.unpack_int8]
  if unpack:
    qbytes = unpack_int8(qbytes, [e["weight_name"] for d in unpack for e in ops[d.layer]
                                  if e["output_name"] == d.output_name])
  if target != "mobile":  # TFLite Micro's layout: buffers inline, 16-byte aligned
    qbytes = inline_buffers(qbytes, always=True)
  problems = check_weight_integers(qbytes, snapped, decisions, ops, float_bytes)
  if problems:
    raise KerasMpqError(
        "Expected the exported weight integers to equal the Keras model's. Received "
        f"{len(problems)} mismatching tensor(s): " + "; ".join(problems[:5]) +
        ". Nothing was written; please report this with the model.")
  bad_scales = check_scales(qbytes)
  if bad_scales:
    raise UnsupportedModelError(
        "Expected finite, positive quantization scales in the exported file. Received: "
        + "; ".join(bad_scales[:5]) + ". Nothing was written; check the layer's weights "
        "and calibration data for constant or non-finite values.")
  notes.extend(_explain_warnings(caught, qbytes))
  layers = _read_back(qbytes, decisions, ops)
  for l in layers:
    if l.note:
      notes.append(f"{l.layer}: {l.note}")
  other = _other_layer_storage(qbytes, [l.name for l in model.layers], plan.layers)
  steps_saved: Dict[str, int] = {"quantized_file": len(qbytes)}
  if lut:
    try:
      packed, done = lut_compress(qbytes, layers, tflite_inspect.layer_weight_ops(qbytes, plan.layers))
    except Exception as e:  # pylint: disable=broad-except
      packed, done = qbytes, []
      notes.append(f"lookup-table compression not used: {type(e).__name__}: {str(e)[:160]}")
    if done and _same_tflm_outputs(qbytes, packed, x):
      steps_saved["lut"] = len(qbytes) - len(packed)
      notes.append(f"lookup-table compressed in TFLite Micro (DECODE): {', '.join(done)}")
      qbytes = packed
    elif done:
      notes.append("lookup-table compression not used: TFLite Micro outputs changed")
  if steps:
    stripped, saved = strip_model(qbytes, steps, plan.layers)
    if target == "mcu" and not _same_tflm_outputs(qbytes, stripped, x):
      raise UnsupportedModelError(
          f"The stripped file ({', '.join(steps)}) gave other outputs in TFLite Micro than "
          "the full one. Export with strip=False and please report it.")
    steps_saved.update(saved)
    qbytes = stripped
  vela_summary = None
  mcu_path = None
  mcu_bytes = qbytes if target != "mobile" else None
  if target == "ethos-u":
    qbytes, vela_summary = compile_vela(qbytes, accelerator, vela_options)
    notes.append(f"Vela ({accelerator}): {vela_summary.get('npu_op_share', 0):.0%} of ops on "
                 "the NPU")
  report = None
  if deployment or ram is not None:
    from keras_mpq import validate  # pylint: disable=g-import-not-at-top
    report = validate.deployment_report(qbytes, target, tflm_bytes=mcu_bytes, x=x,
                                        vela=vela_summary, steps=steps_saved)
    arena = report.get("arena_bytes")
    if ram is not None and arena is not None and arena > ram:
      raise RamLimitError(
          f"Expected a TFLite Micro arena of at most {ram:.0f} bytes (ram). Received: this "
          f"model needs {arena} bytes (measured by TFLite Micro's interpreter); nothing was "
          "written. Use fewer or narrower activations, activation_bits=8, or a larger limit.",
          arena, ram)
  if max_bytes is not None and len(qbytes) > max_bytes:
    raise FileOverBudgetError(
        f"Expected a file of at most {max_bytes:.0f} bytes (the budget). Received: the "
        f"{target} file is {len(qbytes)} bytes; nothing was written.", len(qbytes), max_bytes)
  if target == "ethos-u":
    root, ext = os.path.splitext(path)
    mcu_path = root + "_mcu" + (ext or ".tflite")
    fileio.write_bytes(mcu_path, mcu_bytes)
  fileio.write_bytes(path, qbytes)
  return ExportResult(path=path, target=target, size=len(qbytes), layers=tuple(layers),
                      notes=tuple(notes), vela=vela_summary, mcu_path=mcu_path,
                      deployment=report, other_layers=other)


@dataclasses.dataclass(frozen=True)
class StorageProfile:
  """What a real export of a model for a target measured, for `keras_mpq.costs.file_cost_table`.

  ``size``: the file's bytes with every planned layer at ``reference_bits``;
  ``ops``: per layer, its weight operators and their weight counts;
  ``zero_points_stripped``: whether the file's per-channel zero points were
  cut (the mcu default).
  """

  target: str
  size: int
  ops: Mapping[str, Tuple[Tuple[str, int], ...]]
  reference_bits: int = 8
  zero_points_stripped: bool = False
  strip: Tuple[str, ...] = ()

  def to_dict(self) -> Dict[str, Any]:
    return to_jsonable(dataclasses.asdict(self))


def measure_storage(model, target: str = "mobile", layers: Optional[Sequence[str]] = None,
                    activation_bits: int = 8, strip=None, seed: int = 0) -> StorageProfile:
  """Exports ``model`` once for ``target`` at 8 bits and measures its file (one cheap export).

  Calibration uses two random inputs: ranges do not change a file's size.
  The same stripping as the final export (``strip``) is applied, so the
  fixed part measured is the fixed part of the file that will be written.

  Example:

  >>> p = measure_storage(model, "mcu")                     # doctest: +SKIP
  >>> p.size, p.ops["fc1"]                                  # doctest: +SKIP
  (55280, (('FULLY_CONNECTED', 50176),))
  """
  if target not in TARGETS:
    raise InvalidInputError(f"Expected target in {TARGETS}. Received: target={target!r}")
  if layers is None:
    layers = [l.name for l in quantizers.quantizable_layers(model)]
  steps = _resolve_strip(strip, target)
  plan = QuantizationPlan({n: 8 for n in layers}, {n: activation_bits for n in layers},
                          activation_bits)
  shape = (2,) + tuple(int(d) for d in model.inputs[0].shape[1:])
  x = np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)
  with tempfile.TemporaryDirectory(prefix="keras_mpq_measure_") as tmp:
    r = export_tflite(model, os.path.join(tmp, "m.tflite"), plan, target, x, strip=steps,
                      deployment=False, seed=seed)
  ops: Dict[str, List[Tuple[str, int]]] = {n: [] for n in layers}
  for l in r.layers:
    if l.stored_type != "INT8":
      raise UnsupportedModelError(
          f"Expected every layer stored int8 in an 8-bit export. Received: {l.layer} "
          f"stored {l.stored_type}")
    ops[l.layer].append((l.op, int(l.bytes)))
  return StorageProfile(target, int(r.size), {k: tuple(v) for k, v in ops.items()}, 8,
                        "zero_points" in steps, tuple(steps))


def _explain_warnings(caught, qbytes: bytes) -> List[str]:
  """Notes for RuntimeWarnings ai-edge-quantizer raised; the scales were checked already."""
  out = []
  for w in caught:
    if issubclass(w.category, RuntimeWarning):
      out.append(f"ai-edge-quantizer warned '{w.message}' "
                 f"({os.path.basename(str(w.filename))}:{w.lineno}); every scale in the "
                 "file was checked finite and > 0 afterwards")
  return sorted(set(out))


def _other_layer_storage(qbytes: bytes, layer_names: Sequence[str],
                         planned: Sequence[str]) -> Dict[str, str]:
  """Each unplanned layer with operators -> the types of its operators' outputs in the file."""
  reader = tflite_inspect.parse(qbytes)
  found: Dict[str, set] = {}
  others = [n for n in layer_names if n not in set(planned)]
  for op in reader.ops:
    for t in op.outputs:
      if t < 0:
        continue
      layer = _layer_of_tensor(reader.name(t), others)
      if layer is not None:
        type_name = tflite_inspect._TYPE_INFO.get(reader.tensors[t].Type(), ("?",))[0]  # pylint: disable=protected-access
        found.setdefault(layer, set()).add(type_name.lower())
  return {k: "+".join(sorted(v)) for k, v in found.items()}


def _read_back(qbytes: bytes, decisions: Sequence[_Decision], float_ops) -> List[LayerExport]:
  """Per-layer storage as actually found in the quantized file."""
  rows = {r.name: r for r in tflite_inspect.inspect_tflite(qbytes)}
  out = []
  for d in decisions:
    names = [e["weight_name"] for e in float_ops[d.layer] if e["output_name"] == d.output_name]
    row = rows.get(names[0]) if names else None
    if row is None:
      out.append(LayerExport(d.layer, d.op, d.planned_bits, d.activation_bits, "unknown",
                             "?", None, 0, "weight tensor not found after quantization"))
      continue
    stored = row.dtype
    note = d.note
    if stored in ("FLOAT32", "FLOAT16"):
      storage = "float32" if stored == "FLOAT32" else "float16"
      if d.container != "float":
        note = (note + "; " if note else "") + "ai-edge-quantizer left it float"
    elif stored == "INT4":
      storage = "int4 packed" if d.planned_bits in (4, FLOAT_BITS) else \
          f"int4 holding {row.levels} levels"
    elif stored == "INT8":
      full = d.planned_bits in (8, FLOAT_BITS)
      storage = "int8" if full else f"int8 holding {row.levels} levels"
      if d.container == "int4":
        note = (note + "; " if note else "") + "requested int4, ai-edge-quantizer wrote int8"
    else:
      storage = stored.lower()
    out.append(LayerExport(d.layer, d.op, d.planned_bits, d.activation_bits, storage,
                           stored, row.levels, row.bytes, note))
  return out


# --------------------------------------------------------------------------- vela


def _vela_command() -> List[str]:
  exe = shutil.which("vela") or os.path.join(os.path.dirname(sys.executable), "vela")
  if os.path.exists(exe):
    return [exe]
  try:
    import ethosu.vela  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise MissingDependencyError(
        "Expected Arm's Vela compiler for target='ethos-u'. Install it with: "
        "pip install 'ethos-u-vela==5.2.*' (or pip install 'keras-mpq[mcu]')") from None
  return [sys.executable, "-m", "ethosu.vela.vela"]


def compile_vela(mcu_bytes: bytes, accelerator: str = DEFAULT_VELA_ACCELERATOR,
                 options: Sequence[str] = ()) -> Tuple[bytes, Dict[str, Any]]:
  """Compiles a TFLite Micro file with Vela; returns (compiled bytes, summary).

  The summary has the share of ops placed on the NPU, SRAM and flash bytes,
  Vela's cycle and inference-time estimate, from its summary CSV.
  """
  cmd = _vela_command()
  with tempfile.TemporaryDirectory(prefix="keras_mpq_vela_") as tmp:
    src = os.path.join(tmp, "model.tflite")
    with open(src, "wb") as f:
      f.write(mcu_bytes)
    out_dir = os.path.join(tmp, "out")
    args = cmd + [src, "--accelerator-config", accelerator, "--output-dir", out_dir] + list(options)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      raise UnsupportedModelError(
          f"Vela failed on this model (exit {proc.returncode}): {' | '.join(tail)}")
    compiled = os.path.join(out_dir, "model_vela.tflite")
    with open(compiled, "rb") as f:
      data = f.read()
    summary = _vela_summary(out_dir, proc.stdout)
  summary["accelerator"] = accelerator
  return data, summary


def _vela_summary(out_dir: str, stdout: str) -> Dict[str, Any]:
  summary: Dict[str, Any] = {}
  csvs = [f for f in os.listdir(out_dir) if f.endswith("_summary_" + "") or f.endswith(".csv")]
  for name in csvs:
    if "summary" not in name:
      continue
    with open(os.path.join(out_dir, name), newline="") as f:
      rows = list(csv.DictReader(f))
    if rows:
      row = {k.strip(): v for k, v in rows[0].items() if k}
      pick = {
          "sram_kib": "sram_memory_used", "flash_kib": "off_chip_flash_memory_used",
          "npu_cycles": "cycles_npu", "total_cycles": "cycles_total",
          "inference_time_s": "inference_time", "inferences_per_second": "inferences_per_second",
          "cpu_ops": "cpu_operators", "npu_ops": "npu_operators",
          "on_chip_flash_kib": "on_chip_flash_memory_used",
          "weights_bytes": "total_original_weights",
          "encoded_weights_bytes": "total_npu_encoded_weights",
      }
      for key, col in pick.items():
        for k, v in row.items():
          if k.lower().startswith(col):
            summary[key] = _num(v)
            break
  # Vela prints "CPU operators = N (x%)" and "NPU operators = M (y%)".
  for label, key in (("CPU operators", "cpu_ops"), ("NPU operators", "npu_ops")):
    m = re.search(label + r"\s*=\s*(\d+)", stdout)
    if m:
      summary[key] = int(m.group(1))
  for label, key in (("Total SRAM used", "sram_kib"), ("Total Off-chip Flash used", "flash_kib"),
                     ("Neural network macs", "macs")):
    m = re.search(label + r"\s+([0-9.]+)", stdout)
    if m:
      summary.setdefault(key, float(m.group(1)))
  m = re.search(r"Batch Inference time\s+([0-9.]+) ms", stdout)
  if m:
    summary["inference_ms"] = float(m.group(1))
  m = re.search(r"NPU cycles\s+(\d+)", stdout)
  if m:
    summary.setdefault("npu_cycles", int(m.group(1)))
  total = summary.get("cpu_ops", 0) + summary.get("npu_ops", 0)
  summary["npu_op_share"] = summary.get("npu_ops", 0) / total if total else 0.0
  summary["stdout"] = stdout[-3000:]
  return summary


def _num(v):
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return int(f) if f.is_integer() else f
