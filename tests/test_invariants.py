"""Algebraic invariants of the quantizer, the allocator and budget parsing (hypothesis).

Complements test_configs / test_allocation / test_types: idempotence, sign
symmetry and per-channel scale equivariance of `quantize_array`; BOPs-kind
tables never over budget; `Budget.parse` only ever raises InvalidInputError.
"""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from keras_mpq.plan import allocation as allocation_lib
from keras_mpq.base.layers import quantize_array
from keras_mpq.base.types import Budget, CostTable, SensitivityTable
from keras_mpq.base.errors import BudgetInfeasibleError, InvalidInputError

BITS = st.integers(2, 8)
# Conv-like kernels (kh, kw, cin, cout) reduced over all but the last axis, and
# Dense-like (in, out); values with magnitudes from 1e-3 to 1e3, zeros allowed.
ELEMENTS = st.one_of(st.just(0.0), st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3))
KERNELS = st.one_of(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=4, max_dims=4, max_side=4),
               elements=ELEMENTS),
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=6),
               elements=ELEMENTS))


def _axes(w):
  return tuple(range(w.ndim - 1))


@settings(max_examples=60, deadline=None)
@given(KERNELS, BITS)
def test_quantize_is_idempotent(w, bits):
  q, ints, scales = quantize_array(w, bits, _axes(w))
  q2, ints2, scales2 = quantize_array(q, bits, _axes(w))
  np.testing.assert_allclose(q2, q, rtol=1e-5, atol=0)
  np.testing.assert_array_equal(ints2, ints)


@settings(max_examples=60, deadline=None)
@given(KERNELS, BITS)
def test_quantize_is_odd(w, bits):
  q, ints, _ = quantize_array(w, bits, _axes(w))
  qn, intsn, _ = quantize_array(-w, bits, _axes(w))
  np.testing.assert_array_equal(qn, -q)
  np.testing.assert_array_equal(intsn, -ints)


@settings(max_examples=60, deadline=None)
@given(KERNELS, BITS, st.integers(-6, 6), st.data())
def test_quantize_is_equivariant_to_per_channel_powers_of_two(w, bits, exp, data):
  # Powers of two scale exactly in float32, so Q(c*w) == c*Q(w) holds bit for bit.
  c = np.float32(2.0) ** data.draw(
      hnp.arrays(np.int32, (w.shape[-1],), elements=st.integers(-6, 6))).astype(np.float32)
  q, ints, _ = quantize_array(w, bits, _axes(w))
  qc, intsc, _ = quantize_array(w * c, bits, _axes(w))
  np.testing.assert_array_equal(intsc, ints)
  np.testing.assert_array_equal(qc, q * c)


@settings(max_examples=60, deadline=None)
@given(KERNELS, BITS, st.floats(0.01, 100.0))
def test_quantize_is_equivariant_to_positive_scales(w, bits, c):
  q, ints, _ = quantize_array(w, bits, _axes(w))
  qc, intsc, _ = quantize_array(w * np.float32(c), bits, _axes(w))
  # Rounding ties may move one level under float error; values stay within one step.
  step = np.max(np.abs(w * np.float32(c)), axis=_axes(w), keepdims=True) / (2 ** (bits - 1) - 1)
  assert np.all(np.abs(qc - q * np.float32(c)) <= step * 1.0001 + 1e-6)
  assert np.mean(intsc == ints) >= 0.9 or ints.size < 10


@settings(max_examples=40, deadline=None)
@given(n_layers=st.integers(1, 6), seed=st.integers(0, 10_000), frac=st.floats(0.0, 1.2))
def test_bops_allocation_is_within_budget_or_infeasible(n_layers, seed, frac):
  rng = np.random.default_rng(seed)
  bits = (2, 4, 8)
  names = tuple(f"l{i}" for i in range(n_layers))
  macs = rng.uniform(1e3, 1e10, size=(n_layers, 1))
  matrix = macs * np.array(bits, float) * 8
  sens = SensitivityTable(names, bits, -np.sort(-rng.lognormal(size=(n_layers, 3)), axis=1))
  costs = CostTable(names, bits, {"bops": matrix})
  lo, hi = matrix[:, 0].sum(), matrix[:, -1].sum()
  budget = Budget.bops(max(1.0, lo + frac * (hi - lo)) if frac > 0 else lo * 0.9)
  try:
    plan = allocation_lib.allocate(sens, budget, costs)
  except BudgetInfeasibleError as e:
    assert budget.value < lo
    assert math.isclose(e.smallest, lo, rel_tol=1e-9)
    return
  assert costs.plan_cost(plan, "bops") <= budget.value * (1 + 1e-9)
  assert set(plan.weight_bits) == set(names)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_budget_parse_never_raises_anything_else(text):
  try:
    budget = Budget.parse(text)
  except InvalidInputError:
    return
  assert budget.value > 0 and not math.isnan(budget.value)


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"\s*-?[0-9]*\.?[0-9]*(e[+-]?[0-9]{1,4})?\s*[a-zA-Z]{0,6}\s*",
                     fullmatch=True))
def test_budget_parse_of_number_like_text(text):
  try:
    budget = Budget.parse(text)
  except InvalidInputError:
    return
  assert budget.value > 0 and not math.isnan(budget.value)


@pytest.mark.parametrize("spec", [float("nan"), float("-inf"), 0, -1, None, [], b"4bit",
                                  object(), {"kind": "bytes", "value": -1},
                                  {"kind": "bytes", "value": "lots"}])
def test_budget_parse_of_odd_objects_raises_invalid_input(spec):
  with pytest.raises(InvalidInputError):
    Budget.parse(spec)


@pytest.mark.parametrize("spec", [{}, {"kind": "x", "value": 1}, {"kind": "bytes"}])
def test_budget_parse_of_malformed_dicts_raises_invalid_input(spec):
  with pytest.raises(InvalidInputError):
    Budget.parse(spec)
