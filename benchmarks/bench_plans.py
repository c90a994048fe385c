"""Do mixed-precision plans beat the obvious choice? Mixed versus uniform at equal average bits.

For each benchmark model copy (`bench_models`: both MNIST CNNs at seeds 1 and
2, and the stock MobileNetV2), with 256 calibration samples that are either
data-free (`synthesize(method='labeled')`, the current generator) or real (the
first 256 training images), at average weight budgets 8/6/5/4/3/2.5/2:

* ``mixed``: what `quantize` returns (`sensitivity.search`, one round, default
  objective and candidates, with the measured safeguard), its test accuracy;
* ``allocated``: the exact allocation alone (before the safeguard);
* ``uniform``: the uniform plan at the largest whole bit-width within the
  budget (2..8 bits: at 6 bits, uniform 6-bit), the choice a user would take.

Every plan is calibrated on the same 256 samples (activation ranges, as
`apply_plan` does) and tested on the 2,000 held-out MNIST test images with
fake quantization. A second table, on the MNIST CNNs at 4 / 3 / 2.5 bits,
(seed 1 copies) measures the design choices: the default against cross-entropy on labels as
the objective, the context at the budget instead of all-highest, and the
candidates without 3 bits.

Writes benchmarks/results/plans.md (atomically) and prints it.

    .venv/bin/python benchmarks/bench_plans.py [--quick]
"""

import argparse
import datetime
import hashlib
import math
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # pylint: disable=g-import-not-at-top

import bench_models  # pylint: disable=g-import-not-at-top
from keras_mpq.quantization import access as access_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.quantization import calibrate as calibrate_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.quantization import fold as fold_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.quantization import optimize as optimize_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.base import fileio as fileio_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.base.types import FLOAT_BITS  # pylint: disable=g-import-not-at-top
from keras_mpq.plan import search as search_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.sensitivity import job as job_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.synthesis import generators as generators_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.plan import costs as costs_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.base.compat import keras, tf  # pylint: disable=g-import-not-at-top
from keras_mpq.base.types import Budget, QuantizationPlan  # pylint: disable=g-import-not-at-top

RESULTS = HERE / "results" / "plans.md"
CACHE = HERE.parent / "bench_out" / "plans"
BUDGETS = (8.0, 6.0, 5.0, 4.0, 3.0, 2.5, 2.0)
VARIANT_BUDGETS = (4.0, 3.0, 2.5)
VARIANT_SEEDS = (1,)  # the design-choice table: seed 1 copies (run time)
BITS = (2, 3, 4, 8)
SAMPLES = 256


def log(msg):
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def weight_defaults(source):
  """The weight quantizer `quantize` uses for ``source``: data-free defaults on synthetic data."""
  if source == "synthetic":
    return optimize_lib.DATA_FREE_WEIGHT_METHOD, optimize_lib.DATA_FREE_BIAS_CORRECTION
  return optimize_lib.DEFAULT_WEIGHT_METHOD, optimize_lib.DEFAULT_BIAS_CORRECTION


class Harness:
  """One tfmot model of ``folded``; a plan is set by bits variables and recalibrated.

  Each layer's kernel and bias at its bits are the weight quantizer's
  (`apply.WeightBank` on the calibration data, the source's default method),
  as in the sensitivity table: every layer quantized on the float model's
  inputs (`apply_plan` would quantize layer by layer on quantized inputs).
  """

  def __init__(self, folded, x_test, y_test):
    self.layers = access_lib.plan_layers(folded)
    self.x_test, self.y_test = x_test, y_test
    self.qmodel = access_lib.quantize_model(folded, QuantizationPlan.uniform(self.layers, 8))
    qmodel = self.qmodel
    self.forward = tf.function(
        lambda x: qmodel(x, training=False),
        input_signature=[tf.TensorSpec((None,) + x_test.shape[1:], tf.float32)])
    self._seen = {}
    self._bank = None

  def use_weights(self, x_cal, method, correct):
    """Quantize weights with ``method`` (and bias correction) on ``x_cal`` from now on."""
    if self._bank is not None:  # back to the float kernels before measuring new inputs
      self._bank.set_weight_bits({n: FLOAT_BITS for n in self.layers})
    self._bank = optimize_lib.WeightBank(self.qmodel, x_cal, method, correct)

  def accuracy(self, bits, x_cal):
    key = (tuple(bits[n] for n in self.layers), id(x_cal), id(self._bank))
    if key not in self._seen:
      if self._bank is None:
        access_lib.set_weight_bits(self.qmodel, bits)
      else:
        self._bank.set_weight_bits(bits)
      calibrate_lib.calibrate(self.qmodel, x_cal)
      pred = np.concatenate([self.forward(tf.constant(self.x_test[s:s + 500])).numpy()
                             .argmax(-1) for s in range(0, len(self.x_test), 500)])
      self._seen[key] = float(np.mean(pred == self.y_test))
    return self._seen[key]


def calibration_data(name, seed, model, data, source):
  if source == "real":
    return data.x_train[:SAMPLES], data.y_train[:SAMPLES]
  CACHE.mkdir(parents=True, exist_ok=True)
  # Keyed by the generator's source, so a changed generator synthesizes afresh.
  version = hashlib.sha256(pathlib.Path(generators_lib.__file__).read_bytes()).hexdigest()[:10]
  path = CACHE / f"{name}-seed{seed}-labeled{SAMPLES}-{version}.npz"
  if path.exists():
    with np.load(path) as z:
      return z["x"], z["y"]
  t = time.perf_counter()
  x, y = generators_lib.synthesize(model, SAMPLES, "labeled", seed=0, progress=False)
  log(f"  synthesized {SAMPLES} samples in {time.perf_counter() - t:.0f}s")
  np.savez(path, x=x, y=y)
  return x, y


def run_plans(model, folded, harness, costs, xy, budgets, bits=BITS, objective=None,
              context="highest", table=None):
  """{budget: row} of `search_budgets` (one shared model and measurement) at ``budgets``."""
  sub = costs_lib.cost_table(folded, bits=bits)
  found_all = search_lib.search_budgets(
      model, xy, [Budget.avg_bits(a) for a in budgets], weight_bits=bits, rounds=1,
      costs=sub, progress=False, objective=objective, context=context, table=table)
  rows = {}
  for avg, found in zip(budgets, found_all):
    sel = found.plan.info["selection"]
    alloc = next((c for c in sel["candidates"] if "allocated" in [c["name"]] + c["also"]),
                 None)
    rows[avg] = {
        "bits": dict(found.plan.weight_bits),
        "avg": costs.plan_cost(found.plan, "avg_bits"),
        "acc": harness.accuracy(found.plan.weight_bits, xy[0]),
        "winner": sel["winner"],
        "alloc_bits": alloc["weight_bits"] if alloc else None,
        "alloc_acc": harness.accuracy(alloc["weight_bits"], xy[0]) if alloc else None,
        "note": found.plan.info.get("note") or sel.get("note"),
    }
  return rows, found_all[0].sensitivity


def bench_model(name, seed, sources, quick):
  model = bench_models.get(name, seed)
  data = bench_models.dataset_for(name)
  folded = fold_lib.fold_batchnorm(model)
  costs = costs_lib.cost_table(folded, bits=tuple(range(2, 9)))
  harness = Harness(folded, data.x_test, data.y_test)
  res = {"name": name, "seed": seed, "layers": harness.layers,
         "float_acc": bench_models.float_accuracy(model, data), "sources": {}}
  for source in sources:
    log(f"{name} seed {seed}: {source} data")
    t = time.perf_counter()
    xy = calibration_data(name, seed, model, data, source)
    method, correct = weight_defaults(source)
    harness.use_weights(xy[0], method, correct)
    uniform = {b: harness.accuracy({n: b for n in harness.layers}, xy[0]) for b in range(2, 9)}
    with optimize_lib.weight_defaults(method, correct):
      rows, table = run_plans(model, folded, harness, costs, xy, BUDGETS)
    out = {"uniform": uniform, "rows": rows, "variants": {}, "weights": [method, correct]}
    if name != "mobilenet_v2" and not quick and seed in VARIANT_SEEDS:
      sliced = _slice(table, (2, 4, 8))
      with optimize_lib.weight_defaults(method, correct):  # the source's weight quantizer here too
        out["variants"]["no 3-bit candidates"] = run_plans(
            model, folded, harness, costs, xy, VARIANT_BUDGETS, bits=(2, 4, 8),
            table=sliced)[0]
        out["variants"]["objective: cross-entropy on labels"] = run_plans(
            model, folded, harness, costs, xy, VARIANT_BUDGETS, objective="cross_entropy")[0]
        out["variants"]["context at the budget"] = run_plans(
            model, folded, harness, costs, xy, VARIANT_BUDGETS, context="budget")[0]
    out["seconds"] = time.perf_counter() - t
    res["sources"][source] = out
  return res


def _slice(table, bits):
  cols = [table.bits.index(b) for b in bits]
  return type(table)(table.layers, bits, table.scores[:, cols], table.metric, table.info)


# --------------------------------------------------------------------------- report


def _uniform_at(avg):
  return int(min(8, math.floor(avg + 1e-9)))


def _noise(p, n):
  return math.sqrt(max(p * (1 - p), 1e-12) / n)


def render(results, args, started, elapsed, n_test):
  lines = [
      "## Mixed precision versus the obvious uniform plan", "",
      f"- Command: `.venv/bin/python benchmarks/bench_plans.py {' '.join(sys.argv[1:])}`",
      f"- Date: {started:%Y-%m-%d %H:%M} (took {elapsed / 60:.1f} min)",
      f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs "
      f"(load average {os.getloadavg()[0]:.1f} at end); TensorFlow {tf.__version__}, CPU only",
      "- Models: `bench_models` copies (MNIST CNNs trained with seeds 1 and 2 on the first "
      "8,000 images; stock keras.applications MobileNetV2, alpha 0.35, on the same split "
      f"padded to 32x32x3). Test: the last {n_test:,} images, fake quantization (tfmot), "
      "activation ranges calibrated on the run's 256 calibration samples. Weights: "
      "the weight quantizer `quantize` uses for the data source (`apply.WeightBank`, "
      "each layer on the float model's inputs), named in each table's heading.",
      f"- Data: `synthetic` = 256 samples of `synthesize(method='labeled')` (the current "
      "generator, no real data); `real` = the first 256 training images with labels.",
      f"- Mixed: `sensitivity.search` with the defaults `quantize` uses (objective "
      f"{job_lib.DEFAULT_OBJECTIVE!r}, context at the highest bits, candidates "
      f"{BITS}, held-out half for measurement, safeguard on). `alloc`: the exact "
      "allocation alone, before the safeguard. `uniform`: the largest whole bit-width "
      "within the budget (2..8).",
      f"- Noise: one test image is {100 / n_test:.2f} points; the binomial standard error "
      f"of one accuracy near 97% is {100 * _noise(0.97, n_test):.2f} points "
      f"(near 90%: {100 * _noise(0.90, n_test):.2f}). A difference counts as a loss "
      "below when mixed is more than 2 standard errors of the uniform accuracy below it.",
      ""]
  losses, total, near8, near8_total = [], 0, [], 0
  for res in results:
    for source, out in res["sources"].items():
      u = out["uniform"]
      wm, wc = out.get("weights", ("rtn", False))
      lines += [f"### {res['name']} seed {res['seed']}, {source} data "
                f"(float {res['float_acc']:.4f}; {out['seconds']:.0f} s; weights {wm}"
                f"{' + bias correction' if wc else ''})", "",
                "| budget | mixed acc | mixed avg bits | winner | alloc acc | uniform | "
                "uniform acc | mixed - uniform (pts) | bits |",
                "|---|---|---|---|---|---|---|---|---|"]
      for avg, row in out["rows"].items():
        b = _uniform_at(avg)
        diff = 100 * (row["acc"] - u[b])
        se = 100 * _noise(u[b], n_test)
        total += 1
        flag = ""
        if diff < -2 * se:
          losses.append(f"{res['name']} s{res['seed']} {source} @{avg:g}: {diff:+.2f}")
          flag = " **loss**"
        if avg >= 6:
          near8_total += 1
          gap = 100 * (u[8] - row["acc"])
          if gap > 0.2 + 1e-9:  # 0.2 points is 4 of 2,000 images, not "more than 0.2"
            near8.append(f"{res['name']} s{res['seed']} {source} @{avg:g}: "
                         f"{row['acc']:.4f} vs 8-bit {u[8]:.4f}")
        alloc = "n/a" if row["alloc_acc"] is None else f"{row['alloc_acc']:.4f}"
        lines.append(
            f"| {avg:g} | {row['acc']:.4f} | {row['avg']:.2f} | {row['winner']} | {alloc} | "
            f"{b}-bit | {u[b]:.4f} | {diff:+.2f}{flag} | "
            f"{' '.join(str(row['bits'][n]) for n in res['layers'][:12])}"
            f"{' ...' if len(res['layers']) > 12 else ''} |")
      lines.append("")
      if out["variants"]:
        lines += ["Design choices (test accuracy of the returned plan; in brackets the "
                  "allocation alone):", "",
                  "| variant | " + " | ".join(f"@{a:g}" for a in VARIANT_BUDGETS) + " |",
                  "|---|" + "---|" * len(VARIANT_BUDGETS)]
        base = {a: out["rows"][a] for a in VARIANT_BUDGETS}
        for label, rows in [("default", base)] + list(out["variants"].items()):
          cells = []
          for a in VARIANT_BUDGETS:
            r = rows[a]
            alloc = "n/a" if r["alloc_acc"] is None else f"{r['alloc_acc']:.4f}"
            cells.append(f"{r['acc']:.4f} ({alloc})")
          lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
  lines += ["### Verdict (computed from the tables above)", "",
            f"- Mixed below uniform by more than 2 standard errors: {len(losses)} of "
            f"{total} (model, data, budget) cases" + (": " + "; ".join(losses) if losses
                                                     else "."),
            f"- Budgets >= 6 bits more than 0.2 points below uniform 8-bit: {len(near8)} of "
            f"{near8_total}" + (": " + "; ".join(near8) if near8 else "."), ""]
  lines += _variant_summary(results)
  return "\n".join(lines)


def _variant_summary(results):
  sums = {}
  for res in results:
    for out in res["sources"].values():
      if not out["variants"]:
        continue
      for label, rows in [("default", out["rows"])] + list(out["variants"].items()):
        for a in VARIANT_BUDGETS:
          s = sums.setdefault(label, {"ret": [], "alloc": []})
          s["ret"].append(rows[a]["acc"])
          if rows[a]["alloc_acc"] is not None:
            s["alloc"].append(rows[a]["alloc_acc"])
  if not sums:
    return []
  lines = ["Design choices, mean test accuracy over every MNIST CNN copy, data source and "
           f"budget in {VARIANT_BUDGETS}:", "",
           "| variant | returned plan | allocation alone |", "|---|---|---|"]
  for label, s in sums.items():
    alloc = f"{np.mean(s['alloc']):.4f}" if s["alloc"] else "n/a"
    lines.append(f"| {label} | {np.mean(s['ret']):.4f} ({len(s['ret'])} cases) | {alloc} |")
  lines.append("")
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="plain_cnn seed 1 only, no design-choice variants")
  parser.add_argument("--models", default=None,
                      help="comma-separated name:seed list (default: all copies)")
  parser.add_argument("--sources", default="synthetic,real")
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args(argv)
  if args.models:
    models = [(m.split(":")[0], int(m.split(":")[1])) for m in args.models.split(",")]
  elif args.quick:
    models = [("plain_cnn", 1)]
  else:
    models = [("plain_cnn", 1), ("plain_cnn", 2), ("separable_cnn", 1),
              ("separable_cnn", 2), ("mobilenet_v2", 1)]
  sources = tuple(args.sources.split(","))
  started = datetime.datetime.now()
  t0 = time.perf_counter()
  results = [bench_model(n, s, sources, args.quick) for n, s in models]
  n_test = len(bench_models.dataset_for("plain_cnn").y_test)
  text = render(results, args, started, time.perf_counter() - t0, n_test)
  fileio_lib.write_text(args.out, "# Plans benchmark\n\n" + text)
  print(text)


if __name__ == "__main__":
  main()
