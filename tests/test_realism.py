"""The data-free realism checks (keras_mpq.synthesis.realism)."""

import numpy as np

from keras_mpq.base.compat import keras
from keras_mpq.synthesis import realism


def _bn_model():
  keras.utils.set_random_seed(0)
  inp = keras.Input((6, 6, 2))
  h = keras.layers.Conv2D(4, 3, name="conv")(inp)
  h = keras.layers.BatchNormalization(name="bn")(h)
  return keras.Model(inp, keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(h)))


def test_activation_statistics_trace_once_however_often_called():
  # issue 30: each call traced a new function (TensorFlow's retracing warning).
  model = _bn_model()
  rng = np.random.default_rng(0)
  for n in (5, 17, 130):
    realism.activation_statistics(model, rng.uniform(size=(n, 6, 6, 2)).astype(np.float32))
  probe = realism.model_data.get(model, realism.PROBE)
  assert probe.experimental_get_tracing_count() == 1


def test_batchnorm_check_passes_the_data_the_statistics_came_from_and_flags_other_scales():
  model = _bn_model()
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 255, (128, 6, 6, 2)).astype(np.float32)
  conv = model.get_layer("conv")
  feats = keras.Model(model.inputs, conv.output)(x).numpy()
  bn = model.get_layer("bn")
  bn.moving_mean.assign(feats.mean(axis=(0, 1, 2)))
  bn.moving_variance.assign(feats.var(axis=(0, 1, 2)))
  good = realism.batchnorm_check(model, x)
  assert good["summary"]["passed"] and good["layers"]["bn"]["mean_z"] < 0.1
  bad = realism.batchnorm_check(model, x / 255.0)
  assert not bad["summary"]["passed"]
  assert "FAILED" in realism.describe_batchnorm_check(bad["summary"])


def test_a_model_without_batchnorm_has_nothing_to_check():
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
  check = realism.batchnorm_check(model, np.zeros((8, 4), np.float32))
  assert check["summary"] == {"batchnorm_layers": 0}
  assert realism.describe_batchnorm_check(check["summary"]) is None


def _digits_in(lo, hi):
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  x = load_digits().images[..., None].astype(np.float32) / 16.0  # photos of digits, [0, 1]
  return (lo + (hi - lo) * x)[:512]


def test_the_first_batchnorm_tells_zero_one_from_minus_one_one():
  # issue 30: deeper layers are normalized by the first, so [0, 1] data for a model whose
  # statistics come from [-1, 1] fit most layers; the first BatchNorm sees the input scale.
  keras.utils.set_random_seed(0)
  inp = keras.Input((8, 8, 1))
  h = inp
  for i in range(5):
    h = keras.layers.Conv2D(8, 3, padding="same", name=f"conv{i}")(h)
    h = keras.layers.BatchNormalization(name=f"bn{i}")(h)
    h = keras.layers.ReLU(name=f"relu{i}")(h)
  model = keras.Model(inp, keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(h)))
  x = _digits_in(-1, 1)
  for i in range(5):  # running statistics from [-1, 1] data, layer by layer
    feats = keras.Model(inp, model.get_layer(f"conv{i}").output)(x).numpy()
    bn = model.get_layer(f"bn{i}")
    bn.moving_mean.assign(feats.mean(axis=(0, 1, 2)))
    bn.moving_variance.assign(feats.var(axis=(0, 1, 2)))
  good = realism.batchnorm_check(model, x)["summary"]
  assert good["passed"] and good["input_scale_fits"] and good["first_layer"] == "bn0"
  wrong = realism.batchnorm_check(model, _digits_in(0, 1))
  summary = wrong["summary"]
  assert not summary["passed"] and not summary["input_scale_fits"]
  assert not wrong["layers"]["bn0"]["input_scale_fits"]
  line = realism.describe_batchnorm_check(summary)
  assert "FAILED" in line and "'bn0'" in line and "another scale" in line
