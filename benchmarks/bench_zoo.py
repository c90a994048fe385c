"""Pretrained classifiers judged on real inputs: agreement of each quantized file with its float model.

Models: the classifiers of ``../shared/models`` that have a real source here
(`zoo_data`: spoken words through TensorFlow's audio front end, crops of
natural photos) and four photo classifiers trained here on crops of ten
colour photos (`zoo_data.photo_model`: a residual CNN on raw 0..255 pixels,
a stock MobileNetV2 on [-1, 1] inputs; two training seeds each). For each
model ``n`` real inputs are made (default 300): the first ``--n-cal``
(default 100) calibrate the 'real' rows, the rest (held out) judge every
file. For each budget ('8bit', '4bit' and the mixed '3bit') the model is
quantized with these calibrations:

* ``data-free``: keras_mpq's defaults (``synthesis='labeled'``, no
  ``input_range``: keras_mpq reads it off a Rescaling layer, else estimates it
  from the first BatchNorm's statistics, else assumes [0, 1]);
* ``data-free, old [0,1] default``: ``input_range=(0, 1)`` forced, what the
  previous release assumed for every model without a Rescaling layer (only
  for models whose default range is not [0, 1]; not in the default run, add
  ``old`` to ``--calibrations``);
* ``data-free, empirical bias correction`` (4 bits only):
  ``bias_correction='empirical'``, the data-free default before the analytic
  form from BatchNorm statistics;
* ``noise``: ``synthesis='noise'``, default range;
* ``real``: ``data=x_real[:n_cal]``; when quantize refuses the data as
  outside the default range, again with ``input_range=(min, max)`` of it;
* ``data-free, documented range`` (a diagnostic): ``input_range`` forced to
  the range the model's preprocessing documents (`zoo_data.ZooEntry.documented_range`),
  only where keras_mpq's default differs from it, at 8 and 4 bits.

At the mixed '3bit' budget only ``--calibrations-3bit`` (default data-free
and real) run, to keep the whole run near an hour on 2 CPU cores.

Every result is exported for 'mobile' and 'mcu' and run on the held-out
inputs with ``keras_mpq.validate_tflite(path, x, y, runtime=...)``: the
mobile file in LiteRT, the mcu file in TFLite Micro; ``y`` the float
model's argmax, so ``accuracy`` is the top-1 agreement with the float model.
Where the file refuses the held-out inputs as outside its input range, the
agreement on the inputs clipped into that range (what a device computes) is
given as 'clipped agreement'. Each row records the input range keras_mpq used
(``report['input_range']``: read off a layer, estimated from BatchNorm,
assumed [0, 1] or given) and the realism check of the calibration data
(``report['data']['realism']['batchnorm']['summary']``: 'passed k/n' or
'FAILED k/n' BatchNorm layers fit). A failure is a result: its row records the
exception. Files and caches go under ``KERAS_MPQ_ZOO_CACHE`` (default
/tmp/keras_mpq_zoo), never into the repository.

    .venv/bin/python benchmarks/bench_zoo.py --out benchmarks/results/zoo.md   # everything
    .venv/bin/python benchmarks/bench_zoo.py --quick --models tflite_micro_speech
    .venv/bin/python benchmarks/bench_zoo.py --budgets 4bit --calibrations real,data-free

``--quick``: budget '8bit' only. ``--mcu-budgets 8bit,4bit``: export for
'mcu' only at those budgets. The table goes to ``--out`` (default
benchmarks/results/zoo.md), rewritten after every row, and is printed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys
import time
import traceback
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np

import zoo_data
from keras_mpq.export.targets import RUNTIME_OF_TARGET  # pylint: disable=g-import-not-at-top

import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-order

tf.get_logger().setLevel("ERROR")  # retracing notices of the many small runs

BUDGETS = ("8bit", "4bit", "3bit")
TARGETS = ("mobile", "mcu")
DATA_FREE, EMPIRICAL, OLD_DEFAULT, DOCUMENTED, NOISE, REAL = (
    "data-free", "data-free, empirical bias correction", "data-free, old [0,1] default",
    "data-free, documented range", "noise", "real")
CALIBRATIONS = (DATA_FREE, EMPIRICAL, OLD_DEFAULT, DOCUMENTED, NOISE, REAL)
_CALIBRATION_KEYS = {"data-free": DATA_FREE, "empirical": EMPIRICAL, "old": OLD_DEFAULT,
                     "documented": DOCUMENTED, "noise": NOISE, "real": REAL}
# The 'empirical' row (the data-free default before the analytic form) only here.
EMPIRICAL_BUDGETS = ("4bit",)
# Calibrations run at the mixed '3bit' budget by default (the summary needs data-free;
# real is its reference); the others only at 8 and 4 bits, to keep the run near an hour.
CALIBRATIONS_3BIT = "data-free,real"
# The diagnostic 'documented range' row (where keras_mpq's default differs from it) only here.
DOCUMENTED_BUDGETS = ("8bit", "4bit")
COLUMNS = ("model", "budget", "calibration", "target", "agreement %", "clipped agreement %",
           "input range", "realism", "KB", "quantize s", "export+validate s", "runtime",
           "error / note")
# Summary flags (percentage points of agreement).
MIN_8BIT = 97.0
MAX_8BIT_BELOW_REAL = 1.0
MAX_4BIT_BELOW_REAL = 3.0


def _short(e: BaseException, limit: int = 300) -> str:
  text = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _fmt_range(info, note: str = "") -> str:
  if not info:
    return ""
  text = f"[{info['low']:.4g}, {info['high']:.4g}] {zoo_data.range_how(info)}"
  return text + (f" ({note})" if note else "")


def _fmt_realism(report) -> str:
  summary = (((report.get("data") or {}).get("realism") or {}).get("batchnorm") or {}).get(
      "summary") or {}
  if not summary:
    return "n/a"
  if not summary.get("batchnorm_layers"):
    return "no BatchNorm"
  degenerate = len(summary.get("degenerate") or [])
  tail = f", {degenerate} degenerate" if degenerate else ""
  if summary.get("passed") is None:
    return "no usable BatchNorm" + tail
  verdict = "passed" if summary["passed"] else "FAILED"
  return f"{verdict} {summary['fit']}/{summary['checked']}{tail}"


def _validate(path, x, y, clip_range, runtime="auto"):
  """(agreement %, clipped agreement %, runtime, error): ``y`` is the float model's argmax.

  ``runtime``: as `keras_mpq.validate_tflite`'s ('tflm' for the mcu files).

  ``clip_range``: the range the file was quantized for (``report['input_range']``);
  when the file refuses ``x`` as outside it, ``x`` clipped into it is run too
  (what a device would compute).
  """
  import keras_mpq  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.errors import InvalidInputError  # pylint: disable=g-import-not-at-top
  try:
    v = keras_mpq.validate_tflite(str(path), x, y, runtime=runtime)
    return 100.0 * v.accuracy, None, v.runtime, ""
  except InvalidInputError as e:
    error = _short(e, 160)
    if clip_range is None:
      return None, None, "", error
    try:
      v = keras_mpq.validate_tflite(str(path), np.clip(x, *clip_range), y,
                                    runtime=runtime)
      return None, 100.0 * v.accuracy, v.runtime, "inputs outside the file's range: " + error
    except Exception as e2:  # pylint: disable=broad-except
      return None, None, "", error + " / clipped: " + _short(e2, 120)
  except Exception as e:  # pylint: disable=broad-except
    return None, None, "", _short(e)


def _quantize(name, budget, calibration, x_cal, seed):
  """(result, kwargs used, note, error) of one quantize run; ``real`` retries with the data's range."""
  import keras_mpq  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.errors import InvalidInputError  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if calibration == OLD_DEFAULT:
    kwargs["input_range"] = (0.0, 1.0)
  elif calibration == EMPIRICAL:
    kwargs["bias_correction"] = "empirical"
  elif calibration == DOCUMENTED:
    kwargs["input_range"] = tuple(zoo_data.ZOO[name].documented_range)
  elif calibration == NOISE:
    kwargs["synthesis"] = "noise"
  elif calibration == REAL:
    kwargs["data"] = x_cal
  note = ""
  for attempt in range(2):
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = keras_mpq.quantize(zoo_data.load_model(name), budget, seed=seed,
                                    progress=False, **kwargs)
      return result, kwargs, note, ""
    except InvalidInputError as e:
      if (calibration == REAL and attempt == 0
          and "inside the model's input range" in str(e)):
        kwargs["input_range"] = (float(np.min(x_cal)), float(np.max(x_cal)))
        note = "default range refused the data; given its min, max"
        continue
      return None, kwargs, note, _short(e)
    except Exception as e:  # pylint: disable=broad-except
      return None, kwargs, note, _short(e)
  return None, kwargs, note, "unreachable"


def run_model(name, args, rows, infos, write):
  import keras_mpq  # pylint: disable=g-import-not-at-top
  reason = zoo_data.why_unavailable(name)
  if reason is not None:
    print(f"[skip] {name}: {reason}", flush=True)
    infos.append({"model": name, "skipped": reason})
    return
  model_start = time.perf_counter()
  x = zoo_data.real_inputs(name, n=args.n, seed=args.seed)
  x_cal, x_test = x[:args.n_cal], x[args.n_cal:]
  model = zoo_data.load_model(name)
  y_test = np.asarray(model.predict(x_test, verbose=0, batch_size=100)).argmax(axis=1)
  low, high, source, assumed = keras_mpq.resolve_input_range(model)
  entry = zoo_data.ZOO[name]
  info = {"model": name, "n": args.n, "n_cal": len(x_cal), "n_test": len(x_test),
          "x_range": [float(x.min()), float(x.max())],
          "cal_range": [float(x_cal.min()), float(x_cal.max())],
          "default_range": (low, high, source, assumed),
          "float_classes_used": int(len(set(y_test.tolist()))), "how": entry.how,
          "params": int(model.count_params())}
  truth = zoo_data.true_labels(name, n=args.n, seed=args.seed)
  if truth is not None:
    info["float_vs_truth"] = float(np.mean(truth[args.n_cal:] == y_test))
    info["truth_kind"] = "spoken word" if entry.source == "espeak-ng" else "photo"
  if entry.trained is not None:
    info["trained"] = zoo_data.photo_model_info(*entry.trained)
  infos.append(info)
  write()
  documented = entry.documented_range
  calibrations = [c for c in args.calibrations
                  if not (c == OLD_DEFAULT and (low, high) == (0.0, 1.0))
                  and not (c == DOCUMENTED and (documented is None
                                                or tuple(documented) == (low, high)))]
  out_dir = zoo_data.cache_dir() / "bench_zoo" / name
  out_dir.mkdir(parents=True, exist_ok=True)
  for budget in args.budgets:
    for calibration in calibrations:
      if budget == "3bit" and calibration not in args.calibrations_3bit:
        continue
      if calibration == DOCUMENTED and budget not in DOCUMENTED_BUDGETS:
        continue
      if calibration == EMPIRICAL and budget not in EMPIRICAL_BUDGETS:
        continue
      print(f"[{name}] {budget} {calibration} ...", flush=True)
      start = time.perf_counter()
      result, kwargs, note, error = _quantize(name, budget, calibration, x_cal, args.seed)
      q_seconds = time.perf_counter() - start
      if result is not None:
        in_range = _fmt_range(result.report.get("input_range") or {}, note)
        realism = _fmt_realism(result.report)
      else:
        in_range = (f"[{kwargs['input_range'][0]:.4g}, {kwargs['input_range'][1]:.4g}] given"
                    if "input_range" in kwargs else f"[{low:.4g}, {high:.4g}] default")
        realism = ""
      targets = [t for t in args.targets
                 if not (t == "mcu" and args.mcu_budgets is not None
                         and budget not in args.mcu_budgets)]
      for target in targets:
        row = {"model": name, "budget": budget, "calibration": calibration,
               "target": target, "input range": in_range, "realism": realism,
               "quantize s": q_seconds, "error / note": error}
        if result is not None:
          tag = calibration.replace(",", "").replace(" ", "-").replace("[", "").replace(
              "]", "")
          path = out_dir / f"{budget}_{tag}_{target}.tflite"
          t0 = time.perf_counter()
          try:
            exported = result.export(str(path), target=target)
            row["KB"] = exported.size / 1024
            ir = result.report.get("input_range") or {}
            clip_range = (ir["low"], ir["high"]) if "low" in ir and "high" in ir else None
            agree, clipped, runtime, verror = _validate(
                path, x_test, y_test, clip_range, RUNTIME_OF_TARGET[target])
            row["agreement %"], row["clipped agreement %"] = agree, clipped
            row["error / note"] = verror
            row["runtime"] = runtime
          except Exception as e:  # pylint: disable=broad-except
            row["error / note"] = _short(e)
            if args.verbose:
              traceback.print_exc()
          row["export+validate s"] = time.perf_counter() - t0
        rows.append(row)
        print("   " + _row_md(row), flush=True)
        write()
  info["seconds"] = time.perf_counter() - model_start


def _cell(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.1f}"
  return str(v)


def _row_md(row) -> str:
  return "| " + " | ".join(_cell(row.get(c)) for c in COLUMNS) + " |"


def _agreement(rows, model, budget, calibration, target="mobile"):
  """(value, clipped?) of one row, or (None, False)."""
  for r in rows:
    if (r["model"], r["budget"], r["calibration"], r["target"]) == (model, budget, calibration,
                                                                     target):
      if r.get("agreement %") is not None:
        return r["agreement %"], False
      if r.get("clipped agreement %") is not None:
        return r["clipped agreement %"], True
      return None, False
  return None, False


SUMMARY_CELLS = (("data-free 8", "8bit", DATA_FREE), ("real 8", "8bit", REAL),
                 ("noise 8", "8bit", NOISE), ("data-free 4", "4bit", DATA_FREE),
                 ("real 4", "4bit", REAL), ("noise 4", "4bit", NOISE),
                 ("data-free mixed-3", "3bit", DATA_FREE))


def summary_lines(rows, infos, target="mobile"):
  """Per model: the headline agreements of ``target``'s files and flags."""
  head = ("| model | default input range | " + " | ".join(c[0] for c in SUMMARY_CELLS)
          + " | flags |")
  lines = [head, "|" + "---|" * (len(SUMMARY_CELLS) + 3)]
  for info in infos:
    if "skipped" in info:
      continue
    name = info["model"]
    low, high, source, _ = info["default_range"]
    how = zoo_data.range_how({"source": source, "assumed": info["default_range"][3]})
    values, cells = {}, []
    for label, budget, calibration in SUMMARY_CELLS:
      v, clipped = _agreement(rows, name, budget, calibration, target)
      values[label] = v
      cells.append("" if v is None else f"{v:.1f}" + ("c" if clipped else ""))
    flags = []
    for bits in ("8", "4"):
      df, nz = values[f"data-free {bits}"], values[f"noise {bits}"]
      if df is not None and nz is not None and df < nz:
        flags.append(f"{bits}-bit data-free < noise ({df:.1f} < {nz:.1f})")
    df8, real8 = values["data-free 8"], values["real 8"]
    if df8 is not None and df8 < MIN_8BIT:
      flags.append(f"8-bit data-free < {MIN_8BIT:g}%")
    if df8 is not None and real8 is not None and df8 < real8 - MAX_8BIT_BELOW_REAL:
      flags.append(f"8-bit data-free {real8 - df8:.1f} pts below real")
    df4, real4 = values["data-free 4"], values["real 4"]
    if df4 is not None and real4 is not None and df4 < real4 - MAX_4BIT_BELOW_REAL:
      flags.append(f"4-bit data-free {real4 - df4:.1f} pts below real")
    notes = []
    for budget in DOCUMENTED_BUDGETS:
      v, clipped = _agreement(rows, name, budget, DOCUMENTED, target)
      if v is not None:
        notes.append(f"{budget} {v:.1f}" + ("c" if clipped else ""))
    if notes:
      flags.append("(diagnostic: data-free with the documented input range: "
                   + ", ".join(notes) + ")")
    lines.append(f"| {name} | [{low:.4g}, {high:.4g}] {how} | " + " | ".join(cells) + " | "
                 + ("; ".join(flags) if flags else "-") + " |")
  return lines


def markdown(rows, infos, args, started, finished=None) -> str:
  wall = ""
  if finished is not None:
    wall = f" Wall time {(finished - started).total_seconds() / 60:.1f} min."
  lines = [
      "# Pretrained and trained classifiers on real inputs: agreement of each file with its "
      "float model",
      "",
      f"Command: `cd /work/main && .venv/bin/python benchmarks/bench_zoo.py "
      f"{' '.join(sys.argv[1:])}`; started {started:%Y-%m-%d %H:%M}; "
      f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other work), no GPU; "
      f"seed {args.seed}.{wall}" + ("" if finished else " **Partial: still running.**"),
      "",
  ]
  head, lines = lines, [
      "## Setup",
      "",
      f"Real inputs (`benchmarks/zoo_data.py`), n = {args.n} per model: the first "
      f"{args.n_cal} calibrate the 'real' rows, the last {args.n - args.n_cal} are held out "
      "and judge every file. Agreement % = top-1 agreement of the file "
      "(`keras_mpq.validate_tflite`: mobile files in LiteRT, mcu files in TFLite Micro) with "
      "the float Keras model's argmax on the "
      "held-out inputs. Calibrations: 'data-free' = keras_mpq's defaults (labeled "
      "synthesis, no `input_range`; bias correction from BatchNorm statistics); 'data-free, "
      "empirical bias correction' = `bias_correction='empirical'` (the data-free default "
      f"before, only at {', '.join(EMPIRICAL_BUDGETS)}); 'data-free, old [0,1] default' = `input_range=(0, 1)` "
      "forced, what the previous release assumed (only where the default range is not "
      "[0, 1]); 'data-free, documented range' = `input_range` forced to the range the "
      "model's preprocessing documents (a diagnostic, only where keras_mpq's default "
      f"differs from it, only at {', '.join(DOCUMENTED_BUDGETS)}); 'noise' = "
      "`synthesis='noise'`; 'real' = `data=x_real[:"
      f"{args.n_cal}]` (plus `input_range=(min, max)` of it only where quantize refused "
      "the data). Budgets: " + ", ".join(args.budgets) + "; at the mixed '3bit' budget "
      "only the calibrations " + ", ".join(f"'{c}'" for c in args.calibrations_3bit) + " (a cut "
      "to keep the run near an hour on 2 shared cores). 'Input range' = `result.report['input_range']`: 'layer' (read off a "
      "Rescaling/Normalization layer), 'estimated' (from the first BatchNorm's statistics), "
      "'assumed' ([0, 1] default), 'given'. 'Realism' = the BatchNorm realism check of the "
      "calibration data (`report['data']['realism']['batchnorm']['summary']`): passed/FAILED, "
      "BatchNorm layers that fit / checked. 'Clipped agreement %': where the file refused "
      "the held-out inputs as outside its input range, the agreement on the inputs clipped "
      "into it (what a device computes). KB = file size.",
      "",
      "How the inputs were made:",
      "",
      "- speech (keyword_spotting, keyword_spotting_mobilenetv2, tflite_micro_speech): words "
      "spoken by espeak-ng (12 voices, random speed, pitch, loudness, offset; 3/4 the "
      "model's keywords, 1/4 other words) plus a little Gaussian noise, through TensorFlow's "
      "audio_microfrontend with the model's settings and scaling (see the zoo_data "
      "docstring for how each scaling was chosen);",
      "- rock_paper_scissors: random crops of natural photos, 84x84 gray, per-sample "
      "standardized (no hand photos here: the float model's classes on them are arbitrary);",
      "- photo_resnet_s*, photo_mobilenetv2_s*: models trained here (seeds 0 and 1) on a "
      "10-class 'which photo' task: random square crops (side 8-40% of the photo, resized "
      "antialiased to 32x32, random flip) of 10 colour photos from scikit-image "
      "(astronaut, stereo motorcycle left view, chelsea, coffee, hubble_deep_field, "
      "immunohistochemistry, retina, rocket; `skimage.data.cat()` is the same image as "
      "chelsea, so the motorcycle replaces it) and scikit-learn (china, flower); training "
      "crops from the left 70% of each photo, held-out inputs from the right 30%. "
      "photo_resnet takes raw 0..255 pixels (no Rescaling layer, BatchNorm after every "
      "conv); photo_mobilenetv2 is keras.applications.MobileNetV2(alpha=0.35, 32x32, "
      "weights=None) fed x/127.5-1 (preprocessing outside the model), BatchNorm statistics "
      "recalibrated after training.",
      "",
  ]
  for info in infos:
    if "skipped" in info:
      lines.append(f"- {info['model']}: skipped ({info['skipped']})")
      continue
    extra = ""
    if "float_vs_truth" in info:
      extra = (f"; the float model agrees with the true {info['truth_kind']} on "
               f"{100 * info['float_vs_truth']:.0f}% of the held-out inputs")
    if info.get("trained"):
      t = info["trained"]
      extra += (f"; trained here in {t.get('train_seconds')} s, held-out accuracy "
                f"{100 * t.get('held_out_accuracy', float('nan')):.1f}% on "
                f"{t.get('held_out_crops')} test crops")
    low, high, source, _ = info["default_range"]
    took = f"; {info['seconds'] / 60:.1f} min for all its rows" if "seconds" in info else ""
    if "crashed" in info:
      took += f"; CRASHED after its last row: {info['crashed']}"
    lines.append(
        f"- {info['model']} ({info['params']} parameters): real inputs in "
        f"[{info['x_range'][0]:.4g}, {info['x_range'][1]:.4g}]; keras_mpq's default range "
        f"[{low:.4g}, {high:.4g}] ({source}); float model predicts "
        f"{info['float_classes_used']} classes on the {info['n_test']} held-out inputs"
        f"{extra}{took}.")
  setup, lines = lines, head
  for target in args.targets:
    lines += [
        f"## Summary (target '{target}', files run in "
        f"{'TFLite Micro' if RUNTIME_OF_TARGET[target] == 'tflm' else 'LiteRT'})",
        "",
        "Agreement % with the float model on the held-out real inputs; 'c' = clipped "
        "agreement (the file refused the inputs as outside its range). Flags: data-free "
        f"below noise; data-free 8-bit below {MIN_8BIT:g}% or more than "
        f"{MAX_8BIT_BELOW_REAL:g} point below real 8-bit; data-free 4-bit more than "
        f"{MAX_4BIT_BELOW_REAL:g} points below real 4-bit.",
        "",
    ]
    lines += summary_lines(rows, infos, target) + [""]
  lines += [""] + setup
  lines += ["", "## All rows", "", "| " + " | ".join(COLUMNS) + " |",
            "|" + "---|" * len(COLUMNS)]
  lines += [_row_md(r) for r in rows]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(zoo_data.CLASSIFIERS),
                      help="comma-separated zoo names (default: every classifier with a "
                      "real source, the trained photo models included)")
  parser.add_argument("--out", default=str(HERE / "results" / "zoo.md"))
  parser.add_argument("--quick", action="store_true", help="budget '8bit' only")
  parser.add_argument("--budgets", default=None, help="comma-separated (default 8bit,4bit,3bit)")
  parser.add_argument("--calibrations", default="data-free,empirical,documented,noise,real",
                      help="comma-separated from data-free, empirical, old, documented, "
                      "noise, real")
  parser.add_argument("--calibrations-3bit", default=CALIBRATIONS_3BIT,
                      help="of those, the ones run at the mixed '3bit' budget ('all': every one)")
  parser.add_argument("--targets", default=",".join(TARGETS))
  parser.add_argument("--mcu-budgets", default=None,
                      help="comma-separated budgets exported for 'mcu' (default: all)")
  parser.add_argument("--n", type=int, default=300, help="real inputs per model")
  parser.add_argument("--n-cal", type=int, default=100,
                      help="of which the first this many calibrate the 'real' rows")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--verbose", action="store_true", help="print tracebacks")
  args = parser.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  args.budgets = (args.budgets.split(",") if args.budgets
                  else (["8bit"] if args.quick else list(BUDGETS)))
  def calibration_list(text):
    chosen = []
    for c in (c for c in text.split(",") if c):
      if c not in _CALIBRATION_KEYS:
        parser.error(f"unknown calibration {c!r}; expected one of {list(_CALIBRATION_KEYS)}")
      chosen.append(_CALIBRATION_KEYS[c])
    return [c for c in CALIBRATIONS if c in chosen]

  args.calibrations = calibration_list(args.calibrations)
  args.calibrations_3bit = (list(CALIBRATIONS) if args.calibrations_3bit == "all"
                            else calibration_list(args.calibrations_3bit))
  args.targets = [t for t in args.targets.split(",") if t]
  args.mcu_budgets = args.mcu_budgets.split(",") if args.mcu_budgets else None
  if not 0 < args.n_cal < args.n:
    parser.error("expected 0 < --n-cal < --n")
  for m in args.models:
    if m not in zoo_data.ZOO:
      parser.error(f"unknown model {m!r}; expected one of {sorted(zoo_data.ZOO)}")
  started = datetime.datetime.now()
  rows, infos = [], []
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)

  def write(finished=None):
    out.write_text(markdown(rows, infos, args, started, finished))

  for name in args.models:
    try:
      run_model(name, args, rows, infos, write)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      known = [i for i in infos if i["model"] == name]
      if known:
        known[0]["crashed"] = _short(e)
      else:
        infos.append({"model": name, "skipped": "crashed: " + _short(e)})
    write()
  finished = datetime.datetime.now()
  write(finished)
  print(out.read_text())
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
