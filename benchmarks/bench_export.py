"""Export benchmark: file size, runtime accuracy and latency of mixed-precision TFLite files.

For the zoo's plain_cnn and separable_cnn trained on the real MNIST split,
four plans given directly (uniform 8, uniform 4, first/last 8 + rest 4, and a
2/4/8 mix) are exported for 'mobile' (LiteRT) and 'mcu' (TFLite Micro). For
each: file size beside the ideal packed size (sum of n_params * bits / 8 plus
one float32 scale per output channel), accuracy on the 2000 held-out test
images in LiteRT and in TFLite Micro, LiteRT median latency (1 thread, batch 1)
beside the float file; and Vela's report for the separable model's 'ethos-u'
export. Writes a section to benchmarks/results/export.md and prints it.

    .venv/bin/python benchmarks/bench_export.py [--out benchmarks/results/export.md]
"""

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from keras_mpq.quantization import access as access_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.quantization import fold as fold_lib  # pylint: disable=g-import-not-at-top
from keras_mpq import demo_data as demo_data_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.base import fileio as fileio_lib  # pylint: disable=g-import-not-at-top
from keras_mpq import model_zoo as model_zoo_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.base import layers as layers_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import convert as convert_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import exporter as exporter_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
from keras_mpq import validate as validate_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.base.types import QuantizationPlan  # pylint: disable=g-import-not-at-top


def plans_for(names):
  first, last, middle = names[0], names[-1], names[1:-1]
  mix248 = {first: 8, last: 8}
  mix248.update({n: (4 if i % 2 == 0 else 2) for i, n in enumerate(middle)})
  return {
      "uniform 8": QuantizationPlan.uniform(names, 8),
      "uniform 4": QuantizationPlan.uniform(names, 4),
      "8-4-8": QuantizationPlan({first: 8, last: 8, **{n: 4 for n in middle}}),
      "8-4/2-8": QuantizationPlan({n: mix248[n] for n in names}),
  }


def ideal_bytes(model, plan):
  total = 0.0
  for name, bits in plan.weight_bits.items():
    layer = model.get_layer(name)
    for attr, axes in layers_lib.weight_spec(layer):
      w = getattr(layer, attr).numpy()
      n_scales = int(np.prod([s for i, s in enumerate(w.shape) if i not in axes]))
      total += w.size * bits / 8 + 4 * n_scales
  return total


def bits_label(plan, names):
  return ",".join(str(plan.weight_bits[n]) for n in names)


def run(args):
  data = demo_data_lib.load_default()
  x_test, y_test = data.x_test, data.y_test
  x_cal = data.x_train[:256]
  lines = []
  out_dir = tempfile.mkdtemp(prefix="bench_export_")
  vela_report = None
  for zoo in ("plain_cnn", "separable_cnn"):
    start = time.time()
    model = fold_lib.fold_batchnorm(model_zoo_lib.build_and_train(zoo, data, seed=0))
    names = access_lib.plan_layers(model)
    keras_acc = float(np.mean(model.predict(x_test, verbose=0).argmax(1) == y_test))
    float_path = os.path.join(out_dir, f"{zoo}_float.tflite")
    fileio_lib.write_bytes(float_path, convert_lib.to_float_tflite(model, 1))
    float_ms = runtime_lib.benchmark_latency(float_path, runs=args.runs)
    float_acc = validate_lib.validate_tflite(float_path, x_test, y_test).accuracy
    lines.append(f"\n### {zoo} (layers: {', '.join(names)})\n")
    lines.append(f"Keras float accuracy {keras_acc:.4f}; float .tflite {os.path.getsize(float_path)} B, "
                 f"LiteRT accuracy {float_acc:.4f}, latency {float_ms:.3f} ms.\n")
    lines.append("| plan | bits per layer | ideal packed B | mobile file B | mcu file B | "
                 "LiteRT acc (mobile) | TFLM acc (mcu) | LiteRT acc (mcu) | LiteRT ms (mobile) | "
                 "mobile storage | mcu storage |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, plan in plans_for(names).items():
      tag = label.replace("/", "").replace(" ", "")
      mobile = exporter_lib.export_tflite(model, os.path.join(out_dir, f"{zoo}_{tag}_mobile.tflite"),
                                        plan, "mobile", calibration_data=x_cal)
      mcu = exporter_lib.export_tflite(model, os.path.join(out_dir, f"{zoo}_{tag}_mcu.tflite"),
                                     plan, "mcu", calibration_data=x_cal)
      lite = validate_lib.validate_tflite(mobile.path, x_test, y_test)
      lite_mcu = validate_lib.validate_tflite(mcu.path, x_test, y_test)
      micro = validate_lib.validate_tflite(mcu.path, x_test, y_test, runtime="tflm")
      ms = runtime_lib.benchmark_latency(mobile.path, runs=args.runs)
      short = lambda r: "; ".join(f"{l.layer}: {l.storage}" for l in r.layers)  # pylint: disable=cell-var-from-loop
      lines.append(f"| {label} | {bits_label(plan, names)} | {ideal_bytes(model, plan):.0f} | "
                   f"{mobile.size} | {mcu.size} | {lite.accuracy:.4f} | {micro.accuracy:.4f} | "
                   f"{lite_mcu.accuracy:.4f} | {ms:.3f} | {short(mobile)} | {short(mcu)} |")
      if zoo == "separable_cnn" and label == "8-4-8":
        npu = exporter_lib.export_tflite(model, os.path.join(out_dir, f"{zoo}_{tag}_npu.tflite"),
                                       plan, "ethos-u", calibration_data=x_cal)
        vela_report = (label, npu)
    lines.append(f"\n({zoo}: {time.time() - start:.0f} s)\n")
  if vela_report:
    label, npu = vela_report
    v = npu.vela
    lines.append(f"\n### Vela, separable_cnn, plan '{label}', target ethos-u ({v['accelerator']})\n")
    lines.append("| NPU ops | CPU ops | NPU share | SRAM KiB | off-chip flash KiB | total cycles | "
                 "NPU cycles | est. inference ms | compiled file B |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    lines.append(f"| {v.get('npu_ops')} | {v.get('cpu_ops')} | {v.get('npu_op_share', 0):.0%} | "
                 f"{v.get('sram_kib')} | {v.get('flash_kib')} | {v.get('total_cycles')} | "
                 f"{v.get('npu_cycles')} | {v.get('inference_ms', (v.get('inference_time_s') or 0) * 1e3)} | "
                 f"{npu.size} |")
    lines.append("\nStorage on ethos-u: " + "; ".join(f"{l.layer}: {l.storage}" for l in npu.layers))
  header = [
      f"## Export benchmark ({datetime.date.today().isoformat()})\n",
      f"Command: `.venv/bin/python benchmarks/bench_export.py --runs {args.runs}`  ",
      f"Machine: {platform.machine()}, {platform.system()} {platform.release()}, "
      f"{os.cpu_count()} CPUs (shared), Python {platform.python_version()}  ",
      "Data: real MNIST split from ../shared/data (train 8000, test 2000); calibration: first 256 "
      "training images; accuracy on all 2000 test images.  ",
      "Ideal packed = sum over layers of n_params * bits / 8 + 4 B per output-channel scale "
      "(biases and zero points not counted). Latency: LiteRT, 1 thread, batch 1, median of "
      f"{args.runs} runs after 5 warm-ups.",
  ]
  text = "\n".join(header + lines) + "\n"
  fileio_lib.write_text(args.out, text)
  print(text)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "export.md"))
  parser.add_argument("--runs", type=int, default=50)
  run(parser.parse_args())
