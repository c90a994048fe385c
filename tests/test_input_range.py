"""The model's valid input range: inferred, given, assumed, and data checked against it."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from keras_mpq.model import input_range as input_range_lib
from keras_mpq.base.compat import keras
from keras_mpq.base.errors import InvalidInputError

layers = keras.layers


def _model(preprocess=None):
  inp = keras.Input((6,))
  x = inp if preprocess is None else preprocess(inp)
  return keras.Model(inp, layers.Dense(3)(x))


def test_assumed_inferred_and_given():
  low, high, source, assumed = input_range_lib.resolve_input_range(_model())
  assert (low, high, assumed) == (0.0, 1.0, True) and "assumed" in source
  m = _model(layers.Rescaling(1 / 127.5, offset=-1))
  assert input_range_lib.resolve_input_range(m)[:2] == (0.0, 255.0)
  assert input_range_lib.resolve_input_range(_model(), (-1, 1)) == (
      -1.0, 1.0, "input_range argument", False)


def test_a_keras3_model_is_read_too():
  keras3 = pytest.importorskip("keras")
  inp = keras3.Input((4, 4, 3))
  x = keras3.layers.Rescaling(1 / 255)(inp)
  scaled = keras3.Model(inp, keras3.layers.Dense(2)(keras3.layers.Flatten()(x)))
  assert input_range_lib.resolve_input_range(scaled)[:2] == (0.0, 255.0)
  plain = keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(2)])
  assert input_range_lib.resolve_input_range(plain)[3] is True  # assumed [0, 1]


def test_explicit_range_that_contradicts_rescaling_warns_and_wins():
  m = _model(layers.Rescaling(1 / 255))
  with pytest.warns(UserWarning, match="overrides the range read off the model"):
    assert input_range_lib.resolve_input_range(m, (0, 1))[:2] == (0.0, 1.0)


@pytest.mark.parametrize("bad", [(1, 1), (2, 1), (0, float("nan")), (0, float("inf")),
                                 "0,1", (0,), None])
def test_bad_ranges(bad):
  if bad is None:
    return  # None means "not given"
  with pytest.raises(InvalidInputError, match="input_range"):
    input_range_lib.resolve_input_range(_model(), bad)


def test_uint8_pixels_for_a_unit_range_model_name_both_ranges():
  x = np.random.default_rng(0).integers(0, 256, (8, 6)).astype(np.float32)
  x[0, 0], x[0, 1] = 0, 255
  with pytest.raises(InvalidInputError, match=r"\[0, 1\].*\[0, 255\].*input_range"):
    input_range_lib.check_data_range(x, 0.0, 1.0, "assumed", True)
  with pytest.raises(InvalidInputError, match=r"Rescale the data to \[-1, 1\]"):
    input_range_lib.check_data_range(x, -1.0, 1.0, "input_range argument", False)


def test_data_in_range_passes_and_tiny_data_warns():
  x = np.random.default_rng(0).uniform(0, 1, (8, 6)).astype(np.float32)
  info = input_range_lib.check_data_range(x, 0.0, 1.0, "given", False)
  assert info["input_range"] == [0.0, 1.0] and 0 <= info["data_range"][0] < info["data_range"][1] <= 1
  with pytest.warns(UserWarning, match="under 2%"):
    input_range_lib.check_data_range(x, 0.0, 255.0, "Rescaling", False)


# --------------------------------------------------------------------------- BatchNorm estimate


def _conv_bn(seed=0):
  keras.utils.set_random_seed(seed)
  inp = keras.Input((12, 12, 3))
  h = layers.Conv2D(16, 3, padding="same", name="conv")(inp)
  h = layers.BatchNormalization(name="bn")(h)
  out = layers.Dense(4)(layers.GlobalAveragePooling2D()(layers.ReLU()(h)))
  return keras.Model(inp, out)


def _smooth_images(n, low, high, seed=0):
  """Images with natural-image-like statistics: smooth, mean 40% up [low, high]."""
  rng = np.random.default_rng(seed)
  base = rng.beta(2.0, 3.0, (n, 3, 3, 3))
  up = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)  # 12x12, correlated neighbours
  noisy = np.clip(up + rng.normal(0, 0.05, up.shape), 0, 1)
  return (low + (high - low) * noisy).astype(np.float32)


def _set_statistics(model, x):
  """The BatchNorm's running statistics as training on ``x`` would leave them (converged)."""
  conv, bn = model.get_layer("conv"), model.get_layer("bn")
  feats = keras.Model(model.inputs, conv.output)(x).numpy()
  bn.moving_mean.assign(feats.mean(axis=(0, 1, 2)))
  bn.moving_variance.assign(feats.var(axis=(0, 1, 2)))


@pytest.mark.parametrize("low, high", [(0.0, 255.0), (-128.0, 127.0), (-1.0, 1.0)])
def test_batchnorm_statistics_reveal_raw_pixel_int8_and_signed_unit_scales(low, high):
  # Pretrained models take raw 0..255 pixels, int8 features or [-1, 1] pixels
  # (preprocessed outside the model) without a Rescaling layer; their first
  # BatchNorm knows it (issue 30).
  model = _conv_bn()
  _set_statistics(model, _smooth_images(256, low, high))
  got_low, got_high, source, assumed = input_range_lib.resolve_input_range(model)
  assert (got_low, got_high) == (low, high) and assumed
  assert source.startswith("estimated") and "'bn'" in source


def test_unit_scale_statistics_and_fresh_batchnorm_keep_the_default():
  model = _conv_bn()
  assert input_range_lib.estimate_from_batchnorm(model) is None  # untrained: mean 0, var 1
  _set_statistics(model, _smooth_images(256, 0.0, 1.0))
  assert input_range_lib.estimate_from_batchnorm(model) is None  # [0, 1]: the default stands
  assert input_range_lib.resolve_input_range(model)[:2] == (0.0, 1.0)


def test_degenerate_batchnorm_statistics_give_no_estimate():
  model = _conv_bn()
  _set_statistics(model, _smooth_images(64, 0.0, 255.0))
  model.get_layer("bn").moving_mean.assign(np.full(16, np.nan, np.float32))
  assert input_range_lib.estimate_from_batchnorm(model) is None


def test_a_given_range_or_a_rescaling_layer_wins_over_the_estimate():
  model = _conv_bn()
  _set_statistics(model, _smooth_images(256, 0.0, 255.0))
  assert input_range_lib.resolve_input_range(model, (0, 1))[:3] == (
      0.0, 1.0, "input_range argument")


def _two_inputs():
  a, b = keras.Input((4,), name="pixels"), keras.Input((2,), name="signal")
  h = layers.Concatenate()([layers.Rescaling(1 / 255)(a), b])
  return keras.Model([a, b], layers.Dense(3)(h))


def test_each_input_gets_its_own_default_by_the_same_rules():
  (lo_a, hi_a, src_a, assumed_a), (lo_b, hi_b, src_b, assumed_b) = \
      input_range_lib.resolve_input_ranges(_two_inputs())
  assert (lo_a, hi_a, assumed_a) == (0.0, 255.0, False) and "Rescaling" in src_a
  assert (lo_b, hi_b, assumed_b) == (0.0, 1.0, True)


@pytest.mark.parametrize("given, expected", [
    ({"signal": (-1, 1)}, [(0.0, 255.0), (-1.0, 1.0)]),
    ([None, (-2, 2)], [(0.0, 255.0), (-2.0, 2.0)]),
    ([(0, 255), (-3, 3)], [(0.0, 255.0), (-3.0, 3.0)]),
    ((0, 255), [(0.0, 255.0), (0.0, 255.0)]),  # one range for every input
])
def test_per_input_range_as_dict_list_or_one_pair(given, expected):
  got = input_range_lib.resolve_input_ranges(_two_inputs(), given)
  assert [r[:2] for r in got] == expected


@pytest.mark.parametrize("given, match", [
    ({"sinal": (-1, 1)}, r"input names \['pixels', 'signal'\].*unknown names \['sinal'\]"),
    ([(0, 1), (0, 1), (0, 1)], r"one \(low, high\), a list of 2"),
    ({"signal": (1, -1)}, r"input_range\['signal'\]=\(low, high\)"),
])
def test_bad_per_input_ranges(given, match):
  with pytest.raises(InvalidInputError, match=match):
    input_range_lib.resolve_input_ranges(_two_inputs(), given)


def test_one_input_resolves_as_before():
  model = _model(layers.Rescaling(1 / 255))
  assert input_range_lib.resolve_input_ranges(model) == [input_range_lib.resolve_input_range(model)]
