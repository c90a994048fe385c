"""Tests of keras_mpq.plan.allocation: the exact allocator against brute force, and its edges."""

import itertools
import os
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from keras_mpq.plan import allocation as allocation_lib
from keras_mpq.base.types import FLOAT_BITS, Budget, CostTable, LayerCost, SensitivityTable
from keras_mpq.base.errors import BudgetInfeasibleError, InvalidInputError

BITS = (2, 4, 8)


def _instance(rng, n_layers, bits=BITS, kind="bytes", monotone=True):
  """Random but realistic tables: scores fall with bits, costs rise with them."""
  names = tuple(f"layer{i}" for i in range(n_layers))
  if monotone:
    base = rng.lognormal(0.0, 1.5, size=(n_layers, 1))
    decay = np.array([4.0 ** -i for i in range(len(bits))])
    scores = base * decay * rng.uniform(0.5, 1.5, size=(n_layers, len(bits)))
    scores[:, -1] = rng.uniform(-0.01, 0.01, size=n_layers)
    scores = -np.sort(-scores, axis=1)
  else:
    scores = rng.normal(size=(n_layers, len(bits)))
  if kind == "bytes":
    lcs = [LayerCost(n, "Conv2D", int(rng.integers(50, 50_000)), 16, 16, 1000)
           for n in names]
    matrix = np.array([[c.weight_bytes(b) for b in bits] for c in lcs])
  else:  # BOPs-sized floats, to exercise the row scaling
    macs = rng.uniform(1e6, 1e9, size=(n_layers, 1))
    matrix = macs * np.array(bits, dtype=float) * 8
  sens = SensitivityTable(names, bits, scores)
  costs = CostTable(names, bits, {kind: matrix})
  return sens, costs


def _brute_force(sens, costs, kind, limit, pinned=None):
  """(best objective, best choice) over every plan with cost <= limit, or None."""
  pinned = pinned or {}
  m = costs.matrix(kind)
  options = [[sens.bits.index(pinned[l])] if l in pinned else range(len(sens.bits))
             for l in sens.layers]
  best = None
  for choice in itertools.product(*options):
    cost = math.fsum(m[i, j] for i, j in enumerate(choice))
    if cost <= limit:
      obj = math.fsum(sens.scores[i, j] for i, j in enumerate(choice))
      if best is None or obj < best[0]:
        best = (obj, choice)
  return best


def _cost(costs, plan, kind):
  return costs.plan_cost(plan, kind)


@pytest.mark.parametrize("seed", range(30))
def test_matches_brute_force_on_random_instances(seed):
  rng = np.random.default_rng(seed)
  kind = "bytes" if seed % 2 == 0 else "bops"
  sens, costs = _instance(rng, int(rng.integers(3, 7)), kind=kind, monotone=seed % 3 != 0)
  m = costs.matrix(kind)
  low, high = m.min(axis=1).sum(), m[:, -1].sum()
  for _ in range(4):
    value = float(rng.uniform(low, high * 0.999))
    budget = Budget(kind, value)
    plan = allocation_lib.allocate(sens, budget, costs)
    best = _brute_force(sens, costs, kind, value * (1 + 1e-9))
    assert budget.is_satisfied_by(plan, costs)
    assert _cost(costs, plan, kind) <= value * (1 + 1e-9)
    assert sens.predicted(plan) == pytest.approx(best[0], abs=1e-9)
    assert plan.info["predicted_loss"] == pytest.approx(best[0], abs=1e-9)
    assert plan.info["solver"]["optimal"]


@pytest.mark.parametrize("seed", range(10))
def test_budget_exactly_at_and_just_below_the_optimum(seed):
  rng = np.random.default_rng(100 + seed)
  sens, costs = _instance(rng, 5)
  m = costs.matrix("bytes")
  value = float(rng.uniform(m[:, 0].sum(), m[:, -1].sum() * 0.95))
  obj, choice = _brute_force(sens, costs, "bytes", value)
  at = math.fsum(m[i, j] for i, j in enumerate(choice))  # the optimum's own cost

  plan = allocation_lib.allocate(sens, Budget.bytes(at), costs)
  assert sens.predicted(plan) == pytest.approx(obj, abs=1e-12)
  assert _cost(costs, plan, "bytes") <= at * (1 + 1e-9)

  below = at - 0.25  # byte costs move in steps of 0.5 B: this excludes the optimum
  best_below = _brute_force(sens, costs, "bytes", below)
  if best_below is None:  # the optimum was the cheapest plan
    with pytest.raises(BudgetInfeasibleError, match="at least") as err:
      allocation_lib.allocate(sens, Budget.bytes(below), costs)
    assert err.value.smallest == at
    return
  plan = allocation_lib.allocate(sens, Budget.bytes(below), costs)
  assert _cost(costs, plan, "bytes") <= below
  assert sens.predicted(plan) == pytest.approx(best_below[0], abs=1e-12)
  assert sens.predicted(plan) >= obj - 1e-12


def test_hand_made_table_at_and_below_the_optimum():
  sens = SensitivityTable(("a", "b", "c"), (4, 8),
                          np.array([[5.0, 0.0], [3.0, 0.0], [1.0, 0.0]]))
  costs = CostTable(("a", "b", "c"), (4, 8),
                    {"bytes": np.array([[10, 20], [10, 20], [10, 20]])})
  # 45 B: one layer can stay at 8 bits: the most sensitive, a.
  plan = allocation_lib.allocate(sens, "45B", costs)
  assert plan.weight_bits == {"a": 8, "b": 4, "c": 4}
  assert plan.info["achieved"]["bytes"] == 40.0
  # 40 B is exactly that plan's cost; 39.9 B allows only the all-4-bit plan.
  assert allocation_lib.allocate(sens, "40B", costs).weight_bits == {"a": 8, "b": 4, "c": 4}
  assert allocation_lib.allocate(sens, Budget.bytes(39.9), costs).weight_bits == {
      "a": 4, "b": 4, "c": 4}
  assert plan.info["predicted_loss"] == 4.0
  # 50 B: two layers at 8 bits, a and b.
  assert allocation_lib.allocate(sens, "50B", costs).weight_bits == {"a": 8, "b": 8, "c": 4}


def test_infeasible_budget_names_the_smallest():
  sens = SensitivityTable(("a", "b"), (4, 8), np.array([[1.0, 0.0], [1.0, 0.0]]))
  costs = CostTable(("a", "b"), (4, 8), {"bytes": np.array([[40.5, 80], [60, 100]]),
                                         "avg_bits": np.array([[2, 4], [2, 4]])})
  with pytest.raises(BudgetInfeasibleError, match=r"at least 100.5B") as err:
    allocation_lib.allocate(sens, "100B", costs)
  assert err.value.smallest == 100.5
  with pytest.raises(BudgetInfeasibleError, match=r"at least 4 bits avg") as err:
    allocation_lib.allocate(sens, "3.5bit", costs)
  assert err.value.smallest == 4.0
  # Pinning raises the floor, and the message says so.
  with pytest.raises(BudgetInfeasibleError, match="pinned layers as pinned") as err:
    allocation_lib.allocate(sens, "120B", costs, pinned={"b": 8})
  assert err.value.smallest == 140.5
  # Exactly the smallest is feasible.
  assert allocation_lib.allocate(sens, Budget.bytes(100.5), costs).weight_bits == {"a": 4, "b": 4}


def test_not_binding_budget_returns_all_highest_with_a_note():
  rng = np.random.default_rng(7)
  sens, costs = _instance(rng, 4, monotone=False)  # lower bits may even score better
  for budget in (Budget.bytes(math.inf), Budget.bytes(costs.matrix("bytes")[:, -1].sum())):
    plan = allocation_lib.allocate(sens, budget, costs)
    assert set(plan.weight_bits.values()) == {8}
    assert "not binding" in plan.info["note"]
    assert plan.info["solver"]["status"] == "not needed"


def test_pinned_layers_are_respected():
  rng = np.random.default_rng(11)
  for trial in range(8):
    sens, costs = _instance(rng, 5)
    m = costs.matrix("bytes")
    pinned = {"layer0": 8, "layer4": 2} if trial % 2 else {"layer2": 4}
    low = sum(m[sens.layers.index(l), BITS.index(b)] for l, b in pinned.items()) + sum(
        m[i, 0] for i, l in enumerate(sens.layers) if l not in pinned)
    value = float(rng.uniform(low, m[:, -1].sum()))
    plan = allocation_lib.allocate(sens, Budget.bytes(value), costs, pinned=pinned)
    for layer, bits in pinned.items():
      assert plan.weight_bits[layer] == bits
    assert plan.info["pinned"] == pinned
    best = _brute_force(sens, costs, "bytes", value * (1 + 1e-9), pinned)
    assert sens.predicted(plan) == pytest.approx(best[0], abs=1e-9)
    assert _cost(costs, plan, "bytes") <= value * (1 + 1e-9)


def test_bad_pins_raise():
  sens, costs = _instance(np.random.default_rng(0), 3)
  with pytest.raises(InvalidInputError, match=r"pinned\['nope'\]"):
    allocation_lib.allocate(sens, "1MB", costs, pinned={"nope": 8})
  with pytest.raises(InvalidInputError, match=r"candidates \[2, 4, 8\].*=6"):
    allocation_lib.allocate(sens, "1MB", costs, pinned={"layer0": 6})
  with pytest.raises(InvalidInputError, match="mapping"):
    allocation_lib.allocate(sens, "1MB", costs, pinned=[("layer0", 8)])


def test_mismatched_tables_raise_with_the_difference():
  sens = SensitivityTable(("a", "b"), (4, 8), np.zeros((2, 2)))
  costs = CostTable(("a", "c"), (4, 8), {"bytes": np.ones((2, 2))})
  with pytest.raises(InvalidInputError,
                     match=r"only in sensitivity: \['b'\]; only in costs: \['c'\]"):
    allocation_lib.allocate(sens, "1KB", costs)
  costs = CostTable(("a", "b"), (4,), {"bytes": np.ones((2, 1))})
  with pytest.raises(InvalidInputError, match=r"none for \[8\]"):
    allocation_lib.allocate(sens, "1KB", costs)
  costs = CostTable(("a", "b"), (4, 8), {"bytes": np.ones((2, 2))})
  with pytest.raises(InvalidInputError, match="'latency'"):
    allocation_lib.allocate(sens, "5ms", costs)
  with pytest.raises(InvalidInputError, match="bare number is ambiguous"):
    allocation_lib.allocate(sens, 1000, costs)
  with pytest.raises(InvalidInputError, match="SensitivityTable"):
    allocation_lib.allocate(np.zeros((2, 2)), "1KB", costs)


def test_layer_and_bit_order_do_not_matter():
  rng = np.random.default_rng(3)
  sens, costs = _instance(rng, 5)
  m = costs.matrix("bytes")
  # Same costs, rows reversed, columns reversed, plus a float column.
  shuffled = CostTable(costs.layers[::-1], (FLOAT_BITS, 8, 4, 2),
                       {"bytes": np.hstack([m[::-1, -1:] * 4, m[::-1, ::-1]])})
  value = float(m[:, 1].sum())
  a = allocation_lib.allocate(sens, Budget.bytes(value), costs)
  b = allocation_lib.allocate(sens, Budget.bytes(value), shuffled)
  assert a.weight_bits == b.weight_bits
  assert list(b.weight_bits) == list(sens.layers)


def test_info_records_budget_costs_and_solver():
  sens, costs = _instance(np.random.default_rng(5), 4)
  extra = CostTable(costs.layers, costs.bits,
                    {"bytes": costs.matrix("bytes"), "avg_bits": np.ones((4, 3))})
  plan = allocation_lib.allocate(sens, Budget.bytes(costs.matrix("bytes")[:, 1].sum()), extra)
  info = plan.info
  assert info["budget"] == {"kind": "bytes", "value": costs.matrix("bytes")[:, 1].sum()}
  assert info["achieved"]["bytes"] == pytest.approx(extra.plan_cost(plan, "bytes"))
  assert info["achieved"]["avg_bits"] == 4.0
  assert info["predicted_loss"] == pytest.approx(sens.predicted(plan))
  assert info["solver"]["status"] in (0, "closed form")
  assert info["solver"]["time_s"] >= 0
  assert info["method"] == "milp"
  assert plan.to_json()  # JSON-able


def test_large_costs_never_over_budget():
  """60 layers x 4 bits with BOPs-sized costs: budgets at many points all hold."""
  rng = np.random.default_rng(21)
  sens, costs = _instance(rng, 60, bits=(2, 3, 4, 8), kind="bops")
  m = costs.matrix("bops")
  low, high = m[:, 0].sum(), m[:, -1].sum()
  for frac in np.linspace(0.0, 0.999, 12):
    value = float(low + frac * (high - low))
    plan = allocation_lib.allocate(sens, Budget.bops(value), costs)
    assert costs.plan_cost(plan, "bops") <= value * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(n_layers=st.integers(1, 5), n_bits=st.integers(1, 3),
       seed=st.integers(0, 2**31), frac=st.floats(-0.2, 1.2),
       scale=st.sampled_from([1e-3, 1.0, 1e4, 1e11]))
def test_property_never_over_budget(n_layers, n_bits, seed, frac, scale):
  rng = np.random.default_rng(seed)
  bits = (2, 4, 8)[:n_bits]
  names = tuple(f"l{i}" for i in range(n_layers))
  sens = SensitivityTable(names, bits, rng.normal(size=(n_layers, n_bits)))
  matrix = rng.uniform(0, 1, size=(n_layers, n_bits)) * scale
  costs = CostTable(names, bits, {"bops": matrix})
  low, high = matrix.min(axis=1).sum(), matrix.max(axis=1).sum()
  value = max(low + frac * (high - low), 1e-300)
  try:
    plan = allocation_lib.allocate(sens, Budget.bops(value), costs)
  except BudgetInfeasibleError as e:
    assert value * (1 + 1e-9) < low
    assert e.smallest == pytest.approx(low, rel=1e-12)
    return
  assert costs.plan_cost(plan, "bops") <= value * (1 + 1e-9)
  best = _brute_force(sens, costs, "bops", value * (1 + 1e-9))
  if "note" not in plan.info:  # binding: exactly optimal
    assert sens.predicted(plan) == pytest.approx(best[0], abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_is_monotone_and_optimal(seed):
  rng = np.random.default_rng(200 + seed)
  sens, costs = _instance(rng, 5, monotone=seed % 2 == 0)
  m = costs.matrix("bytes")
  front = allocation_lib.pareto_front(sens, costs, kind="bytes", points=15)
  assert 2 <= len(front) <= 15
  cost_list = [p.cost for p in front]
  losses = [p.predicted_loss for p in front]
  assert cost_list == sorted(cost_list)
  assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
  assert len({tuple(p.plan.weight_bits.values()) for p in front}) == len(front)
  assert cost_list[0] == pytest.approx(m.min(axis=1).sum())
  assert cost_list[-1] <= m[:, -1].sum() * (1 + 1e-9)
  for point in front:  # each point is the best plan at its own cost
    cost, loss, plan = point
    assert costs.plan_cost(plan, "bytes") == pytest.approx(cost)
    assert loss == pytest.approx(_brute_force(sens, costs, "bytes", cost * (1 + 1e-9))[0],
                                 abs=1e-9)
  # The top of the front is as good as any plan within the all-highest cost.
  best = _brute_force(sens, costs, "bytes", m[:, -1].sum() * (1 + 1e-9))
  assert losses[-1] == pytest.approx(best[0], abs=1e-9)


def test_pareto_front_with_pins_and_errors():
  sens, costs = _instance(np.random.default_rng(9), 4)
  front = allocation_lib.pareto_front(sens, costs, points=6, pinned={"layer1": 8})
  assert all(p.plan.weight_bits["layer1"] == 8 for p in front)
  single = allocation_lib.pareto_front(sens, costs, points=3,
                                   pinned={l: 4 for l in sens.layers})
  assert len(single) == 1 and set(single[0].plan.weight_bits.values()) == {4}
  with pytest.raises(InvalidInputError, match="points"):
    allocation_lib.pareto_front(sens, costs, points=1)
  with pytest.raises(InvalidInputError, match="kind"):
    allocation_lib.pareto_front(sens, costs, kind="watts")
  with pytest.raises(InvalidInputError, match="'avg_bits'"):
    allocation_lib.pareto_front(sens, costs, kind="avg_bits")


def test_solver_chatter_on_c_stdout_is_swallowed(capfd):
  import ctypes  # pylint: disable=g-import-not-at-top
  libc = ctypes.CDLL(None)
  with allocation_lib._quiet_c_stdout():  # pylint: disable=protected-access
    os.write(1, b"raw fd write\n")
    libc.puts(b"buffered C stdio line")
  libc.fflush(None)  # anything still buffered would surface now
  os.write(1, b"after\n")
  out, _ = capfd.readouterr()
  assert "raw fd write" not in out and "buffered C stdio" not in out
  assert "after" in out


def test_over_budget_solver_answer_is_never_returned(monkeypatch):
  """A solver answer over budget (as within HiGHS' tolerance) triggers a tighter re-solve."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  real_milp = optimize.milp
  calls = []

  def sloppy_milp(c, *, constraints, **kwargs):
    calls.append(constraints[1].ub.copy())
    if len(calls) == 1:  # pretend the solver accepted a 50% budget violation
      loose = optimize.LinearConstraint(constraints[1].A, -np.inf, constraints[1].ub * 1.5)
      constraints = [constraints[0], loose]
    return real_milp(c, constraints=constraints, **kwargs)

  sens = SensitivityTable(("a", "b", "c"), (4, 8),
                          np.array([[5.0, 0.0], [3.0, 0.0], [1.0, 0.0]]))
  costs = CostTable(("a", "b", "c"), (4, 8),
                    {"bytes": np.array([[10, 20], [10, 20], [10, 20]])})
  monkeypatch.setattr(allocation_lib.optimize, "milp", sloppy_milp)
  plan = allocation_lib.allocate(sens, "45B", costs)
  # the over-budget answer, the tightened re-solve, then the tie-break solve
  assert len(calls) == 3 and calls[1][0] < calls[0][0] and calls[2][0] == calls[1][0]
  assert plan.info["solver"]["rhs_tightened"] is True
  assert costs.plan_cost(plan, "bytes") <= 45
  assert plan.weight_bits == {"a": 8, "b": 4, "c": 4}


# --------------------------------------------------------------------------- ties, greedy, defaults


def test_ties_go_to_more_bits():
  # a and b are harmless at 4 bits and at 8; c is harmed below 8.
  sens = SensitivityTable(("a", "b", "c"), BITS,
                          np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [3.0, 1.0, 0.0]]))
  costs = CostTable(("a", "b", "c"), BITS,
                    {"avg_bits": np.tile([2 / 3, 4 / 3, 8 / 3], (3, 1))})
  # 6 bits: (4, 4, 8) is the only harmless plan that fits
  assert allocation_lib.allocate(sens, "6bit", costs).weight_bits == {"a": 4, "b": 4, "c": 8}
  # 20/3 bits: (4, 4, 8), (8, 4, 8) and (4, 8, 8) all score 0; the tie goes to more bits
  plan = allocation_lib.allocate(sens, Budget.avg_bits(20 / 3), costs)
  assert plan.weight_bits["c"] == 8
  assert sorted([plan.weight_bits["a"], plan.weight_bits["b"]]) == [4, 8]
  assert plan.info["predicted_loss"] == 0.0


def test_ties_go_to_more_bits_in_the_solver_and_the_closed_form():
  rng = np.random.default_rng(5)
  names = tuple(f"l{i}" for i in range(6))
  scores = np.zeros((6, 3))
  scores[:, 0] = rng.uniform(1, 2, 6)  # 2 bits harmful, 4 and 8 bits tied at zero
  sens = SensitivityTable(names, BITS, scores)
  n = rng.integers(100, 1000, 6)
  costs = CostTable(names, BITS, {"bytes": np.outer(n, BITS) / 8.0})
  total8 = float(np.sum(n))
  for frac in (0.55, 0.7, 0.85, 0.99):
    budget = Budget.bytes(total8 * frac)
    plan = allocation_lib.allocate(sens, budget, costs)
    assert all(b >= 4 for b in plan.weight_bits.values())  # never buys harm
    assert plan.info["predicted_loss"] == 0.0
    # no layer left at 4 bits could go to 8 within the budget: the spare is spent
    spare = budget.value - costs.plan_cost(plan, "bytes")
    at4 = [i for i, l in enumerate(names) if plan.weight_bits[l] == 4]
    assert all(n[i] * 4 / 8.0 > spare + 1e-9 for i in at4)


def test_greedy_fits_and_is_never_better_than_exact():
  rng = np.random.default_rng(3)
  for _ in range(20):
    sens, costs = _instance(rng, int(rng.integers(3, 7)))
    m = costs.matrix("bytes")
    value = float(rng.uniform(m[:, 0].sum(), m[:, -1].sum() * 0.999))
    exact = allocation_lib.allocate(sens, Budget.bytes(value), costs)
    greedy = allocation_lib.greedy(sens, Budget.bytes(value), costs)
    assert costs.plan_cost(greedy, "bytes") <= value * (1 + 1e-9)
    assert sens.predicted(greedy) >= sens.predicted(exact) - 1e-9
    assert greedy.info["method"] == "greedy"
  with pytest.raises(BudgetInfeasibleError, match="at least"):
    allocation_lib.greedy(sens, Budget.bytes(1.0), costs)


def test_greedy_respects_pins():
  sens = SensitivityTable(("a", "b"), (4, 8), np.array([[1.0, 0.0], [0.2, 0.0]]))
  costs = CostTable(("a", "b"), (4, 8), {"bytes": np.array([[50, 100], [50, 100]])})
  assert allocation_lib.greedy(sens, "150B", costs).weight_bits == {"a": 8, "b": 4}
  assert allocation_lib.greedy(sens, "150B", costs, pinned={"b": 8}).weight_bits == {
      "a": 4, "b": 8}


def test_default_candidates_by_budget_kind():
  assert allocation_lib.default_weight_bits("4bit") == (2, 3, 4, 8)
  assert allocation_lib.default_weight_bits("2e8bops") == (2, 3, 4, 8)
  assert allocation_lib.default_weight_bits("48KB") == (2, 4, 8)
  # 3 bits are stored like 4 in bytes, so they would only cost accuracy there
  cost = LayerCost("c", "Conv2D", 1000, 8, 8, 1000)
  assert cost.weight_bytes(3) == cost.weight_bytes(4)
