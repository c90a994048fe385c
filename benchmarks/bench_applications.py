"""Stock keras.applications models end to end: time per stage against the floor, sizes, runtimes.

Each architecture is built in plain Keras 3 (``import keras``) with
``weights=None`` at a small input and run through ``keras_mpq.quantize``
(data-free: synthetic calibration data) and both exports ('mobile' checked in
LiteRT, 'mcu' in TFLite Micro). Each model runs in its own process so its peak
RSS is its own. The floor is measured in the same process: one forward pass of
the folded float model over the calibration set, times weight layers times
candidate bit-widths (what any per-(layer, bits) sensitivity needs at least).
Agreement: float versus quantized predictions on real inputs (MNIST test
images resized to the model's input and tiled to 3 channels). The models are
untrained (no weights are downloaded), so agreement says how faithfully the
quantized model follows the float one, not accuracy.

    .venv/bin/python benchmarks/bench_applications.py            # all 8, 32 px
    .venv/bin/python benchmarks/bench_applications.py --models EfficientNetB0 --size 96
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODELS = ("MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large",
          "EfficientNetB0", "ResNet50", "DenseNet121", "NASNetMobile")
BITS = (2, 4, 8)


def real_inputs(size: int, n: int, value_range=(0.0, 255.0), train: bool = False):
  """``(x, y, split)``: MNIST images (test, or train) resized, tiled to 3 channels.

  Pixels 0..255 are mapped linearly onto ``value_range``, the model's input
  scale (the files clip inputs outside the range they were quantized for).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from keras_mpq import demo_data as demo_data_lib  # pylint: disable=g-import-not-at-top
  data = demo_data_lib.load_default()
  x = np.asarray((data.x_train if train else data.x_test)[:n], np.float32)
  y = np.asarray((data.y_train if train else data.y_test)[:n])
  if x.max() <= 1.0:
    x = x * 255.0
  x = tf.image.resize(x, (size, size)).numpy()
  low, high = value_range
  x = low + x / 255.0 * (high - low)
  return np.repeat(x, 3, axis=-1).astype(np.float32), y, data.split


def one(name: str, size: int, samples: int, n_real: int, budget: str, epochs: int = 0,
        n_train: int = 8000, classes: int = 10) -> dict:
  """Runs one architecture; returns its row (called in a child process).

  ``epochs`` > 0 first trains it that long on ``n_train`` MNIST training
  images (Adam, batch 64), so that accuracy on the test images means
  something; 0 leaves it untrained.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import keras  # Keras 3  # pylint: disable=g-import-not-at-top
  import keras_mpq  # pylint: disable=g-import-not-at-top
  from keras_mpq import model_zoo as model_zoo_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.quantization import access as access_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.export import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
  row = {"model": name, "size": size, "classes": classes}
  t0 = time.perf_counter()
  k3 = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                         classes=classes)
  row["build_s"] = time.perf_counter() - t0
  row["params"] = int(k3.count_params())
  if epochs:
    xt, yt, _ = real_inputs(size, n_train, keras_mpq.resolve_input_range(k3)[:2], train=True)
    k3.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    t0 = time.perf_counter()
    k3.fit(xt, yt, epochs=epochs, batch_size=64, verbose=0)
    # After a brief training the moving statistics are still near their initial
    # values (ResNet50 after one epoch predicted one class): set them from data.
    model_zoo_lib.recalibrate_batchnorm(k3, xt[:1000])
    row["train_s"] = time.perf_counter() - t0
    row["epochs"] = epochs
  t0 = time.perf_counter()
  result = keras_mpq.quantize(k3, budget, num_samples=samples, weight_bits=BITS, seed=0,
                              progress=False)
  row["quantize_s"] = time.perf_counter() - t0
  timings = result.report["timings_s"]
  row.update({f"{k}_s": v for k, v in timings.items()})
  folded = result.float_model
  layers = access_lib.plan_layers(folded)
  row["weight_layers"] = len(layers)
  x = result.calibration_data
  folded.predict(x[:2], verbose=0)  # warm up (tracing is not part of the floor)
  t0 = time.perf_counter()
  folded.predict(x, verbose=0, batch_size=128)
  row["forward_s"] = time.perf_counter() - t0
  row["floor_s"] = row["forward_s"] * len(layers) * len(BITS)
  info = result.sensitivity.info
  row["evaluations"] = info.get("evaluations")
  row["prefix_reuse"] = f"{sum(bool(v) for v in info.get('prefix_reuse', {}).values())}/{len(layers)}"
  row["traces"] = json.dumps(info.get("traces"))
  row["avg_bits"] = result.report["achieved"].get("avg_bits")
  row["samples"] = int(len(x))
  # On the model's input scale: raw pixels where it rescales inside (MobileNetV3,
  # EfficientNet), [0, 1] where quantize assumed it.
  low, high = result.report["input_range"]["low"], result.report["input_range"]["high"]
  xr, yr, split = real_inputs(size, n_real, (low, high))
  row["input_range"] = [low, high]
  row["split"] = split
  f_out = folded.predict(xr, verbose=0)
  q_out = result.model.predict(xr, verbose=0)
  row["keras_agree"] = float(np.mean(f_out.argmax(-1) == q_out.argmax(-1)))
  row["float_acc"] = float(np.mean(f_out.argmax(-1) == yr))
  row["keras_acc"] = float(np.mean(q_out.argmax(-1) == yr))
  # Untrained models predict nearly one class for every input, so argmax
  # agreement says little; the correlation of all outputs says more.
  row["keras_corr"] = float(np.corrcoef(f_out.ravel(), q_out.ravel())[0, 1])
  with tempfile.TemporaryDirectory() as tmp:
    for target, runtime in (("mobile", "litert"), ("mcu", "tflm")):
      path = os.path.join(tmp, f"{target}.tflite")
      t0 = time.perf_counter()
      try:
        exported = result.export(path, target=target)
        row[f"{target}_export_s"] = time.perf_counter() - t0
        row[f"{target}_kb"] = exported.size / 1024
        # One run of the file in its runtime (it raises if the runtime cannot
        # load or run it), compared with float and with the quantized Keras
        # model it was written from.
        file_out = runtime_lib.run_tflite(path, xr, runtime=runtime)
        row[f"{target}_ran"] = True
        row[f"{target}_agree"] = float(np.mean(file_out.argmax(-1) == f_out.argmax(-1)))
        row[f"{target}_corr"] = float(np.corrcoef(np.ravel(file_out), f_out.ravel())[0, 1])
        row[f"{target}_acc"] = float(np.mean(file_out.argmax(-1) == yr))
        row[f"{target}_agree_q"] = float(np.mean(file_out.argmax(-1) == q_out.argmax(-1)))
        row[f"{target}_corr_q"] = float(np.corrcoef(np.ravel(file_out), q_out.ravel())[0, 1])
      except Exception as e:  # pylint: disable=broad-except  # reported in the table
        row[f"{target}_export_s"] = time.perf_counter() - t0
        row[f"{target}_ran"] = False
        row[f"{target}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return row


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", nargs="*", default=list(MODELS))
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--samples", type=lambda v: None if v == "auto" else int(v), default=None,
                      help="synthetic samples (default: quantize's, fewer for large models)")
  parser.add_argument("--real", type=int, default=200, help="real MNIST inputs for agreement")
  parser.add_argument("--budget", default="4bit")
  parser.add_argument("--classes", type=int, default=10,
                      help="output classes (1000: an ImageNet-shaped head)")
  parser.add_argument("--epochs", type=int, default=0,
                      help="train each model this many epochs on MNIST first (0: untrained)")
  parser.add_argument("--train", type=int, default=8000, help="training images (with --epochs)")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--rows", nargs="*", default=None,
                      help="render the table from these logs of an earlier run (lines "
                           "'ROW {json}' or '{json}') instead of running; a model in "
                           "--models with no row is listed as not finished")
  parser.add_argument("--note", default="", help="a line added under the command (with --rows)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "applications.md"))
  args = parser.parse_args()
  if args.child:
    row = one(args.child, args.size, args.samples, args.real, args.budget, args.epochs,
              args.train, args.classes)
    print("ROW " + json.dumps(row), flush=True)
    return 0
  from keras_mpq.base import fileio as fileio_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq import report as report_lib  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  rows = []
  if args.rows is not None:
    by_model = {}
    for path in args.rows:
      for line in open(path):
        line = line.strip()
        line = line[4:] if line.startswith("ROW ") else line
        if line.startswith("{") and '"model"' in line:
          row = json.loads(line)
          by_model[row["model"]] = row
    rows = [by_model.get(name) or {"model": name, "size": args.size, "mobile_ran": False,
                                   "mcu_ran": False,
                                   "mobile_error": "not finished (run stopped before this "
                                                   "model completed)"}
            for name in args.models]
  for name in ([] if args.rows is not None else args.models):
    cmd = [sys.executable, __file__, "--child", name, "--size", str(args.size),
           "--samples", str(args.samples or "auto"), "--real", str(args.real),
           "--budget", args.budget, "--epochs", str(args.epochs), "--train", str(args.train),
           "--classes", str(args.classes)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [l[4:] for l in proc.stdout.splitlines() if l.startswith("ROW ")]
    if found:
      rows.append(json.loads(found[-1]))
    else:
      tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
      rows.append({"model": name, "size": args.size, "mobile_ran": False, "mcu_ran": False,
                   "mobile_error": f"exit {proc.returncode}: {tail[:200]}"})
    print(json.dumps(rows[-1]), flush=True)
  split = next((r["split"] for r in rows if "split" in r), "MNIST test")

  def fmt(v, spec):
    return "-" if v is None else format(v, spec)

  timing_rows, out_rows = [], []
  for r in rows:
    timing_rows.append({
        "model": r["model"], "params": fmt(r.get("params"), ","),
        "samples": r.get("samples", "-"),
        "layers": r.get("weight_layers", "-"),
        "load": fmt(r.get("load_s"), ".1f"), "synth": fmt(r.get("synthesis_s"), ".1f"),
        "sens": fmt(r.get("sensitivity+allocation_s"), ".1f"),
        "apply": fmt(r.get("apply_s"), ".1f"), "quantize": fmt(r.get("quantize_s"), ".1f"),
        "floor": fmt(r.get("floor_s"), ".1f"),
        "ratio": (fmt(r["sensitivity+allocation_s"] / r["floor_s"], ".1f")
                  if r.get("floor_s") else "-"),
        "evals": r.get("evaluations", "-"), "reuse": r.get("prefix_reuse", "-"),
        "rss": fmt(r.get("peak_rss_mb"), ".0f")})
    out_rows.append({
        "model": r["model"], "avg_bits": fmt(r.get("avg_bits"), ".2f"),
        "mobile_kb": fmt(r.get("mobile_kb"), ".0f"), "mobile_s": fmt(r.get("mobile_export_s"), ".1f"),
        "mobile_ran": "yes" if r.get("mobile_ran") else "no",
        "mcu_kb": fmt(r.get("mcu_kb"), ".0f"), "mcu_s": fmt(r.get("mcu_export_s"), ".1f"),
        "mcu_ran": "yes" if r.get("mcu_ran") else "no",
        "keras_agree": fmt(r.get("keras_agree"), ".2f"),
        "mobile_agree": fmt(r.get("mobile_agree"), ".2f"),
        "mcu_agree": fmt(r.get("mcu_agree"), ".2f"),
        "keras_corr": fmt(r.get("keras_corr"), ".3f"),
        "mobile_agree_q": fmt(r.get("mobile_agree_q"), ".2f"),
        "mcu_agree_q": fmt(r.get("mcu_agree_q"), ".2f"),
        "mobile_corr_q": fmt(r.get("mobile_corr_q"), ".3f"),
        "mcu_corr_q": fmt(r.get("mcu_corr_q"), ".3f"),
        "acc": ("-" if r.get("float_acc") is None else
                " / ".join(fmt(r.get(k), ".3f") for k in
                           ("float_acc", "keras_acc", "mobile_acc", "mcu_acc")))})
  errors = [f"- {r['model']} {k[:-6]}: {r[k]}" for r in rows for k in r if k.endswith("_error")]
  command = ("`.venv/bin/python benchmarks/bench_applications.py"
             + (f" --models {' '.join(args.models)}" if list(args.models) != list(MODELS) else "")
             + f" --size {args.size}"
             + (f" --classes {args.classes}" if args.classes != 10 else "")
             + (f" --samples {args.samples}" if args.samples else "") + f" --real {args.real}"
             + (f" --epochs {args.epochs} --train {args.train}" if args.epochs else "") + "`")
  text = "\n".join([
      "## Stock keras.applications models: time per stage, sizes, runtimes"
      + (f" ({', '.join(args.models)}, trained {args.epochs} epoch(s))" if args.epochs else
         f" ({', '.join(args.models)} at {args.size}x{args.size})"
         if (list(args.models) != list(MODELS) or args.size != 32) else "")
      + (f", {args.classes} classes" if args.classes != 10 else ""), "",
      f"- Command: {command}" + (" (table rendered from the run's logs with --rows)"
                                 if args.rows is not None else ""),
      *([f"- {args.note}"] if args.note else []),
      f"- Date: {datetime.datetime.now():%Y-%m-%d %H:%M}; machine: {platform.machine()}, "
      f"{os.cpu_count()} cores, CPU only, shared"
      + ("" if args.rows is not None else f"; took {time.perf_counter() - start:.0f}s"),
      f"- Models: plain Keras 3, `weights=None` ("
      + (f"then trained {args.epochs} epoch(s) on the first {args.train} MNIST training "
         "images, Adam, batch 64; accuracy on the test images below"
         if args.epochs else "untrained") + f"), {args.size}x{args.size}x3 input, "
      f"{args.classes} classes; `keras_mpq.quantize(model, {args.budget!r}, num_samples={args.samples})` "
      "(None: quantize's default, `default_num_samples`) "
      "(synthetic calibration data), candidate bits 2/4/8.",
      "- Floor: one forward pass of the float model over the calibration set x weight "
      "layers x 3 candidate bit-widths, measured in the same process; ratio = "
      "sensitivity+allocation / floor.",
      f"- Agreement: argmax of float versus quantized on {args.real} real inputs ({split}, "
      "resized, tiled to 3 channels, on the model's input scale: 0..255 where it rescales "
      "inside, else [0, 1] as quantize assumed); Keras (tfmot model) and each file in its runtime "
      "(LiteRT for mobile, TFLite Micro for mcu). Untrained models: agreement, not accuracy. "
      "An untrained model predicts nearly one class for all inputs, so argmax agreement "
      "with float can be 0 while the outputs are close: 'corr Keras' is the correlation "
      "of all float and quantized Keras outputs, 'mobile/mcu = Keras q' the argmax "
      "agreement of each file with the quantized Keras model it was written from, and "
      "'corr mobile/mcu, Keras q' the correlation of their outputs.",
      "", "Time per stage (seconds) and peak RSS (MB):", "",
      "```", report_lib.format_table(timing_rows, list(timing_rows[0]),
                                 ["model", "params", "samples", "weight layers", "load",
                                  "synthesis",
                                  "sens+alloc", "apply", "quantize", "floor", "ratio",
                                  "evaluations", "prefix reuse", "peak RSS"]), "```", "",
      "Exports:", "",
      "```", report_lib.format_table(out_rows, list(out_rows[0]),
                                 ["model", "avg bits", "mobile KB", "mobile s", "LiteRT ran",
                                  "mcu KB", "mcu s", "TFLM ran", "agree Keras",
                                  "agree mobile", "agree mcu", "corr Keras",
                                  "mobile = Keras q", "mcu = Keras q",
                                  "corr mobile, Keras q", "corr mcu, Keras q",
                                  "accuracy float / Keras q / mobile / mcu"]), "```", ""]
      + (["Failures:", ""] + errors + [""] if errors else []))
  fileio_lib.write_text(args.out, text)
  print(text)
  return 0 if all(r.get("mobile_ran") and r.get("mcu_ran") for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
