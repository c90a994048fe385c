"""Activation ranges of the exported file's tensors: the rules applied after calibration.

ai-edge-quantizer calibrates every activation tensor of the float file to the
min/max seen on the calibration samples (`keras_mpq.export.recipe.quantize_with_recipe`).
These rules then adjust those ranges, in place, before the file is quantized:

- `apply_range_policy`: another range policy (`keras_mpq.base.act_ranges`), as
  the Keras model's `calibrate` applies it;
- `fit_saturating_inputs`: the input of a SOFTMAX or LOGISTIC keeps only the
  part of its range that can change the op's int8 output (see below);
- `fill_fused_ranges`: tensors fused in the batch-1 file take their parts' range;
- `widen_collapsed_ranges`: no range narrower than `MIN_RANGE_WIDTH`.

Why the saturating rule: the logits before a softmax are a tensor of the file
that the Keras model does not quantize (it quantizes the probabilities). On
synthetic calibration data, which the labeled generator makes confident, the
logits span far more than real inputs' do (a keyword spotter's: [-117, 29]
data-free against [-62, 12] on real speech), and the step grows with the span:
the file's argmax then parts from the Keras model's on inputs near a decision
boundary. A softmax's int8 output, though, cannot tell a logit more than
``ln(1024 * classes)`` below its row's largest from one at that bound
(together such logits add less than a quarter of the output's step,
1/256), so the range's low end is raised to the smallest row maximum seen
minus that margin. A logistic's int8 output is 0 below -8 and 1 above 8
(``|x| > ln(512)`` already rounds to them), so its input is clipped to
[-8, 8]. Values outside are clipped, as the output would be.

>>> round(softmax_margin(10), 2)  # ln(1024 * 10)
9.23
"""

from __future__ import annotations

import math
import re
from typing import Dict, Iterator, List, Tuple

import numpy as np

from keras_mpq.base import act_ranges as act_ranges_lib

MIN_RANGE_WIDTH = 1e-2
"""Narrowest activation range written: a tensor that was constant during
calibration (a channel zeroed by 2-bit weights, a dead ReLU) would otherwise
get a near-zero scale, which LiteRT refuses ("no_integer_overflow_from_
quantization"). Its values still quantize exactly; only the step widens."""

LOGISTIC_INPUT_LIMIT = 8.0
"""A LOGISTIC's input is clipped to [-8, 8]: its int8 output (step 1/256) is
already 0 or 1 beyond ``ln(512)`` (6.24)."""


def softmax_margin(classes: int) -> float:
  """How far below its row's largest a softmax input may be clipped: ``ln(1024 * classes)``."""
  return math.log(1024.0 * max(int(classes), 1))


def _tensor_values(calib_bytes: bytes, samples, names) -> Iterator[Tuple[str, np.ndarray]]:
  """``(name, value)`` of each of ``names`` (model inputs left out) after each feed of ``samples``.

  Runs the calibration file once per feed, keeping every tensor; a name the
  file does not have, or a tensor the interpreter did not keep, is skipped.
  """
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  interp = Interpreter(model_content=calib_bytes, experimental_preserve_all_tensors=True)
  inputs = {d["name"] for d in interp.get_input_details()}
  index = {d["name"]: d["index"] for d in interp.get_tensor_details()}
  wanted = [n for n in names if n in index and n not in inputs]
  runner = interp.get_signature_runner()
  for feed in samples:
    runner(**feed)
    for name in wanted:
      try:
        yield name, interp.get_tensor(index[name])
      except ValueError:  # a tensor the interpreter did not keep
        pass


def _min_max(qsv):
  if not isinstance(qsv, dict) or "min" not in qsv or "max" not in qsv:
    return None
  return np.asarray(qsv["min"], np.float32), np.asarray(qsv["max"], np.float32)


def saturating_inputs(reader) -> Dict[str, Dict[str, float]]:
  """The SOFTMAX and LOGISTIC inputs whose range `fit_saturating_inputs` may narrow.

  By tensor name: ``{"op": "SOFTMAX" | "LOGISTIC", "beta": ..., "classes": ...}``.
  Left out: a tensor that is also a model output or feeds any other op (its
  values matter beyond the saturating op), and unnamed tensors.
  """
  consumers: Dict[int, int] = {}
  for op in reader.ops:
    for t in op.inputs:
      if t >= 0:
        consumers[t] = consumers.get(t, 0) + 1
  outputs = {int(reader.sg.Outputs(i)) for i in range(reader.sg.OutputsLength())}
  found = {}
  for op in reader.ops:
    if op.op not in ("SOFTMAX", "LOGISTIC") or not op.inputs:
      continue
    t = op.inputs[0]
    name = reader.name(t)
    if not name or t in outputs or consumers.get(t, 0) != 1:
      continue
    shape = reader.shape(t) or (0,)
    found[name] = {"op": op.op, "beta": reader.softmax_beta(op.index) if op.op == "SOFTMAX" else 1.0,
                   "classes": int(shape[-1])}
  return found


def fit_saturating_inputs(calib, calib_bytes: bytes, samples,
                          inputs: Dict[str, Dict[str, float]]) -> None:
  """Narrows (in place) the calibrated range of each of ``inputs`` (`saturating_inputs`).

  SOFTMAX inputs: the low end rises to the smallest row maximum seen on
  ``samples`` minus `softmax_margin` (divided by the op's beta). LOGISTIC
  inputs: clipped to +-`LOGISTIC_INPUT_LIMIT`.
  """
  wanted = {n: v for n, v in inputs.items() if _min_max(calib.get(n)) is not None}
  softmaxes = [n for n, v in wanted.items() if v["op"] == "SOFTMAX"]
  row_max: Dict[str, float] = {}
  for name, value in (_tensor_values(calib_bytes, samples, softmaxes) if softmaxes else ()):
    if value.size:
      low = float(np.min(np.max(np.asarray(value, np.float32), axis=-1)))
      row_max[name] = min(row_max.get(name, low), low)
  for name, info in wanted.items():
    lo, hi = _min_max(calib[name])
    if info["op"] == "SOFTMAX":
      if name not in row_max:
        continue
      beta = info["beta"] if info["beta"] > 0 else 1.0
      new_lo = np.maximum(lo, row_max[name] - softmax_margin(info["classes"]) / beta)
      new_hi = hi
    else:
      new_lo = np.maximum(lo, -LOGISTIC_INPUT_LIMIT)
      new_hi = np.minimum(hi, LOGISTIC_INPUT_LIMIT)
    new_lo = np.minimum(new_lo, new_hi - MIN_RANGE_WIDTH)
    if np.any(new_lo != lo) or np.any(new_hi != hi):  # untouched ranges keep their arrays
      calib[name]["min"] = new_lo.astype(np.float32)
      calib[name]["max"] = new_hi.astype(np.float32)


def widen_collapsed_ranges(calib) -> None:
  """Widens (in place) every calibrated min/max pair narrower than MIN_RANGE_WIDTH."""
  for qsv in calib.values():
    pair = _min_max(qsv)
    if pair is None:
      continue
    lo, hi = pair
    narrow = (hi - lo) < MIN_RANGE_WIDTH
    if np.any(narrow):
      center = (lo + hi) / 2
      qsv["min"] = np.where(narrow, np.minimum(lo, center - MIN_RANGE_WIDTH / 2), lo)
      qsv["max"] = np.where(narrow, np.maximum(hi, center + MIN_RANGE_WIDTH / 2), hi)


def fill_fused_ranges(calib, interp) -> None:
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


def apply_range_policy(calib, calib_bytes: bytes, samples, policy: str) -> None:
  """Replaces (in place) each activation's min/max in ``calib`` by ``policy``'s range."""
  values: Dict[str, List[np.ndarray]] = {}
  per_feed = act_ranges_lib.MAX_VALUES // max(len(samples), 1)
  for name, value in _tensor_values(calib_bytes, samples, list(calib)):
    values.setdefault(name, []).append(act_ranges_lib.sample_values(value, per_feed))
  for name, parts in values.items():
    qsv = calib[name]
    if _min_max(qsv) is None:
      continue
    chosen = act_ranges_lib.choose_range(np.concatenate(parts), 8, policy)
    qsv["min"] = np.full_like(np.asarray(qsv["min"], np.float32), chosen.low)
    qsv["max"] = np.full_like(np.asarray(qsv["max"], np.float32), chosen.high)
