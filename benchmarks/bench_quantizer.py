"""Weight quantizer ablation: round to nearest, + clipping, + bias correction, + GPTQ.

For each benchmark model (`bench_models`: two seeds of each MNIST CNN and the
stock MobileNetV2) and each budget, the same pipeline runs with the weight
quantizer switched step by step (`keras_mpq.quantization.optimize.optimize_weights`):

* ``rtn``: round to nearest on the per-channel max-abs grid (the old quantizer);
* ``+clip``: per-channel clipping search (`weight_quant.clip_search`);
* ``+bias``: clipping plus empirical bias correction;
* ``+gptq``: clipping, GPTQ rounding and bias correction;
* ``+adaround``: clipping, GPTQ, then AdaRound from GPTQ's integers, and bias
  correction;
* ``+tune``: ``+adaround``, then each layer's per-channel scales and bias tuned
  to the float model's outputs on the calibration data (`keras_mpq.quantization.distill`);
* ``gptq-nobias``: clipping and GPTQ rounding without bias correction;
* ``damped``: GPTQ on a strongly damped Hessian, no bias correction (the
  data-free default of `keras_mpq.quantize`, `apply.DATA_FREE_WEIGHT_METHOD`).
* ``damped+bias``: the damped GPTQ with bias correction.

Uniform budgets quantize every layer at 8/4/3/2 bits (`apply_plan`); mixed
budgets run `keras_mpq.quantize` at an average-bits budget with candidates
{2,3,4,8}, whose sensitivity table uses the same weight quantizer. Two data
sources: 256 real training images (labeled), or data-free (the library's
labeled synthesis, as many samples as data-free `quantize` makes: 1024 for the
MNIST CNNs, cached per model). Accuracy is measured in
LiteRT on the 2,000 held-out test images (the exported mobile .tflite,
`keras_mpq.validate_tflite`); times are wall-clock seconds in the same run.

    .venv/bin/python benchmarks/bench_quantizer.py                  # everything (hours)
    .venv/bin/python benchmarks/bench_quantizer.py --models separable_cnn \\
        --seeds 1 --uniform 4 --mixed 3 --data synthetic          # one row group
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np

import bench_models  # pylint: disable=wrong-import-position
import keras_mpq  # pylint: disable=wrong-import-position
from keras_mpq import recipe as recipe_lib  # pylint: disable=wrong-import-position
from keras_mpq.quantization import access as access_lib  # pylint: disable=wrong-import-position
from keras_mpq.quantization import apply as apply_lib  # pylint: disable=wrong-import-position
from keras_mpq.quantization import fold as fold_lib  # pylint: disable=wrong-import-position
from keras_mpq.synthesis import augment as augment_lib  # pylint: disable=wrong-import-position
from keras_mpq.plan import costs as costs_lib  # pylint: disable=wrong-import-position
from keras_mpq.quantization import distill as distill_lib  # pylint: disable=wrong-import-position
from keras_mpq.base import fileio as fileio_lib  # pylint: disable=wrong-import-position
from keras_mpq import report as report_lib  # pylint: disable=wrong-import-position
from keras_mpq.synthesis import generators as generators_lib  # pylint: disable=wrong-import-position
from keras_mpq.synthesis import losses as losses_lib  # pylint: disable=wrong-import-position

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE.parent / "bench_out" / "quantizer"
# (label, weight method, bias correction, tune_steps: 0 none, None the default)
STEPS = (("rtn", "rtn", False, 0), ("+clip", "mse", False, 0), ("+bias", "mse", True, 0),
         ("+gptq", "gptq", True, 0), ("+adaround", "adaround", True, 0),
         ("+tune", "adaround", True, None),
         # DFQ's analytic bias correction (BatchNorm statistics) in place of the empirical one
         ("rtn+dfq", "rtn", "analytic", 0), ("+clip+dfq", "mse", "analytic", 0),
         ("+adaround+dfq", "adaround", "analytic", 0),
         ("gptq-nobias", "gptq", False, 0),
         ("damped", "gptq-damped", False, 0), ("damped+bias", "gptq-damped", True, 0))
CANDIDATES = (2, 3, 4, 8)


def _accuracy_keras(model, x, y) -> float:
  return float(np.mean(np.argmax(model.predict(x, verbose=0, batch_size=500), -1) == y))


def _litert(baked, plan, calib, data, path) -> float:
  keras_mpq.export_tflite(baked, path, plan, target="mobile", calibration_data=calib)
  return float(keras_mpq.validate_tflite(path, data.x_test, data.y_test).accuracy)


def _synthetic(model, name, seed, n=None, avg_bits=None):
  """Labeled synthetic calibration data (the library's default generator), cached.

  ``n`` None: as many samples as data-free `keras_mpq.quantize` makes for the
  model at an ``avg_bits`` budget (`keras_mpq.recipe.default_calibration_sizes`: synthesized,
  then shifted copies), with the same seed, so the same data.
  """
  made_n = n
  if n is None:
    folded = fold_lib.fold_batchnorm(model)
    budget = None if avg_bits is None else keras_mpq.Budget.avg_bits(avg_bits)
    made_n, n = recipe_lib.default_calibration_sizes(costs_lib.cost_table(folded, bits=CANDIDATES),
                                              budget, tuple(folded.inputs[0].shape)[1:])
  # Keyed on the generator's source too: a change to synthesis makes new data.
  source = b"".join(pathlib.Path(m.__file__).read_bytes()
                    for m in (generators_lib, losses_lib, augment_lib))
  path = OUT / (f"synthetic-{name}-seed{seed}-{made_n}-{n}-"
                f"{hashlib.sha1(source).hexdigest()[:8]}.npz")
  if path.exists():
    z = np.load(path)
    return z["x"], z["y"], None
  t = time.perf_counter()
  made = keras_mpq.synthesize_with_info(model, num_samples=made_n, seed=0, progress=False)
  x, y = made.x, made.y
  if n > made_n:  # as data-free quantize does: shifted copies make up the rest
    x, index = augment_lib.shifted_copies(x, n, seed=0)
    y = y[index]
  took = time.perf_counter() - t
  fileio_lib.ensure_dir(OUT)
  np.savez(path, x=x, y=y)
  return x, y, took


def run_group(name, seed, source, uniform, mixed, steps, litert, log):
  model = bench_models.get(name, seed)
  data = bench_models.dataset_for(name)
  folded = fold_lib.fold_batchnorm(model)

  def calibration(avg_bits):
    if source == "real":
      return data.x_train[:256], data.y_train[:256]
    x, y, took = _synthetic(model, name, seed, avg_bits=avg_bits)
    if took is not None:
      log(f"synthesis {name} seed {seed}, {len(x)} samples: {took:.0f}s")
    return x, y

  float_acc = _accuracy_keras(folded, data.x_test, data.y_test)
  free = source == "synthetic"
  temperature = distill_lib.DATA_FREE_TEMPERATURE if free else 1.0
  rows = []
  tag = f"{name}-s{seed}-{source}"
  for bits in uniform:
    plan = keras_mpq.QuantizationPlan.uniform(access_lib.plan_layers(folded), bits)
    x, y = calibration(bits)
    base_time = None
    for label, method, bc, tune in steps:
      t = time.perf_counter()
      q = apply_lib.apply_plan(folded, plan, x, fold_bn=False, weight_method=method,
                           bias_correction=bc, tune_steps=tune, tune_temperature=temperature)
      took = time.perf_counter() - t
      base_time = took if label == "rtn" else base_time
      row = {"model": name, "seed": seed, "data": source, "budget": f"uniform {bits}",
             "step": label, "float": float_acc, "keras": _accuracy_keras(q, data.x_test,
                                                                          data.y_test),
             "seconds": took, "x_rtn": took / base_time if base_time else None}
      if litert:
        row["litert"] = _litert(access_lib.bake(q), plan, x, data,
                                OUT / f"{tag}-u{bits}-{method}-{bc}.tflite")
      rows.append(row)
      log(json.dumps(row))
  for avg in mixed:
    x, y = calibration(avg)
    base_time = None
    for label, method, bc, tune in steps:
      t = time.perf_counter()
      # Data-free rows run quantize data-free (its synthesis cached across steps).
      result = keras_mpq.quantize(model, keras_mpq.Budget.avg_bits(avg),
                                  data=None if free else (x, y), weight_bits=CANDIDATES,
                                  seed=0, progress=False, weight_method=method,
                                  bias_correction=bc, tune_steps=tune,
                                  cache_dir=OUT / f"cache-{tag}" if free else None)
      took = time.perf_counter() - t
      base_time = took if label == "rtn" else base_time
      timings = result.report["timings_s"]
      row = {"model": name, "seed": seed, "data": source, "budget": f"mixed {avg}",
             "step": label, "float": float_acc,
             "keras": _accuracy_keras(result.model, data.x_test, data.y_test),
             "seconds": took, "x_rtn": took / base_time if base_time else None,
             "sens_s": timings.get("sensitivity+allocation"), "apply_s": timings.get("apply"),
             "plan": "".join(str(b) if b < 10 else "f" for b in result.plan.weight_bits.values())}
      if litert:
        row["litert"] = _litert(access_lib.bake(result.model), result.plan,
                                result.calibration_data, data,
                                OUT / f"{tag}-m{avg}-{method}-{bc}.tflite")
      rows.append(row)
      log(json.dumps(row))
  return rows


def run_mct(name, seed, source, mixed, log):
  """Sony MCT's mixed precision on the same model and calibration data (its own venv).

  MCT (`benchmarks/peer_mct.py`: TensorFlow 2.15, its default PTQ plus mixed
  precision at the same average kernel bits) gets the unfolded model and the
  same calibration images as keras_mpq; its accuracy is its fake-quant
  Keras model's on the same test images (MCT's file export is not run).
  """
  import peer_mct  # pylint: disable=g-import-not-at-top
  model = bench_models.get(name, seed)
  data = bench_models.dataset_for(name)
  if source == "real":
    x = data.x_train[:256]
  else:
    x = _synthetic(model, name, seed, avg_bits=min(mixed))[0]
  float_acc = _accuracy_keras(model, data.x_test, data.y_test)
  t = time.perf_counter()
  found, meta = peer_mct.run_peer(model, x, data.x_test, data.y_test, list(mixed),
                                  OUT / f"mct-{name}-s{seed}-{source}", kind="avg_bits",
                                  seed=0, return_meta=True, export=True)
  took = time.perf_counter() - t
  rows = []
  for avg, r in zip(mixed, found):
    row = {"model": name, "seed": seed, "data": source, "budget": f"mixed {avg:g}",
           "step": f"MCT {meta.get('mct_version', '?')}", "float": float_acc,
           "keras": None if r.get("error") else r["accuracy"],
           "seconds": r.get("seconds") or took / len(found), "x_rtn": None,
           "plan": "".join(str(b) for b in (r.get("bits") or {}).values()),
           "mct_avg_bits": r.get("avg_bits"), "error": r.get("error")}
    if r.get("tflite_path"):  # MCT's own INT8 file, run in LiteRT on the same test images
      try:
        row["litert"] = float(keras_mpq.validate_tflite(r["tflite_path"], data.x_test,
                                                        data.y_test).accuracy)
        row["mct_tflite_kb"] = r.get("tflite_bytes", 0) / 1024
      except Exception as e:  # pylint: disable=broad-except  # reported in the row
        row["litert_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    elif r.get("tflite_error"):
      row["litert_error"] = r["tflite_error"]
    rows.append(row)
    log(json.dumps(row))
  return rows


def _fmt(rows):
  def pct(v):
    return "" if v is None else f"{100 * v:.1f}"
  out = []
  for r in rows:
    out.append({"model": f"{r['model']} s{r['seed']}", "data": r["data"], "budget": r["budget"],
                "step": r["step"], "float": pct(r["float"]), "keras": pct(r["keras"]),
                "litert": pct(r.get("litert")),
                "drop": "" if r.get("litert") is None else f"{100 * (r['float'] - r['litert']):.1f}",
                "time": f"{r['seconds']:.1f}",
                "x_rtn": "" if r["x_rtn"] is None else f"{r['x_rtn']:.2f}",
                "plan": r.get("plan", "")})
  return out


def side_by_side(rows, ours="+tune"):
  """keras_mpq (step ``ours``, LiteRT) beside MCT (its Keras model) per mixed budget.

  One line per (model, seed, data); a cell is ``ours / MCT / MCT file`` in
  percent (MCT's fake-quant Keras model, then its own INT8 .tflite in LiteRT,
  ``fails`` where LiteRT refused it), ``-`` where a row or value is missing.
  Returns '' when there are no MCT rows.
  """
  mct = {(r["model"], r["seed"], r["data"], r["budget"]): r for r in rows
         if r["step"].startswith("MCT") and r.get("keras") is not None}
  if not mct:
    return ""
  mine = {(r["model"], r["seed"], r["data"], r["budget"]): r for r in rows
          if r["step"] == ours and r["budget"].startswith("mixed")}
  budgets = sorted({k[3] for k in mct}, key=lambda b: -float(b.split()[1]))
  groups = sorted({k[:3] for k in mct})
  out = []
  for g in groups:
    line = {"model": f"{g[0]} s{g[1]}", "data": g[2],
            "float": f"{100 * next(r['float'] for k, r in mct.items() if k[:3] == g):.1f}"}
    for b in budgets:
      ours_row = mine.get(g + (b,)) or mine.get(g + (f"mixed {float(b.split()[1])}",))
      peer = mct.get(g + (b,))
      ours_v = None if ours_row is None else ours_row.get("litert", ours_row.get("keras"))
      cells = ["-" if v is None else f"{100 * v:.1f}"
               for v in (ours_v, None if peer is None else peer["keras"],
                         None if peer is None else peer.get("litert"))]
      if peer is not None and peer.get("litert_error"):
        cells[2] = "fails"  # MCT's file did not load or run in LiteRT
      line[b] = " / ".join(cells)
    out.append(line)
  return report_lib.format_table(out, ["model", "data", "float"] + budgets,
                             ["model", "data", "float %"] +
                             [f"{b.split()[1]} bits: ours / MCT / MCT file %"
                              for b in budgets])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", nargs="+", default=list(bench_models.NAMES))
  parser.add_argument("--seeds", nargs="+", type=int, default=list(bench_models.SEEDS))
  parser.add_argument("--data", nargs="+", default=["synthetic", "real"],
                      choices=["synthetic", "real"])
  parser.add_argument("--uniform", nargs="*", type=int, default=[8, 4, 3, 2])
  parser.add_argument("--mixed", nargs="*", type=float, default=[4, 3, 2.5, 2])
  parser.add_argument("--steps", nargs="*", default=[s[0] for s in STEPS],
                      help="keras_mpq weight-quantizer steps (none: only --mct)")
  parser.add_argument("--mct", action="store_true",
                      help="also run Sony MCT at the --mixed budgets (benchmarks/peer_mct)")
  parser.add_argument("--no-litert", action="store_true")
  parser.add_argument("--jsonl", default=str(OUT / "rows.jsonl"),
                      help="rows appended as they are measured")
  parser.add_argument("--out", default=str(HERE / "results" / "quantizer.md"))
  parser.add_argument("--title", default="Weight quantizer: round to nearest, clipping, bias "
                      "correction, GPTQ, AdaRound, scale tuning", help="the section's heading")
  parser.add_argument("--assemble", nargs="*", default=None, metavar="JSONL",
                      help="write the table from rows saved by earlier runs (no new runs)")
  parser.add_argument("--commands", nargs="*", default=(),
                      help="with --assemble: the commands that produced the rows")
  args = parser.parse_args()
  steps = [s for s in STEPS if s[0] in args.steps]
  start = time.perf_counter()
  fileio_lib.ensure_dir(OUT)
  rows = []
  if args.assemble is not None:
    for path in args.assemble:
      with open(path) as f:
        rows += [json.loads(line) for line in f if line.strip()]
    cmd = "; ".join(args.commands) or "(assembled)"
  else:
    jsonl = open(args.jsonl, "a")  # pylint: disable=consider-using-with

    def log(line):
      print(line, flush=True)
      if line.startswith("{"):
        jsonl.write(line + "\n")
        jsonl.flush()

    for name in args.models:
      seeds = [1] if name == "mobilenet_v2" else args.seeds
      for seed in seeds:
        for source in args.data:
          if steps:
            rows += run_group(name, seed, source, args.uniform, args.mixed, steps,
                              not args.no_litert, log)
          if args.mct and args.mixed:
            rows += run_mct(name, seed, source, args.mixed, log)
    jsonl.close()
    cmd = ".venv/bin/python benchmarks/bench_quantizer.py " + " ".join(sys.argv[1:])
  table = report_lib.format_table(
      _fmt(rows), ["model", "data", "budget", "step", "float", "keras", "litert", "drop",
                   "time", "x_rtn", "plan"],
      ["model", "data", "budget", "weights", "float %", "Keras %", "LiteRT %",
       "drop (pts)", "time (s)", "x rtn time", "plan"])
  text = "\n".join([
      f"## {args.title}", "",
      f"- Command: `{cmd.strip()}`",
      f"- Date: {datetime.datetime.now():%Y-%m-%d %H:%M}; machine: {platform.machine()}, "
      f"{os.cpu_count()} cores shared with other jobs, CPU only"
      + ("" if args.assemble is not None else f"; took {time.perf_counter() - start:.0f}s, "
         f"load average {os.getloadavg()[0]:.1f} at the end"),
      "- Models: benchmarks/bench_models.py (MNIST CNNs seeds 1, 2; stock MobileNetV2 "
      "alpha 0.35 on 32x32x3 MNIST). Test: the 2,000 held-out MNIST images.",
      "- Data: 'real' = first 256 training images with labels; 'synthetic' = the "
      "library's labeled synthesis, as many samples as data-free `quantize` makes "
      "(`keras_mpq.recipe.default_calibration_sizes`: for the MNIST CNNs, at budgets that force "
      "layers below 3 bits, 256 synthesized and 768 shifted copies, `keras_mpq.synthesis.augment`; "
      "else 256; the search measures on the 256 synthesized), "
      "tuned at `distill.DATA_FREE_TEMPERATURE`; mixed synthetic rows run `quantize` "
      "data-free, its synthesis cached across steps (time excludes it). Activations 8-bit.",
      "- '+dfq' steps: the analytic bias correction from BatchNorm statistics "
      "(`bias_correction='analytic'`, `keras_mpq.quantization.analytic_bias`, DFQ) in place of the "
      "empirical one, for layers whose input follows a BatchNorm (empirical for the others).",
      "- '+tune': '+adaround', then `keras_mpq.quantization.distill.tune` (per-channel scales and biases "
      "fitted to the float model's outputs, integers kept). Uniform '+tune' rows tune at "
      "every bit-width, to show where it pays; `quantize` data-free tunes only where the "
      "budget forces layers below 3 bits (so its mixed 4 and 3 '+tune' rows equal "
      "'+adaround'), and always with real data.",
      "- Uniform rows: `apply_plan` (time = apply). Mixed rows: `keras_mpq.quantize` with "
      "`Budget.avg_bits`, candidates {2,3,4,8}, the sensitivity table measured with the "
      "same weight quantizer (time = whole call). 'x rtn time' = time / the rtn row's.",
      "- LiteRT %: the exported mobile .tflite run by ai-edge-litert; the export reads "
      "the weight integers back and checks them against the Keras model's.", "",
      "```", table, "```", ""])
  peer = side_by_side(rows)
  if peer:
    text += "\n".join([
        "", "### Beside Sony MCT at the same average bits", "",
        "- keras_mpq: `quantize` at `Budget.avg_bits`, candidates {2,3,4,8}, its default "
        "weight quantizer (AdaRound on GPTQ at 2-3 bits, GPTQ above, bias correction) "
        "and scale tuning (the '+tune' rows), accuracy of the exported file in LiteRT.",
        "- MCT 2.6.1 (TensorFlow 2.15, `benchmarks/peer_mct.py`): its default PTQ and mixed "
        "precision at the same average kernel bits, on the same model and the same "
        "calibration images (real, or keras_mpq's synthetic ones: MCT has no data-free "
        "mode); accuracy of its fake-quant Keras model on the same test images, and of "
        "its own INT8 .tflite (MCT's exporter) run in LiteRT ('MCT file'; 'fails': "
        "LiteRT refused to load it, e.g. `conv.cc:390 affine_quantization->zero_point "
        "!= 0` where MCT gave a layer 2 bits; '-': not measured).", "",
        "```", peer, "```", ""])
  fileio_lib.write_text(args.out, text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
