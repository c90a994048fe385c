"""Time and peak memory of each stage, for a small CNN and two keras.applications models.

Stages: synthesis, sensitivity + allocation, apply (tfmot + calibration),
export (mobile .tflite through ai-edge-quantizer), validate (LiteRT). Each
model runs in its own subprocess so its peak resident memory (from the OS,
``getrusage``) is its own; the peak is reported after each stage (it only
grows). MobileNetV2 and ResNet50 are built with ``weights=None`` (their
weights cannot be downloaded here), so they time the pipeline, not accuracy;
untrained, their synthetic samples never reach their target confidence and
run every step, so their synthesis time is a worst case at the step count shown.

    .venv/bin/python benchmarks/bench_stages.py [--quick]
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results" / "stages.md"


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


STAGES = ("synthesis", "sensitivity+allocation", "apply", "export", "validate")


def worker(name: str, samples: int, steps: int, emit=print) -> dict:
  """Runs the pipeline on ``name`` stage by stage; ``emit``s the row (JSON) after each."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import keras_mpq  # pylint: disable=g-import-not-at-top
  from keras_mpq import demo_data as demo_data_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq import model_zoo as model_zoo_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.base import layers as layers_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.compat import keras  # pylint: disable=g-import-not-at-top
  row = {"model": name, "samples": samples, "synthesis_steps": steps, "done": []}

  def done(stage):
    row["done"].append(stage)
    emit(json.dumps(row))

  if name in model_zoo_lib.BUILDERS:
    data = demo_data_lib.load_default()
    model = model_zoo_lib.build_and_train(name, data, seed=0)
    x_eval, y_eval = data.x_test[:500], data.y_test[:500]
  else:
    build = {"MobileNetV2": lambda: keras.applications.MobileNetV2(
                 alpha=0.35, input_shape=(96, 96, 3), weights=None, classes=10),
             "ResNet50": lambda: keras.applications.ResNet50(
                 input_shape=(96, 96, 3), weights=None, classes=10)}[name]
    keras.utils.set_random_seed(0)
    model = build()
    rng = np.random.default_rng(0)
    x_eval = rng.random((64, 96, 96, 3), dtype=np.float32)
    y_eval = rng.integers(0, 10, 64)
  row["params"] = int(model.count_params())
  row["weight_layers"] = len(layers_lib.quantizable_layers(model))
  row["peak_mb_model"] = _peak_mb()
  emit(json.dumps(row))

  t = time.perf_counter()
  x, y = keras_mpq.synthesize(model, num_samples=samples, max_steps=steps, seed=0,
                              progress=False)
  row["synthesis_s"] = time.perf_counter() - t
  row["peak_mb_synthesis"] = _peak_mb()
  done("synthesis")

  result = keras_mpq.quantize(model, "4bit", data=(x, y), seed=0, progress=False)
  row["sensitivity_allocation_s"] = result.report["timings_s"]["sensitivity+allocation"]
  row["apply_s"] = result.report["timings_s"]["apply"]
  row["evaluations"] = result.sensitivity.info.get("evaluations")
  row["peak_mb_quantize"] = _peak_mb()
  done("sensitivity+allocation")
  done("apply")

  path = pathlib.Path("bench_out") / "stages" / f"{name}_{samples}.tflite"
  path.parent.mkdir(parents=True, exist_ok=True)
  t = time.perf_counter()
  exported = result.export(path, target="mobile")
  row["export_s"] = time.perf_counter() - t
  row["tflite_bytes"] = exported.size
  row["peak_mb_export"] = _peak_mb()
  done("export")

  t = time.perf_counter()
  checked = keras_mpq.validate_tflite(path, x_eval, y_eval)
  row["validate_s"] = time.perf_counter() - t
  row["validate_n"] = len(x_eval)
  row["tflite_acc"] = checked.accuracy
  row["peak_mb"] = _peak_mb()
  done("validate")
  return row


def run_worker(name, samples, steps, timeout=1200) -> dict:
  """Runs `worker` in a fresh process (its own peak memory); keeps the stages that finished.

  On a failure the row keeps the timings of the finished stages, names the
  stage that failed with the exception's last line, and the whole output is
  kept in ``bench_out/stages/<model>_<samples>.log``.
  """
  log = pathlib.Path("bench_out") / "stages" / f"{name}_{samples}.log"
  log.parent.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, __file__, "--worker", name, "--samples", str(samples),
         "--steps", str(steps)]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
  except subprocess.TimeoutExpired as e:
    code = "timeout"
    stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    stderr = (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")) + (
        f"\nTimeoutExpired: no result within {timeout} s")
  log.write_text(stdout + "\n" + stderr)
  lines = [l for l in stdout.splitlines() if l.startswith("{")]
  row = json.loads(lines[-1]) if lines else {"model": name, "samples": samples, "done": []}
  if code != 0 or row.get("done", [])[-1:] != ["validate"]:
    finished = row.get("done", [])
    failed = next((st for st in STAGES if st not in finished), "?")
    message = [l for l in stderr.strip().splitlines() if l.strip()]
    row["error"] = (f"{failed} failed (exit {code}): "
                    f"{message[-1].strip()[:300] if message else 'no output'} (log: {log})")
  return row


def scaling_notes(rows) -> list:
  """Sentences on how stage times grow with samples (plain_cnn) and with layers."""
  ok = [r for r in rows if r.get("synthesis_s") is not None]
  notes = []
  cnn = sorted((r for r in ok if r["model"] == "plain_cnn"), key=lambda r: r["samples"])
  if len(cnn) >= 2:
    a, b = cnn[0], cnn[-1]
    k = b["samples"] / a["samples"]
    parts = []
    for key, label in (("synthesis_s", "synthesis"),
                       ("sensitivity_allocation_s", "sensitivity+allocation"),
                       ("apply_s", "apply")):
      if a.get(key) and b.get(key) is not None:  # both measured, first one non-zero
        parts.append(f"{label} {a[key]:.1f} s -> {b[key]:.1f} s (x{b[key] / a[key]:.1f})")
    notes.append(f"- Samples: plain_cnn from {a['samples']} to {b['samples']} samples "
                 f"(x{k:g}): " + ", ".join(parts) + ".")
  per_layer = []
  for r in ok:
    if r.get("weight_layers") and r.get("sensitivity_allocation_s") is not None:
      per_layer.append(
          f"{r['model']} ({r['weight_layers']} weight layers, {r['samples']} samples): "
          f"{r['sensitivity_allocation_s'] / r['weight_layers']:.2f} s per layer"
          + (f", {r['sensitivity_allocation_s'] / r['evaluations']:.3f} s per evaluation"
             if r.get("evaluations") else ""))
  if per_layer:
    notes.append("- Layers: sensitivity+allocation runs about one pass over the "
                 "calibration set per (layer, candidate bits other than the context's) "
                 "pair (the evals column), so on large models it grows with layers x "
                 "samples x the cost of one forward pass; on the 5-layer CNN fixed costs "
                 "(tracing, calibration) dominate and samples barely matter: "
                 + "; ".join(per_layer) + ".")
  return notes


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--worker")
  parser.add_argument("--samples", type=int, default=256)
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args()
  if args.worker:
    worker(args.worker, args.samples, args.steps, emit=lambda line: print(line, flush=True))
    return 0
  start = time.perf_counter()
  jobs = [("plain_cnn", 64, 500), ("plain_cnn", 256, 500)]
  if not args.quick:
    jobs = [("plain_cnn", 64, 500), ("plain_cnn", 128, 500), ("plain_cnn", 256, 500),
            ("MobileNetV2", 64, 20), ("ResNet50", 32, 10)]
  rows = []
  for job in jobs:
    row = run_worker(*job)
    print(row, flush=True)
    rows.append(row)
  from keras_mpq.base import fileio as fileio_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq import report as report_lib  # pylint: disable=g-import-not-at-top
  cols = ["model", "weight_layers", "params", "samples", "synthesis_steps", "synthesis_s",
          "sensitivity_allocation_s", "evaluations", "apply_s", "export_s", "validate_s",
          "tflite_bytes", "peak_mb_synthesis", "peak_mb_quantize", "peak_mb_export", "peak_mb"]
  heads = ["model", "weight layers", "params", "samples", "synth steps", "synthesis s",
           "sensitivity+alloc s", "evals", "apply s", "export s", "validate s",
           ".tflite B", "peak MB synth", "peak MB quantize", "peak MB export", "peak MB"]
  for r in rows:
    for k in cols:
      if isinstance(r.get(k), float):
        r[k] = round(r[k], 2)
  failures = [r for r in rows if "error" in r]
  text = "\n".join([
      "## Time and memory per stage", "",
      f"- Command: `.venv/bin/python benchmarks/bench_stages.py{' --quick' if args.quick else ''}`",
      f"- Date: {datetime.datetime.now():%Y-%m-%d %H:%M}; machine: {platform.machine()}, "
      f"{os.cpu_count()} cores, CPU only, shared; took {time.perf_counter() - start:.0f}s",
      "- Budget 4-bit average, candidates {2, 4, 8}, one round. plain_cnn: trained on the "
      "MNIST split (first 8000), validated on 500 test images. MobileNetV2 (alpha 0.35) and "
      "ResNet50 at 96x96x3, weights=None (timing only), validated on 64 random inputs; "
      "untrained, their synthetic samples never reach the target confidence, so synthesis "
      "runs every step allowed (a worst case for that step count). "
      "Peak MB: resident set of the model's own process (ru_maxrss), after each stage.",
      "- Fewer synthetic samples and steps for the large models, to keep `make bench` "
      "under half an hour on 2 cores (the last full run took 27 min): " + "; ".join(
          f"{m} {n} samples, at most {s} steps" for m, n, s in jobs
          if m != "plain_cnn") + (" (plain_cnn: 500 steps at most)." if not args.quick
                                  else "none in --quick (plain_cnn only)."),
      "", "```", report_lib.format_table(rows, cols, heads), "```", "",
      "How time grows:", "", *scaling_notes(rows), "",
      "Failures (a row's later stages are blank after one):" if failures else
      "Failures: none.", "",
      *[f"- {r['model']} ({r['samples']} samples): {r['error']}" for r in failures], ""])
  fileio_lib.write_text(args.out, text)
  print(text)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
