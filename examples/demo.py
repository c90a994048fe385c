"""keras_mpq demo: train a small CNN on real data, quantize it data-free, ship it, check it.

Trains a small MobileNet-style (depthwise-separable) CNN on MNIST (``../shared/data/mnist``; scikit-learn's
digits when that folder is absent), quantizes it with NO training data at two
budgets (labeled synthetic data from the model itself), exports mobile
(LiteRT) and mcu (TFLite Micro) flatbuffers, runs both in their runtimes on
held-out real images, and prints float, uniform 8-bit, uniform 4-bit and
mixed-precision accuracy and sizes side by side. Every number is measured in
this run.

    .venv/bin/python examples/demo.py [--out demo_out] [--budgets 5bit,4bit]
                                      [--model separable_cnn|plain_cnn]

The depthwise-separable CNN is the default because it is where bit-widths
matter: its depthwise layers lose most at 4 bits. The plain CNN is dominated
by one Dense layer (89% of its weights), so its plans mostly decide that layer.
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

import keras_mpq
from keras_mpq.quantization import access as access_lib
from keras_mpq.quantization import apply as apply_lib
from keras_mpq import demo_data as demo_data_lib
from keras_mpq import model_zoo as model_zoo_lib
from keras_mpq import report as report_lib


def keras_accuracy(model, x, y):
  return float(np.mean(model.predict(x, verbose=0, batch_size=256).argmax(-1) == y))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="demo_out")
  parser.add_argument("--budgets", default="5bit,4bit")
  parser.add_argument("--model", default="separable_cnn", choices=sorted(model_zoo_lib.BUILDERS))
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  t0 = time.perf_counter()
  data = demo_data_lib.load_default()
  print(f"data: {data.split}")
  model = model_zoo_lib.build_and_train(args.model, data, seed=args.seed)
  x_test, y_test = data.x_test, data.y_test
  print(f"trained {args.model} ({model.count_params()} params) in "
        f"{time.perf_counter() - t0:.0f}s")

  rows = [{"config": "float", "keras_acc": keras_accuracy(model, x_test, y_test),
           "pred_bytes": None}]
  results = {}
  for budget in args.budgets.split(","):
    t = time.perf_counter()
    result = keras_mpq.quantize(model, budget, seed=args.seed)  # data-free
    results[budget] = result
    print(f"\n== mixed precision, budget {budget} (data-free, "
          f"{time.perf_counter() - t:.0f}s) ==")
    print(report_lib.summary_table(result.report))
    result.save(out / f"mixed_{budget}")

  first = next(iter(results.values()))
  synthetic_x = first.calibration_data
  folded, costs = first.float_model, first.costs
  configs = []
  for bits in (8, 4):
    plan = keras_mpq.QuantizationPlan.uniform(access_lib.plan_layers(folded), bits)
    qmodel = apply_lib.apply_plan(folded, plan, synthetic_x, fold_bn=False)
    configs.append((f"uniform {bits}-bit", qmodel, plan))
  for budget, result in results.items():
    configs.append((f"mixed {budget}", result.model, result.plan))

  for name, qmodel, plan in configs:
    row = {"config": name, "keras_acc": keras_accuracy(qmodel, x_test, y_test),
           "pred_bytes": int(round(costs.plan_cost(plan, "bytes"))),
           "avg_bits": costs.plan_cost(plan, "avg_bits")}
    baked = access_lib.bake(qmodel)
    for target, runtime in (("mobile", "litert"), ("mcu", "tflm")):
      path = out / f"{name.replace(' ', '_')}_{target}.tflite"
      keras_mpq.export_tflite(baked, path, access_lib.current_plan(qmodel), target=target,
                              calibration_data=synthetic_x)
      checked = keras_mpq.validate_tflite(path, x_test, y_test, runtime=runtime)
      row[f"{target}_bytes"] = path.stat().st_size
      row[f"{runtime}_acc"] = checked.accuracy
    rows.append(row)
    print(f"checked {name}")

  print(f"\n== {data.name} held-out accuracy and size (every figure measured in this run) ==")
  print(f"test data: {data.split}; quantization data: {len(synthetic_x)} synthetic samples")
  print(report_lib.format_table(
      rows, ["config", "avg_bits", "pred_bytes", "keras_acc", "mobile_bytes", "litert_acc",
             "mcu_bytes", "tflm_acc"],
      ["config", "avg bits", "weights B (pred)", "Keras acc", "mobile .tflite B",
       "LiteRT acc", "mcu .tflite B", "TFLM acc"]))
  print(f"\noutputs in {out}/ ; total {time.perf_counter() - t0:.0f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
