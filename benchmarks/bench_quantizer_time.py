"""Paired wall time of data-free `keras_mpq.quantize`: today's default against simpler quantizers.

One process, the configurations alternating, ``--reps`` times each, on each
MNIST CNN (seed 1) at a 3-bit and a 2-bit average (candidates {2,3,4,8}),
data-free from scratch (synthesis included, no cache):

* ``rtn-256``: round to nearest, no bias correction, 256 synthetic samples, no
  tuning (the quantizer when issue 13 was filed);
* ``gptq-256``: GPTQ with bias correction, 256 samples, no tuning;
* ``default``: what `quantize` does when not told (AdaRound on GPTQ, bias
  correction, `api.default_num_samples` synthetic samples: 256, or 1024 at a
  budget that forces layers below 3 bits, of which the search measures on 256;
  then the scale tuning of `keras_mpq.distill`).

Issue 13 asks `quantize` to stay within 2x of the simpler quantizer's wall
time; these are the ratios, measured in one run so that machine load moves
all alike.

    .venv/bin/python benchmarks/bench_quantizer_time.py
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np

import bench_models  # pylint: disable=wrong-import-position
import keras_mpq  # pylint: disable=wrong-import-position

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
  args = parser.parse_args()
  for name, avg_bits in [(n, b) for n in args.models for b in args.avg_bits]:
    model = bench_models.get(name, 1)
    data = bench_models.dataset_for(name)
    times = {k: [] for k in CONFIGS}
    for rep in range(args.reps):
      for label, kwargs in CONFIGS.items():
        t = time.perf_counter()
        r = keras_mpq.quantize(model, keras_mpq.Budget.avg_bits(avg_bits),
                               weight_bits=(2, 3, 4, 8), seed=0, progress=False, **kwargs)
        times[label].append(time.perf_counter() - t)
        acc = float(np.mean(np.argmax(r.model.predict(data.x_test, verbose=0, batch_size=500),
                                      -1) == data.y_test))
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r.report["timings_s"].items())
        print(f"{name} {avg_bits:g} bits {label} rep {rep}: {times[label][-1]:.1f}s ({stages}), "
              f"Keras accuracy {acc:.4f}", flush=True)
    for label in CONFIGS:
      if label != "default":
        ratio = sum(times["default"]) / sum(times[label])
        print(f"{name} {avg_bits:g} bits: default / {label} wall time = {ratio:.2f}",
              flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
