"""The iterative budget search: sensitivity, allocation, re-measurement, safeguard.

`search` measures the sensitivity table in a context, allocates bits within
the budget (`keras_mpq.plan.allocation`), re-measures in the context of the
new plan for ``rounds`` rounds, and keeps the best measured plan; the
safeguard then measures the uniform plans that fit and a greedy plan on a
held-out part of the data, and keeps the best within two standard errors
(a plan with at least as many bits in every layer wins a tie).

>>> found = search(model, (x, y), "4bit")  # doctest: +SKIP
>>> found.plan.weight_bits  # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from keras_mpq.base import choices
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.results import SearchResult
from keras_mpq.base.types import (
  Budget,
  CostTable,
  QuantizationPlan,
  SensitivityTable,
  to_jsonable,
)
from keras_mpq.plan import allocation as allocation_lib
from keras_mpq.sensitivity.evaluator import evaluator_for
from keras_mpq.sensitivity.job import (
  HOLDOUT,
  NOISE_Z,
  Job,
  Metric,
  MetricSpec,
  apply_holdout,
  check_context,
  check_objective,
  resolve_objective,
  prepare,
)
from keras_mpq.sensitivity.measure import measure
from keras_mpq.sensitivity.metrics import get_metric


def budget_context(bits: Sequence[int], layers: Sequence[str], budget, costs: CostTable,
                   pinned: Optional[Mapping[str, int]] = None) -> Dict[str, int]:
  """The highest uniform plan that fits ``budget`` (pinned layers as pinned).

  The context at the budget for ``search(context="budget")``: for a 4.5-bit
  average and candidates (2, 4, 8), every layer at 4 bits.

  >>> from keras_mpq.base.types import CostTable
  >>> costs = CostTable(("a", "b"), (2, 4, 8), {"avg_bits": np.array([[1, 2, 4]] * 2)})
  >>> budget_context((2, 4, 8), ("a", "b"), "4.5bit", costs)
  {'a': 4, 'b': 4}
  """
  budget = Budget.parse(budget)
  pinned = dict(pinned or {})
  for b in sorted(bits, reverse=True):
    plan = QuantizationPlan({n: int(pinned.get(n, b)) for n in layers})
    if budget.is_satisfied_by(plan, costs):
      return dict(plan.weight_bits)
  return {n: int(pinned.get(n, min(bits))) for n in layers}


CONTEXTS = choices.values(choices.Context)
"""Named first contexts of `search`: every other layer at the highest bits, or at the budget."""


def search(model, data, budget, weight_bits: Sequence[int] = (2, 4, 8), rounds: int = 3,
           metric: str = "task_interaction", pinned: Optional[Mapping[str, int]] = None,
           costs: Optional[CostTable] = None, seed: int = 0, activation_bits: int = 8,
           batch_size: int = 128, progress: Optional[bool] = None, *,
           objective: Optional[str] = None, context="highest", holdout: float = HOLDOUT,
           safeguard: bool = True, table: Optional[SensitivityTable] = None,
           weight_method: Optional[str] = None,
           bias_correction: Optional[Union[bool, str]] = None,
           range_policy: Optional[str] = None, loss=None) -> SearchResult:
  """Sensitivity, allocation, re-measurement in rounds, and a measured safeguard.

  Round 0 measures ``metric`` in the first context and allocates
  (`keras_mpq.plan.allocation.allocate`, exact, on scores cleaned by
  `respect_known`); each plan's loss ``L(plan)`` (``objective``) is measured
  on the held-out part of ``data`` with activation ranges calibrated on the
  rest. Round ``k`` re-measures with the context set to round ``k-1``'s plan
  and re-allocates. It stops when the plan no longer changes, or after
  ``rounds``, or when a plan comes back from an earlier round; metrics
  without a context stop after round 0. The allocated plan is the round
  with the lowest measured loss among those that meet the budget.

  The safeguard (``safeguard=True``) then measures, the same way, every
  uniform plan that fits the budget (pinned layers as pinned) and one greedy
  plan (`keras_mpq.plan.allocation.greedy`) and returns the best measured of all,
  ties going to more bits (a candidate within two standard errors of the
  lowest loss that has at least its bits in every layer wins;
  ``selection["tie_break"]`` says so); ``plan.info["selection"]`` names the
  winner, every candidate's measured loss and the margins. When every
  cleaned score is zero (no layer measured worse than its highest bits beyond
  the noise) the scores carry no information: the best measured uniform plan
  that fits is returned, with a note (also without the safeguard).

  Args:
    model: float tf_keras classifier (BatchNorm folded here).
    data: ``(x, y)`` or ``x`` (labelled by the float model's argmax).
    budget: a `Budget` or a string `Budget.parse` takes (``"4bit"``, ``"48KB"``).
    weight_bits: candidate bits, each in 2..8.
    rounds: at most this many measure-allocate rounds (>= 1).
    metric: a registered metric name.
    pinned: ``{layer: bits}`` fixed before allocation.
    costs: a `CostTable` (default: `keras_mpq.plan.costs.cost_table` of the model).
    seed, activation_bits, batch_size, progress: as in `measure_sensitivity`.
    objective: ``"kl"`` or ``"cross_entropy"`` (as in `measure_sensitivity`);
      also what plans are measured by.
    context: first context of a context metric: ``"highest"`` (every other
      layer at the highest candidate bits), ``"budget"`` (at the highest
      uniform bits that fit the budget, `budget_context`), or a plan /
      ``{layer: bits}``.
    holdout: share of ``data`` held out from range calibration (`split_holdout`).
    safeguard: compare the allocated plan with the uniform and greedy plans.
    table: a `SensitivityTable` already measured for this model, data and
      first context (same layers and bits): round 0 uses it instead of
      measuring again (sweeping budgets over one measurement).

    loss: your own task loss with ``data=(x, y)`` (see
      `keras_mpq.measure_sensitivity`); the objective then.

  Returns:
    A `SearchResult`.

  Example:

  >>> found = search(model, (x, y), "4bit", rounds=3)  # doctest: +SKIP
  >>> found.plan.info["selection"]["winner"]  # doctest: +SKIP
  'allocated'
  """
  return search_budgets(model, data, [budget], weight_bits, rounds, metric, pinned, costs,
                        seed, activation_bits, batch_size, progress, objective=objective,
                        context=context, holdout=holdout, safeguard=safeguard,
                        table=table, weight_method=weight_method,
                        bias_correction=bias_correction, range_policy=range_policy,
                        loss=loss)[0]


def search_budgets(model, data, budgets: Sequence[Any], weight_bits: Sequence[int] = (2, 4, 8),
                   rounds: int = 3, metric: str = "task_interaction",
                   pinned: Optional[Mapping[str, int]] = None,
                   costs: Optional[CostTable] = None, seed: int = 0,
                   activation_bits: int = 8, batch_size: int = 128,
                   progress: Optional[bool] = None, *, objective: Optional[str] = None,
                   context="highest", holdout: float = HOLDOUT, safeguard: bool = True,
                   table: Optional[SensitivityTable] = None,
                   weight_method: Optional[str] = None,
                   bias_correction: Optional[Union[bool, str]] = None,
                   range_policy: Optional[str] = None, loss=None) -> List[SearchResult]:
  """`search` at each of ``budgets``, sharing one quantized model and every measurement.

  A sensitivity table measured in a context, and a plan's measured loss, are
  measured once and reused by every budget that needs them (a budget sweep
  over the default context measures the sensitivity once). Arguments as for
  `search`; returns one `SearchResult` per budget, in order.

  >>> results = search_budgets(model, (x, y), ["6bit", "4bit"])  # doctest: +SKIP
  """
  from keras_mpq.plan import costs as costs_lib  # pylint: disable=g-import-not-at-top
  spec = get_metric(metric)
  objective = check_objective(objective)
  if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
    raise InvalidInputError(f"Expected rounds >= 1. Received: rounds={rounds!r}")
  budgets = [Budget.parse(b) for b in budgets]
  # Labels are needed to measure L(plan), whatever the metric.
  job = prepare(model, data, weight_bits, get_metric(Metric.TASK_INTERACTION.value),
                 None, activation_bits, batch_size, seed, progress, loss=loss)
  objective = resolve_objective(job, objective)
  job.weight_method, job.bias_correction, job.range_policy = (
      weight_method, bias_correction, range_policy)
  apply_holdout(job, holdout)
  if costs is None:
    costs = costs_lib.cost_table(job.folded, bits=job.bits,
                                 activation_bits=job.activation_bits)
  elif not isinstance(costs, CostTable):
    raise InvalidInputError(
        f"Expected costs as a keras_mpq.CostTable. Received: {type(costs).__name__}")
  if isinstance(context, str):
    if context not in CONTEXTS:
      raise InvalidInputError(
          f"Expected context in {list(CONTEXTS)}, a QuantizationPlan or a mapping "
          f"layer -> bits. Received: context={context!r}")
    given_context = None
  else:
    given_context, _ = check_context(context, job.layers, job.bits)
  if table is not None and (
      not isinstance(table, SensitivityTable) or table.layers != job.layers
      or table.bits != job.bits):
    raise InvalidInputError(
        f"Expected table as a SensitivityTable of layers {list(job.layers)} and bits "
        f"{list(job.bits)}. Received: "
        + (f"layers {list(table.layers)}, bits {list(table.bits)}"
           if isinstance(table, SensitivityTable) else type(table).__name__))
  evaluator = evaluator_for(job)
  measured_cache: Dict[Tuple[int, ...], np.ndarray] = {}
  table_cache: Dict[Any, SensitivityTable] = {}

  def measure_samples(weight_bits_: Mapping[str, int]) -> np.ndarray:
    key = tuple(int(weight_bits_[n]) for n in job.layers)
    if key not in measured_cache:
      evaluator.set_context(weight_bits_, True)
      measured_cache[key] = evaluator.sample_objective(objective)
    return measured_cache[key]

  def table_at(context_k, k: int) -> SensitivityTable:
    if k == 0 and table is not None:
      return table
    key = None if context_k is None else tuple(int(context_k[n]) for n in job.layers)
    if key not in table_cache:
      job.context = context_k
      table_cache[key] = measure(job, spec)
    return table_cache[key]

  results = []
  for budget in budgets:
    if context == "budget":
      first = budget_context(job.bits, job.layers, budget, costs, pinned)
    else:
      first = given_context
    if not spec.uses_context:
      first = None
    label = ("highest" if first is None else
             "budget" if context == "budget" else "given")
    results.append(_search_one(job, spec, budget, costs, pinned, rounds, first, table_at,
                               measure_samples, safeguard, evaluator, label))
  return results


def _search_one(job: Job, spec: MetricSpec, budget: Budget, costs: CostTable, pinned,
                rounds: int, first, table_at, measure_samples, safeguard: bool, evaluator,
                context_label: str) -> SearchResult:
  """One budget of `search_budgets`: the rounds, then the safeguard."""
  def measure(weight_bits: Mapping[str, int]) -> float:
    return float(np.mean(measure_samples(weight_bits)))
  history: List[Dict[str, Any]] = []
  plans: List[QuantizationPlan] = []
  tables: List[SensitivityTable] = []
  table = None
  context_k = first
  for k in range(int(rounds)):
    t0 = time.perf_counter()
    table = table_at(context_k, k)
    tables.append(table)
    plan = allocation_lib.allocate(table, budget, costs, pinned)
    measured = measure(plan.weight_bits)
    changed = not plans or plan.weight_bits != plans[-1].weight_bits
    seen = [p.weight_bits for p in plans]
    repeat_of = seen.index(plan.weight_bits) if plan.weight_bits in seen else None
    history.append({
        "round": k, "weight_bits": dict(plan.weight_bits),
        "context": dict(context_k) if context_k else "highest",
        "predicted": table.predicted(plan), "measured_loss": measured,
        "objective": job.objective,
        "cost": costs.plan_cost(plan, budget.kind), "budget": budget.to_dict(),
        "within_budget": budget.is_satisfied_by(plan, costs), "changed": changed,
        "repeat_of": repeat_of,
        "seconds": round(time.perf_counter() - t0, 3)})
    plans.append(plan)
    if repeat_of is not None or not spec.uses_context:
      break  # the plan no longer changes (or cycles back): more rounds repeat it
    context_k = dict(plan.weight_bits)
  ok = [r for r in history if r["within_budget"]]
  best = min(ok or history, key=lambda r: (r["measured_loss"], r["round"]))
  allocated = plans[best["round"]]
  all_zero = bool(np.all(tables[0].scores == 0))
  selection = _select(allocated, tables[0], budget, costs, pinned, job, measure_samples,
                      safeguard, all_zero)
  chosen = selection.pop("plan")
  info = dict(allocated.info)
  if selection["winner"] != "allocated":
    info.pop("note", None)
    info.update({"method": selection["winner"],
                 "achieved": {kind: costs.plan_cost(chosen, kind) for kind in costs.table},
                 "predicted_loss": tables[0].predicted(chosen)})
  info["search"] = {"round": best["round"], "measured_loss": best["measured_loss"],
                    "rounds": len(history), "metric": spec.name, "objective": job.objective,
                    "context": context_label, "holdout": job.holdout,
                    "traces": dict(evaluator.traces)}
  info["selection"] = selection
  chosen = QuantizationPlan(dict(chosen.weight_bits), info=to_jsonable(info))
  return SearchResult(chosen, table, tuple(to_jsonable(history)))


def _select(allocated: QuantizationPlan, table: SensitivityTable, budget: Budget,
            costs: CostTable, pinned, job: Job, measure_samples, safeguard: bool,
            all_zero: bool, z: float = NOISE_Z) -> Dict[str, Any]:
  """The safeguard: the best measured of the allocated, uniform and greedy plans.

  Ties go to more bits: a candidate whose measured loss exceeds the lowest by
  no more than ``z`` standard errors of the per-sample difference (paired:
  the same held-out samples) cannot be told from the best; if it also has at
  least the best's bits in every layer, it wins (the costliest such one).
  Without this, a plan at the lowest bits could win on a difference at the
  level of rounding (an untrained model whose outputs barely move scores
  every plan alike). A mixed plan is not overruled by a uniform one that is
  merely costlier: neither has more bits everywhere, so the measurement
  decides.
  """
  pinned = dict(pinned or {})
  candidates: List[Tuple[str, QuantizationPlan]] = []
  if not all_zero:
    candidates.append(("allocated", allocated))
  if safeguard or all_zero:
    for b in sorted(job.bits, reverse=True):
      plan = QuantizationPlan({n: int(pinned.get(n, b)) for n in job.layers})
      if budget.is_satisfied_by(plan, costs):
        candidates.append((f"uniform {b}-bit", plan))
  if safeguard and not all_zero:
    candidates.append(("greedy", allocation_lib.greedy(table, budget, costs, pinned)))
  rows, seen = [], {}
  for rank, (name, plan) in enumerate(candidates):
    key = tuple(plan.weight_bits[n] for n in job.layers)
    if key in seen:
      seen[key]["also"].append(name)
      continue
    samples = measure_samples(plan.weight_bits)
    row = {"name": name, "also": [], "weight_bits": dict(plan.weight_bits),
           "cost": costs.plan_cost(plan, budget.kind),
           "measured_loss": float(np.mean(samples)),
           "predicted": table.predicted(plan), "_rank": rank, "_plan": plan,
           "_samples": samples}
    seen[key] = row
    rows.append(row)
  if not rows:  # cannot happen: the cheapest uniform plan fits any feasible budget
    rows = [{"name": "allocated", "also": [], "weight_bits": dict(allocated.weight_bits),
             "cost": costs.plan_cost(allocated, budget.kind),
             "measured_loss": float(np.mean(measure_samples(allocated.weight_bits))),
             "predicted": 0.0, "_rank": 0, "_plan": allocated}]
  finite = [r for r in rows if np.isfinite(r["measured_loss"])] or rows
  ranked = sorted(finite, key=lambda r: (r["measured_loss"], r["_rank"]))
  win, tie = _tie_to_more_bits(ranked, z)
  ranked = [win] + [r for r in ranked if r is not win]
  alloc_row = next((r for r in rows if "allocated" in [r["name"]] + r["also"]), None)
  out: Dict[str, Any] = {
      "winner": win["name"], "objective": job.objective,
      "measured_on": (f"{job.holdout['held_out']} held-out samples" if job.holdout
                      and job.holdout.get("held_out") else "the calibration samples"),
      "winner_loss": win["measured_loss"],
      "allocated_loss": None if alloc_row is None else alloc_row["measured_loss"],
      "gain_over_allocated": (None if alloc_row is None
                              else alloc_row["measured_loss"] - win["measured_loss"]),
      "runner_up": ranked[1]["name"] if len(ranked) > 1 else None,
      "margin": (ranked[1]["measured_loss"] - win["measured_loss"]
                 if len(ranked) > 1 else None),
      "candidates": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
      "safeguard": bool(safeguard), "plan": win["_plan"]}
  if tie is not None:
    out["tie_break"] = tie
  if all_zero:
    out["note"] = ("Every sensitivity score is zero within the measurement noise, so the "
                   "scores cannot rank layers: the plan is the best measured uniform plan "
                   "that fits the budget.")
  return out


def _tie_to_more_bits(ranked: List[Dict[str, Any]], z: float
                      ) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
  """The costliest candidate with at least the best's bits everywhere, within noise of it.

  ``ranked``: candidate rows sorted by measured loss, each with its
  ``weight_bits`` and per-sample losses (``_samples``). Returns
  ``(winner, tie_break)``; ``tie_break`` is ``None`` when the lowest-loss
  candidate wins, else what it was tied with.
  """
  best = ranked[0]
  base = best.get("_samples")
  if base is None or len(base) < 2:
    return best, None
  tied = []
  for r in ranked:
    if any(r["weight_bits"][n] < b for n, b in best["weight_bits"].items()):
      continue  # fewer bits somewhere: not "more bits" than the best
    d = np.asarray(r["_samples"], np.float64) - base
    mean = float(np.mean(d))
    se = float(np.std(d, ddof=1) / np.sqrt(len(d)))
    if np.isfinite(mean) and np.isfinite(se) and mean <= z * se:
      tied.append((r, mean, se))
  win, mean, se = max(tied, key=lambda t: (t[0]["cost"], -t[0]["measured_loss"],
                                           -t[0]["_rank"]))
  if win is best:
    return best, None
  return win, {"rule": "more bits", "lowest_loss": best["name"],
               "loss_above_lowest": mean, "stderr": se, "noise_z": float(z),
               "tied": [t[0]["name"] for t in tied]}
