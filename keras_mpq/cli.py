"""The ``keras-mpq`` command: quantize, validate and inspect from the shell.

    keras-mpq quantize MODEL --budget 4bit --target mcu --out DIR [--data data.npz]
    keras-mpq validate MODEL.tflite --data data.npz [--runtime tflm]
    keras-mpq inspect MODEL.tflite [--plan DIR/plan.json] [--view deploy]

``MODEL`` is a ``.keras``, ``.h5`` or SavedModel path. ``--data`` is an ``.npz``
with arrays ``x`` (and ``y``), an ``.npy`` of inputs, or ``mnist`` / ``digits``
for the built-in real data. For a model with several inputs the ``.npz``
holds one array ``x_NAME`` per input, ``NAME`` the Keras input's name
(``x_image``, ``x_features``), matched by name. ``keras-mpq COMMAND --help`` lists a command's
flags. Errors print one line and exit with status 2; Ctrl-C exits with 130.

The parser is argparse with one subparser per command, not absl: absl keeps
one global flag namespace (every command would list every flag), its
``--help`` exits 1 and lists absl's own ~60 logging flags, and it has no
``-h``. To add a flag, add one ``add_argument`` line to the command's group
in `build_parser` and read it as ``args.NAME`` in the command's function:

    data.add_argument("--ram", metavar="SIZE", help="...")

>>> build_parser().parse_args(["inspect", "m.tflite"]).plan is None
True
>>> build_parser().parse_args(["quantize", "m.keras", "--noprogress"]).progress
False
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import time
from typing import List, Optional, Sequence, Tuple

from keras_mpq.base import choices as choices_lib

PROG = "keras-mpq"


# --------------------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
  """argparse, but a usage error is one line (``keras-mpq: error: ...``) and exit status 2."""

  def error(self, message):
    command = self.prog[len(PROG):].strip()
    hint = f"{PROG} {command} --help" if command else f"{PROG} --help"
    self.exit(2, f"{PROG}: error: {message}. See '{hint}'.\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):

  def __init__(self, prog):
    super().__init__(prog, max_help_position=28, width=88)


class _OnOff(argparse.Action):
  """A boolean flag spelled ``--NAME`` / ``--noNAME`` (absl's spelling, kept)."""

  def __init__(self, option_strings, dest, default=None, help=None):  # pylint: disable=redefined-builtin
    super().__init__(option_strings, dest, nargs=0, default=default, help=help)

  def __call__(self, parser, namespace, values, option_string=None):
    setattr(namespace, self.dest, not option_string.startswith(f"--no{self.dest}"))

  def format_usage(self):
    return " | ".join(self.option_strings)


def _bool_flag(group, name: str, default: Optional[bool], help: str):  # pylint: disable=redefined-builtin
  group.add_argument(f"--{name}", f"--no{name}", dest=name, action=_OnOff, default=default,
                     help=help)


def _list_flag(text: str) -> List[str]:
  return [item.strip() for item in text.split(",") if item.strip()]


def _command(subparsers, name: str, usage: str, summary: str,
             example: str) -> argparse.ArgumentParser:
  import textwrap  # pylint: disable=g-import-not-at-top
  return subparsers.add_parser(
      name, help=summary, description=textwrap.fill(summary, 86),
      usage=f"{PROG} {name} {usage}", epilog=f"example:\n  {example}",
      formatter_class=_Formatter, allow_abbrev=False, add_help=False)


def _general(parser) -> None:
  group = parser.add_argument_group("general")
  group.add_argument("-h", "--help", action="help", help="show this help and exit")
  group.add_argument("--verbose", action="store_true",
                     help="show TensorFlow's start-up and runtime log lines")
  group.add_argument("--debug", action="store_true",
                     help="show full tracebacks instead of one-line errors")


_RANGE_FORMS = ("--input_range=LO,HI for every input (e.g. --input_range=-1,1), or "
               "NAME=LO,HI per input (e.g. --input_range image=0,1 --input_range table=-3,3, "
               "or 'image=0,1;table=-3,3')")


def _parse_range(items):
  """``--input_range`` values -> None, one ``(lo, hi)`` for every input, or ``{name: (lo, hi)}``.

  Each value is ``LO,HI`` or ``NAME=LO,HI``; several may share one value,
  separated by ``;``. Bad numbers, LO >= HI, a name given twice or both
  forms at once raise `InvalidInputError` (the names are checked against
  the model in `_check_range_names`).

  >>> _parse_range(["-1,1"])
  (-1.0, 1.0)
  >>> _parse_range(["image=0,1", "table=-3,3"]) == _parse_range(["image=0,1;table=-3,3"])
  True
  >>> _parse_range(["image=0,1;table=-3,3"])
  {'image': (0.0, 1.0), 'table': (-3.0, 3.0)}
  """
  import math  # pylint: disable=g-import-not-at-top

  from keras_mpq.base.errors import InvalidInputError  # pylint: disable=g-import-not-at-top
  parts = [part.strip() for item in items or [] for part in item.split(";") if part.strip()]
  if not parts:
    return None
  every, named = [], {}
  for part in parts:
    name, sep, pair = part.rpartition("=")
    numbers = pair.split(",")
    try:
      if len(numbers) != 2 or (sep and not name.strip()):
        raise ValueError
      low, high = float(numbers[0]), float(numbers[1])
    except ValueError:
      raise InvalidInputError(
          f"Expected {_RANGE_FORMS}: two numbers LO < HI. Received: --input_range {part!r}"
      ) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
      raise InvalidInputError(
          f"Expected --input_range with two finite numbers LO < HI. Received: "
          f"--input_range {part!r} (LO {low:g}, HI {high:g})")
    if not sep:
      every.append((low, high))
    elif name.strip() in named:
      raise InvalidInputError(
          f"Expected each input's --input_range once. Received: {name.strip()!r} twice")
    else:
      named[name.strip()] = (low, high)
  if len(every) > 1 or (every and named):
    raise InvalidInputError(
        f"Expected {_RANGE_FORMS}, not both forms or LO,HI twice. Received: --input_range "
        f"{'; '.join(parts)!r}")
  return every[0] if every else named


def _check_range_names(input_range, model):
  """``input_range`` from `_parse_range` checked against ``model``'s input names.

  A dict naming an input the model does not have raises `InvalidInputError`
  listing the model's inputs; for a model with one input, its one named
  range comes back as ``(lo, hi)``.
  """
  from keras_mpq.base.errors import InvalidInputError  # pylint: disable=g-import-not-at-top
  from keras_mpq.model import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
  if not isinstance(input_range, dict):
    return input_range
  names = inputs_lib.input_names(model)
  unknown = [n for n in input_range if n not in names]
  if unknown:
    raise InvalidInputError(
        f"Expected --input_range NAME=LO,HI with NAME one of the model's inputs {names}. "
        f"Received: {', '.join(repr(n) for n in unknown)}. Model {model.name!r} takes "
        f"{inputs_lib.describe(model)}.")
  return input_range[names[0]] if len(names) == 1 else input_range


def build_parser() -> argparse.ArgumentParser:
  """The ``keras-mpq`` parser: one subcommand per entry in `COMMANDS`."""
  parser = _Parser(
      prog=PROG, formatter_class=_Formatter, allow_abbrev=False,
      description="Data-free mixed-precision post-training quantization for Keras models\n"
                  "that ship as TFLite.",
      epilog="example:\n  keras-mpq quantize model.keras --budget 4bit --target mcu --out out/\n"
             f"\nRun '{PROG} COMMAND --help' for a command's flags.")
  parser.add_argument("--version", action="version", version=_version())
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands",
                              parser_class=_Parser)

  q = _command(sub, "quantize", "MODEL --budget BUDGET --out DIR [flags]",
               "Choose per-layer bits within a budget, export TFLite and "
               "write the plan, sensitivity, report and plots.",
               "keras-mpq quantize model.keras --budget 48KB --target mcu --out out/ "
               "--eval_data mnist")
  q.add_argument("model", metavar="MODEL", help=".keras, .h5 or SavedModel directory")
  budget = q.add_argument_group("budget and target")
  budget.add_argument("--budget", help="required: '48KB', '1.5MiB', '4bit' (average weight "
                      "bits) or '2e8bops'")
  budget.add_argument("--target", default="mobile", choices=list(choices_lib.values(choices_lib.Target)),
                      help="export target (default: mobile)")
  budget.add_argument("--bits", type=_list_flag, default=None, metavar="B,B,...",
                      help="candidate weight bit-widths (default: 2,3,4,8 for bit and BOPs "
                      "budgets, 2,4,8 for byte budgets)")
  budget.add_argument("--ram", metavar="SIZE",
                      help="RAM limit for the TFLite Micro arena, e.g. 64KB (mcu, ethos-u); "
                      "an export whose arena exceeds it fails")
  budget.add_argument("--activation_bits", type=int, default=8, metavar="N",
                      help="activation bits, 8 or 16 (default: 8)")
  budget.add_argument("--pin", type=_list_flag, action="extend", default=[],
                      metavar="LAYER=B,...", help="fix these layers' bits, e.g. conv1=8,logits=8")
  data = q.add_argument_group("data")
  data.add_argument("--data", metavar="FILE", help="calibration data: .npz (x[, y]; x_NAME "
                    "per input for several inputs), .npy, 'mnist' or 'digits' (default: "
                    "synthesized from the model)")
  data.add_argument("--eval_data", metavar="FILE",
                    help="labeled real data to validate the exported file on")
  data.add_argument("--synthesis", default=None, metavar="METHOD",
                    help="synthetic data: labeled, diverse, zeroq or noise (default: labeled "
                    "for a model with a class head, else diverse)")
  data.add_argument("--output_kinds", type=_list_flag, action="extend", default=[],
                    metavar="NAME=KIND,...", help="what an output is where its layers do not "
                    "say: softmax, logits, sigmoid or linear, e.g. embedding=linear")
  data.add_argument("--eval_metric", default=None, metavar="METRIC",
                    help="a Keras metric (e.g. mae) or module:function to judge the "
                    "exported file on --eval_data (default: accuracy for a classifier, "
                    "else each output's fidelity to the Keras model)")
  data.add_argument("--samples", type=int, default=None, metavar="N",
                    help="synthetic samples (default: 256, fewer for large models; up to "
                    "1024 where the budget forces layers below 3 bits, for images 256 "
                    "synthesized and shifted copies of them)")
  data.add_argument("--input_range", action="append", default=[], metavar="[NAME=]LO,HI",
                    help="the model's valid input range, e.g. --input_range=-1,1 or 0,255, for "
                    "every input; or one input's, NAME=LO,HI, the flag once per input (e.g. "
                    "--input_range image=0,1 --input_range table=-3,3, or "
                    "'image=0,1;table=-3,3') (default: each input's, read off its "
                    "Rescaling/Normalization layer, else estimated from its first "
                    "BatchNorm's statistics, else 0,1; the last two assumed)")
  data.add_argument("--range_policy", default=None, choices=list(choices_lib.values(choices_lib.RangePolicy)),
                    help="activation ranges from the calibration data (default: minmax)")
  data.add_argument("--tune_steps", type=int, default=None, metavar="N",
                    help="steps tuning per-channel scales and biases to the float model's "
                    "outputs at the end (default: 200, fewer for large models; data-free "
                    "only where the budget forces layers below 3 bits; 0: none)")
  search = q.add_argument_group("sensitivity search")
  search.add_argument("--metric", default="task_interaction",
                      help="sensitivity metric (default: task_interaction)")
  search.add_argument("--rounds", type=int, default=1, metavar="N",
                      help="search rounds (default: 1, no refinement; see BENCHMARKS.md)")
  search.add_argument("--seed", type=int, default=0, metavar="N",
                      help="random seed; the same seed gives the same run (default: 0)")
  output = q.add_argument_group("output")
  output.add_argument("--out", metavar="DIR", help="required: output directory")
  _bool_flag(output, "cache", True,
             "cache synthetic data and sensitivity in DIR/cache (default: on)")
  _bool_flag(output, "progress", None, "progress bars (default: when on a terminal)")
  _general(q)

  v = _command(sub, "validate", "MODEL.tflite --data FILE [flags]",
               "Run a .tflite file on labeled data (LiteRT or TFLite Micro) "
               "and print its accuracy.",
               "keras-mpq validate out/model_mcu.tflite --data test.npz --runtime tflm")
  v.add_argument("tflite", metavar="MODEL.tflite", help="the file to run")
  group = v.add_argument_group("validation")
  group.add_argument("--data", metavar="FILE",
                     help="required: labeled data, .npz (x, y; x_NAME per input for "
                     "several inputs), 'mnist' or 'digits'")
  group.add_argument("--runtime", default="auto", choices=["auto", "litert", "tflm", "tf"],
                     help="interpreter (default: auto, from the file)")
  group.add_argument("--metric", default=None, metavar="METRIC",
                     help="a Keras metric (e.g. mae) or module:function of (y, outputs) "
                     "(default: accuracy on integer labels)")
  group.add_argument("--reference", metavar="MODEL",
                     help="the float Keras model: agreement, or each output's fidelity "
                     "for a model that is not a classifier")
  _general(v)

  i = _command(sub, "inspect", "MODEL.tflite [--plan PLAN.json] [flags]",
               "List a .tflite file's tensors (dtype, bits, bytes) and "
               "optionally check them against a plan.",
               "keras-mpq inspect out/model_mcu.tflite --plan out/plan.json")
  i.add_argument("tflite", metavar="MODEL.tflite", help="the file to read")
  group = i.add_argument_group("check")
  group.add_argument("--plan", metavar="PLAN.json",
                     help="a plan.json to check the file against (exit 1 on a mismatch)")
  group.add_argument("--view", choices=("tensors", "deploy"), default="tensors",
                     help="tensors: per-tensor storage (default); deploy: flash, TFLite "
                     "Micro arena RAM, latency")
  _general(i)
  return parser


def _version() -> str:
  from keras_mpq import __version__  # pylint: disable=g-import-not-at-top
  return f"{PROG} {__version__}"


# --------------------------------------------------------------------------- quiet logs


def quiet_logs(verbose: bool = False) -> None:
  """Silences TensorFlow's start-up noise unless ``verbose``; call before TF is imported.

  The C++ runtime's lines (``failed call to cuInit``, oneDNN notices, CPU
  feature notes) go through TF_CPP_MIN_LOG_LEVEL; absl's "before
  InitializeLog" line through ABSL_MIN_LOG_LEVEL / GLOG; Python-side
  deprecation chatter through the tf/absl loggers and warnings.
  """
  if verbose:
    return
  # Log levels only: nothing here changes what TensorFlow computes (oneDNN stays on).
  for key, value in (("TF_CPP_MIN_LOG_LEVEL", "3"), ("ABSL_MIN_LOG_LEVEL", "3"),
                     ("GLOG_minloglevel", "3"), ("GRPC_VERBOSITY", "ERROR")):
    os.environ.setdefault(key, value)
  import logging  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  warnings.filterwarnings("ignore", category=FutureWarning)
  warnings.filterwarnings("ignore", category=UserWarning, module=r"(tf_keras|keras|tensorflow)")
  for name in ("tensorflow", "absl", "tensorflow_model_optimization", "h5py"):
    logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _native_logs_muted(quiet: bool):
  """Sends file descriptor 2 to /dev/null while Python's ``sys.stderr`` keeps the terminal.

  TensorFlow's and LiteRT's C++ code print to fd 2 directly (``failed call
  to cuInit``, ``Created TensorFlow Lite XNNPACK delegate``), some before any
  log setting applies. Our own errors, warnings and progress bars go through
  ``sys.stderr``, which is pointed at a duplicate of the real stderr. Only
  done for a real process (``sys.stderr`` is the original one), not when a
  caller has redirected it.
  """
  if not quiet or sys.stderr is not sys.__stderr__:
    yield
    return
  try:
    sys.stderr.flush()
    fd = sys.stderr.fileno()
    saved = os.dup(fd)
  except (OSError, ValueError, AttributeError):
    yield
    return
  original = sys.stderr
  python_stderr = open(saved, "w", buffering=1, encoding=original.encoding,  # pylint: disable=consider-using-with
                       errors="backslashreplace", closefd=False)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, fd)
  os.close(devnull)
  sys.stderr = python_stderr
  try:
    yield
  finally:
    python_stderr.flush()
    sys.stderr = original
    os.dup2(saved, fd)
    python_stderr.close()
    os.close(saved)


def _import_tensorflow(quiet: bool) -> None:
  """Imports TensorFlow and lists devices (where cuInit runs) with the loggers set quiet."""
  if quiet:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.get_logger().setLevel("ERROR")
    tf.config.list_physical_devices()


# --------------------------------------------------------------------------- commands


def load_data(spec: str, need_labels: bool = False) -> Tuple:
  """``(x, y)`` from an ``.npz``/``.npy`` path or 'mnist'/'digits' (test split)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from keras_mpq import demo_data as demo_data_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.errors import InvalidInputError  # pylint: disable=g-import-not-at-top
  if spec in ("mnist", "digits"):
    d = demo_data_lib.load_mnist() if spec == "mnist" else demo_data_lib.load_digits()
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
        per_input = sorted(k for k in keys if k.startswith("x_") and len(k) > 2)
        if xk is not None and (xk != "x_test" or len(per_input) < 2):
          x = z[xk]
        elif per_input:  # several inputs: x_NAME per input, matched by name
          x = {k[2:]: z[k] for k in per_input}
        else:
          raise InvalidInputError(f"{spec!r} has arrays {sorted(keys)}; expected 'x' "
                                  "(inputs), or 'x_NAME' per input of a model with several "
                                  "inputs, and optionally 'y' (labels).")
        y = z[yk] if yk else None
  except InvalidInputError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise InvalidInputError(f"Cannot read data file {spec!r}: {e}. Expected an .npz "
                            "with arrays x and y, or an .npy.") from None
  if need_labels and y is None:
    raise InvalidInputError(f"{spec!r} has no labels; expected an array 'y'.")
  return x, y


def _parse_pins(items: Sequence[str]):
  from keras_mpq.base.errors import InvalidInputError  # pylint: disable=g-import-not-at-top
  pins = {}
  for item in items:
    name, sep, bits = item.partition("=")
    if not sep or not bits.strip().isdigit():
      raise InvalidInputError(f"Expected --pin layer=bits, e.g. conv1=8. Received: {item!r}")
    pins[name.strip()] = int(bits)
  return pins


@contextlib.contextmanager
def _output_dir(path: str):
  """Creates and locks ``--out``; on failure removes what this run created if it is empty.

  Temporary files a killed run left there (and in its cache/) are removed
  once the lock is held.
  """
  from keras_mpq.base import fileio as fileio_lib  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(path)
  created = [p for p in (out / "cache", out, *out.parents) if not p.exists()]
  ok = False
  try:
    with fileio_lib.lock_dir(out):
      for directory in (out, out / "cache"):
        fileio_lib.remove_stale_temps(directory)
      yield out
      ok = True
  finally:
    if not ok:
      for directory in created:  # deepest first
        with contextlib.suppress(OSError):
          directory.rmdir()  # only if empty


def cmd_quantize(args) -> int:
  import warnings  # pylint: disable=g-import-not-at-top

  import keras_mpq  # pylint: disable=g-import-not-at-top
  from keras_mpq import report as report_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.errors import InputRangeAssumedWarning, InvalidInputError  # pylint: disable=g-import-not-at-top
  if not args.budget:
    raise InvalidInputError("Expected --budget, e.g. --budget 4bit or --budget 48KB.")
  if not args.out:
    raise InvalidInputError("Expected --out DIR for the outputs.")
  try:
    bits = None if args.bits is None else [int(b) for b in args.bits]
  except ValueError:
    raise InvalidInputError(f"Expected --bits as integers, e.g. 2,4,8. "
                            f"Received: {','.join(args.bits)}") from None
  pins = _parse_pins(args.pin)
  input_range = _parse_range(args.input_range)
  model = args.model
  if isinstance(input_range, dict):  # named ranges: check the names before anything slow
    model = keras_mpq.load_model(args.model)
    input_range = _check_range_names(input_range, model)
  with _output_dir(args.out) as out:
    data = load_data(args.data) if args.data else None
    # Read the evaluation data now: a bad file should fail before the long run.
    metric = _parse_metric(args.eval_metric)
    eval_data = load_data(args.eval_data) if args.eval_data else None
    if eval_data is not None and eval_data[1] is None and metric is None:
      if isinstance(model, str):
        model = keras_mpq.load_model(args.model)  # a classifier's accuracy needs labels
      if keras_mpq.heads_of(model).classifier:
        eval_data = load_data(args.eval_data, need_labels=True)
    if data is not None and data[1] is None:
      data = data[0]
    # The summary's first line says it when the input range is assumed.
    warnings.filterwarnings("ignore", category=InputRangeAssumedWarning)
    result = keras_mpq.quantize(
        model, args.budget, data=data, target=args.target, weight_bits=bits,
        activation_bits=args.activation_bits, metric=args.metric,
        synthesis=args.synthesis, num_samples=args.samples, rounds=args.rounds,
        pinned=pins, seed=args.seed, progress=args.progress,
        cache_dir=(out / "cache") if args.cache else None,
        input_range=input_range, ram=_parse_ram(args.ram),
        range_policy=args.range_policy, tune_steps=args.tune_steps,
        output_kinds=_parse_kinds(args.output_kinds))
    start = time.perf_counter()
    tflite_path = out / f"model_{args.target.replace('-', '_')}.tflite"
    exported = result.export(tflite_path, target=args.target)
    report = dict(result.report)
    report["export"] = _asdict(exported)
    _file_vs_budget(report, exported)
    report["timings_s"] = {**report["timings_s"],
                           "export": round(time.perf_counter() - start, 3)}
    if eval_data is not None:
      x, y = eval_data
      start = time.perf_counter()
      report["validation"] = _asdict(keras_mpq.validate_tflite(  # mcu: in TFLite Micro itself
          tflite_path, x, y, reference=result.model,
          runtime="tflm" if args.target == "mcu" else "auto", metric=metric))
      report["timings_s"]["validate"] = round(time.perf_counter() - start, 3)
    result = _with_report(result, report)
    files = result.save(out)
  print(report_lib.summary_table(report))
  print(f"\nexported {tflite_path} ({report_lib.human_bytes(tflite_path.stat().st_size)}, "
        f"target {args.target})")
  if "validation" in report:
    print(_validation_line(report["validation"]))
  print("wrote " + ", ".join(sorted(pathlib.Path(p).name for p in files.values())))
  return 0


def _validation_line(v) -> str:
  """One line saying what the validation measured."""
  from keras_mpq import report as report_lib  # pylint: disable=g-import-not-at-top
  fraction = report_lib.fmt_fraction
  parts = []
  if v.get("metric_name"):
    parts.append(f"{v['metric_name']} {v['metric']:.4g}")
  if v.get("fidelity"):
    parts.extend(_fidelity_text(name, f) for name, f in v["fidelity"].items())
  elif v.get("accuracy") is not None or v.get("agreement") is not None:
    parts.append(f"accuracy {fraction(v.get('accuracy'))}, agreement with Keras "
                 f"{fraction(v.get('agreement'))}")
  line = f"validated in {v.get('runtime')}: " + "; ".join(parts or ["ran"])
  return line + (f" ({v['note']})" if v.get("note") else "")


def _fidelity_text(name: str, fidelity) -> str:
  """One output's fidelity to the float model, as printed."""
  return (f"{name}: correlation {fidelity['correlation']:.4f}, normalized error "
          f"{fidelity['normalized_error']:.3g}")


def _parse_kinds(items):
  """``--output_kinds name=kind,...`` as a dict (None when not given)."""
  from keras_mpq.base.errors import InvalidInputError  # pylint: disable=g-import-not-at-top
  kinds = {}
  for item in items or []:
    name, sep, kind = item.partition("=")
    if not sep or not name or not kind:
      raise InvalidInputError(f"Expected --output_kinds as NAME=KIND, e.g. embedding=linear. "
                              f"Received: {item!r}")
    kinds[name] = kind
  return kinds or None


def _parse_metric(text):
  """``--eval_metric``/``--metric``: a Keras metric name, or ``module:function``."""
  from keras_mpq.base.errors import InvalidInputError  # pylint: disable=g-import-not-at-top
  if not text or ":" not in text:
    return text or None
  import importlib  # pylint: disable=g-import-not-at-top
  module, _, name = text.partition(":")
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise InvalidInputError(f"Expected a metric as a Keras metric name or "
                            f"module:function. Received: {text!r} ({e})") from None


def _parse_ram(text):
  from keras_mpq.base.errors import InvalidInputError  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.types import Budget, BudgetKind  # pylint: disable=g-import-not-at-top
  if not text:
    return None
  try:
    budget = Budget.parse(text)
  except InvalidInputError:
    budget = None
  if budget is None or budget.kind != BudgetKind.BYTES:
    raise InvalidInputError(f"Expected --ram as a size such as 64KB or 20000B. "
                            f"Received: --ram={text}")
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

  from keras_mpq.base.types import to_jsonable  # pylint: disable=g-import-not-at-top
  if dataclasses.is_dataclass(obj):
    if hasattr(obj, "to_dict"):
      return to_jsonable(obj.to_dict())
    return to_jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
  return to_jsonable(obj)


def _with_report(result, report):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(result, report=report)


def cmd_validate(args) -> int:
  import keras_mpq  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.errors import InvalidInputError  # pylint: disable=g-import-not-at-top
  if not args.data:
    raise InvalidInputError("Expected --data with labeled inputs (.npz with x and y, "
                            "'mnist' or 'digits'; x alone with --reference).")
  x, y = load_data(args.data, need_labels=not args.reference)
  reference = keras_mpq.load_model(args.reference) if args.reference else None
  result = keras_mpq.validate_tflite(args.tflite, x, y, runtime=args.runtime,
                                     reference=reference, metric=_parse_metric(args.metric))
  for key, value in _asdict(result).items():
    if key == "fidelity" and value:
      for name, f in value.items():
        print(f"fidelity {_fidelity_text(name, f)}")
    elif not isinstance(value, (list, dict)):
      print(f"{key}: {value}")
  return 0


def cmd_inspect(args) -> int:
  from keras_mpq.export import reader as reader_lib  # pylint: disable=g-import-not-at-top
  if args.view == "deploy":
    from keras_mpq.export import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
    micro = runtime_lib.is_full_integer_batch1(args.tflite)
    print(runtime_lib.format_deployment(runtime_lib.deployment_report(
        args.tflite, "mcu" if micro else "mobile")))
    return 0
  rows = reader_lib.inspect_tflite(args.tflite)
  plan = _read_plan(args.plan) if args.plan else None
  print(reader_lib.format_rows(rows, file_size=pathlib.Path(args.tflite).stat().st_size))
  if plan is not None:
    problems = reader_lib.check_against_plan(args.tflite, plan)
    if problems:
      print("\nplan check FAILED:\n  " + "\n  ".join(str(p) for p in problems))
      return 1
    print(f"\nplan check passed: every layer carries its planned bits ({len(plan.weight_bits)} layers)")
  return 0


def _read_plan(spec: str):
  """A `QuantizationPlan` from a plan.json path, or one clear error."""
  from keras_mpq.base.errors import InvalidInputError, KerasMpqError  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.types import QuantizationPlan  # pylint: disable=g-import-not-at-top
  try:
    return QuantizationPlan.from_json(pathlib.Path(spec).read_text())
  except KerasMpqError as e:
    raise InvalidInputError(
        f"Expected --plan to be a plan.json written by keras-mpq quantize. Received: "
        f"{spec!r} ({e})") from None
  except Exception as e:  # pylint: disable=broad-except
    reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
    raise InvalidInputError(
        f"Expected --plan to be a plan.json written by keras-mpq quantize. Received: "
        f"{spec!r} ({reason})") from None


COMMANDS = {"quantize": cmd_quantize, "validate": cmd_validate, "inspect": cmd_inspect}


def main(argv: Sequence[str]) -> int:
  """Runs ``keras-mpq`` on ``argv`` (``argv[0]`` is the program name); returns the exit status."""
  args_list = [str(a) for a in argv[1:]]
  parser = build_parser()
  if not args_list:
    parser.print_help(sys.stderr)
    return 2
  first = args_list[0]
  if not first.startswith("-") and first not in COMMANDS:
    sys.stderr.write(f"{PROG}: error: expected a command ({', '.join(COMMANDS)}). "
                     f"Received: {first!r}. See '{PROG} --help'.\n")
    return 2
  try:
    args, extra = parser.parse_known_args(args_list)
  except SystemExit as e:  # --help, --version (0) or a usage error (2, already printed)
    return e.code if isinstance(e.code, int) else 2
  if extra:
    where = f" {args.command}" if args.command else ""
    sys.stderr.write(f"{PROG}: error: unrecognized arguments: {' '.join(extra)}. "
                     f"See '{PROG}{where} --help'.\n")
    return 2
  if args.command is None:
    parser.print_help(sys.stderr)
    return 2
  quiet_logs(args.verbose)
  try:
    with _native_logs_muted(quiet=not args.verbose):
      if args.command != "inspect":  # inspect reads the flatbuffer without TensorFlow
        _import_tensorflow(quiet=not args.verbose)
      return COMMANDS[args.command](args)
  except KeyboardInterrupt:
    if args.debug:
      raise
    where = f" The cache in {args.out}/cache is kept: rerun to resume." if (
        args.command == "quantize" and args.out and args.cache) else ""
    sys.stderr.write(f"\n{PROG}: interrupted; no partial output was written.{where}\n")
    return 130
  except Exception as e:  # pylint: disable=broad-except
    from keras_mpq.base.errors import KerasMpqError  # pylint: disable=g-import-not-at-top
    if args.debug:
      raise
    if isinstance(e, KerasMpqError):
      sys.stderr.write(f"{PROG}: error: {e}\n")
      return 2
    sys.stderr.write(f"{PROG}: internal error ({type(e).__name__}): {e}\n"
                     "Rerun with --debug for the traceback, and please report it.\n")
    return 1


def run():
  """Console-script entry point (``keras-mpq``)."""
  sys.exit(main(sys.argv))


if __name__ == "__main__":
  run()
