"""The ai-edge-quantizer recipe: per layer and target, how its weights are stored and quantized.

`decide` says for one layer whether its weights are packed int4, int8 or kept
(per target and operator, `keras_mpq.export.targets.CAPABILITIES`);
`build_recipe` turns a plan into ai-edge-quantizer's per-op recipe, and
`quantize_with_recipe` runs it with the calibrated activation ranges.

>>> decide("conv1", "CONV_2D", 4, 8, "mobile").container  # doctest: +SKIP
'int4'
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from keras_mpq.base import act_ranges as act_ranges_lib
from keras_mpq.base import batching
from keras_mpq.base.errors import MissingDependencyError, UnsupportedModelError
from keras_mpq.base.types import FLOAT_BITS
from keras_mpq.export import ranges as ranges_lib
from keras_mpq.export import reader as reader_lib
from keras_mpq.export.convert import quiet
from keras_mpq.export.targets import RUNTIME_OF_TARGET, supported


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


# TFLite builtin operator name -> ai-edge-quantizer's name for it, where they
# differ (its recipe rules name operators its own way; an unknown name fails
# with "Unsupported operation ... for Algorithm").
AEQ_OP_NAMES = {"TRANSPOSE_CONV": "CONV_2D_TRANSPOSE"}

# The weight operators ai-edge-quantizer's policy quantizes at 4 and 8 bits
# (its ``static_wi4_ai8``); the others need ``skip_checks`` at 4 bits.
POLICY_INT4_OPS = ("CONV_2D", "FULLY_CONNECTED")


@dataclasses.dataclass(frozen=True)
class Decision:
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
           output_name: str = "") -> Decision:
  """How one layer's weights will be stored on ``target`` (see module docstring).

  >>> decide("fc", "FULLY_CONNECTED", 4, 8, "mcu").container
  'int8'
  >>> decide("conv", "CONV_2D", 2, 8, "mcu").request_bits
  4
  """
  notes = []
  full_integer = target != "mobile"
  if bits == FLOAT_BITS and not full_integer:
    return Decision(layer, op, output_name, bits, act, "float", 32, False, "")
  if bits == FLOAT_BITS:
    notes.append("planned float; full-integer target stores it as int8")
    bits = 8
  if not supported(target, op, "int8", act):
    notes.append(f"{op} with int{act} activations does not run on "
                 f"{RUNTIME_OF_TARGET[target]}; activations int8")
    act = 8
  if bits <= 4 and supported(target, op, "int4", act):
    request = {2: 4, 3: 3, 4: 4}[bits]
    return Decision(layer, op, output_name, bits if not notes else bits, act, "int4",
                     request, bits == 3, "; ".join(notes))
  if bits <= 4:
    notes.append(f"packed int4 {op} does not run on {RUNTIME_OF_TARGET[target]}"
                 f"{' with int16 activations' if act == 16 else ''}; int8 holds the levels")
  # 2 bits nest exactly in the 3-bit grid; 4 bits are quantized on the 4-bit
  # grid (INT4) and then unpacked into INT8, keeping the exact integers.
  request = {2: 3}.get(bits, bits)
  return Decision(layer, op, output_name, bits, act, "int8", request, False,
                   "; ".join(notes), unpack_int8=bits == 4)


TFLM_INT8_SOFTMAX_MAX_CLASSES = 256
"""Widest int8 SOFTMAX written for TFLite Micro. Its int8 kernel aborts the
process (a ``TFLITE_CHECK`` on the sum of exponentials, tflite-micro issue
3499) when a row's exponentials, relative to its largest, sum to more than
about 2^8: with near-equal logits over many classes. Measured here: a
Dense+softmax over 800 classes runs, over 900 aborts (random weights); the
1000-class MobileNetV2 aborted. Wider softmaxes are written in float
(DEQUANTIZE, then a float SOFTMAX: the file's output is float probabilities)."""


def wide_softmaxes(reader, target: str) -> List[str]:
  """Output names of the SOFTMAX ops ``target``'s runtime cannot run in int8 (see above)."""
  if target == "mobile":
    return []
  return [reader.name(op.outputs[0]) for op in reader.ops
          if op.op == "SOFTMAX"
          and (reader.shape(op.outputs[0]) or (0,))[-1] > TFLM_INT8_SOFTMAX_MAX_CLASSES]


def build_recipe(decisions: Sequence[Decision], target: str,
                 float_outputs: Sequence[str] = ()) -> List[Dict[str, Any]]:
  """ai-edge-quantizer recipe: int8 everywhere, then one rule per planned layer.

  Rules match the op's scope, which ai-edge-quantizer builds from the output
  tensor names joined by ';' plus a trailing ';'. Ops writing one of
  ``float_outputs`` stay float (`wide_softmaxes`).
  """
  recipe = [{"regex": ".*", "operation": "*",
             "algorithm_key": "min_max_uniform_quantize",
             "op_config": _op_config(8, 8, False)}]
  for name in float_outputs:
    recipe.append({"regex": "^" + re.escape(name) + ";$", "operation": "*",
                   "algorithm_key": "no_quantize"})
  for d in decisions:
    regex = "^" + re.escape(d.output_name) + ";$"
    if d.container == "float":
      recipe.append({"regex": regex, "operation": "*", "algorithm_key": "no_quantize"})
      continue
    # ai-edge-quantizer's policy allows only 4 and 8 bits, and INT4 only for
    # conv and fully connected; the probe measured the rest (CAPABILITIES).
    skip = d.request_bits not in (4, 8) or d.op not in POLICY_INT4_OPS
    recipe.append({"regex": regex, "operation": AEQ_OP_NAMES.get(d.op, d.op),
                   "algorithm_key": "min_max_uniform_quantize",
                   "op_config": _op_config(d.request_bits, d.activation_bits, skip)})
  return recipe


def quantize_with_recipe(float_bytes: bytes, recipe, calibration_data: np.ndarray,
                         max_samples: int = act_ranges_lib.MAX_RANGE_SAMPLES, seed: int = 0,
                         calibration_model: Optional[bytes] = None,
                         range_policy: Optional[str] = None) -> bytes:
  """Calibrates and quantizes a float flatbuffer with ai-edge-quantizer.

  Activation ranges are the min/max over the calibration samples (as on the
  Keras side), not ai-edge-quantizer's default moving average: the samples go
  through a dynamic-batch float model (``calibration_model``, else
  ``float_bytes``) in one batch, and the ranges found, keyed by tensor name,
  quantize ``float_bytes`` (which may have batch 1). Another ``range_policy``
  (`keras_mpq.base.act_ranges`) then narrows each activation's range as the Keras
  model's `calibrate` does; the model input keeps its min/max.
  """
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
    from ai_edge_quantizer import quantizer as aeq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise MissingDependencyError(
        "Expected ai-edge-quantizer and ai-edge-litert for TFLite export. "
        "Install them with: pip install 'ai-edge-quantizer==0.10.*' 'ai-edge-litert==2.3.*'"
    ) from None
  calib_bytes = calibration_model or float_bytes
  interp = Interpreter(model_content=calib_bytes)
  sigs = interp.get_signature_list()
  key = next(iter(sigs))
  input_names = list(sigs[key]["inputs"][:1])
  if batching.several(calibration_data):
    # Several inputs: `keras_mpq.export.convert.order_inputs` put them in model
    # order, each named as its signature key; x is a list in that order.
    input_names = [d["name"] for d in interp.get_input_details()]
    if sorted(input_names) != sorted(sigs[key]["inputs"]):
      raise UnsupportedModelError(
          f"Expected the file's inputs {input_names} to be named as its signature's "
          f"{sigs[key]['inputs']}; please report it with the model.")
  dynamic = int(interp.get_input_details()[0].get("shape_signature", [1])[0]) == -1
  # The subset the Keras model's calibrate measures on (with the default seed and limit).
  x = act_ranges_lib.range_subset(calibration_data, max_samples, seed)
  n = batching.num_samples(x)
  step = n if dynamic else 1
  samples = [dict(zip(input_names, batching.as_list(batching.take(x, slice(i, i + step)))))
             for i in range(0, n, step)]
  with quiet():
    calibrator = aeq.Quantizer(bytearray(calib_bytes), recipe)
    calib = (calibrator.calibrate({key: samples}, num_threads=1)
             if calibrator.need_calibration else None)
    if calib:
      policy = act_ranges_lib.check_range_policy(range_policy)
      if policy != "minmax":
        ranges_lib.apply_range_policy(calib, calib_bytes, samples, policy)
      ranges_lib.fit_saturating_inputs(
          calib, calib_bytes, samples,
          ranges_lib.saturating_inputs(reader_lib.parse(calib_bytes)))
      if calibration_model is not None:
        ranges_lib.fill_fused_ranges(calib, Interpreter(model_content=float_bytes))
      ranges_lib.widen_collapsed_ranges(calib)
    q = aeq.Quantizer(bytearray(float_bytes), recipe)
    result = q.quantize(calib)
  return bytes(result.quantized_model)
