"""What the synthetic calibration sets look like, and what they cost to make.

1. The zoo's plain CNN trained on real MNIST (the project's fixed split). For
   each synthesis method (labeled, zeroq, noise), 256 samples: the share the
   float model assigns to their label, the confidence p(y|x) spread, the class
   balance, the wall time; for labeled also the share that reached its target
   confidence and how far above the target it stopped. The real calibration
   images (first 256 of the training split, true labels) are shown beside them.
2. `keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3),
   weights=None, classes=10)` (untrained: timing only): the time to synthesize
   256 labeled samples, the steps it ran, and the time per step beside one
   forward+backward pass of the same batch (the floor).

Writes a markdown section to benchmarks/results/synthesis.md (atomically; the
section of the other mode is kept) and prints it.

Usage:

  .venv/bin/python benchmarks/bench_synthesis.py [--quick] [--seed 0]
"""

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top

from keras_mpq import demo_data as demo_data_lib
from keras_mpq.base import fileio as fileio_lib
from keras_mpq import model_zoo as model_zoo_lib
from keras_mpq.synthesis import classifier as classifier_lib
from keras_mpq.synthesis import generators as generators_lib
from keras_mpq.base.compat import keras, tf

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "synthesis.md"
TITLE = "# Synthetic calibration data benchmark\n"
NUM_SAMPLES = 256
BATCH = 64


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def describe_set(name, model, x, y, seconds, result=None):
  """One table row: agreement, confidence spread, balance, time."""
  probs = _softmax(model.predict(x, verbose=0, batch_size=256))
  conf = probs[np.arange(len(y)), y]
  counts = np.bincount(y, minlength=probs.shape[1])
  share = counts / counts.sum()
  nz = share[share > 0]
  entropy = float(-(nz * np.log(nz)).sum() / np.log(len(share)))
  row = {
      "method": name, "n": len(y), "agree": float(np.mean(probs.argmax(-1) == y)),
      "conf_min": float(conf.min()), "conf_med": float(np.median(conf)),
      "conf_max": float(conf.max()), "classes_present": int((counts > 0).sum()),
      "count_min": int(counts.min()), "count_max": int(counts.max()),
      "balance": entropy, "seconds": seconds, "reached": "-", "overshoot": "-",
      "steps": "-"}
  if result is not None:
    row["steps"] = f"{np.mean(result.steps):.1f}"
    if result.reached is not None:
      row["reached"] = f"{result.reached_share():.3f}"
      over = result.confidences - result.target_confidences
      row["overshoot"] = f"{np.median(over[result.reached]):.3f}"
  return row


def bench_mnist(args, dataset):
  """Rows for real data and each method on the plain CNN."""
  start = time.perf_counter()
  model = model_zoo_lib.build_and_train("plain_cnn", dataset, seed=args.seed)
  train_s = time.perf_counter() - start
  test_acc = float(np.mean(model.predict(dataset.x_test, verbose=0).argmax(-1)
                           == dataset.y_test))
  rows = [describe_set("real (train split, first 256)", model,
                       dataset.x_train[:NUM_SAMPLES], dataset.y_train[:NUM_SAMPLES],
                       float("nan"))]
  settings = {}
  for method in generators_lib.SynthesisMethod:
    kwargs = {"max_steps": args.zeroq_steps} if method.value == "zeroq" else {}
    result = generators_lib.synthesize_with_info(
        model, num_samples=NUM_SAMPLES, method=method.value, seed=args.seed,
        batch_size=BATCH, progress=args.progress, **kwargs)
    rows.append(describe_set(method.value, model, result.x, result.y, result.seconds,
                             result))
    settings[method.value] = {k: result.info.get(k) for k in (
        "learning_rate", "max_steps", "tv_weight", "l2_weight", "confidence_range",
        "traces", "bn_loss_initial", "bn_loss_final") if k in result.info}
    settings[method.value]["input_range"] = (
        f"{list(result.input_range)} ({result.input_range_source})")
  return model, test_acc, train_s, rows, settings


def bench_mobilenet(args):
  """Synthesis time for MobileNetV2-0.35 at 96x96, and the fwd+bwd floor."""
  keras.utils.set_random_seed(args.seed)
  model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3),
                                         weights=None, classes=10)
  classifier = classifier_lib.inspect_classifier(model)
  x = tf.constant(np.random.default_rng(args.seed).uniform(
      0, 1, (BATCH, 96, 96, 3)).astype(np.float32))
  y = tf.constant(np.arange(BATCH) % 10, tf.int32)

  @tf.function
  def forward_backward(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      log_p = classifier.log_probs(x)
      loss = -tf.reduce_sum(tf.gather(log_p, y, axis=1, batch_dims=1))
    return tape.gradient(loss, x)

  forward_backward(x).numpy()  # trace
  floor = []
  for _ in range(args.floor_runs):
    start = time.perf_counter()
    forward_backward(x).numpy()
    floor.append(time.perf_counter() - start)
  result = generators_lib.synthesize_with_info(
      model, num_samples=NUM_SAMPLES, seed=args.seed, batch_size=BATCH,
      max_steps=args.mobilenet_steps, progress=args.progress)
  total_steps = int(sum(result.info["batch_steps"]))
  return {"params": model.count_params(), "floor_med": statistics.median(floor),
          "floor_min": min(floor), "floor_max": max(floor), "seconds": result.seconds,
          "total_steps": total_steps, "batch_steps": result.info["batch_steps"],
          "per_step": result.seconds / max(total_steps, 1),
          "steady_step": result.info["seconds_per_step"],
          "first_call": result.info["first_call_seconds"],
          "reached": result.reached_share(), "traces": result.info["traces"],
          "max_steps": args.mobilenet_steps,
          "conf_med": float(np.median(result.confidences)),
          "range": f"{list(result.input_range)} ({result.input_range_source})"}


def render(args, dataset, test_acc, train_s, rows, settings, mnv2, load, elapsed):
  mode = "quick" if args.quick else "full"
  cmd = "python benchmarks/bench_synthesis.py" + (" --quick" if args.quick else "")
  lines = [
      f"## Synthesis ({mode})", "",
      f"- Command: `{cmd}`",
      f"- Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
      f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other "
      f"jobs; 1-min load average {load[0]:.1f} at start, {load[1]:.1f} at end), "
      f"{platform.system()} {platform.release()}; Python {platform.python_version()}, "
      f"TensorFlow {tf.__version__}, numpy {np.__version__}",
      f"- Data: {dataset.name}, {dataset.split}",
      f"- Model: zoo `plain_cnn` trained with seed {args.seed} ({train_s:.1f} s), "
      f"test accuracy {test_acc:.4f} on the 2000 test images",
      f"- {NUM_SAMPLES} samples per method, batch {BATCH}, seed {args.seed}; "
      f"zeroq max_steps={args.zeroq_steps}; total run {elapsed:.0f} s", "",
      "`agree`: share of samples the float model assigns to their label (for zeroq "
      "and noise the label *is* the argmax, so 1.0 by construction). `conf`: "
      "p(label | x) under the float model. `balance`: label entropy / log(10) "
      "(1 = even). `reached`: share that reached its target confidence tau ~ "
      "U(0.5, 0.95); `overshoot`: median p - tau of those. `steps`: mean "
      "optimization steps per sample.", "",
      "| data | n | agree | conf min | conf median | conf max | classes | "
      "count min/max | balance | reached | overshoot | steps | seconds |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    secs = "-" if np.isnan(r["seconds"]) else f"{r['seconds']:.2f}"
    lines.append(
        f"| {r['method']} | {r['n']} | {r['agree']:.3f} | {r['conf_min']:.3f} | "
        f"{r['conf_med']:.3f} | {r['conf_max']:.3f} | {r['classes_present']} | "
        f"{r['count_min']}/{r['count_max']} | {r['balance']:.3f} | {r['reached']} | "
        f"{r['overshoot']} | {r['steps']} | {secs} |")
  lines += ["", "Settings per method: " + "; ".join(
      f"{m}: " + ", ".join(f"{k}={v}" for k, v in s.items()) for m, s in settings.items()),
      "", "### MobileNetV2 (alpha 0.35, 96x96x3, 10 classes, untrained), "
      f"{NUM_SAMPLES} labeled samples", "",
      f"- {mnv2['params']:,} parameters; input range {mnv2['range']}",
      f"- max_steps={mnv2['max_steps']}, batch {BATCH} ({len(mnv2['batch_steps'])} "
      f"batches); steps run per batch: {mnv2['batch_steps']}; step function traced "
      f"{mnv2['traces']} time(s)",
      f"- Synthesis wall time: **{mnv2['seconds']:.1f} s** for {NUM_SAMPLES} samples "
      f"({mnv2['total_steps']} batch steps: {mnv2['per_step']:.3f} s per step with "
      f"model inspection and tracing included; the first call of the step function, "
      f"tracing included, took {mnv2['first_call']:.2f} s)",
      f"- Floor, one forward+backward pass of a {BATCH}-image batch (compiled, median "
      f"of {args.floor_runs}): **{mnv2['floor_med']:.3f} s** (min {mnv2['floor_min']:.3f}, "
      f"max {mnv2['floor_max']:.3f}); a synthesis step after the first call takes "
      f"**{mnv2['steady_step']:.3f} s** = {mnv2['steady_step'] / mnv2['floor_med']:.2f}x "
      "the floor",
      f"- Reached target confidence: {mnv2['reached']:.3f} of samples (untrained "
      f"network; median p(y|x) {mnv2['conf_med']:.3f}): this part measures time only.",
      ""]
  return "\n".join(lines)


def write_section(path, mode, section):
  """Replaces this mode's section in ``path`` (keeping the other), atomically."""
  path = pathlib.Path(path)
  old = path.read_text() if path.exists() else ""
  sections, current = {}, None
  for line in old.splitlines():
    if line.startswith("## Synthesis ("):
      current = line[len("## Synthesis ("):].rstrip(")")
      sections[current] = []
    if current is not None:
      sections[current].append(line)
  sections[mode] = section.rstrip("\n").splitlines()
  body = "\n\n".join("\n".join(sections[m]).rstrip("\n")
                     for m in ("full", "quick") if m in sections)
  fileio_lib.write_text(path, TITLE + "\n" + body + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer steps: zeroq 100, MobileNetV2 5 (full: 500 and 100)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=str(RESULTS))
  parser.add_argument("--progress", action="store_true", default=None)
  args = parser.parse_args(argv)
  args.zeroq_steps = 100 if args.quick else 500
  args.mobilenet_steps = 5 if args.quick else 100
  args.floor_runs = 3 if args.quick else 7
  load_before = os.getloadavg()[0]
  start = time.perf_counter()
  dataset = demo_data_lib.load_default()
  _, test_acc, train_s, rows, settings = bench_mnist(args, dataset)
  mnv2 = bench_mobilenet(args)
  section = render(args, dataset, test_acc, train_s, rows, settings, mnv2,
                   (load_before, os.getloadavg()[0]), time.perf_counter() - start)
  write_section(args.out, "quick" if args.quick else "full", section)
  print(section)
  return 0


if __name__ == "__main__":
  sys.exit(main())
