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
