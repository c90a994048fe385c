"""Activation range policies: the choice itself, and the Keras model and its file agreeing on it."""

import numpy as np
import pytest

from keras_mpq.base import act_ranges as act_ranges_lib
from keras_mpq.base.errors import InvalidInputError


def test_minmax_keeps_what_was_seen_and_mse_clips_a_lone_outlier():
  v = np.concatenate([np.random.default_rng(0).uniform(0, 1, 20000), [0.0, 50.0]])
  assert act_ranges_lib.choose_range(v, policy="minmax").range == (0.0, 50.0)
  mse = act_ranges_lib.choose_range(v, policy="mse")
  assert mse.clipped and mse.high < 50.0
  assert act_ranges_lib.quantization_mse(v, *mse.range, 8) < act_ranges_lib.quantization_mse(v, 0, 50, 8)
  pct = act_ranges_lib.choose_range(v, policy="percentile")
  assert pct.high < 1.0 and pct.candidate == "percentile"


def test_mse_keeps_min_max_where_clipping_does_not_pay():
  v = np.concatenate([np.random.default_rng(1).uniform(-1, 3, 50000), [-1.0, 3.0]])
  chosen = act_ranges_lib.choose_range(v, bits=8, policy="mse")
  assert chosen.candidate == "minmax" and not chosen.clipped


def test_sampling_keeps_the_extremes_and_is_seeded():
  v = np.random.default_rng(2).normal(size=100000)
  a = act_ranges_lib.sample_values(v, 1000, seed=3)
  assert a.size == 1000 and a.min() == np.float32(v.min()) and a.max() == np.float32(v.max())
  np.testing.assert_array_equal(a, act_ranges_lib.sample_values(v, 1000, seed=3))


@pytest.mark.parametrize("bad", ["max", "", 3])
def test_unknown_policy_is_a_clear_error(bad):
  with pytest.raises(InvalidInputError, match="range_policy to be one of minmax"):
    act_ranges_lib.choose_range([0.0, 1.0], policy=bad)


def test_no_policy_means_the_default_policy():
  # The policy is an argument of every stage that sets ranges (no module-global default).
  assert act_ranges_lib.check_range_policy(None) == act_ranges_lib.DEFAULT_RANGE_POLICY == "minmax"
  assert act_ranges_lib.check_range_policy("mse") == "mse"


def _digits_mlp():
  from sklearn.datasets import load_digits
  from keras_mpq.base.compat import keras
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32).reshape(-1, 64)
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu",
                                                                   name="fc1"),
                            keras.layers.Dense(10, name="logits")])
  model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x[:1200], d.target[:1200], epochs=8, verbose=0)
  return model, x, d.target


def test_keras_model_and_its_file_share_the_clipped_ranges(tmp_path):
  import keras_mpq
  from keras_mpq.quantization import access as access_lib
  from keras_mpq.quantization import apply as apply_lib
  from keras_mpq.quantization import calibrate as calibrate_lib
  model, x, _ = _digits_mlp()
  calib = x[:256].copy()
  calib[:2] *= 6.0  # two outlier inputs stretch every min/max range
  plan = keras_mpq.QuantizationPlan.uniform(access_lib.plan_layers(model), 8)
  q = apply_lib.apply_plan(model, plan, calib, range_policy="percentile")
  seen = calibrate_lib.observed_ranges(q, calib)
  chosen = access_lib.activation_ranges(q)
  assert chosen["fc1"][1] < seen["fc1"][1]  # the outliers were clipped
  assert chosen["input_quantizer"] == seen["input_quantizer"]  # the input keeps min/max
  keras_mpq.export_tflite(access_lib.bake(q), tmp_path / "m.tflite", plan, "mobile",
                          calibration_data=calib, range_policy="percentile")
  from ai_edge_litert.interpreter import Interpreter
  interp = Interpreter(model_path=str(tmp_path / "m.tflite"))
  scales = [d["quantization"][0] for d in interp.get_tensor_details()
            if "fc1" in d["name"] and d["dtype"] == np.int8 and len(d["shape"]) == 2
            and d["shape"][-1] == 32 and d["quantization"][0] > 0]
  assert scales, [d["name"] for d in interp.get_tensor_details()]
  want = (chosen["fc1"][1] - min(chosen["fc1"][0], 0.0)) / 255
  assert min(abs(s - want) / want for s in scales) < 0.02, (scales, want)
  checked = keras_mpq.validate_tflite(tmp_path / "m.tflite", x[1200:], reference=q)
  assert checked.agreement >= 0.97, checked.agreement


def test_range_subset_is_the_same_seeded_subset_for_keras_and_the_file():
  x = np.arange(1000, dtype=np.float32).reshape(1000, 1)
  small = x[:act_ranges_lib.MAX_RANGE_SAMPLES]
  np.testing.assert_array_equal(act_ranges_lib.range_subset(small), small)
  a, b = act_ranges_lib.range_subset(x), act_ranges_lib.range_subset(x)
  assert len(a) == act_ranges_lib.MAX_RANGE_SAMPLES and np.array_equal(a, b)
  assert np.all(np.diff(a[:, 0]) > 0)  # in order, no repeats
