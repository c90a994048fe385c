"""How long the exact allocator takes on a model-sized problem.

A 200-layer model with 4 candidate bit-widths (2, 3, 4, 8): layer sizes drawn
log-uniformly from 500 to 2.4M weights (MobileNet/ResNet-like spread), MACs
from a spatial size per layer, sensitivity scores that fall about 4x per extra
bit (quantization noise power) with per-layer spread and noise, 8-bit scores
near zero. Times `allocate` at byte, average-bit and BOPs budgets spread over
the feasible range, and `pareto_front` with 20 points: median of several runs.
Every plan is checked against its budget. Writes a markdown section to
benchmarks/results/allocation.md (atomically) and prints it.

Usage:

  .venv/bin/python benchmarks/bench_allocation.py [--layers 200] [--runs 7] [--seed 0]
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
import scipy

from keras_mpq.plan import allocation as allocation_lib
from keras_mpq.plan import costs as costs_lib
from keras_mpq.base import fileio as fileio_lib
from keras_mpq.base.types import Budget, BudgetKind, LayerCost, SensitivityTable

BITS = (2, 3, 4, 8)
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "allocation.md"


def make_tables(n_layers: int, seed: int):
  """Random but realistic sensitivity and cost tables for an ``n_layers`` model."""
  rng = np.random.default_rng(seed)
  names = tuple(f"layer{i:03d}" for i in range(n_layers))
  params = np.exp(rng.uniform(np.log(500), np.log(2.4e6), n_layers)).astype(int)
  channels = np.clip((params ** 0.5).astype(int), 8, 2048)
  spatial = rng.choice([1, 7 * 7, 14 * 14, 28 * 28, 56 * 56, 112 * 112], n_layers)
  lcs = [LayerCost(n, "Conv2D", int(p), int(c), int(c), int(p * s))
         for n, p, c, s in zip(names, params, channels, spatial)]
  table = costs_lib.cost_table(lcs, bits=BITS, activation_bits=8)
  base = rng.lognormal(0.0, 1.5, n_layers)[:, None] * (params[:, None] / params.mean()) ** 0.3
  decay = np.array([4.0 ** -(b - 2) for b in BITS])
  scores = base * decay * rng.uniform(0.7, 1.3, (n_layers, len(BITS)))
  scores[:, -1] = rng.normal(0, 1e-4, n_layers)  # 8 bits: measurement noise only
  return SensitivityTable(names, BITS, scores), table


def timed(fn, runs):
  times, out = [], None
  for _ in range(runs):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), min(times), max(times), out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=200)
  parser.add_argument("--runs", type=int, default=7)
  parser.add_argument("--pareto-runs", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args(argv)

  load_before = os.getloadavg()[0]
  sens, table = make_tables(args.layers, args.seed)
  rows = []
  for kind in (BudgetKind.BYTES, BudgetKind.AVG_BITS, BudgetKind.BOPS):
    m = table.matrix(kind)
    low, high = m.min(axis=1).sum(), m.max(axis=1).sum()
    for frac in (0.1, 0.3, 0.5, 0.8):
      budget = Budget(kind, low + frac * (high - low))
      med, lo, hi, plan = timed(lambda b=budget: allocation_lib.allocate(sens, b, table),
                                args.runs)
      achieved = table.plan_cost(plan, kind)
      assert achieved <= budget.value * (1 + 1e-9), (budget, achieved)
      solver = plan.info["solver"]
      rows.append((kind.value, frac, budget.describe(), achieved, med, lo, hi,
                   plan.info["predicted_loss"], solver["status"], solver.get("optimal"),
                   solver.get("rhs_tightened", False)))

  pmed, plo, phi, front = timed(
      lambda: allocation_lib.pareto_front(sens, table, kind="bytes", points=20),
      args.pareto_runs)
  losses = [p.predicted_loss for p in front]
  monotone = all(b <= a for a, b in zip(losses, losses[1:]))
  over = sum(p.cost > max(p.plan.info["budget"]["value"], 0) * (1 + 1e-9) for p in front)

  command = "python benchmarks/bench_allocation.py " + " ".join(
      sys.argv[1:] if argv is None else argv)
  lines = [
      "## Allocation time (exact MILP, scipy.optimize.milp / HiGHS)",
      "",
      f"- Command: `{command.strip()}`",
      f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
      f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores "
      f"(shared with other jobs; 1-min load average {load_before:.1f} at start, "
      f"{os.getloadavg()[0]:.1f} at end), {platform.system()} {platform.release()}; "
      f"Python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}",
      f"- Problem: {args.layers} layers x {len(BITS)} bit-widths {BITS} "
      f"({args.layers * len(BITS)} binaries), seed {args.seed}; "
      f"{sum(c.n_params for c in table.layer_costs) / 1e6:.1f}M weights",
      "",
      f"`allocate`: median of {args.runs} runs per budget (budget at a fraction of the "
      "range from the cheapest plan to the most expensive one).",
      "",
      "| kind | fraction | budget | achieved | median s | min s | max s | predicted loss "
      "| status | optimal | rhs tightened |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r[0]} | {r[1]:.1f} | {r[2]} | {r[3]:.6g} | {r[4]:.4f} | {r[5]:.4f} "
                 f"| {r[6]:.4f} | {r[7]:.5g} | {r[8]} | {r[9]} | {r[10]} |")
  all_med = [r[4] for r in rows]
  lines += [
      "",
      f"Median over all {len(rows)} budgets: {statistics.median(all_med):.4f} s; "
      f"slowest median: {max(all_med):.4f} s.",
      "",
      f"`pareto_front(kind='bytes', points=20)`: median {pmed:.3f} s "
      f"(min {plo:.3f}, max {phi:.3f}) over {args.pareto_runs} runs; "
      f"{len(front)} distinct plans from {front[0].cost:.6g} B to {front[-1].cost:.6g} B; "
      f"predicted loss non-increasing: {monotone}; points over their budget: {over}.",
      "",
  ]
  text = "\n".join(lines)
  fileio_lib.write_text(args.out, "# Allocation benchmark\n\n" + text)
  print(text)


if __name__ == "__main__":
  main()
