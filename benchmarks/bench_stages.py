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


def worker(name: str, samples: int, steps: int) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import keras_mpq  # pylint: disable=g-import-not-at-top
  from keras_mpq import apply, demo_data, model_zoo, quantizers  # pylint: disable=g-import-not-at-top
  from keras_mpq.compat import keras  # pylint: disable=g-import-not-at-top
  row = {"model": name, "samples": samples, "synthesis_steps": steps}
  if name in model_zoo.BUILDERS:
    data = demo_data.load_default()
    model = model_zoo.build_and_train(name, data, seed=0)
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
  row["weight_layers"] = len(quantizers.quantizable_layers(model))
  row["peak_mb_model"] = _peak_mb()

  t = time.perf_counter()
  x, y = keras_mpq.synthesize(model, num_samples=samples, max_steps=steps, seed=0,
                              progress=False)
  row["synthesis_s"] = time.perf_counter() - t
  row["peak_mb_synthesis"] = _peak_mb()

  result = keras_mpq.quantize(model, "4bit", data=(x, y), seed=0, progress=False)
  row["sensitivity_allocation_s"] = result.report["timings_s"]["sensitivity+allocation"]
  row["apply_s"] = result.report["timings_s"]["apply"]
  row["evaluations"] = result.sensitivity.info.get("evaluations")
  row["peak_mb_quantize"] = _peak_mb()

  path = pathlib.Path("bench_out") / "stages" / f"{name}.tflite"
  path.parent.mkdir(parents=True, exist_ok=True)
  t = time.perf_counter()
  exported = result.export(path, target="mobile")
  row["export_s"] = time.perf_counter() - t
  row["tflite_bytes"] = exported.size
  row["peak_mb_export"] = _peak_mb()

  t = time.perf_counter()
  checked = keras_mpq.validate_tflite(path, x_eval, y_eval)
  row["validate_s"] = time.perf_counter() - t
  row["validate_n"] = len(x_eval)
  row["tflite_acc"] = checked.accuracy
  row["peak_mb"] = _peak_mb()
  return row


def run_worker(name, samples, steps, timeout=1200) -> dict:
  proc = subprocess.run([sys.executable, __file__, "--worker", name, "--samples", str(samples),
                         "--steps", str(steps)], capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    return {"model": name, "samples": samples, "error": proc.stderr[-400:]}
  return json.loads(lines[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--worker")
  parser.add_argument("--samples", type=int, default=256)
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.samples, args.steps)))
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
  from keras_mpq import fileio, report  # pylint: disable=g-import-not-at-top
  cols = ["model", "weight_layers", "params", "samples", "synthesis_steps", "synthesis_s",
          "sensitivity_allocation_s", "evaluations", "apply_s", "export_s", "validate_s",
          "tflite_bytes", "peak_mb_synthesis", "peak_mb_quantize", "peak_mb"]
  heads = ["model", "weight layers", "params", "samples", "synth steps", "synthesis s",
           "sensitivity+alloc s", "evals", "apply s", "export s", "validate s",
           ".tflite B", "peak MB synth", "peak MB quantize", "peak MB"]
  for r in rows:
    for k in cols:
      if isinstance(r.get(k), float):
        r[k] = round(r[k], 2)
  text = "\n".join([
      "## Time and memory per stage", "",
      f"- Command: `.venv/bin/python benchmarks/bench_stages.py{' --quick' if args.quick else ''}`",
      f"- Date: {datetime.datetime.now():%Y-%m-%d %H:%M}; machine: {platform.machine()}, "
      f"{os.cpu_count()} cores, CPU only, shared; took {time.perf_counter() - start:.0f}s",
      "- Budget 4-bit average, candidates {2, 4, 8}, one round. plain_cnn: trained on the "
      "MNIST split (first 8000), validated on 500 test images. MobileNetV2 (alpha 0.35) and "
      "ResNet50 at 96x96x3, weights=None (timing only), validated on 64 random inputs. "
      "Peak MB: resident set of the model's own process (ru_maxrss), after each stage.",
      "", "```", report.format_table(rows, cols, heads), "```", "",
      "Errors, if any: " + (", ".join(f"{r['model']}: {r['error']}" for r in rows
                                     if "error" in r) or "none."), ""])
  fileio.write_text(args.out, text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
