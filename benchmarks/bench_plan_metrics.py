"""Why a mixed plan can lose to uniform on an autoencoder's ROC AUC: each candidate plan, measured four ways.

`keras_mpq.quantize` picks its plan with a measured safeguard: the allocated
plan, every uniform plan that fits the budget and a greedy plan are each
quantized and measured on held-out synthetic samples by the library's
objective (for an autoencoder with a sigmoid output: per-pixel binary KL to
the float output). On the conv autoencoder of `any_data` (MNIST digits 0-4
normal, 5-9 anomalous), this script re-quantizes every candidate of that
safeguard (`keras_mpq.apply_plan` on the same calibration data) and measures
it again on the 2,000 held-out real MNIST images:

* ``objective``: the library's measured loss (synthetic held-out samples);
* ``real output err``: mean squared change of the output from the float
  model's, over the float output's variance (real images);
* ``real score err``: mean squared change of the anomaly score (the
  reconstruction MSE) from the float model's, over the float score's
  variance (real images);
* ``ROC AUC``: of the quantized model's score, normal against anomalous.

The first three need no labels; the last needs them. The question it
answers: does any label-free measure rank the plans as the AUC does?

    .venv/bin/python benchmarks/bench_plan_metrics.py --seeds 0,1 --quantize-seeds 0,1 \\
        --out benchmarks/results/plan_metrics.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np  # pylint: disable=g-import-not-at-top

import any_data  # pylint: disable=g-import-not-at-top


def _score(out, x) -> np.ndarray:
  out = np.asarray(out, np.float64).reshape(x.shape)
  return np.mean((out - x) ** 2, axis=tuple(range(1, x.ndim)))


def measure(seed: int, budget: str, quantize_seed: int):
  """Rows (one per safeguard candidate) for conv autoencoder ``seed``."""
  import keras_mpq  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.types import QuantizationPlan  # pylint: disable=g-import-not-at-top
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  task = any_data.conv_autoencoder(seed)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    result = keras_mpq.quantize(any_data.conv_autoencoder(seed).model, budget,
                                seed=quantize_seed, progress=False)
  selection = result.plan.info["selection"]
  calib = np.asarray(result.calibration_data)
  x, bad = task.x_test, task.y_test
  float_out = np.asarray(result.float_model.predict(x, verbose=0, batch_size=256))
  float_score = _score(float_out, x)
  key = (seed, quantize_seed)
  rows = [{"seed": key, "plan": "float", "objective": None, "out_err": 0.0, "score_err": 0.0,
           "auc": float(roc_auc_score(bad, float_score)), "bits": "", "chosen": False}]
  for cand in selection["candidates"]:
    plan = QuantizationPlan(dict(cand["weight_bits"]))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      qm = keras_mpq.apply_plan(any_data.conv_autoencoder(seed).model, plan, calib,
                                seed=quantize_seed)
    out = np.asarray(qm.predict(x, verbose=0, batch_size=256))
    score = _score(out, x)
    names = [cand["name"]] + list(cand.get("also", []))
    rows.append({
        "seed": key, "plan": " = ".join(names), "objective": float(cand["measured_loss"]),
        "out_err": float(np.mean((out - float_out) ** 2) / np.var(float_out)),
        "score_err": float(np.mean((score - float_score) ** 2) / np.var(float_score)),
        "auc": float(roc_auc_score(bad, score)),
        "bits": " ".join(f"{n}:{b}" for n, b in sorted(cand["weight_bits"].items())),
        "chosen": selection["winner"] in names})
  return rows


def _rank(values):
  order = np.argsort(np.argsort(values, kind="stable"), kind="stable")
  return [int(r) + 1 for r in order]


def markdown(rows, args, started, wall_min) -> str:
  lines = [
      "# Plan selection on an autoencoder: label-free measures against ROC AUC",
      "",
      f"- Command: `.venv/bin/python benchmarks/bench_plan_metrics.py {' '.join(args.argv)}`",
      f"- Date: {started:%Y-%m-%d %H:%M} (took {wall_min:.1f} min); {platform.machine()}, "
      f"{os.cpu_count()} CPU cores shared with other jobs, no GPU",
      "- Model: `any_data.conv_autoencoder` (MNIST digits 0-4 normal; 2,000 held-out images, "
      "digits 5-9 anomalous; score = reconstruction MSE). Plans: every candidate of data-free "
      f"`quantize(model, {args.budget!r}, seed=q)`'s safeguard, each "
      "re-quantized with `apply_plan` on that run's synthetic calibration data.",
      "- 'seed / q': the autoencoder's training seed / the quantize seed q.",
      "- Columns: 'objective' = the library's measured loss on held-out synthetic samples "
      "(what the safeguard compares); 'real output err' = mean squared output change / float "
      "output variance; 'real score err' = mean squared anomaly-score change / float score "
      "variance; both on the real held-out images, no labels. (rank) = rank among the "
      "quantized plans, 1 = best. '*' = the plan `quantize` returned.",
      "",
      "| seed / q | plan | objective (rank) | real output err (rank) | real score err (rank) "
      "| ROC AUC (rank) | bits |",
      "|---|---|---|---|---|---|---|",
  ]
  verdicts, agree = [], {"objective": [], "out_err": [], "score_err": []}
  for seed in sorted({r["seed"] for r in rows}):
    mine = [r for r in rows if r["seed"] == seed]
    quantized = [r for r in mine if r["plan"] != "float"]
    ranks = {k: _rank([(-r[k] if k == "auc" else r[k]) for r in quantized])
             for k in ("objective", "out_err", "score_err", "auc")}
    for r in mine:
      if r["plan"] == "float":
        lines.append(f"| {seed[0]} / {seed[1]} | float | - | - | - | {r['auc']:.4f} | |")
        continue
      i = quantized.index(r)
      lines.append(
          f"| {seed[0]} / {seed[1]} | {r['plan']}{' *' if r['chosen'] else ''} | {r['objective']:.5f} "
          f"({ranks['objective'][i]}) | {r['out_err']:.4f} ({ranks['out_err'][i]}) | "
          f"{r['score_err']:.4f} ({ranks['score_err'][i]}) | {r['auc']:.4f} "
          f"({ranks['auc'][i]}) | {r['bits']} |")
    best_auc = quantized[int(np.argmax([r["auc"] for r in quantized]))]
    for key, label in (("objective", "the library's objective"),
                       ("out_err", "real output error"), ("score_err", "real score error")):
      best = quantized[int(np.argmin([r[key] for r in quantized]))]
      agree[key].append(best is best_auc)
      verdicts.append(
          f"- seed {seed[0]}, q {seed[1]}: best by {label}: {best['plan']} (AUC {best['auc']:.4f}); "
          f"best by AUC: {best_auc['plan']} ({best_auc['auc']:.4f})"
          + (" - agree" if best is best_auc else " - disagree"))
  counts = "; ".join(f"{label} {sum(agree[key])} of {len(agree[key])}" for key, label in (
      ("objective", "the library's objective"), ("out_err", "real output error"),
      ("score_err", "real score error")))
  lines += ["", "## Verdict (computed from the table above)", "",
            f"The plan with the lowest label-free error is the plan with the best AUC: {counts}.",
            ""] + verdicts
  return "\n".join(lines) + "\n"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", default="0,1", help="conv autoencoder training seeds")
  p.add_argument("--budget", default="4bit")
  p.add_argument("--quantize-seeds", default="0,1", help="keras_mpq quantize seeds")
  p.add_argument("--out", default=str(HERE / "results" / "plan_metrics.md"))
  args = p.parse_args(argv)
  args.argv = list(argv if argv is not None else sys.argv[1:])
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  started, t0 = datetime.datetime.now(), time.perf_counter()
  rows = []
  for seed in (int(s) for s in args.seeds.split(",")):
    for q in (int(s) for s in args.quantize_seeds.split(",")):
      rows += measure(seed, args.budget, q)
  text = markdown(rows, args, started, (time.perf_counter() - t0) / 60)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
