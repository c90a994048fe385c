"""How much would MSE-optimal weight clipping add? An experiment, not (yet) the library's grid.

keras_mpq's weight grid takes each channel's scale from max|w|. Error-minimizing
thresholds (as Sony MCT uses by default) clip each channel at the ratio r of
max|w| that minimizes ||Q(w) - w||^2. Here the clipped weights are baked into
the float model and then quantized by `apply_plan` at the same bits: the
clipped channel's max lands on a grid level, so keras_mpq's max-abs rule
re-derives exactly the clipped grid. Uniform plans, real calibration data
(first 256 training images), accuracy on the 2,000 held-out MNIST images.

    .venv/bin/python benchmarks/bench_clipping.py
"""

import argparse
import datetime
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

import keras_mpq
from keras_mpq.model import graph as graph_lib
from keras_mpq.quantization import access as access_lib
from keras_mpq.quantization import apply as apply_lib
from keras_mpq.quantization import fold as fold_lib
from keras_mpq import demo_data as demo_data_lib
from keras_mpq.base import fileio as fileio_lib
from keras_mpq import model_zoo as model_zoo_lib
from keras_mpq.base import layers as layers_lib
from keras_mpq import report as report_lib

RATIOS = np.linspace(0.3, 1.0, 36)


def mse_clip(w, bits, axes):
  """Per-channel clipping of ``w`` at the MSE-optimal ratio of max|w| (NumPy)."""
  qmax = 2 ** (bits - 1) - 1
  maxabs = np.max(np.abs(w), axis=axes, keepdims=True)
  best_err, best = None, None
  for r in RATIOS:
    scale = np.where(maxabs > 0, r * maxabs / qmax, 1.0)
    q = np.clip(np.round(w / scale), -qmax, qmax) * scale
    err = np.sum((q - w) ** 2, axis=axes, keepdims=True)
    if best is None:
      best_err, best = err, q
    else:
      better = err < best_err
      best = np.where(better, q, best)
      best_err = np.where(better, err, best_err)
  return best.astype(np.float32)


def clipped_model(folded, bits):
  clone = graph_lib.rebuild(folded, lambda l: (l.__class__.from_config(l.get_config()),
                                           l.get_weights()))
  for layer in layers_lib.quantizable_layers(clone):
    spec = dict(layers_lib.weight_spec(layer))
    values = []
    for var in layer.weights:
      attr = var.name.split("/")[-1].split(":")[0]
      v = var.numpy()
      values.append(mse_clip(v, bits, spec[attr]) if attr in spec else v)
    layer.set_weights(values)
  return clone


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "clipping.md"))
  args = parser.parse_args()
  start = time.perf_counter()
  data = demo_data_lib.load_default()
  calib = data.x_train[:256]
  rows = []
  for name in ("plain_cnn", "separable_cnn"):
    folded = fold_lib.fold_batchnorm(model_zoo_lib.build_and_train(name, data, seed=0))
    for bits in (4, 3):
      plan = keras_mpq.QuantizationPlan.uniform(access_lib.plan_layers(folded), bits)
      accs = {}
      for label, base in (("max-abs", folded), ("MSE clip", clipped_model(folded, bits))):
        q = apply_lib.apply_plan(base, plan, calib, fold_bn=False)
        accs[label] = float(np.mean(q.predict(data.x_test, verbose=0).argmax(-1) == data.y_test))
      rows.append({"model": name, "bits": bits, "maxabs": accs["max-abs"],
                   "mse": accs["MSE clip"], "gain": accs["MSE clip"] - accs["max-abs"]})
      print(rows[-1], flush=True)
  text = "\n".join([
      "## Weight clipping: max-abs grid versus MSE-optimal clipping (experiment)", "",
      "- Command: `.venv/bin/python benchmarks/bench_clipping.py`",
      f"- Date: {datetime.datetime.now():%Y-%m-%d %H:%M}; machine: {platform.machine()}, "
      f"{os.cpu_count()} cores, CPU only; took {time.perf_counter() - start:.0f}s",
      f"- Data: {data.split}; uniform plans; activations 8-bit calibrated on the first 256 "
      "training images; per-channel clip ratio searched over 36 values in [0.3, 1].", "",
      "```", report_lib.format_table(rows, ["model", "bits", "maxabs", "mse", "gain"],
                                 ["model", "weight bits", "max-abs acc", "MSE-clip acc",
                                  "gain"]), "```", "",
      "Not yet the library's default grid: this measures what adopting it would add "
      "(see the MCT rows in *Accuracy versus size*).", ""])
  fileio_lib.write_text(args.out, text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
