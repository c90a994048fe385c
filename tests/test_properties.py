"""Properties of the quantizer, the budget parser and the allocator, checked by hypothesis.

Adds to test_quantizers / test_types / test_allocation (fixed examples and an
unpinned BOPs property) what only generated inputs can show:

- `quantize_array` on any shape, reduction axes and magnitudes: error within
  half a step per channel, at most ``2**b - 1`` levels, and how the error
  falls with bits. The naive claim "the error never grows with more bits" is
  false (weights on the 3-bit grid are exact at 3 bits, not at 4); what holds
  is that the error never grows when the coarser grid is a subset of the finer
  one (``2**(b1-1) - 1`` divides ``2**(b2-1) - 1``), and that the worst case,
  half a step, always shrinks.
- `Budget.parse` on generated text: valid budgets parse to the right value,
  anything else raises InvalidInputError and nothing else.
- `allocate` on random tables with random pins, for every budget kind: never
  over budget, optimal against brute force, and an infeasible budget raises
  BudgetInfeasibleError whose ``smallest`` is the cheapest plan's cost, which
  is itself feasible.
"""

import itertools
import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import assume, example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from keras_mpq.plan import allocation as allocation_lib
from keras_mpq.base.layers import MIN_WEIGHT_BOUND, quantize_array
from keras_mpq.base.types import Budget, BudgetKind, CostTable, SensitivityTable
from keras_mpq.base.errors import BudgetInfeasibleError, InvalidInputError

# --------------------------------------------------------------------------- quantize_array

# Kernels of rank 1 to 4 with magnitudes from 1e-30 to 1e30 (normal float32),
# zeros and repeated values allowed; the last axis is the output channel.
_MAGNITUDE = st.floats(float(np.float32(1e-30)), float(np.float32(1e30)), width=32)
_ELEMENT = st.one_of(st.just(0.0), _MAGNITUDE, _MAGNITUDE.map(lambda v: -v))


@st.composite
def kernels(draw):
  """(kernel, reduce_axes): one scale per index of the last axis, or one per tensor."""
  shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
  w = draw(hnp.arrays(np.float32, shape, elements=_ELEMENT))
  per_tensor = draw(st.booleans()) or len(shape) == 1
  axes = tuple(range(len(shape))) if per_tensor else tuple(range(len(shape) - 1))
  return w, axes


def _qmax(bits):
  return 2 ** (bits - 1) - 1


@settings(max_examples=150, deadline=None)
@given(kernels(), st.integers(2, 8))
def test_error_within_half_a_step_of_each_channel(kernel, bits):
  w, axes = kernel
  q, ints, scales = quantize_array(w, bits, axes)
  assert q.shape == w.shape and q.dtype == np.float32
  assert np.all(np.isfinite(q)) and np.all(scales > 0)
  err = np.abs(q.astype(np.float64) - w.astype(np.float64))
  assert np.all(err <= scales.astype(np.float64) / 2 * (1 + 1e-5))
  # the integers are the stored values: within the narrow range, and they rebuild q
  assert ints.min() >= -_qmax(bits) and ints.max() <= _qmax(bits)
  np.testing.assert_allclose(ints * scales, q, rtol=1e-6)


@settings(max_examples=150, deadline=None)
@given(kernels(), st.integers(2, 8))
def test_at_most_2_to_the_b_minus_1_levels_per_channel(kernel, bits):
  w, axes = kernel
  _, ints, _ = quantize_array(w, bits, axes)
  channels = np.moveaxis(ints, -1, 0).reshape(ints.shape[-1], -1) if len(axes) < w.ndim \
      else ints.reshape(1, -1)
  for values in channels:
    assert len(np.unique(values)) <= 2 ** bits - 1


_NESTED = [(b1, b2) for b1 in range(2, 9) for b2 in range(b1 + 1, 9)
           if _qmax(b2) % _qmax(b1) == 0]


@settings(max_examples=150, deadline=None)
@given(kernels(), st.sampled_from(_NESTED))
def test_error_never_grows_from_a_grid_to_a_finer_grid_holding_it(kernel, pair):
  """2 -> any b, 3 -> 5 and 7, 4 -> 7: every level of the coarse grid is a level of the fine one."""
  w, axes = kernel
  b1, b2 = pair
  coarse = np.abs(quantize_array(w, b1, axes)[0].astype(np.float64) - w)
  fine = np.abs(quantize_array(w, b2, axes)[0].astype(np.float64) - w)
  scale = np.max(np.abs(w), axis=axes, keepdims=True).astype(np.float64)
  assert np.all(fine <= coarse + 1e-6 * scale)


@settings(max_examples=100, deadline=None)
@given(kernels())
def test_worst_case_error_bound_shrinks_with_every_bit(kernel):
  w, axes = kernel
  bounds = [quantize_array(w, b, axes)[2] / 2 for b in range(2, 9)]
  # Channels below MIN_WEIGHT_BOUND are dead (integers 0 at every width, issue 30).
  live = np.max(np.abs(w), axis=axes, keepdims=True) >= MIN_WEIGHT_BOUND
  for low, high in zip(bounds, bounds[1:]):
    assert np.all(high[live] < low[live])
  for b in range(2, 9):
    ints = quantize_array(w, b, axes)[1]
    assert not np.any(np.where(live, 0, ints))


def test_more_bits_can_mean_more_error_off_nested_grids():
  """The counterexample to 'error is monotone in bits': weights on the 3-bit grid."""
  w = np.array([[1.0], [1 / 3], [-2 / 3]], np.float32)  # levels of the 3-bit grid (qmax 3)
  err3 = np.abs(quantize_array(w, 3, (0,))[0] - w).max()
  err4 = np.abs(quantize_array(w, 4, (0,))[0] - w).max()
  assert err3 < 1e-6 < err4  # 4-bit levels are multiples of 1/7


# A channel whose largest weight is subnormal used to get a zero scale (underflow).
def test_subnormal_channel_keeps_a_positive_scale():
  w = np.array([[1e-44, -5e-45], [1.0, 0.5]], np.float32).T
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    q, _, scales = quantize_array(w, 8, (0,))
  assert np.all(scales > 0)
  assert np.all(np.abs(q - w) <= scales / 2)


# --------------------------------------------------------------------------- Budget.parse

_UNITS = {"b": ("bytes", 1), "kb": ("bytes", 1e3), "kib": ("bytes", 1024),
          "mb": ("bytes", 1e6), "mib": ("bytes", 1024**2), "gb": ("bytes", 1e9),
          "gib": ("bytes", 1024**3), "bit": ("avg_bits", 1), "bits": ("avg_bits", 1),
          "bops": ("bops", 1), "kbops": ("bops", 1e3), "mbops": ("bops", 1e6),
          "gbops": ("bops", 1e9), "ms": ("latency", 1)}


@st.composite
def number_texts(draw):
  """Positive numbers as people type them: 48, 1.5, .5, 2e9, 3.0E-2, 1_000."""
  whole = draw(st.integers(0, 10**6))
  frac = draw(st.one_of(st.none(), st.integers(0, 999)))
  text = str(whole) if frac is None else f"{whole if draw(st.booleans()) else ''}.{frac}"
  if draw(st.booleans()):
    text += draw(st.sampled_from(["e", "E"])) + draw(st.sampled_from(["", "+", "-"])) + \
        str(draw(st.integers(0, 12)))
  assume(float(text) > 0)
  if frac is None and exp_free(text) and len(text) > 3 and draw(st.booleans()):
    text = f"{int(text):_}"  # digit grouping, which the parser allows
  return text


def exp_free(text):
  return "e" not in text.lower()


def _mixed_case(draw, unit):
  return "".join(c.upper() if draw(st.booleans()) else c for c in unit)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_valid_budgets_parse_to_their_value(data):
  number = data.draw(number_texts())
  unit = data.draw(st.sampled_from(sorted(_UNITS)))
  pad = lambda: data.draw(st.sampled_from(["", " ", "  ", "\t"]))  # pylint: disable=unnecessary-lambda-assignment
  text = pad() + number + pad() + _mixed_case(data.draw, unit) + pad()
  budget = Budget.parse(text)
  kind, scale = _UNITS[unit]
  assert budget.kind is BudgetKind(kind)
  assert budget.value == pytest.approx(float(number.replace("_", "")) * scale, rel=1e-12)


_BUDGET_ALPHABET = st.sampled_from(list("0123456789.eE+-_ kKmMgGiIbBtTsSoOpP\t,x%/") +
                                   ["bit", "KB", "MiB", "ms", "bops", "nan", "inf", "\u212a"])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=12), st.lists(_BUDGET_ALPHABET, max_size=8).map("".join)))
@example("1e999KB")
@example("0bit")
@example("nan bit")
@example("1.bit")
def test_any_text_parses_or_raises_invalid_input(text):
  try:
    budget = Budget.parse(text)
  except InvalidInputError as e:
    assert str(e)  # the message says what was expected
    return
  assert budget.value > 0 and not math.isnan(budget.value)
  assert Budget.parse(budget.to_dict()) == budget


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.binary(max_size=8),
                 st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.sampled_from(["kind", "value", "x"]),
                                 st.one_of(st.none(), st.text(max_size=6), st.floats(),
                                           st.integers(), st.lists(st.integers(), max_size=2),
                                           st.dictionaries(st.text(max_size=2), st.integers(),
                                                           max_size=1)),
                                 max_size=3)))
def test_non_string_budgets_raise_invalid_input(spec):
  try:
    budget = Budget.parse(spec)
  except InvalidInputError:
    return
  assert isinstance(spec, dict) and budget.value > 0  # only a well-formed dict may pass
  assert budget.kind.value == spec["kind"]


# --------------------------------------------------------------------------- allocate


@st.composite
def problems(draw):
  """Random scores (any sign), random costs of one kind, random pins, random budget."""
  n_layers = draw(st.integers(1, 5))
  bits = tuple(sorted(draw(st.sets(st.sampled_from([2, 3, 4, 6, 8]), min_size=1,
                                   max_size=3))))
  seed = draw(st.integers(0, 2**32 - 1))
  rng = np.random.default_rng(seed)
  names = tuple(f"layer{i}" for i in range(n_layers))
  kind = draw(st.sampled_from(["bytes", "avg_bits", "bops"]))
  scale = draw(st.sampled_from([1e-3, 1.0, 1e3, 1e9]))
  costs = rng.uniform(0.0, 1.0, size=(n_layers, len(bits))) * scale
  if draw(st.booleans()):
    costs = np.sort(costs, axis=1)  # the usual shape: more bits cost more
  if draw(st.booleans()):
    costs = np.round(costs * 4) / 4  # ties between plans
  scores = rng.normal(size=(n_layers, len(bits)))
  pinned = {n: bits[int(rng.integers(len(bits)))] for n in names if rng.random() < 0.3}
  frac = draw(st.floats(-0.3, 1.3))
  return (SensitivityTable(names, bits, scores), CostTable(names, bits, {kind: costs}),
          kind, pinned, frac)


def _brute(sens, costs, kind, pinned):
  """[(cost, objective)] of every plan that respects the pins."""
  m = costs.matrix(kind)
  options = [[sens.bits.index(pinned[n])] if n in pinned else range(len(sens.bits))
             for n in sens.layers]
  return [(math.fsum(m[i, j] for i, j in enumerate(c)),
           math.fsum(sens.scores[i, j] for i, j in enumerate(c)))
          for c in itertools.product(*options)]


@settings(max_examples=120, deadline=None)
@given(problems())
def test_allocate_never_over_budget_and_optimal_with_pins(problem):
  sens, costs, kind, pinned, frac = problem
  plans = _brute(sens, costs, kind, pinned)
  cheapest = min(c for c, _ in plans)
  dearest = max(c for c, _ in plans)
  value = cheapest + frac * (dearest - cheapest)
  assume(value > 0)
  budget = Budget(BudgetKind(kind), value)
  try:
    plan = allocation_lib.allocate(sens, budget, costs, pinned)
  except BudgetInfeasibleError as e:
    assert value * (1 + 1e-9) < cheapest
    assert e.smallest == pytest.approx(cheapest, rel=1e-12, abs=1e-300)
    assert re.search(r"at least", str(e))
    # the smallest it names is feasible
    assume(e.smallest > 0)
    again = allocation_lib.allocate(sens, Budget(BudgetKind(kind), e.smallest), costs, pinned)
    assert costs.plan_cost(again, kind) <= e.smallest * (1 + 1e-9)
    return
  achieved = costs.plan_cost(plan, kind)
  assert achieved <= value * (1 + 1e-9)
  assert all(plan.weight_bits[n] == b for n, b in pinned.items())
  best = min(obj for c, obj in plans if c <= value * (1 + 1e-9))
  if "note" not in plan.info:  # a binding budget: the exact optimum
    assert sens.predicted(plan) == pytest.approx(best, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_infeasible_budget_names_the_cheapest_plan(problem):
  sens, costs, kind, pinned, _ = problem
  cheapest = min(c for c, _ in _brute(sens, costs, kind, pinned))
  assume(cheapest > 1e-12)
  with pytest.raises(BudgetInfeasibleError) as err:
    allocation_lib.allocate(sens, Budget(BudgetKind(kind), cheapest * 0.999), costs, pinned)
  assert err.value.smallest == pytest.approx(cheapest, rel=1e-12)
