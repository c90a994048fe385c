"""Tests of keras_mpq.sensitivity: metrics, compiled-once evaluation, prefix reuse, search."""

import json
import os

import numpy as np
import pytest

from keras_mpq import apply, sensitivity
from keras_mpq.compat import keras
from keras_mpq.types import (FLOAT_BITS, Budget, InvalidInputError, QuantizationPlan,
                             SensitivityTable, UnsupportedModelError)

CNN_LAYERS = ("conv1", "conv2", "conv3", "fc1", "logits")


@pytest.fixture(scope="module")
def data(small_data):
  x, y = small_data[0][:256], small_data[1][:256]
  return x, y


@pytest.fixture(scope="module")
def ti_table(trained_cnn, data):
  """The default task-interaction table of the trained CNN (measured once)."""
  return sensitivity.measure_sensitivity(trained_cnn, data, progress=False)


def _tiny(seed=0, softmax=False):
  keras.utils.set_random_seed(seed)
  inp = keras.Input((6, 6, 1))
  x = keras.layers.Conv2D(3, 3, activation="relu", name="c")(inp)
  x = keras.layers.Flatten()(x)
  out = keras.layers.Dense(4, activation="softmax" if softmax else None, name="d")(x)
  return keras.Model(inp, out)


def _residual(seed=0):
  """conv a -> (conv b -> conv c) + a -> dense d; plus a skip from the input."""
  keras.utils.set_random_seed(seed)
  inp = keras.Input((6, 6, 2))
  s = keras.layers.Conv2D(2, 1, name="s")(inp)
  s = keras.layers.Add(name="add0")([inp, s])  # 's' sits inside a block from the input
  a = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(s)
  b = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="b")(a)
  c = keras.layers.Conv2D(4, 3, padding="same", name="c")(b)
  z = keras.layers.Add(name="add1")([a, c])
  z = keras.layers.GlobalAveragePooling2D()(z)
  out = keras.layers.Dense(3, name="d")(z)
  return keras.Model(inp, out)


def _tiny_data(shape, n=48, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.uniform(0, 1, (n,) + shape).astype(np.float32),
          rng.integers(0, classes, n))


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("metric", sensitivity.available_metrics())
def test_every_metric_gives_a_finite_table(trained_cnn, data, metric):
  table = sensitivity.measure_sensitivity(
      trained_cnn, None if metric == "weight_mse" else data, metric=metric,
      progress=False)
  assert table.layers == CNN_LAYERS
  assert table.bits == (2, 4, 8)
  assert table.scores.shape == (5, 3)
  assert np.all(np.isfinite(table.scores))
  assert table.metric == metric
  assert table.info["wall_seconds"] >= 0
  if metric in ("weight_mse", "hessian_trace", "zeroq_kl"):
    # These are distances: larger error at 2 bits than 8 bits in every layer.
    assert np.all(table.scores[:, 0] > table.scores[:, 2])
    assert np.all(table.scores >= -1e-9)


def test_metric_registry_lists_names_and_rejects_unknown():
  assert sensitivity.available_metrics()[0] == "task_interaction"
  assert set(sensitivity.available_metrics()) == {m.value for m in sensitivity.Metric}
  assert sensitivity.get_metric(sensitivity.Metric.ZEROQ_KL).needs_labels is False
  with pytest.raises(InvalidInputError, match="task_interaction.*Received: metric='l2'"):
    sensitivity.get_metric("l2")


def test_register_metric_adds_a_metric(trained_cnn):
  @sensitivity.register_metric("test_constant", needs_data=False, needs_labels=False)
  def _constant(job):
    return np.full((len(job.layers), len(job.bits)), 0.5), {"note": "constant"}

  try:
    table = sensitivity.measure_sensitivity(trained_cnn, None, metric="test_constant")
    assert table.metric == "test_constant"
    assert np.all(table.scores == 0.5) and table.info["note"] == "constant"
  finally:
    sensitivity._METRICS.pop("test_constant")  # pylint: disable=protected-access


def test_task_interaction_low_bits_hurt_most_layers(ti_table):
  two, eight = ti_table.scores[:, 0], ti_table.scores[:, 2]
  assert np.all(eight == 0.0)  # the context itself: nothing changes
  assert np.sum(two > eight) >= 3  # most layers (a loss can drop by chance)
  assert two.sum() > 0
  assert ti_table.score("conv1", 2) > ti_table.score("conv1", 4)
  assert ti_table.score("fc1", 2) > ti_table.score("fc1", 4)
  info = ti_table.info
  assert info["context"] == {name: 8 for name in CNN_LAYERS}
  assert info["labels"] == "given" and info["num_samples"] == 256
  assert 0 < info["float_loss"] < 1 and 0 < info["context_loss"] < 1


def test_weight_mse_matches_numpy_quantizer(trained_cnn):
  from keras_mpq import quantizers  # pylint: disable=g-import-not-at-top
  table = sensitivity.measure_sensitivity(trained_cnn, None, metric="weight_mse",
                                          weight_bits=(3,))
  folded = apply.fold_batchnorm(trained_cnn)
  w = folded.get_layer("fc1").kernel.numpy()
  q = quantizers.quantize_array(w, 3, (0,))[0]
  assert table.score("fc1", 3) == pytest.approx(np.sum((q - w) ** 2) / np.sum(w ** 2),
                                                rel=1e-5)


def test_softmax_output_and_argmax_labels():
  model = _tiny(softmax=True)
  x, _ = _tiny_data((6, 6, 1))
  table = sensitivity.measure_sensitivity(model, x, metric="task_float_context")
  probs = model.predict(x, verbose=0)
  y = probs.argmax(1)
  expected = -np.mean(np.log(probs[np.arange(len(y)), y]))
  assert table.info["labels"] == "float model argmax"
  assert table.info["float_loss"] == pytest.approx(expected, rel=1e-4)
  assert np.all(np.isfinite(table.scores))


# --------------------------------------------------------------------------- efficiency


def test_no_retracing_across_evaluations(ti_table):
  # Two compiled functions, each traced exactly once, served all evaluations.
  assert ti_table.info["traces"] == {"evaluate": 1, "prefix": 1}
  assert ti_table.info["concrete_functions"] == {"evaluate": 1, "prefix": 1}
  # 5 layers x 2 non-context bit-widths, the context pass, the float pass.
  assert ti_table.info["pair_evaluations"] == 10
  assert ti_table.info["evaluations"] == 12


def test_evaluator_reused_across_contexts_does_not_retrace(trained_cnn, data):
  job = sensitivity._prepare(  # pylint: disable=protected-access
      trained_cnn, data, (2, 4, 8), sensitivity.get_metric("task_interaction"), None, 8,
      128, 0, False)
  ev = sensitivity._evaluator_for(job)  # pylint: disable=protected-access
  for bits in (8, 4, FLOAT_BITS):
    ev.set_context({n: bits for n in CNN_LAYERS}, activations=bits != FLOAT_BITS)
    ev.layer_scores((2, 4, 8), "cross_entropy")
    ev.loss()
  assert dict(ev.traces) == {"evaluate": 1, "prefix": 1}
  assert ev.batch_calls > 50


def test_prefix_reuse_gives_the_full_model_numbers(trained_cnn, data, ti_table):
  full = sensitivity.measure_sensitivity(trained_cnn, data, reuse_prefix=False)
  np.testing.assert_allclose(ti_table.scores, full.scores, atol=1e-5)
  assert ti_table.info["prefix_reuse"] == {"conv1": False, "conv2": True, "conv3": True,
                                           "fc1": True, "logits": True}
  assert not any(full.info["prefix_reuse"].values())
  assert full.info["traces"] == {"evaluate": 1, "prefix": 1}


def test_prefix_reuse_on_residual_graph():
  model = _residual()
  x, y = _tiny_data((6, 6, 2), classes=3)
  reused = sensitivity.measure_sensitivity(model, (x, y), metric="task_float_context")
  full = sensitivity.measure_sensitivity(model, (x, y), metric="task_float_context",
                                         reuse_prefix=False)
  np.testing.assert_allclose(reused.scores, full.scores, atol=1e-6)
  assert np.any(np.abs(full.scores) > 1e-6)
  cut = reused.info["prefix_cut"]
  # 's' is inside a block that starts at the model input: no cut before it.
  assert cut["s"] is None and reused.info["prefix_reuse"]["s"] is False
  assert cut["a"] == "a" and cut["b"] == "b"
  assert cut["c"] == "b"  # c's input is not a cut (add1 needs a): nearest cut before
  assert cut["d"] == "d"


# --------------------------------------------------------------------------- context, seed, JSON


def test_context_changes_the_scores(trained_cnn, data, ti_table):
  at4 = sensitivity.measure_sensitivity(trained_cnn, data,
                                        context={n: 4 for n in CNN_LAYERS})
  assert at4.info["context"] == {n: 4 for n in CNN_LAYERS}
  assert np.all(at4.scores[:, 1] == 0.0)  # 4 bits is the context now
  assert not np.allclose(at4.scores, ti_table.scores, atol=1e-4)
  plan = QuantizationPlan({"conv1": 2})  # missing layers default to max(bits)
  partial = sensitivity.measure_sensitivity(trained_cnn, data, context=plan)
  assert partial.info["context"]["conv1"] == 2 and partial.info["context"]["fc1"] == 8
  assert partial.score("conv1", 2) == 0.0
  assert not np.allclose(partial.scores[1:], ti_table.scores[1:], atol=1e-5)


def test_same_seed_same_table(trained_cnn, data, ti_table):
  again = sensitivity.measure_sensitivity(trained_cnn, data, seed=0)
  np.testing.assert_array_equal(again.scores, ti_table.scores)
  h0 = sensitivity.measure_sensitivity(trained_cnn, data, metric="hessian_trace", seed=3)
  h1 = sensitivity.measure_sensitivity(trained_cnn, data, metric="hessian_trace", seed=3)
  h2 = sensitivity.measure_sensitivity(trained_cnn, data, metric="hessian_trace", seed=4)
  np.testing.assert_array_equal(h0.scores, h1.scores)
  assert not np.array_equal(h0.scores, h2.scores)
  assert h0.info["probes"] == sensitivity.HUTCHINSON_PROBES


def test_json_round_trip(ti_table):
  text = ti_table.to_json()
  back = SensitivityTable.from_json(text)
  assert back == ti_table
  assert back.info["prefix_reuse"] == ti_table.info["prefix_reuse"]
  assert json.loads(text)["metric"] == "task_interaction"


# --------------------------------------------------------------------------- search


def test_search_returns_a_plan_within_budget(trained_cnn, data):
  from keras_mpq import costs as costs_lib  # pylint: disable=g-import-not-at-top
  found = sensitivity.search(trained_cnn, data, "4bit", rounds=3, pinned={"conv1": 8},
                             progress=False)
  costs = costs_lib.cost_table(apply.fold_batchnorm(trained_cnn))
  assert Budget.avg_bits(4).is_satisfied_by(found.plan, costs)
  assert found.plan.weight_bits["conv1"] == 8
  assert 1 <= len(found.rounds) <= 3
  for r in found.rounds:
    assert r["within_budget"] and r["cost"] <= 4 + 1e-9
    assert np.isfinite(r["measured_loss"]) and np.isfinite(r["predicted"])
  best = min(r["measured_loss"] for r in found.rounds)
  chosen = found.plan.info["search"]
  assert chosen["measured_loss"] == best
  assert found.rounds[chosen["round"]]["weight_bits"] == found.plan.weight_bits
  # The plan's loss is what it measures: apply it and compare. The search's
  # weights are optimized per layer on the float model's inputs (WeightBank),
  # apply_plan's layer by layer on the quantized model's: close, not equal.
  qmodel = apply.apply_plan(trained_cnn, found.plan, data[0])
  out = qmodel.predict(data[0], verbose=0)
  loss = keras.losses.sparse_categorical_crossentropy(data[1], out, from_logits=True)
  assert float(np.mean(loss)) == pytest.approx(chosen["measured_loss"], rel=2e-2)
  # The search goes on only while each plan is new.
  assert all(r["repeat_of"] is None for r in found.rounds[:-1])
  if len(found.rounds) < 3:
    last = found.rounds[-1]
    assert found.rounds[last["repeat_of"]]["weight_bits"] == last["weight_bits"]
  assert set(chosen["traces"].values()) == {1}
  assert isinstance(found.sensitivity, SensitivityTable)
  assert json.loads(json.dumps(found.to_dict()))["plan"]["weight_bits"]


def test_search_stops_when_plans_cycle():
  # On this tiny model the plan alternates between two allocations.
  x, y = _tiny_data((6, 6, 1), n=64)
  found = sensitivity.search(_tiny(), (x, y), "5bit", rounds=6)
  plans = [r["weight_bits"] for r in found.rounds]
  assert all(p not in plans[:i] for i, p in enumerate(plans[:-1]))
  assert len(found.rounds) == 3 and found.rounds[-1]["repeat_of"] == 0
  assert found.plan.weight_bits in plans


def test_search_with_a_context_free_metric_stops_after_one_round(trained_cnn):
  x, y = _tiny_data((28, 28, 1), n=32, classes=10)
  found = sensitivity.search(trained_cnn, (x, y), "6bit", metric="weight_mse", rounds=3)
  assert len(found.rounds) == 1
  assert found.sensitivity.metric == "weight_mse"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits, match", [
    ((1, 4), "2..8"), ((4, 16), "2..8"), ((4, 32), "2..8"), ((4, 4), "distinct"),
    ((), "distinct"), ("48", "2..8")])
def test_bad_bits(bits, match):
  x, y = _tiny_data((6, 6, 1))
  with pytest.raises(InvalidInputError, match=match):
    sensitivity.measure_sensitivity(_tiny(), (x, y), weight_bits=bits)


def test_bad_inputs_raise_clear_errors():
  model = _tiny()
  x, y = _tiny_data((6, 6, 1))
  with pytest.raises(InvalidInputError, match="weight_mse"):
    sensitivity.measure_sensitivity(model, (x, y), metric="mse")
  with pytest.raises(InvalidInputError, match=r"unknown layers: \['nope'\]"):
    sensitivity.measure_sensitivity(model, (x, y), context={"nope": 4})
  with pytest.raises(InvalidInputError, match="2..8"):
    sensitivity.measure_sensitivity(model, (x, y), context={"c": 9})
  with pytest.raises(InvalidInputError, match="takes no context"):
    sensitivity.measure_sensitivity(model, (x, y), metric="zeroq_kl", context={"c": 4})
  with pytest.raises(InvalidInputError, match=r"shape \(N, 6, 6, 1\)"):
    sensitivity.measure_sensitivity(model, (x[:, :5], y))
  with pytest.raises(InvalidInputError, match=r"labels in 0..3"):
    sensitivity.measure_sensitivity(model, (x, y + 4))
  with pytest.raises(InvalidInputError, match="labels of shape"):
    sensitivity.measure_sensitivity(model, (x, y[:-1]))
  with pytest.raises(InvalidInputError, match="integer class labels"):
    sensitivity.measure_sensitivity(model, (x, y + 0.5))
  with pytest.raises(InvalidInputError, match="needs data"):
    sensitivity.measure_sensitivity(model, None)
  with pytest.raises(InvalidInputError, match="batch_size"):
    sensitivity.measure_sensitivity(model, (x, y), batch_size=0)
  with pytest.raises(InvalidInputError, match="rounds >= 1"):
    sensitivity.search(model, (x, y), "4bit", rounds=0)
  with pytest.raises(InvalidInputError, match="activation bits"):
    sensitivity.measure_sensitivity(model, (x, y), activation_bits=4)


def test_unsupported_models_are_refused():
  inp = keras.Input((6, 6, 1))
  no_head = keras.Model(inp, keras.layers.Conv2D(2, 3, name="c")(inp))
  with pytest.raises(UnsupportedModelError, match=r"\(batch, classes\)"):
    sensitivity.measure_sensitivity(no_head, _tiny_data((6, 6, 1)))
  no_weights = keras.Sequential([keras.Input((4,)), keras.layers.Softmax()])
  with pytest.raises(UnsupportedModelError, match="quantizable layer"):
    sensitivity.measure_sensitivity(no_weights, None, metric="weight_mse")
  with pytest.raises(InvalidInputError, match="tf_keras"):
    sensitivity.measure_sensitivity("model.h5", None, metric="weight_mse")


def test_one_hot_labels_are_accepted():
  model = _tiny()
  x, y = _tiny_data((6, 6, 1))
  a = sensitivity.measure_sensitivity(model, (x, y), metric="task_float_context")
  b = sensitivity.measure_sensitivity(model, (x, np.eye(4)[y]), metric="task_float_context")
  np.testing.assert_array_equal(a.scores, b.scores)
