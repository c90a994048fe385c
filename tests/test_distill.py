"""Tests of keras_mpq.quantization.distill: scales and biases tuned to the float model, integers kept."""

import numpy as np
import pytest

from keras_mpq.quantization import access as access_lib
from keras_mpq.quantization import apply as apply_lib
from keras_mpq.quantization import fold as fold_lib
from keras_mpq.quantization import distill as distill_lib
from keras_mpq.base.types import FLOAT_BITS, QuantizationPlan
from keras_mpq.base.errors import InvalidInputError


def _accuracy(model, x, y):
  return float(np.mean(np.argmax(model.predict(x, verbose=0, batch_size=500), -1) == y))


def _quantized(model, x, bits):
  folded = fold_lib.fold_batchnorm(model)
  plan = QuantizationPlan.uniform(access_lib.plan_layers(folded), bits)
  return folded, apply_lib.apply_plan(folded, plan, x, fold_bn=False, tune_steps=0)


def _assert_same_integers(a, b):
  assert a.keys() == b.keys()
  for layer in a:
    for attr in a[layer]:
      np.testing.assert_array_equal(a[layer][attr], b[layer][attr], err_msg=f"{layer}.{attr}")


def test_tuning_keeps_the_integers_and_lowers_the_held_out_divergence(trained_separable,
                                                                       small_data):
  """Regression test of issue 13's real-data 2-bit gain (seeded, loose margin).

  The full figures (two trained copies per model, LiteRT) are in BENCHMARKS.md,
  *Weight quantizer*, the ``+tune`` rows.
  """
  x_cal, _, x_test, y_test = small_data
  folded, q = _quantized(trained_separable, x_cal[:256], 2)
  ints, before = access_lib.weight_integers(q), _accuracy(q, x_test, y_test)
  info = distill_lib.tune(q, folded, x_cal[:256], steps=200, seed=0)
  after = _accuracy(q, x_test, y_test)
  assert info["kept"] and info["steps"] == 200 and info["holdout_samples"] == 64
  assert info["kl_after"] < 0.8 * info["kl_before"], info
  lo, hi = distill_lib.FACTOR_RANGE
  assert lo <= info["factor_range"][0] <= info["factor_range"][1] <= hi
  _assert_same_integers(access_lib.weight_integers(q), ints)
  assert after >= before + 0.02, (before, after)
  assert distill_lib.tune_report(q) == info


def test_tuning_that_does_not_help_is_undone(trained_cnn, small_data):
  """An absurd learning rate makes the held-out divergence worse: every value comes back."""
  x_cal = small_data[0][:128]
  folded, q = _quantized(trained_cnn, x_cal, 3)
  saved = q.get_weights()
  info = distill_lib.tune(q, folded, x_cal, steps=20, learning_rate=50.0, seed=0)
  assert not info["kept"] and "restored" in info["reason"]
  for a, b in zip(q.get_weights(), saved):
    np.testing.assert_array_equal(a, b)


def test_an_interrupted_tuning_leaves_the_model_as_it_was(trained_cnn, small_data, monkeypatch):
  from tqdm import auto as tqdm_auto
  x_cal = small_data[0][:64]
  folded, q = _quantized(trained_cnn, x_cal, 3)
  saved = q.get_weights()

  class Interrupting:  # the progress bar: Ctrl-C on the third step
    def __init__(self, **_):
      self.n = 0

    def update(self, _):
      self.n += 1
      if self.n == 3:
        raise KeyboardInterrupt

    def close(self):
      pass

  monkeypatch.setattr(tqdm_auto, "tqdm", Interrupting)
  with pytest.raises(KeyboardInterrupt):
    distill_lib.tune(q, folded, x_cal, steps=10, progress=True)
  for a, b in zip(q.get_weights(), saved):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(InvalidInputError, match="NaN"):
    distill_lib.tune(q, folded, np.full_like(x_cal, np.nan), steps=1)


def test_apply_plan_tunes_by_default_and_not_with_zero_steps(trained_cnn, small_data):
  x_cal = small_data[0][:64]
  folded = fold_lib.fold_batchnorm(trained_cnn)
  plan = QuantizationPlan.uniform(access_lib.plan_layers(folded), 4)
  tuned = apply_lib.apply_plan(folded, plan, x_cal, fold_bn=False)
  plain = apply_lib.apply_plan(folded, plan, x_cal, fold_bn=False, tune_steps=0)
  assert distill_lib.tune_report(tuned)["steps"] == distill_lib.DEFAULT_STEPS
  assert distill_lib.tune_report(plain) == {}
  _assert_same_integers(access_lib.weight_integers(tuned), access_lib.weight_integers(plain))


def test_nothing_to_tune_and_bad_steps(trained_cnn, small_data):
  x_cal = small_data[0][:32]
  folded = fold_lib.fold_batchnorm(trained_cnn)
  plan = QuantizationPlan.uniform(access_lib.plan_layers(folded), FLOAT_BITS)
  q = apply_lib.apply_plan(folded, plan, x_cal, fold_bn=False, tune_steps=0)
  info = distill_lib.tune(q, folded, x_cal, steps=10)
  assert info["steps"] == 0 and not info["kept"] and "no quantized" in info["reason"]
  for bad in (-1, 2.5, True, "200"):
    with pytest.raises(InvalidInputError, match="tune_steps"):
      distill_lib.tune(q, folded, x_cal, steps=bad)
  with pytest.raises(InvalidInputError, match="holdout"):
    distill_lib.tune(q, folded, x_cal, steps=1, holdout=1.0)


def test_default_skips_small_calibration_sets(trained_cnn, small_data):
  x_cal = small_data[0][:distill_lib.MIN_SAMPLES - 1]
  folded, q = _quantized(trained_cnn, x_cal, 4)
  info = distill_lib.tune(q, folded, x_cal)
  assert info["steps"] == 0 and "fewer than the default needs" in info["reason"]
  assert distill_lib.tune(q, folded, x_cal, steps=5)["steps"] == 5  # asked for: tuned anyway


def test_default_steps_shrink_with_model_size():
  assert distill_lib.default_steps(None) == distill_lib.DEFAULT_STEPS
  assert distill_lib.default_steps(1e6) == distill_lib.DEFAULT_STEPS
  mid = distill_lib.default_steps(distill_lib.TUNE_MACS / (distill_lib.BATCH_SIZE * 100))
  assert mid == 100
  assert distill_lib.default_steps(distill_lib.TUNE_MACS / distill_lib.BATCH_SIZE) == 0

