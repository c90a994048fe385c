"""Paired wall time of data-free `keras_mpq.quantize`: today's default against simpler quantizers.

One process, the configurations alternating, ``--reps`` times each, on each
MNIST CNN (seed 1) at a 3-bit and a 2-bit average (candidates {2,3,4,8}),
data-free from scratch (synthesis included, no cache):

* ``rtn-256``: round to nearest, no bias correction, 256 synthetic samples, no
  tuning (the quantizer when issue 13 was filed);
* ``gptq-256``: GPTQ with bias correction, 256 samples, no tuning;
* ``default``: what `quantize` does when not told (AdaRound on GPTQ, bias
  correction, `api.default_calibration_sizes` samples: 256 synthesized, and at
  a budget that forces layers below 3 bits 768 shifted copies of them
  (`keras_mpq.synthesis.augment`), the search measuring on the 256; then the scale
  tuning of `keras_mpq.quantization.distill`).

Issue 13 asks `quantize` to stay within 2x of the simpler quantizer's wall
time; these are the ratios, measured in one run so that machine load moves
all alike.

    .venv/bin/python benchmarks/bench_quantizer_time.py
"""

import argparse
import datetime
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np

import bench_models  # pylint: disable=wrong-import-position
import keras_mpq  # pylint: disable=wrong-import-position
from keras_mpq.base import fileio as fileio_lib  # pylint: disable=wrong-import-position
from keras_mpq import report as report_lib  # pylint: disable=wrong-import-position

CONFIGS = {
    "rtn-256": dict(weight_method="rtn", bias_correction=False, num_samples=256, tune_steps=0),
    "gptq-256": dict(weight_method="gptq", bias_correction=True, num_samples=256, tune_steps=0),
    "default": dict(),
}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", nargs="+", default=["plain_cnn", "separable_cnn"])
  parser.add_argument("--reps", type=int, default=2)
  parser.add_argument("--avg-bits", nargs="+", type=float, default=[3.0, 2.0])
  parser.add_argument("--out", default=None, help="also write the table here (markdown)")
  args = parser.parse_args()
  start = time.perf_counter()
  table = []
  for name, avg_bits in [(n, b) for n in args.models for b in args.avg_bits]:
    model = bench_models.get(name, 1)
    data = bench_models.dataset_for(name)
    times, accs = {k: [] for k in CONFIGS}, {}
    for rep in range(args.reps):
      for label, kwargs in CONFIGS.items():
        t = time.perf_counter()
        r = keras_mpq.quantize(model, keras_mpq.Budget.avg_bits(avg_bits),
                               weight_bits=(2, 3, 4, 8), seed=0, progress=False, **kwargs)
        times[label].append(time.perf_counter() - t)
        acc = accs[label] = float(np.mean(np.argmax(r.model.predict(data.x_test, verbose=0, batch_size=500),
                                      -1) == data.y_test))
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r.report["timings_s"].items())
        print(f"{name} {avg_bits:g} bits {label} rep {rep}: {times[label][-1]:.1f}s ({stages}), "
              f"Keras accuracy {acc:.4f}", flush=True)
    row = {"model": name, "budget": f"{avg_bits:g} bits average"}
    for label in CONFIGS:
      row[label] = f"{np.mean(times[label]):.1f} s, {100 * accs[label]:.1f}%"
      if label != "default":
        ratio = sum(times["default"]) / sum(times[label])
        row[f"x {label}"] = f"{ratio:.2f}"
        print(f"{name} {avg_bits:g} bits: default / {label} wall time = {ratio:.2f}",
              flush=True)
    table.append(row)
  if args.out:
    others = [k for k in CONFIGS if k != "default"]
    cols = ["model", "budget"] + list(CONFIGS) + [f"x {k}" for k in others]
    text = "\n".join([
        "# Wall time of data-free `quantize`: the default against simpler quantizers (issue 13)",
        "",
        f"- Command: `.venv/bin/python benchmarks/bench_quantizer_time.py "
        f"--reps {args.reps}`",
        f"- Date: {datetime.datetime.now():%Y-%m-%d %H:%M}; {os.cpu_count()} cores, CPU "
        f"only; took {time.perf_counter() - start:.0f} s, load average "
        f"{os.getloadavg()[0]:.1f} at the end. Seed-1 copies, candidates {{2,3,4,8}}, "
        "from scratch (synthesis included, no cache), the configurations alternating "
        f"{args.reps} times; a cell is the mean time and the Keras accuracy on the "
        "2,000 test images (the last repetition's).",
        "- Configurations: " + "; ".join(f"`{k}`: {v or 'quantize as not told'}"
                                         for k, v in CONFIGS.items()) + ".",
        "- `x rtn-256`: the default's total time over the other's, the ratio issue 13 "
        "caps at 2.",
        "",
        report_lib.format_table(table, cols, cols),
    ])
    fileio_lib.write_text(args.out, text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
