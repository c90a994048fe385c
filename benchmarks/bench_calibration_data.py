"""Issue 12: which calibration data stands in for real data, judged by what calibration on it achieves.

For each benchmark model copy (benchmarks/bench_models.py: the two MNIST CNNs
with BatchNorm, a BN-free MNIST CNN, two seeds each) and each data source
(labeled synthesis as it is now, the first labeled synthesis, ZeroQ where the
model has BatchNorm, Gaussian noise, 256 real training images):

- synthesis time for 256 samples (all in one run, so the times compare);
- realism against real data: per-layer activation range ratios, synthetic
  over real (median, min, max over layers; 1.0 is real data's own);
- uniform 8-bit accuracy of the exported mobile .tflite in LiteRT, and
  uniform 4-bit accuracy of the fake-quant Keras model, both calibrated on
  that source only, on the 2,000 test images.

    .venv/bin/python benchmarks/bench_calibration_data.py [--models plain_cnn,nobn_cnn] [--seeds 1,2]
"""

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

import bench_models
import keras_mpq
from keras_mpq.quantization import access as access_lib
from keras_mpq.quantization import apply as apply_lib
from keras_mpq.quantization import fold as fold_lib
from keras_mpq.base import fileio as fileio_lib
from keras_mpq.synthesis import realism as realism_lib
from keras_mpq import report as report_lib
from keras_mpq.synthesis import generators as generators_lib

HERE = pathlib.Path(__file__).resolve().parent
OLD_LABELED = dict(objective="stop", confidence_range=(0.5, 0.95), jitter=0, bn_weight=0,
                   max_steps=500)
# The generator before this round's defaults (BN weight 1, step size 0.01).
PREVIOUS_LABELED = {"bn_weight": 1.0, "learning_rate": 0.01}
SOURCES = ("labeled", "labeled (bn 1 lr 0.01)", "labeled (old)", "zeroq", "noise", "real")
POLICIES = ("minmax", "percentile", "mse")


CACHE = HERE.parent / "bench_out" / "calibration_data"


def _calibration(model, source, data, seed, key):
  """(x, seconds) for one data source, or None where it does not apply.

  Synthetic sets are cached in bench_out/calibration_data with the seconds
  they took, so a rerun of the tables does not repeat the synthesis.
  """
  path = CACHE / f"{key}-{source.replace(' ', '_').replace('(', '').replace(')', '')}.npz"
  if source != "real" and path.exists():
    hit = np.load(path)
    return hit["x"], float(hit["seconds"])
  made = _synthesize(model, source, data, seed)
  if made is not None and source != "real":
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=made[0], seconds=made[1])
  return made


def _synthesize(model, source, data, seed):
  start = time.perf_counter()
  if source == "real":
    return data.x_train[:256], 0.0
  if source == "zeroq" and not generators_lib.losses.batchnorm_layers(model):
    return None
  kwargs = {"labeled (old)": OLD_LABELED,
            "labeled (bn 1 lr 0.01)": PREVIOUS_LABELED}.get(source, {})
  method = "labeled" if source.startswith("labeled") else source
  made = generators_lib.synthesize_with_info(model, num_samples=256, method=method, seed=seed,
                                        progress=False, **kwargs)
  return made.x, time.perf_counter() - start


def _accuracy(qmodel, data):
  return float(np.mean(qmodel.predict(data.x_test, verbose=0, batch_size=500).argmax(-1)
                       == data.y_test))


def run_model(name, seed, tmp, sources=SOURCES):
  model = bench_models.get(name, seed)
  data = bench_models.dataset_for(name)
  folded = fold_lib.fold_batchnorm(model)
  layers = access_lib.plan_layers(folded)
  real_stats = realism_lib.activation_statistics(folded, data.x_train[:256])
  rows = []
  for source in sources:
    made = _calibration(model, source, data, 0, f"{name}-seed{seed}")
    if made is None:
      continue
    x, seconds = made
    ratios = realism_lib.compare_statistics(realism_lib.activation_statistics(folded, x),
                                        real_stats)["summary"]
    plan8 = keras_mpq.QuantizationPlan.uniform(layers, 8)
    lite = {}
    for policy in POLICIES:
      q8 = apply_lib.apply_plan(folded, plan8, x, fold_bn=False, range_policy=policy)
      path = os.path.join(tmp, f"{name}-{seed}-{source.replace(' ', '_')}-{policy}.tflite")
      keras_mpq.export_tflite(access_lib.bake(q8), path, plan8, target="mobile", calibration_data=x,
                              range_policy=policy)
      lite[policy] = keras_mpq.validate_tflite(path, data.x_test, data.y_test).accuracy

    def low_bit(bits, method, correct):
      q = apply_lib.apply_plan(folded, keras_mpq.QuantizationPlan.uniform(layers, bits), x,
                           fold_bn=False, weight_method=method, bias_correction=correct)
      return _accuracy(q, data)

    rows.append({"model": f"{name} s{seed}", "source": source,
                 "seconds": round(seconds, 1),
                 "ratio_med": ratios.get("range_ratio_median"),
                 "ratio_min": ratios.get("range_ratio_min"),
                 "ratio_max": ratios.get("range_ratio_max"),
                 "float": bench_models.float_accuracy(model, data),
                 "lite8": lite["minmax"], "lite8_pct": lite["percentile"],
                 "lite8_mse": lite["mse"],
                 "k4_rtn": low_bit(4, "rtn", False), "k4_bc": low_bit(4, "rtn", True),
                 "k3": low_bit(3, "gptq", True)})
    rows[-1]["gap8"] = rows[-1]["lite8"] - rows[-1]["float"]
    rows[-1]["load"] = round(os.getloadavg()[0], 1)
    print(rows[-1], flush=True)
  return rows


ROWS = CACHE / "rows.jsonl"


def _cached_rows():
  if not ROWS.exists():
    return {}
  rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
  return {(r["model"], r["source"]): r for r in rows}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="plain_cnn,separable_cnn,nobn_cnn,mobilenet_v2")
  parser.add_argument("--seeds", default="1,2")
  parser.add_argument("--sources", default=",".join(SOURCES))
  parser.add_argument("--out", default=str(HERE / "results" / "calibration_data.md"))
  parser.add_argument("--fresh", action="store_true",
                      help="ignore the rows and synthetic sets cached in bench_out/")
  parser.add_argument("--cached", action="store_true",
                      help="only render the cached rows of these models, seeds and sources "
                           "(measure nothing)")
  args = parser.parse_args()
  start = time.perf_counter()
  if args.fresh and CACHE.exists():
    shutil.rmtree(CACHE)
  done = _cached_rows()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    # Seed-major, so that an interrupted run has every model at least once.
    for seed in (int(s) for s in args.seeds.split(",")):
      for name in args.models.split(","):
        for source in args.sources.split(","):
          key = (f"{name} s{seed}", source)
          if key not in done and not args.cached:
            for r in run_model(name, seed, tmp, [source]):
              CACHE.mkdir(parents=True, exist_ok=True)
              with open(ROWS, "a") as f:
                f.write(json.dumps(r) + "\n")
              done[key] = r
          if key in done:
            rows.append(done[key])
            render(rows, args, start)
  return 0


def _loads(rows):
  loads = [r["load"] for r in rows if "load" in r]
  if not loads:
    return "load average not recorded"
  return (f"1-minute load average {min(loads):.1f} to {max(loads):.1f} on "
          f"{os.cpu_count()} cores as the rows were measured"
          + ("" if len(loads) == len(rows) else f", unrecorded for {len(rows) - len(loads)} "
             "older rows"))


def render(rows, args, start):
  """Writes the results file for the rows measured so far."""
  data = bench_models.dataset_for("plain_cnn")
  cols = ["model", "source", "seconds", "ratio_med", "ratio_min", "ratio_max", "float",
          "lite8", "gap8", "lite8_pct", "lite8_mse", "k4_rtn", "k4_bc", "k3"]
  heads = ["model", "data", "synth s", "range ratio med", "min", "max", "float acc",
           "8b LiteRT", "8b - float", "8b pct", "8b mse", "4b rtn", "4b rtn+bc",
           "3b gptq+bc"]
  verdicts = []
  for model_name in dict.fromkeys(r["model"] for r in rows):
    mine = {r["source"]: r for r in rows if r["model"] == model_name}
    if "labeled" not in mine or "real" not in mine or len(mine) < 3:
      continue
    new = mine["labeled"]
    free = [s for s in ("labeled (bn 1 lr 0.01)", "labeled (old)", "zeroq", "noise")
            if s in mine]
    best_other = max(free, key=lambda s: mine[s]["lite8"])
    for col, what in (("k4_bc", "4-bit rtn + bias correction"), ("k3", "3-bit gptq+bc")):
      rival = max(free, key=lambda s: mine[s][col])
      gap = new[col] - mine[rival][col]
      noise = 2 * math.sqrt(max(mine[rival][col] * (1 - mine[rival][col]), 1e-12) / len(data.y_test))
      verdict = ("labeled best" if gap >= 0 else
                 f"labeled NOT best, {100 * gap:+.2f} points, within 2 standard errors"
                 if -gap <= noise else f"labeled NOT best, {100 * gap:+.2f} points")
      verdicts.append(
          f"- {model_name}, {what}: labeled {new[col]:.4f}, best other data-free {rival} "
          f"{mine[rival][col]:.4f} ({verdict}), real {mine['real'][col]:.4f}.")
    verdicts.append(
        f"- {model_name}: labeled 8-bit {new['lite8']:.4f} vs float {new['float']:.4f} "
        f"({'within' if new['gap8'] >= -0.002 else 'NOT within'} 0.2 points); best other "
        f"data-free source {best_other} {mine[best_other]['lite8']:.4f}; real "
        f"{mine['real']['lite8']:.4f}; synthesis {new['seconds']:.0f}s"
        + "".join(f", {mine[s]['seconds']:.0f}s for {s}" for s in ("labeled (bn 1 lr 0.01)",
                                                               "labeled (old)") if s in mine)
        + " (times compare only between rows measured at one load).")
  groups = (("labeled", [r for r in rows if r["source"] == "labeled"]),
            ("all synthetic but noise", [r for r in rows if r["source"] not in ("real", "noise")]),
            ("real", [r for r in rows if r["source"] == "real"]))
  policy_lines = ["", "Activation range policy: 8-bit LiteRT accuracy minus float, mean over "
                  "rows (" + ", ".join(f"{g}: {len(rs)} rows" for g, rs in groups) + "):", ""]
  for col, policy in (("lite8", "minmax"), ("lite8_pct", "percentile"), ("lite8_mse", "mse")):
    policy_lines.append(f"- {policy}: " + "; ".join(
        f"{g} {100 * np.mean([r[col] - r['float'] for r in rs]):+.2f} points"
        for g, rs in groups if rs))
  text = "\n".join([
      "## Calibration data: synthetic sources against real data (issue 12)", "",
      "- Command: `.venv/bin/python benchmarks/bench_calibration_data.py "
      f"--models {args.models} --seeds {args.seeds}" + (
          "" if args.sources == ",".join(SOURCES) else f" --sources '{args.sources}'")
      + (" --cached` (rendered from rows measured by earlier invocations, cached in "
         "bench_out/calibration_data/rows.jsonl)" if args.cached else "`"),
      f"- Date: {datetime.datetime.now():%Y-%m-%d %H:%M}; machine: {platform.machine()}, "
      f"{os.cpu_count()} cores, CPU only, shared with other jobs ({_loads(rows)}: "
      "times are inflated by the load, compare them only within one load); this "
      f"invocation took {time.perf_counter() - start:.0f}s (rows are cached in "
      "bench_out/calibration_data, so a rerun completes an interrupted table)",
      f"- Data: {data.split}. Models from benchmarks/bench_models.py (seeds as listed; "
      "nobn_cnn has no BatchNorm). 256 calibration samples per source, seed 0. "
      "'labeled (old)': the first generator (cross-entropy, each sample stopped at a "
      "target in [0.5, 0.95], no BN term, no jitter). Range ratio: per quantized layer, "
      "(max - min) of its output on the source over the same on 256 real images. "
      f"{len(rows)} rows. 8b: uniform w8a8 exported for mobile, accuracy in LiteRT, activation ranges by "
      "min/max (8b pct, 8b mse: the percentile and MSE range policies of "
      "keras_mpq.base.act_ranges, in the Keras model and the file alike). 4b/3b: uniform "
      "weights, fake-quant Keras model (which quantizes as the file does): round to "
      "nearest (rtn), + per-channel empirical bias correction (bc), or GPTQ + bc (the "
      "quantizer with real data; 3-bit only). 'labeled': the generator's defaults "
      "(BN weight 100, step size 0.1, 150 steps). 'labeled (bn 1 lr 0.01)': the same "
      "generator with the previous defaults (BN weight 1, step size 0.01). The binomial standard error on 2,000 images near 97% accuracy is "
      "0.38 points.", "",
      "```", report_lib.format_table(rows, cols, heads), "```", "", "Verdicts (computed from "
      "the table):", ""] + verdicts + policy_lines + [""])
  fileio_lib.write_text(args.out, text)


if __name__ == "__main__":
  sys.exit(main())
