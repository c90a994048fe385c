"""End-to-end: keras_mpq.quantize on models trained on real MNIST, data-free and with real data."""

import json

import numpy as np
import pytest

import keras_mpq
from keras_mpq import apply


def _acc(model, x, y):
  return float(np.mean(model.predict(x, verbose=0, batch_size=256).argmax(-1) == y))


@pytest.fixture(scope="module")
def datafree_result(trained_cnn):
  return keras_mpq.quantize(trained_cnn, "4bit", num_samples=64, rounds=2, seed=0,
                            progress=False)


def test_datafree_quantize_meets_budget_and_keeps_accuracy(datafree_result, trained_cnn,
                                                           small_data):
  _, _, x_test, y_test = small_data
  result = datafree_result
  assert result.report["within_budget"]
  assert result.report["achieved"]["avg_bits"] <= 4.0 + 1e-9
  assert set(result.plan.weight_bits) == set(apply.plan_layers(result.float_model))
  assert result.report["data"]["source"] == "synthetic"
  assert len(result.calibration_data) == 64
  # the quantized model's real accuracy stays close to float at 4 bits average
  float_acc, q_acc = _acc(trained_cnn, x_test, y_test), _acc(result.model, x_test, y_test)
  assert q_acc > float_acc - 0.05, (float_acc, q_acc)
  # the wrappers carry exactly the plan
  assert apply.get_weight_bits(result.model) == dict(result.plan.weight_bits)


def test_result_is_frozen_and_saves(datafree_result, tmp_path):
  with pytest.raises(Exception):
    datafree_result.plan = None
  files = datafree_result.save(tmp_path)
  for name in ("plan.json", "sensitivity.json", "report.json", "sensitivity.png",
               "bits.png", "pareto.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  plan = keras_mpq.QuantizationPlan.from_json((tmp_path / "plan.json").read_text())
  assert plan == datafree_result.plan
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["budget"]["kind"] == "avg_bits"
  assert set(files) >= {"plan", "sensitivity", "report"}


def test_export_mobile_runs_in_litert(datafree_result, small_data, tmp_path):
  _, _, x_test, y_test = small_data
  path = tmp_path / "m.tflite"
  datafree_result.export(path, target="mobile")
  checked = keras_mpq.validate_tflite(path, x_test, y_test)
  keras_acc = _acc(datafree_result.model, x_test, y_test)
  assert checked.accuracy > keras_acc - 0.03, (checked.accuracy, keras_acc)


def test_real_data_and_byte_budget(trained_separable, small_data):
  x, y, x_test, y_test = small_data
  from keras_mpq import export as export_lib  # pylint: disable=g-import-not-at-top
  folded = apply.fold_batchnorm(trained_separable)
  # A byte budget is the mobile file's size (issue 15): its costs come from one export.
  costs = keras_mpq.file_cost_table(folded, export_lib.measure_storage(folded, "mobile"),
                                    bits=(2, 4, 8))
  per_layer = costs.matrix("bytes")
  cheapest, dearest = per_layer.min(axis=1).sum(), per_layer.max(axis=1).sum()
  budget = keras_mpq.Budget.bytes(cheapest + 0.5 * (dearest - cheapest))
  result = keras_mpq.quantize(trained_separable, budget, data=(x[:128], y[:128]), rounds=1,
                              seed=0, progress=False)
  assert result.report["data"]["source"] == "user"
  assert result.report["achieved"]["bytes"] <= budget.value
  assert result.report["achieved"]["bytes"] < dearest  # the budget really binds
  assert _acc(result.model, x_test, y_test) > 0.5


def test_same_seed_same_plan(trained_cnn, small_data):
  x = small_data[0][:64]
  a = keras_mpq.quantize(trained_cnn, "3bit", data=x, rounds=1, seed=3, progress=False)
  b = keras_mpq.quantize(trained_cnn, "3bit", data=x, rounds=1, seed=3, progress=False)
  assert a.plan == b.plan
  np.testing.assert_array_equal(a.sensitivity.scores, b.sensitivity.scores)


def test_cache_resumes_with_same_plan(trained_cnn, tmp_path):
  kwargs = dict(num_samples=32, rounds=1, seed=0, progress=False, cache_dir=tmp_path)
  first = keras_mpq.quantize(trained_cnn, "4bit", **kwargs)
  cached = sorted(p.name for p in tmp_path.iterdir())
  assert any(n.startswith("synthetic-") for n in cached)
  assert any(n.startswith("search-") for n in cached)
  second = keras_mpq.quantize(trained_cnn, "4bit", **kwargs)
  assert second.plan == first.plan
  assert "cached" in second.report["data"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget="4 parsecs"), "budget unit"),
    (dict(budget="4bit", target="fpga"), "target"),
    (dict(budget="4bit", weight_bits=(1, 4)), "2..8"),
    (dict(budget="4bit", activation_bits=4), "activation"),
    (dict(budget="4bit", data=np.zeros((4, 10, 10, 1))), "shape"),
    (dict(budget="0.5bit", data=np.zeros((8, 28, 28, 1))), "at least 2 bits"),
])
def test_bad_input_is_a_clear_error(trained_cnn, kwargs, match):
  with pytest.raises(keras_mpq.KerasMpqError, match=match):
    keras_mpq.quantize(trained_cnn, progress=False, rounds=1, **kwargs)
