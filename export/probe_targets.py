"""Probes which operator x weight-bits x activation-bits combinations each runtime runs.

For every weight operator keras_mpq quantizes (CONV_2D, DEPTHWISE_CONV_2D,
FULLY_CONNECTED, TRANSPOSE_CONV), every weight bit-width 2..8 in each container it could be
stored in (packed INT4 for 2..4 bits, INT8 for all) and activations int8 and
int16, this script builds a one-layer tf_keras model, exports it through
keras_mpq's own exporter path (ai-edge-quantizer recipe, batch 1), and asks:

* quantizer: did ai-edge-quantizer write the requested container and at most
  2^b-1 levels (it silently falls back when its policy refuses a config)?
* litert: does ai-edge-litert run it, matching the Keras output?
* tflm: does the TFLite Micro Python interpreter allocate and run it,
  matching LiteRT?
* vela: does Vela (ethos-u55-128) compile it with the op on the NPU?

It writes export/targets_probe.json. keras_mpq/export.py's CAPABILITIES table
is this file's "capabilities" section; tests/test_export.py checks they agree.

    .venv/bin/python export/probe_targets.py [--out export/targets_probe.json]
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from keras_mpq.export import convert as convert_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import flatbuffer as flatbuffer_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import recipe as export_recipe_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import vela as vela_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.base import fileio as fileio_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import reader as reader_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.base.compat import keras, set_global_seed  # pylint: disable=g-import-not-at-top
from keras_mpq.base.types import QuantizationPlan  # pylint: disable=g-import-not-at-top

OPS = {
    "CONV_2D": lambda: keras.layers.Conv2D(8, 3, padding="same", name="layer"),
    "DEPTHWISE_CONV_2D": lambda: keras.layers.DepthwiseConv2D(3, padding="same", name="layer"),
    "FULLY_CONNECTED": lambda: keras.layers.Dense(8, name="layer"),
    "TRANSPOSE_CONV": lambda: keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same",
                                                           name="layer"),
}
INPUT_SHAPES = {"CONV_2D": (6, 6, 4), "DEPTHWISE_CONV_2D": (6, 6, 4), "FULLY_CONNECTED": (16,),
                "TRANSPOSE_CONV": (6, 6, 4)}


def _model(op, seed=0):
  set_global_seed(seed)
  inp = keras.Input(INPUT_SHAPES[op], name="x")
  layer = OPS[op]()
  out = layer(inp)
  model = keras.Model(inp, out)
  rng = np.random.default_rng(seed)
  model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
  return model


def _container_request(bits, container):
  if container == "int4":
    return {2: 4, 3: 3, 4: 4}[bits], bits == 3
  return {2: 3, 4: 8}.get(bits, bits), False


def probe_case(op, bits, container, act, x, vela=True):
  case = {"op": op, "weight_bits": bits, "container": container, "activation_bits": act}
  model = _model(op)
  plan = QuantizationPlan({"layer": bits}, {"layer": act})
  snapped = convert_lib.snap_to_plan(model, plan)
  float_bytes = convert_lib.to_float_tflite(snapped, batch_size=1)
  calib_bytes = convert_lib.to_float_tflite(snapped, batch_size=None)
  ops = reader_lib.layer_weight_ops(float_bytes, ["layer"])["layer"]
  entry = ops[0]
  request, repack = _container_request(bits, container)
  decision = export_recipe_lib.Decision("layer", op, entry["output_name"], bits, act, container,  # pylint: disable=protected-access
                                  request, repack, "")
  recipe = export_recipe_lib.build_recipe([decision], "mobile")
  try:
    qbytes = export_recipe_lib.quantize_with_recipe(float_bytes, recipe, x,
                                              calibration_model=calib_bytes)
    if repack:
      qbytes = flatbuffer_lib.repack_int4(qbytes, [entry["weight_name"]])
  except Exception as e:  # pylint: disable=broad-except
    case.update(quantizer=False, litert=False, tflm=False, vela=False,
                error=f"quantizer: {type(e).__name__}: {str(e)[:200]}")
    return case
  rows = {r.name: r for r in reader_lib.inspect_tflite(qbytes)}
  row = rows.get(entry["weight_name"])
  act_types = {r.dtype for r in rows.values() if not r.is_constant}
  want = "INT4" if container == "int4" else "INT8"
  case["stored_type"] = row.dtype if row else None
  case["levels"] = row.levels if row else None
  case["quantizer"] = bool(row and row.dtype == want and row.levels <= 2**bits - 1
                           and f"INT{act}" in act_types)
  reference = snapped.predict(x, verbose=0)
  span = float(np.ptp(reference)) or 1.0
  try:
    lite = runtime_lib.run_tflite(qbytes, x, runtime="litert")
    err = float(np.max(np.abs(lite - reference))) / span
    case["litert_rel_error"] = round(err, 4)
    case["litert"] = bool(err < 0.1)
  except Exception as e:  # pylint: disable=broad-except
    case["litert"] = False
    case["litert_error"] = str(e)[:200]
    lite = None
  try:
    micro = runtime_lib.run_tflite(qbytes, x, runtime="tflm")
    if lite is not None:
      case["tflm_vs_litert"] = round(float(np.max(np.abs(micro - lite))) / span, 4)
    err = float(np.max(np.abs(micro - reference))) / span
    case["tflm_rel_error"] = round(err, 4)
    case["tflm"] = bool(err < 0.1)
  except Exception as e:  # pylint: disable=broad-except
    case["tflm"] = False
    case["tflm_error"] = str(e)[:200]
  if vela:
    try:
      _, summary = vela_lib.compile_vela(qbytes)
      case["vela_npu_ops"] = summary.get("npu_ops")
      case["vela_cpu_ops"] = summary.get("cpu_ops")
      case["vela"] = bool(summary.get("cpu_ops", 1) == 0 and summary.get("npu_ops", 0) > 0)
    except Exception as e:  # pylint: disable=broad-except
      case["vela"] = False
      case["vela_error"] = str(e)[:200]
  return case


def capabilities(cases):
  """runtime -> op -> container -> activation bits that pass for every weight bit-width."""
  caps = {}
  for runtime in ("litert", "tflm", "vela"):
    caps[runtime] = {}
    for op in OPS:
      caps[runtime][op] = {}
      for container in ("int4", "int8"):
        acts = []
        for act in (8, 16):
          sel = [c for c in cases if c["op"] == op and c["container"] == container
                 and c["activation_bits"] == act]
          if sel and all(c["quantizer"] and c.get(runtime) for c in sel):
            acts.append(act)
        caps[runtime][op][container] = acts
  return caps


def _versions():
  out = {"python": platform.python_version()}
  for pkg in ("tensorflow", "ai-edge-quantizer", "ai-edge-litert", "tflite-micro",
              "ethos-u-vela", "tf-keras"):
    try:
      from importlib import metadata  # pylint: disable=g-import-not-at-top
      out[pkg] = metadata.version(pkg)
    except Exception:  # pylint: disable=broad-except
      out[pkg] = None
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "targets_probe.json"))
  parser.add_argument("--no-vela", action="store_true")
  parser.add_argument("--ops", nargs="+", choices=sorted(OPS),
                      help="probe only these operators; the other operators' cases are kept "
                           "from --out")
  args = parser.parse_args()
  start = time.time()
  cases = []
  kept_from = None
  if args.ops and os.path.exists(args.out):
    with open(args.out) as f:
      previous = json.load(f)
    cases = [c for c in previous["cases"] if c["op"] not in args.ops]
    kept_from = previous.get("date")
  for op in args.ops or OPS:
    x = np.random.default_rng(1).normal(0, 1, (8,) + INPUT_SHAPES[op]).astype(np.float32)
    for bits in range(2, 9):
      for container in (("int4", "int8") if bits <= 4 else ("int8",)):
        for act in (8, 16):
          case = probe_case(op, bits, container, act, x, vela=not args.no_vela)
          cases.append(case)
          print(json.dumps(case), flush=True)
  result = {
      "what": "which op x weight bits x container x activation bits each runtime runs",
      "command": "python export/probe_targets.py" + (
          f" --ops {' '.join(args.ops)}" if args.ops else ""),
      "other_ops_from": kept_from,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": f"{platform.machine()} {platform.system()} {platform.release()}",
      "versions": _versions(),
      "seconds": round(time.time() - start, 1),
      "capabilities": capabilities(cases),
      "cases": cases,
  }
  fileio_lib.write_json(args.out, result)
  print(json.dumps(result["capabilities"], indent=1))
  print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
  main()
