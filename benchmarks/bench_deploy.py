"""Byte budgets as file bytes: predicted vs written per target, flash, arena RAM, stripping.

For each model and target ('mobile', 'mcu'): one cheap export measures the
file's fixed part (`keras_mpq.export.measure_storage`); the exporter's storage
rules give each (layer, bits) its bytes (`keras_mpq.costs.file_cost_table`).
Three byte budgets between the smallest and the all-8-bit file are allocated
exactly (`keras_mpq.allocate`) with a proxy sensitivity (``n_params *
4**-bits``: this benchmark is about bytes, not accuracy), exported, and the
written file compared with the prediction and the budget. Also: the TFLite
Micro arena measured by its interpreter, LiteRT latency, the saving of each
stripping step on mcu, and TFLite Micro lookup-table compression (``lut``).

    .venv/bin/python benchmarks/bench_deploy.py [--models digits_mlp,plain_cnn,...]
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
from keras_mpq import costs, demo_data, fileio, report
from keras_mpq import export as export_lib
from keras_mpq.compat import keras, set_global_seed
from keras_mpq.types import QuantizationPlan, SensitivityTable

BITS = (2, 4, 8)


def digits_mlp():
  d = demo_data.load_digits()
  set_global_seed(1)
  m = keras.Sequential([keras.Input(d.x_train.shape[1:]), keras.layers.Flatten(),
                        keras.layers.Dense(64, activation="relu", name="fc1"),
                        keras.layers.Dense(32, activation="relu", name="fc2"),
                        keras.layers.Dense(10, name="logits")])
  m.compile("adam", "sparse_categorical_crossentropy")
  m.fit(d.x_train, d.y_train, epochs=3, verbose=0)
  return m, d


def get_model(name):
  if name == "digits_mlp":
    return digits_mlp()
  import bench_models  # pylint: disable=g-import-not-at-top
  return bench_models.get(name, 1), bench_models.dataset_for(name)


def proxy_sensitivity(table):
  by = {c.name: c for c in table.layer_costs}
  scores = np.array([[by[n].n_params * 4.0 ** -b for b in table.bits] for n in table.layers])
  return SensitivityTable(table.layers, table.bits, scores)


def run_model(name, out_dir, lines):
  model, data = get_model(name)
  folded = keras_mpq.fold_batchnorm(model)
  x = np.asarray(data.x_train[:128], np.float32)
  for target in ("mobile", "mcu"):
    t0 = time.perf_counter()
    profile = export_lib.measure_storage(folded, target)
    table = costs.file_cost_table(folded, profile, bits=BITS)
    sens = proxy_sensitivity(table)
    low = table.matrix("bytes").min(axis=1).sum()
    high = table.plan_cost(QuantizationPlan({n: 8 for n in table.layers}), "bytes")
    for frac in (0.1, 0.5, 0.9):
      budget = float(low + frac * (high - low)) if high > low else float(high)
      plan = keras_mpq.allocate(sens, keras_mpq.Budget.bytes(budget), table)
      plan = plan.plan if hasattr(plan, "plan") else plan
      predicted = table.plan_cost(plan, "bytes")
      path = os.path.join(out_dir, f"{name}_{target}.tflite")
      r = export_lib.export_tflite(folded, path, plan, target, x, max_bytes=budget)
      d = r.deployment
      lines.append(
          f"| {name} | {target} | {budget:.0f} | {table.fixed_bytes:.0f} | {predicted:.0f} | "
          f"{r.size} | {'yes' if r.size <= budget else 'NO'} | "
          f"{d.get('arena_bytes') if d.get('arena_bytes') is not None else '-'} | "
          f"{d.get('latency_ms')} | "
          + ", ".join(f"{k} {v}" for k, v in d["steps"].items() if k != "quantized_file")
          + f" | {' '.join(str(plan.weight_bits[n]) for n in table.layers)} |")
      print(lines[-1], flush=True)
    if target == "mcu":
      plan = QuantizationPlan({n: 2 for n in table.layers})
      plain = export_lib.export_tflite(folded, os.path.join(out_dir, "p.tflite"), plan, "mcu", x)
      lut = export_lib.export_tflite(folded, os.path.join(out_dir, "l.tflite"), plan, "mcu", x,
                                     lut=True)
      used = any("lookup-table compressed" in n for n in lut.notes)
      LUT.append(f"| {name} | {plain.size} | {lut.size} | {plain.deployment['arena_bytes']} | "
                 f"{lut.deployment['arena_bytes']} | {'yes' if used else 'no: ' + '; '.join(n for n in lut.notes if 'lookup' in n)[:80]} |")
      print(LUT[-1], flush=True)
    print(f"{name} {target}: {time.perf_counter() - t0:.0f} s", flush=True)
  if args_vela[0]:
    rows = {}
    for bits in (8, 4, 2):
      plan = QuantizationPlan({n: bits for n in table.layers})
      try:
        r = export_lib.export_tflite(folded, os.path.join(out_dir, "v.tflite"), plan, "ethos-u", x)
      except keras_mpq.KerasMpqError as e:
        VELA.append(f"| {name} | {bits} | Vela failed: {str(e)[:80]} | | | |")
        continue
      mcu = os.path.getsize(r.mcu_path)
      rows[bits] = r.size
      npu = r.deployment.get("npu") or {}
      VELA.append(f"| {name} | {bits} | {mcu} | {r.size} | {npu.get('flash_kib', '-')} | "
                  f"{npu.get('sram_kib', '-')} | {npu.get('npu_cycles', '-')} |")
      print(VELA[-1], flush=True)


LUT = []
VELA = []
args_vela = [True]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="digits_mlp,plain_cnn,separable_cnn,mobilenet_v2")
  parser.add_argument("--out", default="benchmarks/results/deploy.md")
  parser.add_argument("--no-vela", action="store_true")
  args = parser.parse_args()
  args_vela[0] = not args.no_vela
  start = time.perf_counter()
  out_dir = fileio.ensure_dir("bench_out/deploy")
  lines = []
  for name in args.models.split(","):
    run_model(name, str(out_dir), lines)
  text = [
      "## Byte budgets are file bytes (deploy)", "",
      f"Command: `.venv/bin/python benchmarks/bench_deploy.py --models {args.models}`  ",
      f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: "
      f"{platform.machine()} {platform.system()}; {time.perf_counter() - start:.0f} s.  ",
      "Models: benchmarks/bench_models.py seed 1 (MNIST split: first 128 training images "
      "calibrate); digits_mlp trained here on sklearn digits. Plans: exact allocation with a "
      "proxy sensitivity (n_params * 4^-bits), budgets at 10/50/90% between the smallest and "
      "the all-8-bit file. Arena: TFLite Micro's recording allocator; latency: LiteRT, "
      "1 thread, this CPU (mcu rows: the mcu file with zero points restored).", "",
      "| model | target | budget B | fixed B | predicted B | written B | <= budget | "
      "arena B | LiteRT ms | saved per step (B) | bits per layer |",
      "|---|---|---:|---:|---:|---:|---|---:|---:|---|---|", *lines, "",
      "TFLite Micro lookup-table compression (all layers planned 2 bits, mcu; DECODE "
      "decodes into the arena):", "",
      "| model | mcu file B | with LUT B | arena B | arena with LUT B | used |",
      "|---|---:|---:|---:|---:|---|", *LUT, "",
      "Vela's weight compression (ethos-u, ethos-u55-128; every layer at the given bits, "
      "stored int8 holding 2^b-1 levels):", "",
      "| model | bits | mcu file B (Vela input) | Vela file B | Vela flash KiB | "
      "SRAM KiB | NPU cycles |", "|---|---:|---:|---:|---:|---:|---:|", *VELA, ""]
  fileio.write_text(args.out, "\n".join(text))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
