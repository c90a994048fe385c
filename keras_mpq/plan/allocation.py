"""Allocation: one weight bit-width per layer under a budget, solved exactly.

Choosing ``b_i`` for each layer ``i`` to minimize ``sum_i score_i(b_i)``
subject to ``sum_i cost_i(b_i) <= budget`` is a multiple-choice knapsack. We
solve it as a small integer program with `scipy.optimize.milp` (HiGHS): one
binary per (layer, bits), exactly one per layer, one budget row. Pure numpy and
scipy: the inputs are a `SensitivityTable` and a `CostTable`, nothing here
touches Keras.

Numerics: per layer, the cheapest option's cost is subtracted (the one-hot
rows make that exact) and the budget row is divided by the remaining slack, so
its coefficients lie in [0, 1] whatever the unit (bytes or 1e12 BOPs); options
that cannot fit even alone are fixed to 0; scores are shifted and scaled the
same way. After solving, the binaries are rounded and the plan's real cost is
checked against the budget; a plan over budget (possible within the solver's
feasibility tolerance) is never returned: the problem is solved again with a
tightened row.

Example:

>>> import numpy as np
>>> from keras_mpq.base.types import Budget, CostTable, SensitivityTable
>>> sens = SensitivityTable(("a", "b"), (4, 8), np.array([[1.0, 0.0], [0.2, 0.0]]))
>>> costs = CostTable(("a", "b"), (4, 8), {"bytes": np.array([[50, 100], [50, 100]])})
>>> allocate(sens, Budget.bytes(150), costs).weight_bits
{'a': 8, 'b': 4}
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
from scipy import optimize, sparse

from keras_mpq.base.errors import (
  BudgetInfeasibleError,
  InvalidInputError,
  KerasMpqError,
)
from keras_mpq.base.results import ParetoPoint
from keras_mpq.base.types import (
  Budget,
  BudgetKind,
  CostTable,
  QuantizationPlan,
  SensitivityTable,
)

# A plan meets a budget when its cost is <= value * (1 + _RTOL), as in
# `Budget.is_satisfied_by`.
_RTOL = 1e-9
# Budget-row right-hand sides tried in turn (the row is scaled to slack 1):
# the exact one first, then ones tighter than HiGHS' feasibility tolerances.
_RHS_TRIES = (1.0, 1.0 - 1e-5, 1.0 - 1e-3)
# Second (tie-breaking) solve: plans whose normalized score sum is within this
# of the optimum count as ties, and the one spending the most budget wins.
_TIE_TOL = 1e-9
_UNITS = {BudgetKind.BYTES: "B", BudgetKind.AVG_BITS: " bits avg",
          BudgetKind.BOPS: " BOPs", BudgetKind.LATENCY: " ms"}


# --------------------------------------------------------------------------- public


DEFAULT_WEIGHT_BITS = (2, 4, 8)
"""Default candidate weight bit-widths for byte and latency budgets."""

DEFAULT_WEIGHT_BITS_LOW = (2, 3, 4, 8)
"""Default candidates for average-bit and BOPs budgets (3 bits measured to help there)."""


def default_weight_bits(budget) -> Tuple[int, ...]:
  """The default candidate bit-widths for ``budget``'s kind.

  Average-bit and BOPs budgets get 3 bits too; byte budgets do not, because
  TFLite stores 3-bit weights in the same INT4 container as 4-bit ones
  (`keras_mpq.base.types.LayerCost.weight_bytes`), so 3 bits would cost as much
  as 4 and measure worse; latency tables list their own bit-widths.

  >>> default_weight_bits("4bit"), default_weight_bits("48KB")
  ((2, 3, 4, 8), (2, 4, 8))
  """
  kind = Budget.parse(budget).kind
  if kind in (BudgetKind.AVG_BITS, BudgetKind.BOPS):
    return DEFAULT_WEIGHT_BITS_LOW
  return DEFAULT_WEIGHT_BITS


def _feasible_problem(sensitivity, budget, costs, pinned):
  """(budget, problem, kind, cost matrix, limit), or `BudgetInfeasibleError` naming the smallest budget."""
  budget = Budget.parse(budget)
  problem = _Problem(sensitivity, costs, pinned)
  kind = budget.kind
  matrix = problem.matrix(kind)
  limit = budget.value * (1 + _RTOL)
  smallest = problem.cheapest_cost(matrix)
  if smallest > limit:
    where = " with the pinned layers as pinned" if problem.pinned else ""
    raise BudgetInfeasibleError(
        f"Expected a budget of at least {_fmt(kind, smallest)}: the cheapest plan "
        f"(every layer at its cheapest candidate bit-width{where}) costs that much. "
        f"Received: budget={budget.describe()}. Raise the budget, add lower "
        "candidate bit-widths, or pin fewer layers.", smallest)
  return budget, problem, kind, matrix, limit


def allocate(sensitivity: SensitivityTable, budget, costs: CostTable,
             pinned: Optional[Mapping[str, int]] = None, *,
             time_limit: float = 60.0) -> QuantizationPlan:
  """The plan with the lowest predicted loss whose cost meets ``budget``.

  Args:
    sensitivity: score per (layer, candidate bits); the objective is the sum
      of the chosen scores (`SensitivityTable.predicted`).
    budget: a `Budget` or anything `Budget.parse` takes (``"48KB"``,
      ``"4bit"``, ``"2e9bops"``, ``"5ms"``).
    costs: a `CostTable` with the same layers (any order) and at least the
      sensitivity's bit-widths, holding the budget's kind.
    pinned: ``{layer: bits}`` fixed before solving (bits must be candidates).
    time_limit: seconds HiGHS may spend; past it the best plan found so far
      is returned with ``info["solver"]["optimal"] = False``.

  Returns:
    A `QuantizationPlan` whose ``info`` records the budget, the achieved cost
    of every kind in ``costs``, the predicted loss, and the solver's status
    and time. When even the all-highest plan fits, that plan is returned and
    ``info["note"]`` says the budget is not binding.

  Raises:
    BudgetInfeasibleError: the budget is below the cheapest plan; ``.smallest``
      is the cheapest plan's cost in the budget's unit.
    InvalidInputError: mismatched layers or bits, unknown pinned layers or
      bits, or a budget kind the cost table does not have.

  Example:

  >>> import numpy as np
  >>> from keras_mpq.base.types import CostTable, SensitivityTable
  >>> sens = SensitivityTable(("a", "b"), (2, 8), np.array([[3.0, 0.0], [1.0, 0.0]]))
  >>> costs = CostTable(("a", "b"), (2, 8), {"avg_bits": np.array([[1, 4], [1, 4]])})
  >>> plan = allocate(sens, "5bit", costs)
  >>> plan.weight_bits, plan.info["achieved"]["avg_bits"]
  ({'a': 8, 'b': 2}, 5.0)
  """
  budget, problem, kind, matrix, limit = _feasible_problem(sensitivity, budget, costs, pinned)

  highest = problem.highest_choice()
  highest_cost = _total(matrix, highest)
  if highest_cost <= limit:
    solver = {"status": "not needed", "optimal": True, "time_s": 0.0}
    note = (f"Budget {budget.describe()} is not binding: the plan with every layer at "
            f"its highest candidate bit-width costs {_fmt(kind, highest_cost)}, so it "
            "is returned.")
    return problem.plan(highest, budget, solver, note=note)

  choice, solver = _solve(problem, matrix, limit, time_limit)
  return problem.plan(choice, budget, solver)


def pareto_front(sensitivity: SensitivityTable, costs: CostTable,
                 kind="bytes", points: int = 20,
                 pinned: Optional[Mapping[str, int]] = None, *,
                 time_limit: float = 60.0) -> List[ParetoPoint]:
  """Optimal plans at ``points`` budgets from the cheapest plan to the all-highest one.

  Each budget is solved exactly like `allocate` (without its "not binding"
  shortcut, so the last point is the lowest-loss plan within the all-highest
  plan's cost). Identical plans are kept once; the points come sorted by
  cost, and the predicted loss never rises as the cost rises.

  Args:
    sensitivity: as for `allocate`.
    costs: as for `allocate`; must hold ``kind``.
    kind: the cost the front is drawn against (a `BudgetKind` or its value).
    points: how many budgets to solve, evenly spaced (>= 2).
    pinned: as for `allocate`.
    time_limit: seconds HiGHS may spend on each budget.

  Returns:
    A list of `ParetoPoint` (``cost, predicted_loss, plan``), cost ascending.

  Example:

  >>> import numpy as np
  >>> from keras_mpq.base.types import CostTable, SensitivityTable
  >>> sens = SensitivityTable(("a", "b"), (4, 8), np.array([[1.0, 0.0], [0.2, 0.0]]))
  >>> costs = CostTable(("a", "b"), (4, 8), {"bytes": np.array([[50, 100], [50, 100]])})
  >>> [(p.cost, p.predicted_loss) for p in pareto_front(sens, costs, points=5)]
  [(100.0, 1.2), (150.0, 0.2), (200.0, 0.0)]
  """
  try:
    kind = BudgetKind(kind)
  except ValueError:
    raise InvalidInputError(
        f"Expected kind in {[k.value for k in BudgetKind]}. Received: kind={kind!r}"
    ) from None
  if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 2:
    raise InvalidInputError(f"Expected points to be an int >= 2. Received: points={points!r}")
  problem = _Problem(sensitivity, costs, pinned)
  matrix = problem.matrix(kind)
  low = problem.cheapest_cost(matrix)
  high = _total(matrix, problem.highest_choice())
  budgets = np.linspace(low, high, int(points)) if high > low else np.array([low])

  found: Dict[Tuple[int, ...], ParetoPoint] = {}
  best: Optional[Tuple[float, np.ndarray, Dict[str, Any]]] = None
  for value in budgets:
    value = float(value)
    choice, solver = _solve(problem, matrix, value * (1 + _RTOL), time_limit)
    loss = problem.predicted(choice)
    if best is not None and loss > best[0]:
      # Never worse than a cheaper budget's plan, which also fits this one
      # (guards against a solver stopping within its optimality gap).
      loss, choice, solver = best[0], best[1], dict(best[2], reused_cheaper_plan=True)
    best = (loss, choice, solver)
    key = tuple(int(c) for c in choice)
    if key in found:
      continue
    if value > 0:
      budget = Budget(kind, value)
    else:  # an all-zero cost row (e.g. a latency table of zeros)
      budget = None
    plan = problem.plan(choice, budget, solver, kind=kind)
    found[key] = ParetoPoint(plan.info["achieved"][kind.value], loss, plan)
  return sorted(found.values(), key=lambda p: (p.cost, -p.predicted_loss))


# --------------------------------------------------------------------------- problem


class _Problem:
  """The validated inputs: scores and costs as (layers x bits) arrays, in one order."""

  def __init__(self, sensitivity, costs, pinned):
    if not isinstance(sensitivity, SensitivityTable):
      raise InvalidInputError(
          "Expected sensitivity to be a SensitivityTable. Received: "
          f"{type(sensitivity).__name__}")
    if not isinstance(costs, CostTable):
      raise InvalidInputError(
          f"Expected costs to be a CostTable. Received: {type(costs).__name__}")
    layers, bits = sensitivity.layers, sensitivity.bits
    only_sens = [l for l in layers if l not in costs.layers]
    only_costs = [l for l in costs.layers if l not in layers]
    if only_sens or only_costs:
      raise InvalidInputError(
          "Expected the same layers in the sensitivity table and the cost table. "
          f"Received: only in sensitivity: {only_sens}; only in costs: {only_costs}")
    lacking = [b for b in bits if b not in costs.bits]
    if lacking:
      raise InvalidInputError(
          f"Expected costs for every candidate bit-width {list(bits)}. Received: "
          f"costs for {list(costs.bits)}; none for {lacking}")
    scores = np.asarray(sensitivity.scores, dtype=np.float64)
    if scores.shape != (len(layers), len(bits)) or not np.all(np.isfinite(scores)):
      raise InvalidInputError(
          f"Expected finite scores of shape {(len(layers), len(bits))}. Received: "
          f"shape {scores.shape}")
    rows = [costs.layers.index(l) for l in layers]
    cols = [costs.bits.index(b) for b in bits]
    self.layers = layers
    self.bits = bits
    self.scores = scores
    self.sensitivity = sensitivity
    self.costs = costs
    self._tables = {k: np.asarray(v, dtype=np.float64)[np.ix_(rows, cols)]
                    for k, v in costs.table.items()}
    self.pinned = self._check_pinned(pinned)
    self.allowed = np.ones(scores.shape, dtype=bool)
    for name, b in self.pinned.items():
      i = layers.index(name)
      self.allowed[i] = False
      self.allowed[i, bits.index(b)] = True

  def _check_pinned(self, pinned) -> Dict[str, int]:
    if pinned is None:
      return {}
    if not isinstance(pinned, Mapping):
      raise InvalidInputError(
          "Expected pinned to be a mapping {layer name: bits}. Received: "
          f"{type(pinned).__name__}")
    out = {}
    for name, b in pinned.items():
      if name not in self.layers:
        raise InvalidInputError(
            f"Expected pinned layers among {list(self.layers)}. Received: "
            f"pinned[{name!r}]")
      if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or int(b) not in self.bits:
        raise InvalidInputError(
            f"Expected pinned bits among the candidates {list(self.bits)}. Received: "
            f"pinned[{name!r}]={b!r}")
      out[str(name)] = int(b)
    return out

  def matrix(self, kind) -> np.ndarray:
    kind = BudgetKind(kind)
    if kind.value not in self._tables:
      raise InvalidInputError(
          f"Expected the cost table to hold {kind.value!r} costs for this budget. "
          f"Received: a table with {sorted(self._tables)}. A latency budget needs a "
          "latency table; BOPs need known MACs.")
    matrix = self._tables[kind.value]
    if not np.all(np.isfinite(matrix)):
      raise InvalidInputError(f"Expected finite {kind.value!r} costs; found NaN or Inf.")
    return matrix

  def cheapest_cost(self, matrix) -> float:
    return math.fsum(np.where(self.allowed, matrix, np.inf).min(axis=1))

  def highest_choice(self) -> np.ndarray:
    """Index of each layer's highest allowed bit-width."""
    order = np.argsort(self.bits)
    choice = np.empty(len(self.layers), dtype=np.int64)
    for i in range(len(self.layers)):
      choice[i] = [j for j in order if self.allowed[i, j]][-1]
    return choice

  def predicted(self, choice) -> float:
    return math.fsum(self.scores[np.arange(len(choice)), choice])

  def plan(self, choice, budget: Optional[Budget], solver: Dict[str, Any],
           note: Optional[str] = None, kind=None) -> QuantizationPlan:
    weight_bits = {l: self.bits[int(j)] for l, j in zip(self.layers, choice)}
    info: Dict[str, Any] = {
        "method": "milp",
        "metric": self.sensitivity.metric,
        "budget": budget.to_dict() if budget is not None else
                  {"kind": BudgetKind(kind).value, "value": 0.0},
        "budget_text": budget.describe() if budget is not None else "0",
        "achieved": {k: _total(m, choice) for k, m in self._tables.items()},
        "predicted_loss": self.predicted(choice),
        "solver": solver,
        "pinned": dict(self.pinned),
    }
    if note:
      info["note"] = note
    return QuantizationPlan(weight_bits, info=info)


# --------------------------------------------------------------------------- solver


def _solve(problem: _Problem, matrix: np.ndarray, limit: float,
           time_limit: float) -> Tuple[np.ndarray, Dict[str, Any]]:
  """Index of the chosen bits per layer minimizing the score with cost <= limit."""
  start = time.perf_counter()
  allowed = problem.allowed
  n_layers, _ = matrix.shape
  row_min = np.where(allowed, matrix, np.inf).min(axis=1)
  slack = limit - math.fsum(row_min)
  if slack < 0:  # callers check feasibility first
    raise KerasMpqError(f"Internal error: budget {limit} below the cheapest plan.")
  delta = matrix - row_min[:, None]
  allowed = allowed & (delta <= slack)
  scores = problem.scores

  max_delta = np.where(allowed, delta, 0.0).max(axis=1)
  if math.fsum(max_delta) <= slack:
    # The budget cannot bind among the options left: each layer takes its
    # lowest-score option (ties to the costlier one: more bits). Exact without a solver.
    choice = np.array([min(np.flatnonzero(allowed[i]),
                           key=lambda j, i=i: (scores[i, j], -matrix[i, j]))
                       for i in range(n_layers)])
    return choice, {"status": "closed form", "optimal": True,
                    "time_s": round(time.perf_counter() - start, 6)}

  rows, cols = np.nonzero(allowed)  # one binary per allowed (layer, bits)
  n_vars = len(rows)
  score_min = np.where(allowed, scores, np.inf).min(axis=1)
  obj = scores[rows, cols] - score_min[rows]
  obj_scale = float(obj.max()) if obj.size and obj.max() > 0 else 1.0
  obj = obj / obj_scale
  one_hot = sparse.csr_array((np.ones(n_vars), (rows, np.arange(n_vars))),
                             shape=(n_layers, n_vars))
  row = (delta[rows, cols] / slack)[None, :]

  status = None
  for attempt, rhs in enumerate(_RHS_TRIES):
    with _quiet_c_stdout():
      res = optimize.milp(
          obj, integrality=np.ones(n_vars), bounds=optimize.Bounds(0, 1),
          constraints=[optimize.LinearConstraint(one_hot, 1, 1),
                       optimize.LinearConstraint(row, -np.inf, rhs)],
          options={"mip_rel_gap": 0.0, "time_limit": float(time_limit),
                   "presolve": True})
    status = (res.status, res.message)
    if res.x is None:
      raise KerasMpqError(
          f"Expected HiGHS to find a plan within the budget. Received: status "
          f"{res.status} ({res.message}). Try a larger time_limit or budget.")
    x = np.asarray(res.x).reshape(-1)
    choice = np.empty(n_layers, dtype=np.int64)
    best = np.full(n_layers, -1.0)
    for v in range(n_vars):  # round: the largest binary of each layer wins
      if x[v] > best[rows[v]]:
        best[rows[v]], choice[rows[v]] = x[v], cols[v]
    if _total(matrix, choice) <= limit:
      info = {"status": int(res.status), "message": str(res.message),
              "optimal": res.status == 0, "rhs_tightened": attempt > 0,
              "variables": int(n_vars),
              "objective": float(res.fun) * obj_scale + math.fsum(score_min),
              "time_s": round(time.perf_counter() - start, 6)}
      if res.status == 0:
        choice = _prefer_more_bits(choice, obj, rows, cols, one_hot, row, rhs, matrix,
                                   limit, info, time_limit)
      info["time_s"] = round(time.perf_counter() - start, 6)
      return choice, info
  raise KerasMpqError(
      f"Internal error: HiGHS kept returning plans over the budget {limit} "
      f"(last status {status}). Please report it with the cost table.")


def _prefer_more_bits(choice, obj, rows, cols, one_hot, row, rhs, matrix, limit,
                      info, time_limit) -> np.ndarray:
  """Ties go to more bits: among plans as good as ``choice``, one that spends the most.

  A second, lexicographic solve: the score sum (normalized) may not exceed
  the optimum by more than ``_TIE_TOL``; maximize the budget spent. Falls back
  to ``choice`` if HiGHS does not return a plan within the budget.
  """
  n_layers = one_hot.shape[0]
  best = float(np.sum(obj[[np.flatnonzero((rows == i) & (cols == choice[i]))[0]
                            for i in range(n_layers)]]))
  spend = -row[0]
  with _quiet_c_stdout():
    res = optimize.milp(
        spend, integrality=np.ones(len(obj)), bounds=optimize.Bounds(0, 1),
        constraints=[optimize.LinearConstraint(one_hot, 1, 1),
                     optimize.LinearConstraint(row, -np.inf, rhs),
                     optimize.LinearConstraint(obj[None, :], -np.inf, best + _TIE_TOL)],
        options={"mip_rel_gap": 0.0, "time_limit": float(time_limit), "presolve": True})
  if res.x is None:
    return choice
  x = np.asarray(res.x).reshape(-1)
  tied = np.array(choice, copy=True)
  top = np.full(n_layers, -1.0)
  for v in range(len(x)):
    if x[v] > top[rows[v]]:
      top[rows[v]], tied[rows[v]] = x[v], cols[v]
  score = float(np.sum(obj[[np.flatnonzero((rows == i) & (cols == tied[i]))[0]
                             for i in range(n_layers)]]))
  if _total(matrix, tied) <= limit and score <= best + _TIE_TOL:
    if not np.array_equal(tied, choice):
      info["tie_break"] = "more bits"
    return tied
  return choice


def greedy(sensitivity: SensitivityTable, budget, costs: CostTable,
           pinned: Optional[Mapping[str, int]] = None) -> QuantizationPlan:
  """The greedy plan: from every layer at its highest bits, lower the cheapest harm first.

  Each step moves one layer to a lower candidate bit-width, the move with the
  smallest score increase per unit of cost saved (ties: the larger saving),
  until the plan fits the budget. Not optimal (`allocate` is); the safeguard
  of `keras_mpq.plan.search.search` measures it beside the exact plan.

  >>> import numpy as np
  >>> from keras_mpq.base.types import CostTable, SensitivityTable
  >>> sens = SensitivityTable(("a", "b"), (4, 8), np.array([[1.0, 0.0], [0.2, 0.0]]))
  >>> costs = CostTable(("a", "b"), (4, 8), {"bytes": np.array([[50, 100], [50, 100]])})
  >>> greedy(sens, "150B", costs).weight_bits
  {'a': 8, 'b': 4}
  """
  budget, problem, kind, matrix, limit = _feasible_problem(sensitivity, budget, costs, pinned)
  choice = problem.highest_choice()
  scores = problem.scores
  while _total(matrix, choice) > limit:
    best = None
    for i in range(len(choice)):
      j0 = choice[i]
      for j in np.flatnonzero(problem.allowed[i]):
        saved = matrix[i, j0] - matrix[i, j]
        if saved <= 0:
          continue
        key = ((scores[i, j] - scores[i, j0]) / saved, -saved, i, j)
        if best is None or key < best:
          best = key
    if best is None:  # nothing cheaper left (cannot happen above the cheapest plan)
      break
    choice[best[2]] = best[3]
  plan = problem.plan(choice, budget, {"status": "greedy", "optimal": False,
                                       "time_s": 0.0})
  return dataclasses.replace(plan, info=dict(plan.info, method="greedy"))


@contextlib.contextmanager
def _quiet_c_stdout():
  """Swallows what C code writes to stdout inside the block.

  HiGHS 1.12 (bundled with scipy 1.17) prints a stray debug line,
  "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();",
  straight to C stdout even with ``disp=False`` (ERGO-Code/HiGHS#2783). The
  solve takes milliseconds; for that time file descriptor 1 points at
  /dev/null. Where that cannot be done, nothing is redirected.
  """
  try:
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
  except (OSError, AttributeError, ValueError, TypeError):
    yield
    return
  try:
    os.dup2(devnull, 1)
    yield
  finally:
    libc.fflush(None)
    os.dup2(saved, 1)
    os.close(saved)
    os.close(devnull)


def _total(matrix: np.ndarray, choice) -> float:
  return math.fsum(matrix[np.arange(len(choice)), np.asarray(choice, dtype=np.int64)])


def _fmt(kind: BudgetKind, value: float) -> str:
  return f"{value:.10g}{_UNITS[BudgetKind(kind)]}"
