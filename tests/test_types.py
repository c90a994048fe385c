"""Shared types: budget parsing, plans, sensitivity and cost tables."""

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from keras_mpq.base.types import FLOAT_BITS, Budget, BudgetKind, CostTable, LayerCost, QuantizationPlan, SensitivityTable
from keras_mpq.base.errors import InvalidInputError


@pytest.mark.parametrize("spec,kind,value", [
    ("48KB", BudgetKind.BYTES, 48_000), ("1.5MiB", BudgetKind.BYTES, 1.5 * 1024**2),
    ("20000B", BudgetKind.BYTES, 20_000), ("4bit", BudgetKind.AVG_BITS, 4),
    ("3.5bits", BudgetKind.AVG_BITS, 3.5), ("2e9bops", BudgetKind.BOPS, 2e9),
    ("300MBOPs", BudgetKind.BOPS, 3e8), ("5ms", BudgetKind.LATENCY, 5),
    (" 4 bit ", BudgetKind.AVG_BITS, 4),
])
def test_budget_parse(spec, kind, value):
  b = Budget.parse(spec)
  assert b.kind is kind
  assert b.value == pytest.approx(value)
  assert Budget.from_dict(b.to_dict()) == b


@pytest.mark.parametrize("spec", ["", "four bits", "4 parsecs", "-3bit", "0KB", 4, None,
                                  "nanKB"])
def test_budget_parse_rejects(spec):
  with pytest.raises(InvalidInputError, match="budget|Expected"):
    Budget.parse(spec)


def test_budget_infinite_means_unrestricted():
  assert Budget.bytes(math.inf).value == math.inf


@given(st.floats(min_value=0.01, max_value=1e12, allow_nan=False),
       st.sampled_from(["B", "KB", "KiB", "MB", "MiB", "bit", "bits", "bops", "ms"]))
def test_budget_parse_property(number, unit):
  b = Budget.parse(f"{number!r}{unit}")
  assert b.value > 0
  assert Budget.parse(b) is b


def test_plan_validation_and_roundtrip():
  plan = QuantizationPlan({"a": 8, "b": 2, "c": FLOAT_BITS}, {"a": 16})
  assert plan.act_bits("a") == 16 and plan.act_bits("b") == 8
  assert QuantizationPlan.from_json(plan.to_json()) == plan
  assert plan.replace(b=4).weight_bits["b"] == 4
  with pytest.raises(InvalidInputError, match="2..8"):
    QuantizationPlan({"a": 9})
  with pytest.raises(InvalidInputError, match="2..8"):
    QuantizationPlan({"a": 1})
  with pytest.raises(InvalidInputError, match="activation"):
    QuantizationPlan({"a": 8}, {"a": 4})
  with pytest.raises(InvalidInputError, match="not in the plan"):
    plan.replace(zzz=4)


def test_sensitivity_table():
  t = SensitivityTable(("a", "b"), (2, 8), np.array([[1.0, 0.0], [0.5, 0.1]]))
  assert t.score("b", 2) == 0.5
  assert t.predicted(QuantizationPlan({"a": 8, "b": 2})) == pytest.approx(0.5)
  assert SensitivityTable.from_json(t.to_json()) == t
  with pytest.raises(InvalidInputError, match="shape"):
    SensitivityTable(("a",), (2, 8), np.zeros((2, 2)))
  with pytest.raises(InvalidInputError, match="finite"):
    SensitivityTable(("a",), (2,), np.array([[np.nan]]))
  with pytest.raises(ValueError):
    t.scores[0, 0] = 3.0  # read-only


def test_layer_cost_bytes():
  c = LayerCost("conv", "Conv2D", n_params=1000, n_bias=10, n_scales=10, macs=5000)
  assert c.weight_bytes(8) == 1000 + 40 + 120
  assert c.weight_bytes(4) == 500 + 40 + 120
  assert c.weight_bytes(2) == c.weight_bytes(4)  # int4 container
  assert c.weight_bytes(FLOAT_BITS) == 4 * 1010


def test_cost_table():
  costs = CostTable(("a", "b"), (2, 8), {"bytes": [[1, 4], [2, 8]]})
  plan = QuantizationPlan({"a": 2, "b": 8})
  assert costs.plan_cost(plan, "bytes") == 9
  assert Budget.bytes(9).is_satisfied_by(plan, costs)
  assert not Budget.bytes(8.9).is_satisfied_by(plan, costs)
  assert CostTable.from_dict(costs.to_dict()).plan_cost(plan, "bytes") == 9
  with pytest.raises(InvalidInputError, match="latency"):
    costs.matrix("latency")
  with pytest.raises(InvalidInputError, match="shape"):
    CostTable(("a",), (2, 8), {"bytes": [[1, 2, 3]]})


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"), ("", "not valid JSON"), ("[8, 4]", "weight_bits"),
    ('{"weight_bits": [8]}', "mapping"), ('{"weight_bits": {"a": "eight"}}', "integer"),
    ('{"weight_bits": {"a": 8}, "activation_bits": 5}', "wrong type|mapping"),
    (None, "str"),
])
def test_plan_from_json_errors_are_clear(text, match):
  with pytest.raises(InvalidInputError, match=match):
    QuantizationPlan.from_json(text)


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"), ('"a string"', "sensitivity table"),
    ('{"layers": ["a"], "bits": [4]}', "missing"),
    ('{"layers": ["a"], "bits": [4], "scores": [[0.1, 0.2]]}', "shape"),
    ('{"layers": ["a"], "bits": [4], "scores": [["x"]]}', "wrong type"),
    ('{"layers": 3, "bits": [4], "scores": [[0.1]]}', "wrong type"),
])
def test_sensitivity_from_json_errors_are_clear(text, match):
  with pytest.raises(InvalidInputError, match=match):
    SensitivityTable.from_json(text)


def test_from_json_round_trips():
  t = SensitivityTable(("a", "b"), (4, 8), np.array([[0.5, 0.0], [0.1, 0.0]]), "zeroq_kl")
  assert SensitivityTable.from_json(t.to_json()) == t
  p = QuantizationPlan({"a": 4, "b": 8}, {"a": 16})
  assert QuantizationPlan.from_json(p.to_json()) == p
