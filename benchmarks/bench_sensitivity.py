"""Claims 1 and 2 of METHOD.md section 4: how well each sensitivity metric ranks configurations.

For the zoo's plain_cnn and separable_cnn trained on real MNIST (the project's
split: first 8,000 images train and calibrate, last 2,000 test), the
`bench_models` copies trained with seeds 1 and 2:

1. Sample K random per-layer configurations from {2, 4, 8} bits spread over
   sizes (per configuration a probability ``p`` of low bits is drawn, then
   each layer takes 2/4/8 bits with probabilities p^2, 2p(1-p), (1-p)^2), and
   measure each one's real test loss and accuracy with fake quantization (the
   model is quantized once with tfmot and calibrated on 512 real training
   images, then only the bits variables change).
2. For each metric (and the task-interaction metric with each objective,
   KL from the float model or cross-entropy on labels, cleaned by
   `sensitivity.respect_known` or raw, in the all-8-bit context or at a 4-bit
   context), with the sensitivity measured on 256 LABELED SYNTHETIC
   samples (`keras_mpq.synthesize`, no real data), the Spearman and Kendall
   correlation between the predicted cost ``sum_i Omega_i(b_i)`` and the
   measured test loss (and, beside it, the test error); and the real test
   accuracy of the plan each metric picks (`allocate`, exact) at 3-bit and
   4-bit average weight budgets (activations recalibrated on the 512 real
   images for each plan, as `apply_plan` does).
3. Data: the task-interaction metric measured on labeled synthetic, ZeroQ
   distilled, noise, and real (256 real training images) data.
4. Iterative search (`keras_mpq.plan.search.search`) rounds at one budget.
5. Cost: wall time of one full task-interaction measurement beside the floor
   (evaluations x one forward pass over the same data, same run), for the
   MNIST CNN and for keras.applications.MobileNetV2(alpha=0.35,
   input_shape=(96, 96, 3), weights=None, classes=10) on random data.

Writes a markdown section to benchmarks/results/sensitivity.md (atomically)
and prints it.

Usage:

  .venv/bin/python benchmarks/bench_sensitivity.py [--quick] [--seed 0]
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
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # pylint: disable=g-import-not-at-top
from scipy import stats  # pylint: disable=g-import-not-at-top

import bench_models  # pylint: disable=g-import-not-at-top
from keras_mpq.plan import allocation as allocation_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.quantization import access as access_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.quantization import calibrate as calibrate_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.quantization import fold as fold_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.quantization import optimize as optimize_lib  # pylint: disable=g-import-not-at-top
from keras_mpq import demo_data as demo_data_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.base import fileio as fileio_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.plan import costs as costs_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.plan import search as search_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.sensitivity import job as job_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.sensitivity import measure as measure_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.synthesis import generators as generators_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.base.compat import keras, tf  # pylint: disable=g-import-not-at-top
from keras_mpq.base.types import Budget, QuantizationPlan  # pylint: disable=g-import-not-at-top

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "sensitivity.md"
BITS = (2, 4, 8)
# (label, metric, measure_sensitivity keyword arguments); "ctx4" is replaced by
# every layer at 4 bits (the context at a 4-bit budget).
METRICS = (
    ("task_interaction (kl)", "task_interaction", {"objective": "kl"}),
    ("task_interaction (kl, raw)", "task_interaction", {"objective": "kl", "clean": False}),
    ("task_interaction (kl, context 4-bit)", "task_interaction",
     {"objective": "kl", "context": "ctx4"}),
    ("task_interaction (ce)", "task_interaction", {"objective": "cross_entropy"}),
    ("task_interaction (ce, raw)", "task_interaction",
     {"objective": "cross_entropy", "clean": False}),
    ("task_float_context (ce)", "task_float_context", {"objective": "cross_entropy"}),
    ("zeroq_kl", "zeroq_kl", {}),
    ("hessian_trace", "hessian_trace", {}),
    ("weight_mse", "weight_mse", {}),
)
TI_LABEL = METRICS[0][0]
MODEL_SEEDS = (1, 2)
BUDGETS = (3.0, 4.0)
CALIBRATION = 512


def log(msg):
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- real test loss


class TestHarness:
  """One tfmot model calibrated on real data; configurations set by bits variables.

  ``weights="rtn"``: each layer rounded to nearest on its max-abs grid (the
  bits variables alone). ``weights="default"``: each (layer, bits) quantized
  by the library's weight quantizer (`apply.DEFAULT_WEIGHT_METHOD` with its
  bias correction, `apply.WeightBank` on the real calibration images), as
  `keras_mpq.quantize` with real data would deploy it.
  """

  def __init__(self, folded, layers, x_cal, x_test, y_test, weights="rtn"):
    self.layers, self.x_cal = layers, x_cal
    self.x_test, self.y_test = x_test, y_test
    self.qmodel = access_lib.quantize_model(folded, QuantizationPlan.uniform(layers, 8))
    self.bank = None if weights == "rtn" else optimize_lib.WeightBank(
        self.qmodel, x_cal, optimize_lib.DEFAULT_WEIGHT_METHOD, optimize_lib.DEFAULT_BIAS_CORRECTION)
    if self.bank is not None:
      self.bank.set_weight_bits({n: 8 for n in layers})
    calibrate_lib.calibrate(self.qmodel, x_cal)
    qmodel = self.qmodel
    self.forward = tf.function(
        lambda x: qmodel(x, training=False),
        input_signature=[tf.TensorSpec((None,) + x_test.shape[1:], tf.float32)])

  def measure(self, bits, recalibrate=False):
    """(test loss, test accuracy) at ``bits`` ({layer: bits})."""
    if self.bank is None:
      access_lib.set_weight_bits(self.qmodel, bits)
    else:
      self.bank.set_weight_bits(bits)
    if recalibrate:
      calibrate_lib.calibrate(self.qmodel, self.x_cal)
    logits = np.concatenate([self.forward(tf.constant(self.x_test[s:s + 500])).numpy()
                             for s in range(0, len(self.x_test), 500)])
    loss = keras.losses.sparse_categorical_crossentropy(
        self.y_test, logits, from_logits=True).numpy().mean()
    return float(loss), float(np.mean(logits.argmax(-1) == self.y_test))

  def reset(self):
    """All 8 bits, calibrated at 8 bits (the state random configurations use)."""
    if self.bank is None:
      access_lib.set_weight_bits(self.qmodel, {n: 8 for n in self.layers})
    else:
      self.bank.set_weight_bits({n: 8 for n in self.layers})
    calibrate_lib.calibrate(self.qmodel, self.x_cal)


def random_configs(layers, k, rng):
  configs = []
  for _ in range(k):
    p = rng.uniform()
    probs = np.array([p * p, 2 * p * (1 - p), (1 - p) ** 2])
    configs.append({n: int(rng.choice(BITS, p=probs)) for n in layers})
  return configs


def correlations(table, configs, losses, errors, reference=None):
  pred = np.array([table.predicted(QuantizationPlan(c)) for c in configs])
  row = {"spearman": stats.spearmanr(pred, losses)[0],
         "kendall": stats.kendalltau(pred, losses)[0],
         "spearman_err": stats.spearmanr(pred, errors)[0]}
  if reference is not None:
    row["spearman_real_pred"] = stats.spearmanr(pred, reference)[0]
  return row, pred


def bootstrap(rows, losses, rng, resamples=1000):
  """95% interval of each row's Spearman, and how often task_interaction beats it.

  The same resampled configuration sets serve every metric, so the
  comparison is paired.
  """
  k = len(losses)
  idx = [rng.integers(0, k, k) for _ in range(resamples)]
  rhos = {r["metric"]: np.array([stats.spearmanr(r["pred"][i], losses[i])[0] for i in idx])
          for r in rows}
  ti = rhos[TI_LABEL]
  for r in rows:
    rho = rhos[r["metric"]]
    r["ci"] = (float(np.nanpercentile(rho, 2.5)), float(np.nanpercentile(rho, 97.5)))
    r["ti_wins"] = float(np.mean(ti > rho)) if r["metric"] != TI_LABEL else None


def plan_accuracies(table, costs, harness):
  out = {}
  for avg in BUDGETS:
    plan = allocation_lib.allocate(table, Budget.avg_bits(avg), costs)
    loss, acc = harness.measure(plan.weight_bits, recalibrate=True)
    out[avg] = {"acc": acc, "loss": loss, "bits": plan.weight_bits,
                "achieved": plan.info["achieved"]["avg_bits"]}
  harness.reset()
  return out


# --------------------------------------------------------------------------- per model


def bench_model(name, ds, k, num_samples, seed, model_seed, no_search=False, weights="rtn"):
  log(f"{name} seed {model_seed}: loading")
  t0 = time.perf_counter()
  model = bench_models.get(name, model_seed)
  folded = fold_lib.fold_batchnorm(model)
  layers = access_lib.plan_layers(folded)
  costs = costs_lib.cost_table(folded, bits=BITS)
  float_acc = float(np.mean(model.predict(ds.x_test, verbose=0).argmax(-1) == ds.y_test))
  harness = TestHarness(folded, layers, ds.x_train[:CALIBRATION], ds.x_test, ds.y_test,
                        weights)
  res = {"name": f"{name} seed {model_seed}", "layers": layers, "float_acc": float_acc,
         "params": {c.name: c.n_params for c in costs.layer_costs},
         "train_s": time.perf_counter() - t0}

  log(f"{name}: {k} random configurations on the real test set")
  rng = np.random.default_rng(seed)
  configs = random_configs(layers, k, rng)
  measured = [harness.measure(c) for c in configs]
  losses = np.array([m[0] for m in measured])
  errors = 1.0 - np.array([m[1] for m in measured])
  sizes = np.array([costs.plan_cost(QuantizationPlan(c), "avg_bits") for c in configs])
  res["configs"] = {"k": k, "avg_bits_min": sizes.min(), "avg_bits_max": sizes.max(),
                    "avg_bits_median": float(np.median(sizes)),
                    "loss_min": losses.min(), "loss_max": losses.max(),
                    "acc_min": 1 - errors.max(), "acc_max": 1 - errors.min()}
  res["uniform"] = {b: harness.measure({n: b for n in layers}, recalibrate=True)
                    for b in BITS}
  harness.reset()

  log(f"{name}: synthesizing data")
  data = {}
  for method in ("labeled", "zeroq", "noise"):
    t = time.perf_counter()
    data[method] = generators_lib.synthesize(model, num_samples, method, seed=seed,
                                        progress=False)
    log(f"  {method}: {time.perf_counter() - t:.1f}s")
  data["real"] = (ds.x_train[:num_samples], ds.y_train[:num_samples])

  # Real-data task_interaction predictions: the reference ranking for claim 2.
  tables = {}
  t = time.perf_counter()
  tables[(TI_LABEL, "real")] = measure_lib.measure_sensitivity(
      model, data["real"], metric="task_interaction", seed=seed, progress=False,
      **METRICS[0][2])
  _, ref_pred = correlations(tables[(TI_LABEL, "real")], configs, losses, errors)

  metric_rows = []
  for label, metric, kwargs in METRICS:
    log(f"{name}: metric {label} on labeled synthetic data")
    kwargs = dict(kwargs)
    if kwargs.get("context") == "ctx4":
      kwargs["context"] = {n: 4 for n in layers}
    t = time.perf_counter()
    table = measure_lib.measure_sensitivity(
        model, None if metric == "weight_mse" else data["labeled"], metric=metric,
        seed=seed, progress=False, **kwargs)
    seconds = time.perf_counter() - t
    tables[(label, "labeled")] = table
    row, pred = correlations(table, configs, losses, errors, ref_pred)
    row.update({"metric": label, "seconds": seconds, "pred": pred,
                "evaluations": table.info.get("evaluations", 0),
                "plans": plan_accuracies(table, costs, harness)})
    metric_rows.append(row)
  bootstrap(metric_rows, losses, np.random.default_rng(seed + 1))
  res["metrics"] = metric_rows

  data_rows = []
  for label, _, kwargs in (METRICS[0],):
    for source in ("labeled", "zeroq", "noise", "real"):
      log(f"{name}: {label} on {source} data")
      key = (label, source)
      if key not in tables:
        tables[key] = measure_lib.measure_sensitivity(
            model, data[source], metric="task_interaction", seed=seed, progress=False,
            **kwargs)
      row, _ = correlations(tables[key], configs, losses, errors, ref_pred)
      row.update({"source": source, "metric": label,
                  "plans": plan_accuracies(tables[key], costs, harness)})
      data_rows.append(row)
  res["data"] = data_rows

  res["model"], res["data_xy"] = model, data["labeled"]
  if no_search:
    res["search"] = None
    return res
  log(f"{name}: iterative search at 3 bits")
  t = time.perf_counter()
  found = search_lib.search(model, data["labeled"], Budget.avg_bits(3.0), rounds=3,
                             costs=costs, seed=seed, progress=False)
  res["search_s"] = time.perf_counter() - t
  rounds = []
  for r in found.rounds:
    loss, acc = harness.measure(r["weight_bits"], recalibrate=True)
    rounds.append(dict(r, test_loss=loss, test_acc=acc))
  harness.reset()
  res["search"] = {"rounds": rounds, "chosen": found.plan.info["search"]["round"]}
  res["model"], res["data_xy"] = model, data["labeled"]
  return res


# --------------------------------------------------------------------------- cost


def forward_time(model, x, repeats=5):
  """Median seconds of one forward pass of ``model`` (quantized, 8-bit) over ``x``."""
  folded = job_lib._fold(model)  # pylint: disable=protected-access
  layers = access_lib.plan_layers(folded)
  qmodel = access_lib.quantize_model(folded, QuantizationPlan.uniform(layers, 8))
  calibrate_lib.calibrate(qmodel, x[:128])
  fwd = tf.function(lambda t: qmodel(t, training=False),
                    input_signature=[tf.TensorSpec((None,) + x.shape[1:], tf.float32)])

  def once():
    for s in range(0, len(x), 128):
      fwd(tf.constant(x[s:s + 128])).numpy()

  once()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    once()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bench_cost(label, model, x, y):
  log(f"cost: {label}")
  t = time.perf_counter()
  table = measure_lib.measure_sensitivity(model, (x, y), progress=False)
  wall = time.perf_counter() - t
  t = time.perf_counter()
  plain = measure_lib.measure_sensitivity(model, (x, y), progress=False, reuse_prefix=False)
  wall_plain = time.perf_counter() - t
  fwd = forward_time(model, x)
  return {"label": label, "n": len(x), "layers": len(table.layers),
          "evaluations": table.info["evaluations"], "wall": wall, "fwd": fwd,
          "reused": sum(table.info["prefix_reuse"].values()),
          "traces": table.info["traces"], "calib": table.info["calibration_seconds"],
          "evaluations_plain": plain.info["evaluations"], "wall_plain": wall_plain,
          "same": float(np.max(np.abs(table.scores - plain.scores)))}


# --------------------------------------------------------------------------- report


def _f(v, d=3):
  return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{d}f}"


def _bits(bits, layers):
  return " ".join(str(bits[n]) for n in layers)


def render(results, costs, args, started, elapsed):
  mode = "quick" if args.quick else "full"
  lines = [
      f"## Sensitivity metrics ({mode} mode)", "",
      f"- Command: `.venv/bin/python benchmarks/bench_sensitivity.py"
      f"{' --quick' if args.quick else ''} --seed {args.seed}"
      f"{'' if args.quick else ' --model-seeds ' + ','.join(map(str, args.model_seeds))}"
      f"{'' if args.quick else f' --k {args.k} --names {args.names}'}"
      f"{' --no-search' if args.no_search else ''}{' --no-cost' if args.no_cost else ''}"
      f"{'' if args.weights == 'rtn' else ' --weights ' + args.weights}`",
      "- Weights of each measured configuration: " + (
          "round to nearest on the max-abs grid (bits variables only)." if args.weights == "rtn"
          else f"the library's default quantizer (`{optimize_lib.DEFAULT_WEIGHT_METHOD}`, bias "
          f"correction {optimize_lib.DEFAULT_BIAS_CORRECTION}) per (layer, bits) on the "
          f"{CALIBRATION} real calibration images (`apply.WeightBank`)."),
      f"- Date: {started:%Y-%m-%d %H:%M} (took {elapsed / 60:.1f} min)",
      f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other "
      f"jobs (load average {os.getloadavg()[0]:.1f} at end), {platform.system()} "
      f"{platform.release()}; Python {platform.python_version()}, TensorFlow "
      f"{tf.__version__}, CPU only",
      f"- Data: {results[0]['dataset']}; models trained on the first 8,000 images "
      "(`bench_models` copies, seeds "
      f"{', '.join(str(s) for s in args.model_seeds)}); every loss/accuracy below is on the last 2,000 (test), with "
      f"activations calibrated on the first {CALIBRATION} training images.",
      f"- Sensitivities: on {args.num_samples} labeled synthetic samples "
      "(`synthesize(method='labeled')`) unless the data table says otherwise; "
      "candidate bits {2, 4, 8}, activations 8-bit.",
      "- Spearman / Kendall: between a metric's predicted cost "
      "`sum_i Omega_i(b_i)` and the measured test loss of each random "
      "configuration (higher is better). `rho(err)`: Spearman against the test "
      "error instead. `rho(real)`: Spearman against the predictions of "
      "task_interaction measured on real data. `[95% CI]`: bootstrap over the "
      "configurations (1000 resamples); `P(TI > it)`: share of the same resamples "
      "in which task_interaction's Spearman is higher than this metric's.",
      "- Plans: `allocate` (exact MILP) at an average of 3 and 4 weight bits; "
      "test accuracy of the plan, activations recalibrated at the plan.", ""]
  for res in results:
    c = res["configs"]
    layers = res["layers"]
    lines += [
        f"### {res['name']} (float test accuracy {res['float_acc']:.4f})", "",
        "Layers (params): " + ", ".join(f"{n} ({res['params'][n]})" for n in layers)
        + ".  ",
        f"{c['k']} random configurations: average bits {c['avg_bits_min']:.2f} to "
        f"{c['avg_bits_max']:.2f} (median {c['avg_bits_median']:.2f}); test loss "
        f"{c['loss_min']:.3f} to {c['loss_max']:.3f}; test accuracy {c['acc_min']:.4f} "
        f"to {c['acc_max']:.4f}.  ",
        "Uniform references (test accuracy): " + ", ".join(
            f"{b}-bit {res['uniform'][b][1]:.4f}" for b in BITS) + ".", "",
        "| metric | Spearman [95% CI] | P(TI > it) | Kendall | rho(err) | rho(real) | "
        "acc @3 bit | acc @4 bit | seconds | evaluations |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for row in res["metrics"]:
      p = row["plans"]
      lines.append(
          f"| {row['metric']} | {_f(row['spearman'])} [{_f(row['ci'][0], 2)}, "
          f"{_f(row['ci'][1], 2)}] | {_f(row['ti_wins'], 2)} | {_f(row['kendall'])} | "
          f"{_f(row['spearman_err'])} | {_f(row.get('spearman_real_pred'))} | "
          f"{p[3.0]['acc']:.4f} ({_bits(p[3.0]['bits'], layers)}) | "
          f"{p[4.0]['acc']:.4f} ({_bits(p[4.0]['bits'], layers)}) | "
          f"{row['seconds']:.1f} | {row['evaluations']} |")
    ranked = sorted(res["metrics"], key=lambda r: -np.nan_to_num(r["spearman"], nan=-9))
    pos = [r["metric"] for r in ranked].index(TI_LABEL) + 1
    best = ranked[0]
    ti_row = next(r for r in res["metrics"] if r["metric"] == TI_LABEL)
    best_other = next(r for r in ranked if r["metric"] != TI_LABEL)
    acc3 = {r["metric"]: r["plans"][3.0]["acc"] for r in res["metrics"]}
    top3 = max(acc3.values())
    best3 = " = ".join(m for m, a in acc3.items() if a == top3)
    lines += ["", f"Plan bits are listed in layer order ({' '.join(layers)}).  ",
              f"**Verdict (measured, not tuned):** by Spearman against test loss, "
              f"{TI_LABEL} ranks {pos} of {len(ranked)} (best: {best['metric']}, "
              f"{_f(best['spearman'])}; {TI_LABEL} {_f(ti_row['spearman'])}; in "
              f"{_f(100 * (1 - best_other['ti_wins']), 0)}% of bootstrap resamples "
              f"{best_other['metric']} scores at least as high). Best 3-bit plan: {best3} "
              f"({top3:.4f}); {TI_LABEL}'s: {acc3[TI_LABEL]:.4f}. "
              f"One test image is 0.0005 of accuracy.", "",
              "Task-interaction sensitivity by data source:", "",
              "| objective | data | Spearman | Kendall | rho(err) | rho(real) | acc @3 bit | "
              "acc @4 bit |", "|---|---|---|---|---|---|---|---|"]
    for row in res["data"]:
      p = row["plans"]
      lines.append(
          f"| {row['metric']} | {row['source']} | {_f(row['spearman'])} | {_f(row['kendall'])} | "
          f"{_f(row['spearman_err'])} | {_f(row.get('spearman_real_pred'))} | "
          f"{p[3.0]['acc']:.4f} ({_bits(p[3.0]['bits'], layers)}) | "
          f"{p[4.0]['acc']:.4f} ({_bits(p[4.0]['bits'], layers)}) |")
    by_source = sorted([r for r in res["data"] if r["metric"] == TI_LABEL],
                       key=lambda r: -np.nan_to_num(r["spearman"], nan=-9))
    order = ", ".join(f"{r['source']} {_f(r['spearman'])}" for r in by_source)
    order = f"({TI_LABEL}) " + order
    lines += ["", f"By Spearman against test loss: {order}."]
    if res["search"] is None:
      lines.append("")
      continue
    lines += ["", f"Iterative search at 3 bits average on labeled synthetic data "
              f"({res['search_s']:.1f} s; chosen: round {res['search']['chosen']}):", "",
              "| round | bits | predicted | loss (synthetic) | avg bits | test loss | "
              "test acc | changed |", "|---|---|---|---|---|---|---|---|"]
    for r in res["search"]["rounds"]:
      lines.append(
          f"| {r['round']} | {_bits(r['weight_bits'], layers)} | {_f(r['predicted'], 4)} | "
          f"{_f(r['measured_loss'], 4)} | {r['cost']:.3f} | {_f(r['test_loss'], 4)} | "
          f"{r['test_acc']:.4f} | {r['changed']} |")
    lines.append("")
  lines += ["### Goal: Spearman >= 0.9 with synthetic data", ""]
  for res in results:
    ti = next(r for r in res["metrics"] if r["metric"] == TI_LABEL)
    best = max(res["metrics"], key=lambda r: np.nan_to_num(r["spearman"], nan=-9))
    lines.append(f"- {res['name']}: {TI_LABEL} {_f(ti['spearman'])} "
                 f"({'met' if ti['spearman'] >= 0.9 else 'NOT met'}); best row "
                 f"{best['metric']} {_f(best['spearman'])}.")
  lines.append("")
  if not costs:
    return "\n".join(lines)
  lines += ["### Cost of one task_interaction measurement", "",
            "Floor = evaluations x one forward pass of the quantized model over the "
            "same data (median of 5, same run). Wall time includes quantizing the "
            "model, calibration and tracing. `no reuse`: the same measurement "
            "evaluating the full model for every (layer, bits) pair; `max |diff|`: "
            "largest score difference between the two.", "",
            "| model | samples | layers (prefix reused) | evaluations | one pass (s) | "
            "floor (s) | wall (s) | wall / floor | no reuse: evaluations, wall (s) | "
            "max abs diff | traces |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for c in costs:
    floor = c["evaluations"] * c["fwd"]
    lines.append(
        f"| {c['label']} | {c['n']} | {c['layers']} ({c['reused']}) | {c['evaluations']} | "
        f"{c['fwd']:.3f} | {floor:.1f} | {c['wall']:.1f} | {c['wall'] / floor:.2f} | "
        f"{c['evaluations_plain']}, {c['wall_plain']:.1f} | {c['same']:.1e} | "
        f"{c['traces']} |")
  lines.append("")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="30 configurations, 128 samples, one model (plain_cnn)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=str(RESULTS))
  parser.add_argument("--model-seeds", default=",".join(str(s) for s in MODEL_SEEDS),
                      help="bench_models copies to study, e.g. 1 or 1,2")
  parser.add_argument("--k", type=int, default=100, help="random configurations")
  parser.add_argument("--names", default="plain_cnn,separable_cnn")
  parser.add_argument("--no-search", action="store_true",
                      help="skip the iterative-search table (bench_rounds.py has it)")
  parser.add_argument("--no-cost", action="store_true",
                      help="skip the cost table (MobileNetV2 timing)")
  parser.add_argument("--weights", choices=("rtn", "default"), default="rtn",
                      help="how the configurations' real test loss quantizes weights: "
                           "round to nearest, or the library's default quantizer")
  args = parser.parse_args(argv)
  args.num_samples = 128 if args.quick else 256
  k = 30 if args.quick else args.k
  started = datetime.datetime.now()
  t0 = time.perf_counter()
  ds = demo_data_lib.load_default()
  names = ("plain_cnn",) if args.quick else tuple(args.names.split(","))
  args.model_seeds = (1,) if args.quick else tuple(
      int(v) for v in args.model_seeds.split(","))
  results = []
  for name in names:
    for model_seed in args.model_seeds:
      res = bench_model(name, ds, k, args.num_samples, args.seed, model_seed,
                        args.no_search, args.weights)
      res["dataset"] = f"{ds.name} ({ds.split})"
      results.append(res)
  costs = [] if args.no_cost else [bench_cost(
      "plain_cnn (MNIST, labeled synthetic)", results[0]["model"], *results[0]["data_xy"])]
  if not args.no_cost:
    mnv2 = keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3),
                                          weights=None, classes=10)
    rng = np.random.default_rng(args.seed)
    n = 64 if args.quick else 128
    x = rng.uniform(-1, 1, (n, 96, 96, 3)).astype(np.float32)
    y = rng.integers(0, 10, n)
    costs.append(bench_cost("MobileNetV2 0.35, 96x96 (random data)", mnv2, x, y))
  text = render(results, costs, args, started, time.perf_counter() - t0)
  fileio_lib.write_text(args.out, "# Sensitivity benchmark\n\n" + text)
  print(text)


if __name__ == "__main__":
  main()
