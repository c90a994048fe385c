"""Tests for keras_mpq.quantization.analytic_bias: DFQ's bias correction from BatchNorm statistics."""

import numpy as np
import pytest

from keras_mpq.quantization import analytic_bias as analytic_bias_lib
from keras_mpq.quantization import access as access_lib
from keras_mpq.quantization import apply as apply_lib
from keras_mpq.quantization import fold as fold_lib
from keras_mpq.quantization import optimize as optimize_lib
from keras_mpq.base.compat import keras, set_global_seed
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.types import QuantizationPlan


@pytest.mark.parametrize("mu,sigma,cap", [(0.0, 1.0, None), (-1.0, 0.5, None),
                                          (2.0, 3.0, None), (1.0, 2.0, 6.0), (5.5, 1.0, 6.0)])
def test_relu_mean_matches_sampling(mu, sigma, cap):
  z = np.random.default_rng(0).normal(mu, sigma, 400_000)
  expected = np.mean(np.clip(z, 0.0, np.inf if cap is None else cap))
  got = analytic_bias_lib.relu_mean(np.array([mu]), np.array([sigma]), cap)[0]
  assert abs(got - expected) < 0.01 * max(sigma, 1.0)


def _bn_cnn(seed=0, pool="avg"):
  """conv -> BN -> ReLU -> [pool] -> conv -> BN -> ReLU6 -> GAP -> Dense."""
  set_global_seed(seed)
  inp = keras.Input((12, 12, 2))
  x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(inp)
  x = keras.layers.BatchNormalization(name="bn1")(x)
  x = keras.layers.ReLU(name="r1")(x)
  x = (keras.layers.AveragePooling2D(name="p1") if pool == "avg"
       else keras.layers.MaxPooling2D(name="p1"))(x)
  x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="c2")(x)
  x = keras.layers.BatchNormalization(name="bn2")(x)
  x = keras.layers.ReLU(6.0, name="r2")(x)
  x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
  out = keras.layers.Dense(3, name="fc")(x)
  model = keras.Model(inp, out)
  rng = np.random.default_rng(seed)
  for bn in ("bn1", "bn2"):
    layer = model.get_layer(bn)
    gamma, beta, mean, var = layer.get_weights()
    layer.set_weights([rng.uniform(0.5, 2.0, 8).astype(np.float32),
                       rng.uniform(-1.0, 1.0, 8).astype(np.float32),
                       rng.normal(0, 0.3, 8).astype(np.float32),
                       rng.uniform(0.5, 2.0, 8).astype(np.float32)])
  return model


def test_expected_inputs_follow_the_graph_back_to_a_batchnorm():
  folded = fold_lib.fold_batchnorm(_bn_cnn())
  priors = analytic_bias_lib.priors_of(folded)
  assert set(priors) == {"c1", "c2"}  # the folded producers stand for their BNs
  expected = analytic_bias_lib.expected_inputs(folded, priors)
  # c1 reads the model input (no prior); c2 and fc are reached.
  assert set(expected) == {"c2", "fc"}
  beta, gamma = priors["c1"]
  np.testing.assert_allclose(expected["c2"][0, 0], analytic_bias_lib.relu_mean(beta, gamma),
                             rtol=1e-5)
  beta2, gamma2 = priors["c2"]
  np.testing.assert_allclose(expected["fc"], analytic_bias_lib.relu_mean(beta2, gamma2, 6.0),
                             rtol=1e-5)
  assert expected["c2"].shape == (6, 6, 8) and expected["fc"].shape == (8,)


def test_max_pooling_stops_the_walk_and_a_refold_keeps_the_priors():
  folded = fold_lib.fold_batchnorm(_bn_cnn(pool="max"))
  expected = analytic_bias_lib.expected_inputs(folded, analytic_bias_lib.priors_of(folded))
  assert set(expected) == {"fc"}  # max pooling raises the mean: not modelled
  again = fold_lib.fold_batchnorm(folded)  # nothing left to fold; the statistics stay known
  assert analytic_bias_lib.priors_of(again).keys() == {"c1", "c2"}


def test_analytic_correction_matches_the_true_mean_shift():
  """Where the BN output really is N(beta, gamma^2), DFQ's change equals the measured shift."""
  set_global_seed(0)
  inp = keras.Input((16,))
  h = keras.layers.Dense(16, use_bias=False, name="d1")(inp)
  h = keras.layers.BatchNormalization(name="bn")(h)
  h = keras.layers.ReLU(name="relu")(h)
  out = keras.layers.Dense(4, name="d2")(h)
  model = keras.Model(inp, out)
  rng = np.random.default_rng(1)
  model.get_layer("d1").set_weights([np.eye(16, dtype=np.float32)])
  gamma = rng.uniform(0.5, 2, 16).astype(np.float32)
  beta = rng.uniform(-1, 1, 16).astype(np.float32)
  model.get_layer("bn").set_weights([gamma, beta, np.zeros(16, np.float32),
                                     np.ones(16, np.float32) - 1e-3])
  x = rng.standard_normal((20000, 16)).astype(np.float32)  # BN output ~ N(beta, gamma^2)
  plan = QuantizationPlan({"d1": 8, "d2": 2})
  q = apply_lib.apply_plan(model, plan, x[:256], weight_method="rtn", bias_correction="analytic",
                       tune_steps=0)
  rows = {r["layer"]: r for r in optimize_lib.weight_report(q)}
  assert rows["d2"]["bias_correction"] == "analytic"
  assert rows["d1"]["bias_correction"] == "empirical"  # reads the input: no prior
  none = apply_lib.apply_plan(model, plan, x[:256], weight_method="rtn", bias_correction=False,
                          tune_steps=0)
  # Mean output error over many samples: the analytic change removes most of it.
  err_none = np.abs(np.mean(none.predict(x, verbose=0) - model.predict(x, verbose=0), 0))
  err_dfq = np.abs(np.mean(q.predict(x, verbose=0) - model.predict(x, verbose=0), 0))
  assert err_dfq.sum() < 0.35 * err_none.sum(), (err_none, err_dfq)


def test_bias_correction_values_are_checked():
  assert optimize_lib.check_weight_method("rtn", "analytic") == ("rtn", "analytic")
  assert optimize_lib.check_weight_method("rtn", "empirical") == ("rtn", True)
  with pytest.raises(InvalidInputError, match="'analytic'"):
    optimize_lib.check_weight_method("rtn", "dfq")


def test_analytic_correction_rescues_round_to_nearest_without_data(trained_separable,
                                                                    small_data):
  """Seeded, loose: uniform 3-bit round to nearest on the separable CNN, with DFQ's
  correction (measured 67-74% -> 86-88% on the benchmark copies, BENCHMARKS.md).

  The calibration images set only activation ranges and the first layer's
  correction; every other layer's comes from the BatchNorm statistics.
  """
  x_cal, _, x_test, y_test = small_data
  plan = QuantizationPlan.uniform(access_lib.plan_layers(fold_lib.fold_batchnorm(trained_separable)), 3)
  accs = {}
  for bc in (False, "analytic"):
    q = apply_lib.apply_plan(trained_separable, plan, x_cal[:128], weight_method="rtn",
                         bias_correction=bc, tune_steps=0)
    accs[bc] = float(np.mean(np.argmax(q.predict(x_test, verbose=0), -1) == y_test))
    if bc:
      rows = optimize_lib.weight_report(q)
      assert sum(r.get("bias_correction") == "analytic" for r in rows) >= len(rows) - 1
  assert accs["analytic"] >= accs[False] + 0.05, accs
