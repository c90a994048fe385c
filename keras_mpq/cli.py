"""The ``keras-mpq`` command: quantize, validate and inspect from the shell.

    keras-mpq quantize MODEL --budget 4bit --target mcu --out DIR [--data data.npz]
    keras-mpq validate MODEL.tflite --data data.npz [--runtime tflm]
    keras-mpq inspect MODEL.tflite [--plan DIR/plan.json] [--view deploy]

``MODEL`` is a ``.keras``, ``.h5`` or SavedModel path. ``--data`` is an ``.npz``
with arrays ``x`` (and ``y``), an ``.npy`` of inputs, or ``mnist`` / ``digits``
for the built-in real data. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Optional, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("budget", None, "Budget: '48KB', '1.5MiB', '4bit', '2e8bops'.")
flags.DEFINE_enum("target", "mobile", ["mobile", "mcu", "ethos-u"], "Export target.")
flags.DEFINE_string("out", None, "Output directory for quantize.")
flags.DEFINE_string("data", None,
                    "quantize: calibration data (default: synthesized from the model). "
                    "validate: labeled evaluation data. .npz (x, y), .npy, 'mnist' or 'digits'.")
flags.DEFINE_string("eval_data", None,
                    "quantize: labeled real data to validate the exported file on.")
flags.DEFINE_list("bits", ["2", "4", "8"], "Candidate weight bit-widths.")
flags.DEFINE_integer("activation_bits", 8, "Activation bits (8 or 16).")
flags.DEFINE_string("metric", "task_interaction", "Sensitivity metric.")
flags.DEFINE_string("synthesis", "labeled", "Synthetic data method: labeled, zeroq, noise.")
flags.DEFINE_integer("samples", 256, "Synthetic samples.")
flags.DEFINE_integer("rounds", 1, "Rounds of the sensitivity search (1: no refinement; "
                     "see BENCHMARKS.md for why).")
flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same run.")
flags.DEFINE_list("pin", [], "Pinned layers, e.g. conv1=8,logits=8.")
flags.DEFINE_string("runtime", "auto", "validate: auto, litert, tflm or tf.")
flags.DEFINE_string("plan", None, "inspect: a plan.json to check the file against.")
flags.DEFINE_boolean("progress", None, "Progress bars (default: when on a terminal).")
flags.DEFINE_boolean("cache", True, "quantize: cache synthetic data and sensitivity in OUT.")
flags.DEFINE_boolean("debug", False, "Show full tracebacks.")
flags.DEFINE_string("ram", None, "quantize: RAM limit for the TFLite Micro arena, e.g. 64KB "
                    "(mcu, ethos-u); an export whose arena exceeds it fails.")
flags.DEFINE_enum("view", "tensors", ["tensors", "deploy"],
                  "inspect: 'tensors' (per-tensor storage) or 'deploy' (flash, TFLite Micro "
                  "arena RAM, latency).")

USAGE = __doc__


class UsageError(Exception):
  pass


def load_data(spec: str, need_labels: bool = False) -> Tuple:
  """``(x, y)`` from an ``.npz``/``.npy`` path or 'mnist'/'digits' (test split)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from keras_mpq import demo_data  # pylint: disable=g-import-not-at-top
  from keras_mpq.types import InvalidInputError  # pylint: disable=g-import-not-at-top
  if spec in ("mnist", "digits"):
    d = demo_data.load_mnist() if spec == "mnist" else demo_data.load_digits()
    return d.x_test, d.y_test
  path = pathlib.Path(spec)
  if not path.exists():
    raise InvalidInputError(f"Data file {spec!r} not found. Expected an .npz with "
                            "arrays x and y, an .npy of inputs, 'mnist' or 'digits'.")
  try:
    if path.suffix == ".npy":
      x, y = np.load(path, allow_pickle=False), None
    else:
      with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        xk = next((k for k in ("x", "x_test", "images") if k in keys), None)
        yk = next((k for k in ("y", "y_test", "labels") if k in keys), None)
        if xk is None:
          raise InvalidInputError(f"{spec!r} has arrays {sorted(keys)}; expected 'x' "
                                  "(inputs) and optionally 'y' (labels).")
        x, y = z[xk], (z[yk] if yk else None)
  except InvalidInputError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise InvalidInputError(f"Cannot read data file {spec!r}: {e}. Expected an .npz "
                            "with arrays x and y, or an .npy.") from None
  if need_labels and y is None:
    raise InvalidInputError(f"{spec!r} has no labels; expected an array 'y'.")
  return x, y


def _parse_pins():
  from keras_mpq.types import InvalidInputError  # pylint: disable=g-import-not-at-top
  pins = {}
  for item in FLAGS.pin:
    name, sep, bits = item.partition("=")
    if not sep or not bits.strip().isdigit():
      raise InvalidInputError(f"Expected --pin layer=bits, e.g. conv1=8. Received: {item!r}")
    pins[name.strip()] = int(bits)
  return pins


def cmd_quantize(model_path: str) -> int:
  import keras_mpq  # pylint: disable=g-import-not-at-top
  from keras_mpq import report as report_lib, fileio  # pylint: disable=g-import-not-at-top
  from keras_mpq.types import InvalidInputError  # pylint: disable=g-import-not-at-top
  if not FLAGS.budget:
    raise InvalidInputError("Expected --budget, e.g. --budget 4bit or --budget 48KB.")
  if not FLAGS.out:
    raise InvalidInputError("Expected --out DIR for the outputs.")
  out = fileio.ensure_dir(FLAGS.out)
  try:
    bits = [int(b) for b in FLAGS.bits]
  except ValueError:
    raise InvalidInputError(f"Expected --bits as integers, e.g. 2,4,8. "
                            f"Received: {','.join(FLAGS.bits)}") from None
  data = load_data(FLAGS.data) if FLAGS.data else None
  # Read the evaluation data now: a bad file should fail before the long run.
  eval_data = load_data(FLAGS.eval_data, need_labels=True) if FLAGS.eval_data else None
  if data is not None and data[1] is None:
    data = data[0]
  result = keras_mpq.quantize(
      model_path, FLAGS.budget, data=data, target=FLAGS.target, weight_bits=bits,
      activation_bits=FLAGS.activation_bits, metric=FLAGS.metric,
      synthesis=FLAGS.synthesis, num_samples=FLAGS.samples, rounds=FLAGS.rounds,
      pinned=_parse_pins(), seed=FLAGS.seed, progress=FLAGS.progress,
      cache_dir=(out / "cache") if FLAGS.cache else None, ram=_parse_ram())
  start = time.perf_counter()
  tflite_path = out / f"model_{FLAGS.target.replace('-', '_')}.tflite"
  exported = result.export(tflite_path, target=FLAGS.target)
  report = dict(result.report)
  report["export"] = _asdict(exported)
  _file_vs_budget(report, exported)
  report["timings_s"] = {**report["timings_s"], "export": round(time.perf_counter() - start, 3)}
  if eval_data is not None:
    x, y = eval_data
    start = time.perf_counter()
    report["validation"] = _asdict(keras_mpq.validate_tflite(  # mcu: in TFLite Micro itself
        tflite_path, x, y, reference=result.model,
        runtime="tflm" if FLAGS.target == "mcu" else "auto"))
    report["timings_s"]["validate"] = round(time.perf_counter() - start, 3)
  result = _with_report(result, report)
  files = result.save(out)
  print(report_lib.summary_table(report))
  print(f"\nexported {tflite_path} ({tflite_path.stat().st_size} bytes, target {FLAGS.target})")
  if "validation" in report:
    v = report["validation"]
    print(f"validated in {v.get('runtime')}: accuracy {v.get('accuracy')}, "
          f"agreement with Keras {v.get('agreement')}")
  print("wrote " + ", ".join(sorted(pathlib.Path(p).name for p in files.values())))
  return 0


def _parse_ram():
  from keras_mpq.types import Budget, BudgetKind, InvalidInputError  # pylint: disable=g-import-not-at-top
  if not FLAGS.ram:
    return None
  try:
    budget = Budget.parse(FLAGS.ram)
  except InvalidInputError:
    budget = None
  if budget is None or budget.kind != BudgetKind.BYTES:
    raise InvalidInputError(f"Expected --ram as a size such as 64KB or 20000B. "
                            f"Received: --ram={FLAGS.ram}")
  return budget.value


def _file_vs_budget(report, exported) -> None:
  """Judges a byte budget by the written file (not the prediction) when it is the file's."""
  budget = report.get("budget", {})
  report["file_bytes"] = exported.size
  if budget.get("kind") == "bytes" and report.get("cost_target") == exported.target:
    report["within_budget"] = exported.size <= budget["value"]
    report["within_budget_basis"] = f"written file ({exported.size} B)"


def _asdict(obj):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from keras_mpq.types import to_jsonable  # pylint: disable=g-import-not-at-top
  if dataclasses.is_dataclass(obj):
    if hasattr(obj, "to_dict"):
      return to_jsonable(obj.to_dict())
    return to_jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
  return to_jsonable(obj)


def _with_report(result, report):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(result, report=report)


def cmd_validate(tflite_path: str) -> int:
  import keras_mpq  # pylint: disable=g-import-not-at-top
  from keras_mpq.types import InvalidInputError  # pylint: disable=g-import-not-at-top
  if not FLAGS.data:
    raise InvalidInputError("Expected --data with labeled inputs (.npz with x and y, "
                            "'mnist' or 'digits').")
  x, y = load_data(FLAGS.data, need_labels=True)
  result = keras_mpq.validate_tflite(tflite_path, x, y, runtime=FLAGS.runtime)
  for key, value in _asdict(result).items():
    if not isinstance(value, (list, dict)):
      print(f"{key}: {value}")
  return 0


def cmd_inspect(tflite_path: str) -> int:
  from keras_mpq import tflite_inspect  # pylint: disable=g-import-not-at-top
  if FLAGS.view == "deploy":
    from keras_mpq import validate  # pylint: disable=g-import-not-at-top
    micro = validate.is_full_integer_batch1(tflite_path)
    print(validate.format_deployment(validate.deployment_report(
        tflite_path, "mcu" if micro else "mobile")))
    return 0
  rows = tflite_inspect.inspect_tflite(tflite_path)
  plan = _read_plan(FLAGS.plan) if FLAGS.plan else None
  print(tflite_inspect.format_rows(rows))
  if plan is not None:
    problems = tflite_inspect.check_against_plan(tflite_path, plan)
    if problems:
      print("\nplan check FAILED:\n  " + "\n  ".join(str(p) for p in problems))
      return 1
    print(f"\nplan check passed: every layer carries its planned bits ({len(plan.weight_bits)} layers)")
  return 0


def _read_plan(spec: str):
  """A `QuantizationPlan` from a plan.json path, or one clear error."""
  from keras_mpq.types import InvalidInputError, KerasMpqError, QuantizationPlan  # pylint: disable=g-import-not-at-top
  try:
    return QuantizationPlan.from_json(pathlib.Path(spec).read_text())
  except KerasMpqError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
    raise InvalidInputError(
        f"Expected --plan to be a plan.json written by keras-mpq quantize. Received: "
        f"{spec!r} ({reason})") from None


COMMANDS = {"quantize": cmd_quantize, "validate": cmd_validate, "inspect": cmd_inspect}


def main(argv) -> int:
  args = argv[1:]
  if len(args) != 2 or args[0] not in COMMANDS:
    sys.stderr.write(USAGE + "\nkeras-mpq: error: expected a command "
                     f"({', '.join(COMMANDS)}) and one path. Received: {' '.join(args) or 'nothing'}\n")
    return 2
  command, path = args
  try:
    return COMMANDS[command](path)
  except Exception as e:  # pylint: disable=broad-except
    from keras_mpq.types import KerasMpqError  # pylint: disable=g-import-not-at-top
    if FLAGS.debug:
      raise
    if isinstance(e, KerasMpqError):
      sys.stderr.write(f"keras-mpq: error: {e}\n")
      return 2
    sys.stderr.write(f"keras-mpq: internal error ({type(e).__name__}): {e}\n"
                     "Rerun with --debug for the traceback, and please report it.\n")
    return 1


def _parse_flags(argv):
  """absl's parser, but a bad flag is a usage error: one line, exit status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"keras-mpq: error: {e}. See keras-mpq --helpshort.\n")
    sys.exit(2)


def run():
  """Console-script entry point (``keras-mpq``)."""
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
