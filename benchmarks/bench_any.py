"""Any Keras model, not only classifiers (issue 31): autoencoders, masks, regression, two heads, two inputs.

Models (`any_data`): five trained here on real data, two training seeds each
(a convolutional autoencoder on MNIST digits 0-4 judged by the ROC AUC of its
reconstruction error against digits 5-9; a small U-Net predicting the stroke
mask of noisy, occluded MNIST digits, mean IoU; an MLP regressor on
scikit-learn's diabetes table, R^2; a two-output CNN, ``class`` softmax and
``box`` regression, accuracy and box error; a classifier with two inputs, the
MNIST image and a table of its row and column ink sums, fed as a dict by
input name, accuracy), and three pretrained
non-classifiers from ``../shared/models`` (the MLPerf-Tiny anomaly-detection
autoencoder on log-mel frames of espeak-ng speech; an ECG-like autoencoder and
a fingerprint signature model on synthetic inputs: no real source here),
judged by their agreement with the float model (score correlation, error
ratio).

For each model (and seed) the float metric is measured in Keras; then
``keras_mpq.quantize`` runs

* ``data-free`` (no data, keras_mpq's defaults) at budgets '8bit', '4bit',
  the mixed '3.5bit' (forces some layers below 4 bits) and 'uniform4'
  (``"4bit"`` with ``weight_bits=(4,)``: every layer at 4 bits, the baseline
  of the "mixed 4-bit at or above uniform 4-bit" check);
* ``real`` (``data=x_pool[:--n-cal]``, real inputs of the training split or
  a held-apart pool) at '8bit', '4bit' and 'uniform4'; where quantize refuses
  the data as outside the model's assumed input range, again with
  ``input_range=(min, max)`` of the data (the note says so);
* ``data-free, given range`` (``input_range`` = the range the inputs are
  documented to lie in, `GIVEN_RANGE`) at '8bit' and '4bit', only for models
  whose inputs are not in [0, 1] (regression, AD, fingerprint).

Every result is exported with ``result.export(path, target="mobile")`` and
``target="mcu"``; the mobile file runs in LiteRT, the mcu file in TFLite Micro,
on the held-out real inputs (the same ``--n-test`` inputs as the float and
Keras-quantized metrics), and the task metric is computed on the files'
outputs. Multi-output files are run here output by output (LiteRT; TFLite
Micro in a forked child); outputs are matched to the Keras output names by the
file's signature, else by tensor name, else by shape, else by order (the
error/note column says which). Single-output files go through
``keras_mpq.export.runtime.run_tflite``; where a file refuses the inputs as
outside its input range, the inputs clipped into it are run and the metric is
marked 'c'.

Targets from the issue (the 'pass' column; judged on every file that ran:
LiteRT and TFLite Micro, a file that did not export or run fails):

* conv autoencoder ROC AUC within 0.01 of float at 8 bits, 0.02 at 4 bits;
* mask IoU within 0.01 at 8 bits, 0.03 at 4 bits;
* regression R^2 within 0.02 at 8 bits, 0.05 at 4 bits;
* two-head accuracy within 1 point at 8 bits, 3 points at 4 bits, and box
  MAE no more than 0.01 (of the image side) worse;
* two-input accuracy within 1 point at 8 bits, 3 points at 4 bits (the
  two-head model's classification targets; this benchmark's, not the issue's);
* anomaly_detection: both files export and run; score correlation with float
  shown (this benchmark also asks r >= 0.95 at 8 bits, 0.9 at 4 bits: its own
  threshold, not the issue's);
* the other two pretrained files: no target (metrics shown, 'runs' checked).

The mixed '3.5bit' rows have no target. 'Mixed plans at 4 bits at or above
uniform 4-bit': the summary compares the '4bit' row with the 'uniform4' row
of the same model, seed and calibration (LiteRT metric; `MIXED_TOLERANCE`).

Each model (and seed) runs in a child process, so a crash loses that model's
remaining rows only; every quantize/export/run is wrapped and its error goes
into the table. A library that refuses non-classifiers (keras_mpq before
commit d18b764) gives rows whose error column holds the refusal ("Expected a
classifier ...", "several inputs or outputs are not supported yet",
"Expected a flat model") and FAIL.

The whole run (7 models, 11 model-seeds, every budget and calibration) takes
roughly an hour or more on 2 shared CPU cores, most of it the fingerprint
model's data-free runs (4-7 min each: synthesis at 180x180); ``--quick`` about
10 minutes.

    .venv/bin/python benchmarks/bench_any.py                       # everything
    .venv/bin/python benchmarks/bench_any.py --quick               # seed 0, 8bit, data-free + real
    .venv/bin/python benchmarks/bench_any.py --models mask_net,two_head --seeds 0 --budgets 8bit,4bit
    .venv/bin/python benchmarks/bench_any.py --models two_input --calibrations data-free \
        --out benchmarks/results/any_models_two_input.md

Trained models and made inputs are cached under ``KERAS_MPQ_ANY_CACHE``
(default /tmp/keras_mpq_any); exported files go under it too, never into the
repository. The table goes to ``--out`` (default
benchmarks/results/any_models.md), rewritten after every model, and is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np

import any_data

BUDGETS = ("8bit", "4bit", "3.5bit", "uniform4")
MIXED_BUDGET = "3.5bit"
UNIFORM = "uniform4"
DATA_FREE, REAL, GIVEN = "data-free", "real", "data-free, given range"
CALIBRATIONS = (DATA_FREE, REAL, GIVEN)
_CALIBRATION_KEYS = {"data-free": DATA_FREE, "real": REAL, "range": GIVEN}
REAL_BUDGETS = ("8bit", "4bit", UNIFORM)
GIVEN_BUDGETS = ("8bit", "4bit")
TARGETS = ("mobile", "mcu")
# The range each model's inputs are documented to lie in (`any_data`'s docstring).
GIVEN_RANGE = {
    "conv_autoencoder": (0.0, 1.0), "mask_net": (0.0, 1.0), "two_head": (0.0, 1.0),
    "regression_mlp": (-4.0, 4.0),            # standardized features
    "anomaly_detection": (0.0, 320.0),        # 3 * dB + 220 of full-scale audio
    "autoencoder_example": (0.0, 1.0),
    "fingerprint_signature_generator": (-128.0, 127.0),  # uint8 - 128
}
# Metrics shown per model (the first is the headline, `any_data.HEADLINE`).
SHOWN = {
    "conv_autoencoder": ("ROC AUC",), "mask_net": ("IoU",), "regression_mlp": ("R2",),
    "two_head": ("accuracy", "box MAE"), "two_input": ("accuracy",),
    "anomaly_detection": ("score corr", "error ratio"),
    "autoencoder_example": ("score corr", "error ratio"),
    "fingerprint_signature_generator": ("output corr", "rel. error"),
}
# Issue 31's targets: (metric, largest allowed drop below float) per bits; a negative
# entry bounds a rise (an error metric). anomaly_detection's floors are this benchmark's.
TARGETS_BY_BITS = {
    "conv_autoencoder": {8: [("ROC AUC", 0.01)], 4: [("ROC AUC", 0.02)]},
    "mask_net": {8: [("IoU", 0.01)], 4: [("IoU", 0.03)]},
    "regression_mlp": {8: [("R2", 0.02)], 4: [("R2", 0.05)]},
    "two_head": {8: [("accuracy", 0.01), ("box MAE", -0.01)],
                 4: [("accuracy", 0.03), ("box MAE", -0.01)]},
    "two_input": {8: [("accuracy", 0.01)], 4: [("accuracy", 0.03)]},
    "anomaly_detection": {8: [("score corr", 0.05)], 4: [("score corr", 0.10)]},
}
TARGET_BITS = {"8bit": 8, "4bit": 4}
# 'Mixed 4-bit at or above uniform 4-bit', allowing this much below (metric noise).
MIXED_TOLERANCE = {"ROC AUC": 0.005, "IoU": 0.005, "R2": 0.01, "accuracy": 0.005,
                   "score corr": 0.005, "output corr": 0.005}
COLUMNS = ("model", "seed", "calibration", "budget", "avg bits", "KB mobile", "KB mcu",
           "float", "Keras quantized", "LiteRT", "TFLM", "delta vs float", "target", "pass",
           "quantize s", "error / note")


def _short(e: BaseException, limit: int = 300) -> str:
  text = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
  return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------- running files


def _subset_metric(task, idx):
  """The task's metric on the test inputs ``idx`` (metrics are defined on the full test set)."""
  return lambda pred: task.metric_fn(pred, idx)


def _match_outputs(names, shapes, details, signature):
  """Index into ``details`` for each Keras output name, and how it was matched."""
  if signature:
    if all(n in signature for n in names):
      by_index = {int(d["index"]): i for i, d in enumerate(details)}
      if all(int(signature[n]) in by_index for n in names):
        return [by_index[int(signature[n])] for n in names], "by signature"
  tokens = [set(str(d.get("name", "")).replace(":", "/").replace(";", "/").split("/"))
            for d in details]
  hits = [[i for i, t in enumerate(tokens) if n in t] for n in names]
  if all(len(h) == 1 for h in hits) and len({h[0] for h in hits}) == len(names):
    return [h[0] for h in hits], "by tensor name"
  want = [tuple(int(s) for s in shape[1:]) for shape in shapes]
  have = [tuple(int(s) for s in d["shape"][1:]) for d in details]
  if len(set(want)) == len(want) and all(have.count(w) == 1 for w in want):
    return [have.index(w) for w in want], "by shape"
  return list(range(len(names))), "by order"


def _litert_interpreter(data: bytes):
  from keras_mpq.export import reader as reader_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.export import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
  if reader_lib.has_cut_zero_points(data):  # an mcu file: LiteRT wants one zero point per scale
    data = reader_lib.restore_zero_points(data)
  interpreter_class, _ = runtime_lib._litert_class("auto")  # pylint: disable=protected-access
  interp = interpreter_class(model_content=data, num_threads=1)
  interp.allocate_tensors()
  return interp


def _signature_outputs(interp):
  try:
    runner = interp.get_signature_runner()
    return {name: d["index"] for name, d in runner.get_output_details().items()}
  except Exception:  # pylint: disable=broad-except  # no signature (stripped)
    return {}


def _multi_litert(data: bytes, x, names, shapes):
  """{name: outputs} of a multi-output file in LiteRT, and the matching used."""
  from keras_mpq.export import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
  interp = _litert_interpreter(data)
  inp = interp.get_input_details()[0]
  outs = interp.get_output_details()
  order, how = _match_outputs(names, shapes, outs, _signature_outputs(interp))
  fixed = int(inp["shape"][0])
  dynamic = int(inp.get("shape_signature", inp["shape"])[0]) == -1
  step = min(256, len(x)) if dynamic else fixed
  got = {n: [] for n in names}
  current = fixed
  for i in range(0, len(x), step):
    chunk = np.asarray(x[i:i + step], np.float32)
    n = len(chunk)
    if dynamic and n != current:
      interp.resize_tensor_input(inp["index"], [n] + list(inp["shape"][1:]))
      interp.allocate_tensors()
      current = n
      outs = interp.get_output_details()
    if not dynamic and n != fixed:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
    quantized = runtime_lib._quantize_input(chunk, inp)  # pylint: disable=protected-access
    interp.set_tensor(inp["index"], quantized)
    interp.invoke()
    for name, j in zip(names, order):
      got[name].append(runtime_lib.dequantize_output(interp.get_tensor(outs[j]["index"]),
                                                     outs[j])[:n])
  return {n: np.concatenate(v) for n, v in got.items()}, how


def _multi_tflm_here(data: bytes, x, names, shapes):
  from keras_mpq.export import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
  view = _litert_interpreter(data)  # output order, names and shapes of the same file
  outs_view = view.get_output_details()
  order, how = _match_outputs(names, shapes, outs_view, _signature_outputs(view))
  interpreter_class = runtime_lib._tflm_class()  # pylint: disable=protected-access
  interp = runtime_lib._tflm_interpreter(interpreter_class, data)  # pylint: disable=protected-access
  inp = runtime_lib._tflm_detail(interp.get_input_details(0))  # pylint: disable=protected-access
  outs = [runtime_lib._tflm_detail(interp.get_output_details(j))  # pylint: disable=protected-access
          for j in range(len(outs_view))]
  got = {n: [] for n in names}
  for i in range(len(x)):
    sample = np.asarray(x[i:i + 1], np.float32)
    interp.set_input(runtime_lib._quantize_input(sample, inp), 0)  # pylint: disable=protected-access
    interp.invoke()
    for name, j in zip(names, order):
      got[name].append(runtime_lib.dequantize_output(interp.get_output(j), outs[j]))
  return {n: np.concatenate(v) for n, v in got.items()}, how


def _child(send, fn, args):
  try:
    send.send(("ok", fn(*args)))
  except BaseException as e:  # pylint: disable=broad-except  # handed to the parent
    send.send(("error", f"{type(e).__name__}: {e}"))
  finally:
    send.close()


def _multi_tflm(data: bytes, x, names, shapes):
  """`_multi_tflm_here` in a forked child, so a native crash becomes an error."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  context = multiprocessing.get_context("fork")
  receive, send = context.Pipe(duplex=False)
  child = context.Process(target=_child, args=(send, _multi_tflm_here, (data, x, names, shapes)),
                          daemon=True)
  child.start()
  send.close()
  try:
    status, value = receive.recv()
  except EOFError:
    child.join()
    raise RuntimeError(f"TFLite Micro crashed (exit {child.exitcode})") from None
  finally:
    receive.close()
  child.join()
  if status == "error":
    raise RuntimeError(value)
  return value


def _library_order_note(path, x, out, names) -> str:
  """Whether `run_tflite`'s outputs (a list, in Keras order) agree with the name-matched ``out``."""
  from keras_mpq.export import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
  try:
    lib = runtime_lib.run_tflite(str(path), x, runtime="auto")
  except Exception as e:  # pylint: disable=broad-except
    return "run_tflite on this file: " + _short(e, 120)
  if not isinstance(lib, (list, tuple)) or len(lib) != len(names):
    return f"run_tflite returned {type(lib).__name__}, not {len(names)} outputs"
  same = all(np.asarray(a).shape == np.asarray(out[n][:len(x)]).shape
             and np.allclose(a, out[n][:len(x)], atol=1e-6) for a, n in zip(lib, names))
  return "run_tflite's output order " + ("agrees" if same else "DISAGREES")


def run_file(path, x, model, runtime: str, clip_range=None):
  """(outputs, note): the file's outputs on ``x`` (a dict for a multi-output model).

  ``runtime``: 'litert' or 'tflm'. Single-output files go through
  `keras_mpq.export.runtime.run_tflite` (``x`` a dict by input name for a
  model with several inputs, matched by name); when it refuses ``x`` as outside the
  file's input range and ``clip_range`` is given, ``x`` clipped into it is run
  and the note starts with 'clipped'.
  """
  from keras_mpq.base.errors import InvalidInputError  # pylint: disable=g-import-not-at-top
  from keras_mpq.export import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
  names = list(model.output_names)
  input_names = list(model.input_names) if isinstance(x, dict) else None
  if len(names) > 1:
    data = pathlib.Path(path).read_bytes()
    shapes = [tuple(o.shape) for o in model.outputs]
    fn = _multi_litert if runtime == "litert" else _multi_tflm
    out, how = fn(data, x, names, shapes)
    return out, f"outputs matched {how}"
  rt = "auto" if runtime == "litert" else "tflm"
  try:
    return runtime_lib.run_tflite(str(path), x, runtime=rt, input_names=input_names), ""
  except InvalidInputError as e:
    if clip_range is None or input_names or "input range" not in str(e):
      raise
    return (runtime_lib.run_tflite(str(path), np.clip(x, *clip_range), runtime=rt),
            "clipped: " + _short(e, 120))


# --------------------------------------------------------------------------- one model


def _fmt_metrics(name, m, clipped=False):
  if not m:
    return ""
  parts = []
  for k in SHOWN[name]:
    v = m.get(k)
    if v is None:
      continue
    if k == "accuracy":
      parts.append(f"{100 * v:.2f}%")
    elif k == "box MAE":
      parts.append(f"box {v:.4f}")
    elif k == "error ratio":
      parts.append(f"err {v:.3f}")
    elif k == "rel. error":
      parts.append(f"rel {v:.4f}")
    else:
      parts.append(f"{v:.4f}")
  return " / ".join(parts) + (" c" if clipped else "")


def check_targets(name, budget, float_m, file_ms):
  """(target text, 'pass' / 'FAIL' / '-'): issue 31's target on every file metric in ``file_ms``.

  ``file_ms``: {'LiteRT': metrics or None, 'TFLM': metrics or None}; a None
  (file missing or not run) fails a row that has a target.
  """
  bits = TARGET_BITS.get(budget)
  if name not in TARGETS_BY_BITS:
    ran = all(m is not None for m in file_ms.values())
    return "runs (no target)", ("pass" if ran else "FAIL")
  if bits is None:
    return "-", "-"
  rules = TARGETS_BY_BITS[name][bits]
  text = ", ".join((f"{k} >= float - {tol:g}" if tol >= 0 else f"{k} <= float + {-tol:g}")
                   for k, tol in rules)
  if float_m is None:
    return text, "FAIL"
  ok = True
  for m in file_ms.values():
    if m is None:
      ok = False
      continue
    for k, tol in rules:
      if tol >= 0:
        ok &= m[k] >= float_m[k] - tol - 1e-12
      else:
        ok &= m[k] <= float_m[k] - tol + 1e-12
  return text, ("pass" if ok else "FAIL")


def _quantize(load, budget, calibration, x_cal, given, seed):
  """(result, note, error) of one quantize run; ``load()`` gives a fresh float model."""
  import keras_mpq  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.errors import InvalidInputError  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if budget == UNIFORM:
    budget_arg, kwargs["weight_bits"] = "4bit", (4,)
  else:
    budget_arg = budget
  if calibration == REAL:
    kwargs["data"] = x_cal
  elif calibration == GIVEN:
    kwargs["input_range"] = tuple(given)
  note = ""
  for attempt in range(2):
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = keras_mpq.quantize(load(), budget_arg, seed=seed, progress=False, **kwargs)
      return result, note, ""
    except InvalidInputError as e:
      if calibration == REAL and attempt == 0 and "input range" in str(e):
        kwargs["input_range"] = ({k: any_data.value_range(v) for k, v in x_cal.items()}
                                 if isinstance(x_cal, dict) else any_data.value_range(x_cal))
        note = "data outside the default range: input_range=(min, max) of it; "
        continue
      return None, note, _short(e)
    except Exception as e:  # pylint: disable=broad-except
      return None, note, _short(e)
  return None, note, "unreachable"


def run_one(name, seed, args, emit):
  """Every row of one model (and seed); ``emit(kind, payload)`` records info and rows."""
  import keras_mpq  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  reason = any_data.why_unavailable(name)
  trained = name in any_data.TRAINED
  if reason is not None:
    emit("info", {"model": name, "seed": seed, "skipped": reason})
    return
  task = any_data.task(name, seed if trained else 0)
  model = task.model
  n_test = min(args.n_test, any_data.num_samples(task.x_test))
  idx = np.arange(n_test)
  x_test = any_data.take(task.x_test, idx)
  metric = _subset_metric(task, idx)
  x_cal = any_data.take(task.x_pool, slice(0, args.n_cal))
  float_m = metric(any_data.predict(model, x_test))
  prefix_cache = {}

  def float_prefix(n):
    """Float metric on the first ``n`` test inputs (what TFLite Micro ran)."""
    if n not in prefix_cache:
      prefix_cache[n] = _subset_metric(task, idx[:n])(
          any_data.predict(model, any_data.take(x_test, slice(0, n))))
    return prefix_cache[n]
  ranges = keras_mpq.resolve_input_ranges(model)
  info = {"model": name, "seed": seed if trained else None, "n_test": n_test,
          "n_test_all": any_data.num_samples(task.x_test), "n_cal": any_data.num_samples(x_cal),
          "x_range": list(any_data.value_range(task.x_test)),
          "default_range": [[low, high, str(source), bool(assumed)]
                            for low, high, source, assumed in ranges],
          "inputs": list(model.input_names),
          "params": int(model.count_params()), "outputs": list(model.output_names),
          "float": float_m, "how": any_data.HOW.get(name, "")}
  if trained:
    info["trained"] = any_data.info(name, seed)
  emit("info", info)
  given = GIVEN_RANGE.get(name)
  out_dir = any_data.cache_dir() / "bench_any" / f"{name}_s{seed}"
  out_dir.mkdir(parents=True, exist_ok=True)
  plan = []
  for calibration in args.calibrations:
    for budget in args.budgets:
      if calibration == REAL and budget not in args.real_budgets:
        continue
      if calibration == GIVEN and (budget not in GIVEN_BUDGETS or given is None
                                   or tuple(given) == (0.0, 1.0)):
        continue
      plan.append((calibration, budget))
  for calibration, budget in plan:
    print(f"[{name} s{seed}] {calibration} {budget} ...", flush=True)
    row = {"model": name, "seed": seed if trained else "-", "calibration": calibration,
           "budget": budget, "float": _fmt_metrics(name, float_m), "float_m": float_m}
    t0 = time.perf_counter()
    result, note, error = _quantize(lambda: any_data.load_model(name, seed if trained else 0),
                                    budget, calibration, x_cal, given, args.seed)
    row["quantize s"] = time.perf_counter() - t0
    notes, metrics = [note] if note else [], {}
    if result is None:
      row["error / note"] = (note + error).strip()
    else:
      achieved = result.report.get("achieved") or {}
      row["avg bits"] = achieved.get("avg_bits")
      try:
        km = metric(any_data.predict(result.model, x_test, names=list(model.output_names)))
        metrics["Keras"] = km
        row["Keras quantized"] = _fmt_metrics(name, km)
      except Exception as e:  # pylint: disable=broad-except
        notes.append("Keras quantized: " + _short(e, 160))
      ir = result.report.get("input_range") or {}
      clip_range = (ir["low"], ir["high"]) if "low" in ir and "high" in ir else None
      tag = f"{calibration.replace(',', '').replace(' ', '-')}_{budget}"
      for target, runtime, col in (("mobile", "litert", "LiteRT"), ("mcu", "tflm", "TFLM")):
        if target not in args.targets:
          continue
        metrics[col] = None
        path = out_dir / f"{tag}_{target}.tflite"
        try:
          exported = result.export(str(path), target=target)
          size = getattr(exported, "size", None) or path.stat().st_size
          row[f"KB {target}"] = size / 1024
        except Exception as e:  # pylint: disable=broad-except
          notes.append(f"export {target}: " + _short(e, 200))
          if args.verbose:
            traceback.print_exc()
          continue
        try:
          x_run = any_data.take(x_test, slice(0, args.n_tflm)) if runtime == "tflm" else x_test
          out, run_note = run_file(path, x_run, model, runtime, clip_range)
          n_run = any_data.num_samples(x_run)
          m = (metric(out) if runtime != "tflm" or n_run == n_test
               else _subset_metric(task, idx[:n_run])(out))
          metrics[col] = m
          row[col] = _fmt_metrics(name, m, clipped=run_note.startswith("clipped"))
          if runtime == "tflm" and n_run < n_test and name in any_data.TRAINED:
            row[col] += f" (float {_fmt_metrics(name, float_prefix(n_run))})"
          if runtime == "litert" and len(model.output_names) > 1:
            notes.append(_library_order_note(path, x_run[:20], out, model.output_names))
          if run_note:
            notes.append(f"{col}: {run_note}")
        except Exception as e:  # pylint: disable=broad-except
          notes.append(f"run {target} ({col}): " + _short(e, 200))
          if args.verbose:
            traceback.print_exc()
      row["error / note"] = "; ".join(notes)
    head = any_data.HEADLINE[name]
    best = metrics.get("LiteRT") or metrics.get("Keras")
    if best is not None:
      row["delta vs float"] = "%+.4f" % (best[head] - float_m[head])
      if name == "two_head":
        row["delta vs float"] += " / box %+.4f" % (best["box MAE"] - float_m["box MAE"])
    row["metrics"] = {k: v for k, v in metrics.items()}
    if budget == UNIFORM:
      row["target"], row["pass"] = "(uniform baseline)", "-"
    elif result is None:
      text, _ = check_targets(name, budget, float_m, {"LiteRT": None})
      row["target"], row["pass"] = text, ("FAIL" if text != "-" else "-")
    else:
      files = {k: metrics.get(k) for k in ("LiteRT", "TFLM") if k in metrics}
      if args.n_tflm < n_test and "TFLM" in files and files["TFLM"] is not None:
        # TFLM ran on a prefix: judge it against float on the same prefix.
        sub_float = float_prefix(args.n_tflm)
        _, v_tflm = check_targets(name, budget, sub_float, {"TFLM": files.pop("TFLM")})
        text, v = check_targets(name, budget, float_m, files or {"LiteRT": None})
        row["target"], row["pass"] = text, ("pass" if v == v_tflm == "pass" else
                                            ("-" if v == "-" else "FAIL"))
      else:
        row["target"], row["pass"] = check_targets(name, budget, float_m,
                                                   files or {"LiteRT": None})
    emit("row", row)
    print("   " + _row_md(row), flush=True)
  emit("done", {"model": name, "seed": seed, "seconds": time.perf_counter() - start})


# --------------------------------------------------------------------------- markdown


def _cell(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
  return str(v)


def _row_md(row) -> str:
  return "| " + " | ".join(_cell(row.get(c)) for c in COLUMNS) + " |"


def mixed_vs_uniform(rows):
  """Lines: per model/seed/calibration, the '4bit' row's LiteRT headline vs the 'uniform4' row's."""
  lines = []
  keyed = {(r["model"], str(r["seed"]), r["calibration"], r["budget"]): r for r in rows}
  for (model, seed, calibration, budget), r in keyed.items():
    if budget != "4bit":
      continue
    u = keyed.get((model, seed, calibration, UNIFORM))
    if u is None:
      continue
    head = any_data.HEADLINE[model]
    def value(row):
      m = (row.get("metrics") or {})
      best = m.get("LiteRT") or m.get("Keras")
      return None if best is None else best.get(head)
    mv, uv = value(r), value(u)
    if mv is None or uv is None:
      verdict = "n/a (" + ("mixed" if mv is None else "uniform") + " has no result)"
    else:
      tol = MIXED_TOLERANCE.get(head, 0.0)
      verdict = (f"{'pass' if mv >= uv - tol else 'FAIL'}: mixed {mv:.4f} vs uniform "
                 f"{uv:.4f} ({mv - uv:+.4f}; tolerance {tol:g})")
    lines.append(f"| {model} | {seed} | {calibration} | {head} | {verdict} |")
  return lines


def _default_range_text(info) -> str:
  """keras_mpq's default input range of a model, as written: per input name for several."""
  ranges = info["default_range"]
  if ranges and not isinstance(ranges[0], list):  # a single range (older records)
    ranges = [ranges]
  texts = [f"[{low:.4g}, {high:.4g}] ({source}{', assumed' if assumed else ''})"
           for low, high, source, assumed in ranges]
  names = info.get("inputs") or []
  if len(texts) == 1 or len(names) != len(texts):
    return "; ".join(texts)
  return "; ".join(f"{n!r} {t}" for n, t in zip(names, texts))


def markdown(rows, infos, args, started, finished=None) -> str:
  wall = ""
  if finished is not None:
    wall = f" Wall time {(finished - started).total_seconds() / 60:.1f} min."
  lines = [
      "# Any Keras model, not only classifiers (issue 31): autoencoders, masks, regression, "
      "two heads, two inputs",
      "",
      f"Command: `cd /work/main && .venv/bin/python benchmarks/bench_any.py "
      f"{' '.join(args.argv)}`; started {started:%Y-%m-%d %H:%M}; "
      f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other work), no GPU; "
      f"quantize seed {args.seed}.{wall}" + ("" if finished else " **Partial: still running.**"),
      "",
      "## Targets",
      "",
  ]
  n_pass = sum(r.get("pass") == "pass" for r in rows)
  n_fail = sum(r.get("pass") == "FAIL" for r in rows)
  lines.append(f"Rows with a target: {n_pass} pass, {n_fail} FAIL (the 'pass' column below; "
               "a row whose quantize or export failed fails). Targets (issue 31; judged on "
               "the LiteRT and TFLite Micro files): conv AE ROC AUC within 0.01 of float at 8 "
               "bits, 0.02 at 4; mask IoU within 0.01 / 0.03; regression R^2 within 0.02 / "
               "0.05; two-head accuracy within 1 / 3 points and box MAE at most 0.01 worse; "
               "two-input accuracy within 1 / 3 points (this benchmark's threshold); "
               "anomaly_detection: both files export and run, score correlation >= 0.95 / "
               "0.9 (this benchmark's threshold); the other pretrained files: both run.")
  lines += ["", "Mixed 4-bit at or above uniform 4-bit (LiteRT metric, Keras-quantized "
            "where no file ran):", "",
            "| model | seed | calibration | metric | mixed 4bit vs uniform4 |",
            "|---|---|---|---|---|"]
  lines += mixed_vs_uniform(rows) or ["| (no pairs yet) | | | | |"]
  lines += ["", "## Models and inputs", ""]
  for info in infos:
    if "skipped" in info:
      lines.append(f"- {info['model']} (seed {info.get('seed')}): skipped ({info['skipped']})")
      continue
    fm = ", ".join(f"{k} {v:.4f}" for k, v in info["float"].items())
    trained = info.get("trained") or {}
    extra = (f"; trained here in {trained.get('train_seconds')} s"
             if trained.get("train_seconds") is not None else "")
    default = _default_range_text(info)
    took = f"; {info['seconds'] / 60:.1f} min for its rows" if "seconds" in info else ""
    if "crashed" in info:
      took += f"; CRASHED: {info['crashed']}"
    seed = "" if info.get("seed") is None else f" seed {info['seed']}"
    lines.append(
        f"- **{info['model']}**{seed} ({info['params']} parameters, outputs "
        f"{', '.join(info['outputs'])}): {info['how']}. Test inputs: {info['n_test']} of "
        f"{info['n_test_all']} held out, in [{info['x_range'][0]:.4g}, "
        f"{info['x_range'][1]:.4g}]; calibration pool {info['n_cal']}; keras_mpq's default "
        f"input range {default}. Float: {fm}{extra}{took}.")
  lines += [
      "",
      "Calibrations: 'data-free' = `keras_mpq.quantize(model, budget)` with no data; 'real' = "
      f"`data=x_pool[:{args.n_cal}]` (real inputs of the training split, or the held-apart "
      "pool for the pretrained files); 'data-free, given range' = `input_range` = the inputs' "
      "documented range (only where it is not [0, 1]). Budgets: " + ", ".join(args.budgets)
      + "; 'uniform4' = `\"4bit\"` with `weight_bits=(4,)`; real only at "
      + ", ".join(args.real_budgets) + ". Metric cells: the headline metric (two_head: "
      "accuracy / box MAE; autoencoders: score correlation with float / error ratio "
      "rms(out - float out) / rms(float out - x); fingerprint: output correlation / relative "
      "error); 'c' = the file refused the inputs as outside its range and ran them clipped "
      f"into it. TFLM runs on the first {args.n_tflm} test inputs (its metric is on those, "
      "judged against float on those, and float's metric on them is shown beside it). "
      "'delta vs float' = LiteRT (else Keras-quantized) headline minus float. KB = file size.",
      "",
      "## All rows",
      "",
      "| " + " | ".join(COLUMNS) + " |",
      "|" + "---|" * len(COLUMNS),
  ]
  lines += [_row_md(r) for r in rows]
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def _child_main(args):
  """Runs one ``model:seed`` and appends JSON lines to ``--child-out``."""
  name, seed = args.child.split(":")
  seed = int(seed)
  out = open(args.child_out, "a")

  def emit(kind, payload):
    out.write(json.dumps({"kind": kind, "payload": payload}, default=_json_default) + "\n")
    out.flush()

  try:
    run_one(name, seed, args, emit)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    emit("crash", {"model": name, "seed": seed, "error": _short(e)})
  out.close()


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(any_data.ALL),
                      help="comma-separated, from " + ", ".join(any_data.ALL))
  parser.add_argument("--seeds", default="0,1", help="training seeds of the models trained here")
  parser.add_argument("--budgets", default=None,
                      help="comma-separated from 8bit, 4bit, 3.5bit (any 'N.Nbit'), uniform4 "
                      "(default all; --quick: 8bit)")
  parser.add_argument("--calibrations", default=None,
                      help="comma-separated from data-free, real, range (default all three; "
                      "--quick: data-free,real)")
  parser.add_argument("--real-budgets", default=",".join(REAL_BUDGETS),
                      help="budgets run with real calibration")
  parser.add_argument("--targets", default=",".join(TARGETS))
  parser.add_argument("--quick", action="store_true",
                      help="first seed only, budget 8bit, data-free and real, 200 test "
                      "inputs, 50 on TFLM")
  parser.add_argument("--n-test", type=int, default=None,
                      help="held-out inputs per model (default 1000; --quick 200)")
  parser.add_argument("--n-tflm", type=int, default=None,
                      help="of which TFLite Micro runs the first (default 300; --quick 50)")
  parser.add_argument("--n-cal", type=int, default=200, help="real calibration inputs")
  parser.add_argument("--seed", type=int, default=0, help="quantize's seed")
  parser.add_argument("--out", default=str(HERE / "results" / "any_models.md"))
  parser.add_argument("--timeout", type=float, default=3600.0,
                      help="seconds per model (and seed) child process")
  parser.add_argument("--in-process", action="store_true",
                      help="run every model in this process (debugging)")
  parser.add_argument("--verbose", action="store_true", help="print tracebacks")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
  args.models = [m for m in args.models.split(",") if m]
  for m in args.models:
    if m not in any_data.ALL:
      parser.error(f"unknown model {m!r}; expected one of {list(any_data.ALL)}")
  args.seeds = [int(s) for s in args.seeds.split(",") if s]
  if args.quick:
    args.seeds = args.seeds[:1]
  args.budgets = (args.budgets.split(",") if args.budgets
                  else (["8bit"] if args.quick else list(BUDGETS)))
  args.real_budgets = [b for b in args.real_budgets.split(",") if b]
  chosen = []
  if args.calibrations is None:
    args.calibrations = "data-free,real" if args.quick else "data-free,real,range"
  for c in (c for c in args.calibrations.split(",") if c):
    if c not in _CALIBRATION_KEYS:
      parser.error(f"unknown calibration {c!r}; expected one of {list(_CALIBRATION_KEYS)}")
    chosen.append(_CALIBRATION_KEYS[c])
  args.calibrations = [c for c in CALIBRATIONS if c in chosen]
  args.targets = [t for t in args.targets.split(",") if t]
  args.n_test = args.n_test or (200 if args.quick else 1000)
  args.n_tflm = min(args.n_tflm or (50 if args.quick else 300), args.n_test)
  return args


def _child_argv(args):
  """The parent's own options, minus --out, for a child."""
  skip = {"--out"}
  out, it = [], iter(args.argv)
  for a in it:
    key = a.split("=")[0]
    if key in skip:
      if "=" not in a:
        next(it, None)
      continue
    out.append(a)
  return out


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    _child_main(args)
    return
  started = datetime.datetime.now()
  rows, infos = [], []
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)

  def write(finished=None):
    out.write_text(markdown(rows, infos, args, started, finished))

  def take(kind, payload):
    if kind == "info":
      infos.append(payload)
    elif kind == "row":
      rows.append(payload)
    elif kind == "done":
      for i in infos:
        if i["model"] == payload["model"] and (i.get("seed") in (None, payload["seed"])):
          i["seconds"] = payload["seconds"]
    elif kind == "crash":
      known = [i for i in infos if i["model"] == payload["model"]
               and i.get("seed") in (None, payload["seed"])]
      if known:
        known[-1]["crashed"] = payload["error"]
      else:
        infos.append({"model": payload["model"], "seed": payload["seed"],
                      "skipped": "crashed: " + payload["error"]})

  jobs = [(m, s) for m in args.models
          for s in (args.seeds if m in any_data.TRAINED else [0])]
  for name, seed in jobs:
    print(f"== {name} seed {seed}", flush=True)
    if args.in_process:
      try:
        run_one(name, seed, args, take)
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        take("crash", {"model": name, "seed": seed, "error": _short(e)})
      write()
      continue
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as f:
      child_out = f.name
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), *_child_argv(args),
           "--child", f"{name}:{seed}", "--child-out", child_out]
    error = None
    try:
      proc = subprocess.run(cmd, timeout=args.timeout, check=False)
      if proc.returncode != 0:
        error = f"child process exited with {proc.returncode}"
    except subprocess.TimeoutExpired:
      error = f"child process timed out after {args.timeout:.0f} s"
    n_before = len(rows)
    lines = pathlib.Path(child_out).read_text().splitlines()
    os.unlink(child_out)
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      take(record["kind"], record["payload"])
    if error is not None:
      take("crash", {"model": name, "seed": seed, "error": error})
      if len(rows) == n_before:
        rows.append({"model": name, "seed": seed, "error / note": error, "pass": "FAIL"})
    write()
  finished = datetime.datetime.now()
  write(finished)
  print(out.read_text())
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
