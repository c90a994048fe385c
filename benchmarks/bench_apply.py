"""Accuracy of models quantized by `keras_mpq.apply_plan`, before and after a short fine-tune.

On the real MNIST split (first 8,000 images train/calibrate, last 2,000 test):
trains the zoo's plain_cnn and separable_cnn (`model_zoo.build_and_train`),
then for each plan (uniform 8, uniform 4, uniform 2, first and last layers 8
with the rest 4, and a 2/4/8 mix) measures

* post-training accuracy: `apply_plan` calibrated on 256 training images,
  evaluated on the 2,000 held-out images (Keras fake quantization: weights at
  their planned bits, activations 8-bit);
* accuracy after quantization-aware fine-tuning of that model with ``fit``
  (Adam, lr 1e-4, on the 8,000 training images) with the
  `callbacks.FreezeRanges` (after one epoch of steps) and
  `callbacks.FreezeBatchNorm` (after one epoch) callbacks.

Writes a markdown section to benchmarks/results/apply.md (atomically) and
prints it.

Usage:

  .venv/bin/python benchmarks/bench_apply.py [--epochs 2] [--seed 0] [--models plain_cnn,separable_cnn]
"""

import argparse
import datetime
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top

from keras_mpq.quantization import access as access_lib
from keras_mpq.quantization import apply as apply_lib
from keras_mpq import callbacks as callbacks_lib
from keras_mpq.model import size as size_lib
from keras_mpq import demo_data as demo_data_lib
from keras_mpq.base import fileio as fileio_lib
from keras_mpq import model_zoo as model_zoo_lib
from keras_mpq.base.compat import keras, set_global_seed, tf
from keras_mpq.base.types import QuantizationPlan

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "apply.md"
N_CALIBRATION = 256


def plans_for(names):
  """The plans measured, by label, for layer ``names`` in model order."""
  first, last, middle = names[0], names[-1], names[1:-1]
  mix = {n: (2, 4)[i % 2] for i, n in enumerate(middle)}  # alternating 2 and 4 inside
  return {
      "uniform 8": QuantizationPlan.uniform(names, 8),
      "uniform 4": QuantizationPlan.uniform(names, 4),
      "uniform 2": QuantizationPlan.uniform(names, 2),
      "first/last 8, rest 4": QuantizationPlan({first: 8, **{n: 4 for n in middle}, last: 8}),
      "first/last 8, rest 2/4": QuantizationPlan({first: 8, **mix, last: 8}),
  }


def accuracy(model, x, y):
  return float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), -1) == y))


def avg_bits(model, plan):
  """Parameter-weighted average weight bits of ``plan`` on ``model`` (kernels only)."""
  sizes = {lc.name: lc.n_params for lc in size_lib.layer_costs(model)}
  total = sum(sizes[n] for n in plan.weight_bits)
  return sum(sizes[n] * b for n, b in plan.weight_bits.items()) / total


def fine_tune(qmodel, data, epochs, seed, quantized=True):
  """Adam lr 1e-4 on the training images; the callbacks for quantized models."""
  set_global_seed(seed)
  steps_per_epoch = int(np.ceil(len(data.x_train) / 64))
  qmodel.compile(keras.optimizers.Adam(1e-4),
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 metrics=["accuracy"])
  chores = [callbacks_lib.FreezeRanges(after_steps=steps_per_epoch),
            callbacks_lib.FreezeBatchNorm(after_epochs=1)] if quantized else []
  qmodel.fit(data.x_train, data.y_train, batch_size=64, epochs=epochs, verbose=0,
             shuffle=True, callbacks=chores)
  return qmodel


def float_fine_tuned(model, data, epochs, seed):
  """The float model trained ``epochs`` more with the same settings (the fair baseline)."""
  clone = keras.models.clone_model(model)
  clone.set_weights(model.get_weights())
  return accuracy(fine_tune(clone, data, epochs, seed, quantized=False), data.x_test,
                  data.y_test)


def run(models, epochs, seed):
  data = demo_data_lib.load_default()
  x_cal = data.x_train[:N_CALIBRATION]
  rows = []
  for name in models:
    t0 = time.time()
    model = model_zoo_lib.build_and_train(name, data, seed=seed)
    train_s = time.time() - t0
    float_acc = accuracy(model, data.x_test, data.y_test)
    float_ft = float_fine_tuned(model, data, epochs, seed)
    rows.append((name, "float", "", "32", f"{float_acc:.4f}", f"{float_ft:.4f}", "",
                 f"{train_s:.0f}"))
    print(f"{name}: float {float_acc:.4f}, fine-tuned float {float_ft:.4f} "
          f"(trained in {train_s:.0f} s)", flush=True)
    names = access_lib.plan_layers(model)
    for label, plan in plans_for(names).items():
      t0 = time.time()
      qmodel = apply_lib.apply_plan(model, plan, x_cal)
      apply_s = time.time() - t0
      assert access_lib.get_weight_bits(qmodel) == dict(plan.weight_bits)
      ptq = accuracy(qmodel, data.x_test, data.y_test)
      t0 = time.time()
      fine_tune(qmodel, data, epochs, seed)
      ft_s = time.time() - t0
      qat = accuracy(qmodel, data.x_test, data.y_test)
      bits = "/".join(str(plan.weight_bits[n]) for n in names)
      rows.append((name, label, bits, f"{avg_bits(model, plan):.2f}", f"{ptq:.4f}",
                   f"{qat:.4f}", f"{apply_s:.1f}", f"{ft_s:.0f}"))
      print(f"  {label:24s} bits {bits:16s} ptq {ptq:.4f} fine-tuned {qat:.4f} "
            f"(apply {apply_s:.1f} s, fine-tune {ft_s:.0f} s)", flush=True)
  return data, rows


def to_markdown(data, rows, args, command):
  header = ("| model | plan | weight bits per layer | avg bits | accuracy after apply_plan "
            f"| after {args.epochs}-epoch fine-tune | apply_plan s | train / fine-tune s |")
  lines = [
      "# apply_plan: post-training and fine-tuned accuracy", "",
      f"Command: `{command}`  ",
      f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  ",
      f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), "
      f"Python {platform.python_version()}, TensorFlow {tf.__version__}, CPU only  ",
      f"Data: {data.name}, split {data.split}; calibration: first {N_CALIBRATION} training "
      f"images; accuracy on the {len(data.x_test)} held-out test images  ",
      f"Fine-tune: Adam lr 1e-4, batch 64, {args.epochs} epoch(s) on the "
      f"{len(data.x_train)} training images, FreezeRanges after 1 epoch of steps, "
      f"FreezeBatchNorm after 1 epoch (no BatchNorm is left after folding in these two "
      f"models, so it has nothing to freeze here); seed {args.seed}.  ",
      "Keras fake quantization (weights per-channel symmetric at the planned bits, "
      "activations 8-bit asymmetric), not a TFLite file. The float row's fine-tune "
      "column is the float model trained the same extra epochs: the baseline for the "
      "fine-tuned quantized models (part of their gain is just more training).", "",
      header, "|" + "---|" * 8]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--models", default="plain_cnn,separable_cnn")
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args(argv)
  command = ".venv/bin/python benchmarks/bench_apply.py " + " ".join(sys.argv[1:] if argv is None
                                                           else argv)
  data, rows = run(args.models.split(","), args.epochs, args.seed)
  text = to_markdown(data, rows, args, command.strip())
  fileio_lib.write_text(args.out, text)
  print(text)


if __name__ == "__main__":
  main()
