"""Byte budgets as file bytes: predicted vs written per target, flash, arena RAM, stripping.

For each model and target ('mobile', 'mcu'): one cheap export measures the
file's fixed part (`keras_mpq.export.storage.measure_storage`); the exporter's storage
rules give each (layer, bits) its bytes (`keras_mpq.plan.costs.file_cost_table`).
Three byte budgets between the smallest and the all-8-bit file are allocated
exactly (`keras_mpq.allocate`) with a proxy sensitivity (``n_params *
4**-bits``: this benchmark is about bytes, not accuracy), exported with the
budget as ``max_bytes``, and the written file compared with the prediction
and the budget. Also measured: the TFLite Micro arena (its interpreter), the
saving of each stripping step on mcu (one step at a time, in
`keras_mpq.export.flatbuffer.STRIP_STEPS` order), TFLite Micro lookup-table compression
of 2- and 3-bit layers (``lut=True``), and Vela's weight compression of int8
tensors holding 255, 15 or 3 levels (target 'ethos-u').

    .venv/bin/python benchmarks/bench_deploy.py [--models digits_mlp,plain_cnn,...]

A model name may carry a seed: ``plain_cnn@2``. ``digits_cnn`` is the zoo's
``separable_cnn`` trained here on scikit-learn digits.
"""

import argparse
import datetime
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np

import keras_mpq
from keras_mpq.plan import costs as costs_lib
from keras_mpq import demo_data as demo_data_lib
from keras_mpq.base import fileio as fileio_lib
from keras_mpq import model_zoo as model_zoo_lib
from keras_mpq.export import exporter as exporter_lib
from keras_mpq.export import storage as storage_lib
from keras_mpq.base.compat import keras, set_global_seed
from keras_mpq.base.types import QuantizationPlan, SensitivityTable

BITS = (2, 4, 8)
FRACTIONS = (0.1, 0.5, 0.9)
DEFAULT_MODELS = ("digits_mlp,digits_cnn,plain_cnn,separable_cnn,mobilenet_v2,"
                  "plain_cnn@2,separable_cnn@2")
# The slow stock model and the second seeds get the byte-budget rows only.
NO_EXTRAS = ("mobilenet_v2",)


def digits_mlp():
  d = demo_data_lib.load_digits()
  set_global_seed(1)
  m = keras.Sequential([keras.Input(d.x_train.shape[1:]), keras.layers.Flatten(),
                        keras.layers.Dense(64, activation="relu", name="fc1"),
                        keras.layers.Dense(32, activation="relu", name="fc2"),
                        keras.layers.Dense(10, name="logits")])
  m.compile("adam", "sparse_categorical_crossentropy")
  m.fit(d.x_train, d.y_train, epochs=3, verbose=0)
  return m, d


def get_model(spec):
  name, _, seed = spec.partition("@")
  seed = int(seed or 1)
  if name == "digits_mlp":
    return digits_mlp()
  if name == "digits_cnn":
    d = demo_data_lib.load_digits()
    return model_zoo_lib.build_and_train("separable_cnn", d, seed=seed, epochs=8), d
  import bench_models  # pylint: disable=g-import-not-at-top
  return bench_models.get(name, seed), bench_models.dataset_for(name)


def proxy_sensitivity(table):
  by = {c.name: c for c in table.layer_costs}
  scores = np.array([[by[n].n_params * 4.0 ** -b for b in table.bits] for n in table.layers])
  return SensitivityTable(table.layers, table.bits, scores)


def _steps(d):
  return ", ".join(f"{k} {v}" for k, v in d["steps"].items() if k != "quantized_file")


def run_model(spec, out_dir, tables, samples, vela):
  model, data = get_model(spec)
  folded = keras_mpq.fold_batchnorm(model)
  x = np.asarray(data.x_train[:samples], np.float32)
  layers = None
  for target in ("mobile", "mcu"):
    t0 = time.perf_counter()
    profile = storage_lib.measure_storage(folded, target)
    table = costs_lib.file_cost_table(folded, profile, bits=BITS)
    layers = table.layers
    sens = proxy_sensitivity(table)
    low = float(table.matrix("bytes").min(axis=1).sum())
    high = float(table.plan_cost(QuantizationPlan({n: 8 for n in table.layers}), "bytes"))
    for frac in FRACTIONS:
      budget = low + frac * (high - low) if high > low else high
      plan = keras_mpq.allocate(sens, keras_mpq.Budget.bytes(budget), table)
      plan = plan.plan if hasattr(plan, "plan") else plan
      predicted = table.plan_cost(plan, "bytes")
      path = os.path.join(out_dir, f"{spec}_{target}.tflite")
      r = exporter_lib.export_tflite(folded, path, plan, target, x, max_bytes=budget)
      d = r.deployment
      written = os.path.getsize(path)
      arena = d.get("arena_bytes")
      tables["budget"].append(
          f"| {spec} | {target} | {budget:.0f} | {low:.0f} | {table.fixed_bytes:.0f} | "
          f"{predicted:.0f} | {written} | {written - round(predicted):+d} | "
          f"{'yes' if written <= budget else 'NO'} | {d['flash_bytes']} | "
          f"{arena if arena is not None else '-'} | "
          f"{' '.join(str(plan.weight_bits[n]) for n in table.layers)} |")
      print(tables["budget"][-1], flush=True)
      if target == "mcu" and frac == FRACTIONS[1]:
        s = d["steps"]
        tables["strip"].append(
            f"| {spec} | {s['quantized_file']} | {s.get('rebuild', 0)} | {s.get('names', 0)} | "
            f"{s.get('signatures', 0)} | {s.get('metadata', 0)} | {s.get('zero_points', 0)} | "
            f"{written} | {1 - written / s['quantized_file']:.1%} |")
    print(f"{spec} {target}: {time.perf_counter() - t0:.0f} s", flush=True)
  if spec.split("@")[0] in NO_EXTRAS or "@" in spec:
    return
  t0 = time.perf_counter()
  for bits in (2, 3):
    plan = QuantizationPlan({n: bits for n in layers})
    plain = exporter_lib.export_tflite(folded, os.path.join(out_dir, "p.tflite"), plan, "mcu", x)
    lut = exporter_lib.export_tflite(folded, os.path.join(out_dir, "l.tflite"), plan, "mcu", x,
                                   lut=True)
    done = [n for n in lut.notes if "lookup-table compressed" in n]
    why = "; ".join(n for n in lut.notes if "lookup-table" in n and "not used" in n)
    stored = "/".join(sorted({l.storage for l in plain.layers}))
    tables["lut"].append(
        f"| {spec} | {bits} | {stored} | {plain.size} | {lut.size} | "
        f"{plain.size - lut.size} | {plain.deployment['arena_bytes']} | "
        f"{lut.deployment['arena_bytes']} | "
        f"{'yes: ' + done[0].split(': ', 1)[1] if done else 'no' + (': ' + why[:90] if why else ' (no int8-stored 2-4 bit layer)')} |")
    print(tables["lut"][-1], flush=True)
  print(f"{spec} lut: {time.perf_counter() - t0:.0f} s", flush=True)
  if not vela:
    return
  t0 = time.perf_counter()
  for bits in (8, 4, 2):
    plan = QuantizationPlan({n: bits for n in layers})
    try:
      r = exporter_lib.export_tflite(folded, os.path.join(out_dir, "v.tflite"), plan, "ethos-u",
                                   x, deployment=False)
    except keras_mpq.KerasMpqError as e:
      tables["vela"].append(f"| {spec} | {bits} | Vela failed: {str(e)[:80]} | | | | | |")
      continue
    npu = r.vela or {}
    orig, enc = npu.get("weights_bytes", "-"), npu.get("encoded_weights_bytes", "-")
    tables["vela"].append(
        f"| {spec} | {bits} | {os.path.getsize(r.mcu_path)} | {r.size} | "
        f"{orig} | {enc} | "
        f"{npu.get('flash_kib', '-')} | {npu.get('sram_kib', '-')} | "
        f"{npu.get('npu_cycles', '-')} |")
    print(tables["vela"][-1], flush=True)
  print(f"{spec} vela: {time.perf_counter() - t0:.0f} s", flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default=DEFAULT_MODELS)
  parser.add_argument("--samples", type=int, default=32, help="calibration images per export")
  parser.add_argument("--out", default="benchmarks/results/deploy.md")
  parser.add_argument("--no-vela", action="store_true")
  args = parser.parse_args()
  start = time.perf_counter()
  out_dir = str(fileio_lib.ensure_dir("bench_out/deploy"))
  tables = {"budget": [], "strip": [], "lut": [], "vela": []}
  for spec in args.models.split(","):
    run_model(spec, out_dir, tables, args.samples, not args.no_vela)
  ok = sum("| yes |" in l for l in tables["budget"])
  text = [
      "## Byte budgets are file bytes (deploy)", "",
      f"Command: `nice .venv/bin/python benchmarks/bench_deploy.py --models {args.models} "
      f"--samples {args.samples}`  ",
      f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: "
      f"{platform.machine()} {platform.system()}, shared; {time.perf_counter() - start:.0f} s.  ",
      "Models: benchmarks/bench_models.py (`name@seed`, seed 1 unless given; MNIST split: "
      f"the first {args.samples} training images calibrate); digits_mlp (Dense 64-32-10) and "
      "digits_cnn (the zoo's separable_cnn) trained here on sklearn digits; mobilenet_v2 is "
      "the stock keras.applications MobileNetV2 (alpha 0.35, 32x32). Plans: exact "
      "allocation with a proxy sensitivity (n_params * 4^-bits; bytes, not accuracy, are "
      "measured here) over bits {2, 4, 8}, budgets at 10/50/90% between the smallest "
      "possible file (`smallest B`) and the all-8-bit file. Arena: TFLite Micro's recording "
      "allocator (mcu only).", "",
      f"Every written file at or under its budget: **{ok} of {len(tables['budget'])}**.", "",
      "| model | target | budget B | smallest B | fixed B | predicted B | written B | "
      "written - predicted | <= budget | flash B | arena B | bits per layer |",
      "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|", *tables["budget"], "",
      "Where `smallest B` equals the all-8-bit file (mcu, Dense-only models), TFLite Micro "
      "has no kernel that reads a Dense layer below int8 (int4 fully connected fails to "
      "prepare), so every plan costs the same and the three budgets coincide; the "
      "lookup-table rows below are how such a file gets smaller. A 4-bit layer that is "
      "unpacked into int8 is charged a 256-byte rebuild allowance, and a mobile layer not "
      "stored int8 its data rounded up to 16 bytes plus 16 (`costs.BUFFER_ALIGNMENT`: "
      "ai-edge-quantizer's file layout depends on the whole plan), both upper bounds "
      "(written - predicted < 0).",
      "",
      "Saving of each mcu stripping step (bytes, the 50% budget's file; one step at a time "
      "in this order, each measured on the rebuilt file; `rebuild` is the flatbuffer "
      "rewrite itself). All four are the mcu default; each stripped file gave the same "
      "TFLite Micro outputs as the unstripped one (checked by the export):", "",
      "| model | quantized file B | rebuild | names | signatures | metadata | zero points | "
      "written B | saved |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
      *tables["strip"], "",
      "TFLite Micro lookup-table compression (`lut=True`; every layer planned at the given "
      "bits, mcu). Only layers stored int8 are compressed (on mcu: fully connected "
      "layers; 2- and 3-bit convolutions are already packed int4). `used` means the "
      "compressed file ran in the installed TFLite Micro and gave outputs identical to the "
      "uncompressed file. DECODE decodes the weights into the arena:", "",
      "| model | bits | storage without LUT | mcu file B | with LUT B | saved B | arena B | "
      "arena with LUT B | used |", "|---|---:|---|---:|---:|---:|---:|---:|---|",
      *tables["lut"], "",
      "Vela's weight compression (target ethos-u, ethos-u55-128, Vela 5.2; every layer at "
      "the given bits, stored int8 holding 2^b-1 levels, since Vela crashes on int4). "
      "`weights` and `encoded` are Vela's own totals (its summary CSV: total_original_weights, "
      "total_npu_encoded_weights):", "",
      "| model | bits | mcu file B (Vela input) | Vela file B | weights B | "
      "encoded weights B | off-chip flash KiB | SRAM KiB | NPU cycles |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|", *tables["vela"], "",
      "What the tables say, and the defaults that follow:", "",
      "- Stripping: names, signatures, metadata and all-zero zero points are all stripped "
      "by default on mcu (each weight tensor keeps its Keras layer's name, so "
      "`keras-mpq inspect --plan` still maps layers). `quantized file B` is the file "
      "after the exporter's own rebuild with inline, 16-byte aligned buffers "
      "(`export.inline_buffers`: TFLite Micro computed wrong outputs on "
      "ai-edge-quantizer's offset buffers, which it writes from 256 KiB of constants on), "
      "so `rebuild` is 0.",
      "- Lookup-table compression stays opt-in (`lut=True`): it ran and matched in every "
      "row above, and shrinks int8-stored 2- and 3-bit layers several-fold, but DECODE "
      "writes the decoded int8 weights into the arena, so the flash saved comes back as "
      "arena RAM (compare the two arena columns), and the byte budget's cost table does "
      "not model it.",
      "- Vela compresses int8 weights that hold few levels by itself: its encoded weights "
      "at 4 bits (15 levels) and 2 bits (3 levels) are a fraction of the 8-bit ones, "
      "so ethos-u needs no int4 container. The byte cost table does not model Vela's "
      "encoding: an ethos-u budget is checked on the written file.", ""]
  fileio_lib.write_text(args.out, "\n".join(text))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
