"""TFLite export for phones ('mobile'), microcontrollers ('mcu') and Arm Ethos-U NPUs.

The float tf_keras model (BatchNorm folded) is first snapped to the plan's
grid (per-output-channel symmetric, narrow range, scale = max|w| / (2^(b-1)-1),
the grid `keras_mpq.quantization.configs` uses; idempotent for weights already on it),
converted to a float flatbuffer with ``tf.lite.TFLiteConverter``, then
quantized by ai-edge-quantizer with one recipe rule per Keras layer (matched
through the op's output tensor name, which carries the layer's name scope).
ai-edge-quantizer's max-abs symmetric channelwise weight quantization computes
scale = max|w| / (2^(n-1)-1) too, so it re-derives the same integers; the
exporter reads them back from the file and compares them, value for value,
with the Keras model's (`check_weight_integers`), and fails naming the tensor
if they differ. A channel whose integers are all 0 (a dead filter) gets a
scale its bias fits in (`rescale_zero_channels`; ai-edge-quantizer's 1e-9 / q
overflowed the int32 bias), and every integer bias is checked to hold the
float model's (`check_biases`).

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

import math
import os
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np

from keras_mpq.base import act_ranges as act_ranges_lib
from keras_mpq.base import fileio as fileio_lib
from keras_mpq.base.compat import keras
from keras_mpq.base.errors import (
  FileOverBudgetError,
  InvalidInputError,
  KerasMpqError,
  RamLimitError,
  UnsupportedModelError,
)
from keras_mpq.base.results import ExportResult, LayerExport
from keras_mpq.base.types import FLOAT_BITS, QuantizationPlan
from keras_mpq.export import reader as reader_lib
from keras_mpq.export.checks import (
  check_biases,
  check_runtime_ops,
  check_scales,
  check_weight_integers,
  layer_of_tensor,
)
from keras_mpq.export.convert import (
  prepare_for_target,
  same_tflm_outputs,
  snap_to_plan,
  to_float_tflite,
)
from keras_mpq.export.flatbuffer import (
  inline_buffers,
  lut_compress,
  repack_int4,
  rescale_zero_channels,
  resolve_strip,
  strip_model,
  unpack_int8,
)
from keras_mpq.export.recipe import (
  TFLM_INT8_SOFTMAX_MAX_CLASSES,
  Decision,
  build_recipe,
  decide,
  quantize_with_recipe,
  wide_softmaxes,
)
from keras_mpq.export.targets import DEFAULT_VELA_ACCELERATOR, TARGETS
from keras_mpq.export.vela import compile_vela
from keras_mpq.model import inputs as inputs_lib

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
  if calibration_data is None:
    raise InvalidInputError(
        "Expected calibration_data (a few hundred typical inputs) to set the "
        "activation ranges. Received: calibration_data=None")
  if len(model.inputs) > 1:  # a list in model order or a dict by input name, checked
    return inputs_lib.check_inputs(model, calibration_data, "calibration_data")
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


def export_tflite(model, path, plan: QuantizationPlan, target: str = "mobile",
                  calibration_data=None, *, accelerator: str = DEFAULT_VELA_ACCELERATOR,
                  max_calibration_samples: int = act_ranges_lib.MAX_RANGE_SAMPLES, seed: int = 0,
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
      activation ranges; at most ``max_calibration_samples`` are used. For a
      model with several inputs, a list in ``model.inputs`` order or a dict by
      input name; each input's int8 quantization comes from its own values.
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
      ('minmax', 'percentile', 'mse'; `keras_mpq.base.act_ranges`).

  Returns:
    An `ExportResult` read back from the written file.

  Example:

  >>> plan = QuantizationPlan({"conv1": 4, "logits": 8})     # doctest: +SKIP
  >>> r = export_tflite(model, "m.tflite", plan, "mcu", calibration_data=x)  # doctest: +SKIP
  >>> r.layers[0].storage                                    # doctest: +SKIP
  'int4 packed'
  """
  x = _check_args(model, plan, target, calibration_data)
  steps = resolve_strip(strip, target)
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
  reader = reader_lib.parse(float_bytes)
  ops = reader_lib.layer_weight_ops(reader, plan.layers)
  decisions = []
  for layer in plan.layers:
    if not ops[layer]:
      notes.append(f"{layer}: no TFLite weight op carries this layer's name; left to the default")
      continue
    for entry in ops[layer]:
      decisions.append(decide(layer, entry["op"], plan.weight_bits[layer],
                              plan.act_bits(layer), target, entry["output_name"]))
  wide = wide_softmaxes(reader, target)
  notes.extend(f"{name}: softmax over more than {TFLM_INT8_SOFTMAX_MAX_CLASSES} classes "
               "written in float (TFLite Micro's int8 softmax aborts on such rows); the "
               "file's output is float probabilities" for name in wide)
  recipe = build_recipe(decisions, target, wide)
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
  # Dead channels (all integers 0) get a scale their bias fits in (issue 30).
  qbytes, rescaled = rescale_zero_channels(qbytes, float_bytes)
  notes.extend(rescaled)
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
  bad_biases = check_biases(qbytes, float_bytes)
  if bad_biases:
    raise KerasMpqError(
        "Expected the exported biases to equal the Keras model's. Received "
        f"{len(bad_biases)} mismatching tensor(s): " + "; ".join(bad_biases[:5]) +
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
      packed, done = lut_compress(qbytes, layers, reader_lib.layer_weight_ops(qbytes, plan.layers))
    except Exception as e:  # pylint: disable=broad-except
      packed, done = qbytes, []
      notes.append(f"lookup-table compression not used: {type(e).__name__}: {str(e)[:160]}")
    if done and same_tflm_outputs(qbytes, packed, x):
      steps_saved["lut"] = len(qbytes) - len(packed)
      notes.append(f"lookup-table compressed in TFLite Micro (DECODE): {', '.join(done)}")
      qbytes = packed
    elif done:
      notes.append("lookup-table compression not used: TFLite Micro outputs changed")
  if steps:
    stripped, saved = strip_model(qbytes, steps, plan.layers)
    if target == "mcu" and not same_tflm_outputs(qbytes, stripped, x):
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
    from keras_mpq.export import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
    report = runtime_lib.deployment_report(qbytes, target, tflm_bytes=mcu_bytes, x=x,
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
        f"{target} file is {len(qbytes)} bytes; nothing was written."
        + (" Vela compresses the weights its own way, which the cost table does not "
           f"predict (every plan is int8 there): a budget of {len(qbytes)} bytes fits this "
           "file." if target == "ethos-u" else ""), len(qbytes), max_bytes)
  if target == "ethos-u":
    root, ext = os.path.splitext(path)
    mcu_path = root + "_mcu" + (ext or ".tflite")
    fileio_lib.write_bytes(mcu_path, mcu_bytes)
  fileio_lib.write_bytes(path, qbytes)
  return ExportResult(path=path, target=target, size=len(qbytes), layers=tuple(layers),
                      notes=tuple(notes), vela=vela_summary, mcu_path=mcu_path,
                      deployment=report, other_layers=other)


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
  reader = reader_lib.parse(qbytes)
  found: Dict[str, set] = {}
  others = [n for n in layer_names if n not in set(planned)]
  for op in reader.ops:
    for t in op.outputs:
      if t < 0:
        continue
      layer = layer_of_tensor(reader.name(t), others)
      if layer is not None:
        type_name = reader_lib.TYPE_INFO.get(reader.tensors[t].Type(), ("?",))[0]  # pylint: disable=protected-access
        found.setdefault(layer, set()).add(type_name.lower())
  return {k: "+".join(sorted(v)) for k, v in found.items()}


def _read_back(qbytes: bytes, decisions: Sequence[Decision], float_ops) -> List[LayerExport]:
  """Per-layer storage as actually found in the quantized file."""
  rows = {r.name: r for r in reader_lib.inspect_tflite(qbytes)}
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
