"""Models trained elsewhere, as users bring them (issue 30), end to end and data-free.

- A classifier that takes raw 0..255 pixels, with BatchNorm and no Rescaling
  layer: keras_mpq used to assume [0, 1], synthesized near-black images and
  calibrated ranges real images overflow (13.5% agreement on real photos with
  the old default, benchmarks/results/zoo.md). Its first BatchNorm's statistics
  now give the input range, and the realism check says the data fits.
- A 1000-class classifier quantized on fewer samples than classes.
"""

import numpy as np
import pytest

import keras_mpq
from keras_mpq import demo_data, model_zoo
from keras_mpq.base.compat import keras
from keras_mpq.synthesis import realism


@pytest.fixture(scope="module")
def raw_pixel_model():
  """The plain CNN trained on sklearn digits given as raw 0..255 pixels (seeded)."""
  data = demo_data.load_digits()
  x, x_test = data.x_train * 255.0, data.x_test * 255.0
  model = model_zoo.train(model_zoo.plain_cnn(input_shape=x.shape[1:]), x, data.y_train,
                          epochs=4, seed=0)
  return model_zoo.recalibrate_batchnorm(model, x[:1000]), x_test


def test_raw_pixel_model_quantizes_data_free_at_8_bits(raw_pixel_model):
  model, x_test = raw_pixel_model
  with pytest.warns(keras_mpq.InputRangeAssumedWarning, match=r"estimated \[0, 255\]"):
    result = keras_mpq.quantize(model, "8bit", seed=0, progress=False)
  assert (result.report["input_range"]["low"], result.report["input_range"]["high"]) == (0, 255)
  check = result.report["data"]["realism"]["batchnorm"]["summary"]
  assert check["passed"], check
  want = model.predict(x_test, verbose=0).argmax(1)
  agree = float(np.mean(result.model.predict(x_test, verbose=0).argmax(1) == want))
  assert agree >= 0.95, agree  # the old [0, 1] assumption gave far less (see the benchmark)
  assert "realism check" in keras_mpq.summary_table(result.report)


def test_the_realism_check_flags_data_on_the_wrong_scale(raw_pixel_model):
  model, x_test = raw_pixel_model
  right = realism.batchnorm_check(model, x_test)["summary"]
  wrong = realism.batchnorm_check(model, x_test / 255.0)["summary"]  # the old default's scale
  assert right["passed"] and not wrong["passed"], (right, wrong)
  line = realism.describe_batchnorm_check(wrong)
  assert "FAILED" in line and "data=x" in line


def test_a_1000_class_model_quantizes_data_free_with_defaults():
  # An ImageNet-shaped head on a small body: 1000 classes, fewer default samples.
  keras.utils.set_random_seed(0)
  inp = keras.Input((16, 16, 3))
  h = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv")(inp)
  h = keras.layers.GlobalAveragePooling2D()(h)
  model = keras.Model(inp, keras.layers.Dense(1000, name="logits")(h))
  with pytest.warns(keras_mpq.InputRangeAssumedWarning):
    result = keras_mpq.quantize(model, "8bit", num_samples=64, seed=0, progress=False)
  assert len(result.calibration_data) == 64
  assert set(result.plan.weight_bits) == {"conv", "logits"}


def test_degenerate_batchnorm_statistics_are_named_and_synthesis_goes_on():
  keras.utils.set_random_seed(0)
  model = model_zoo.plain_cnn(input_shape=(12, 12, 1), num_classes=4)
  bn = model.get_layer("bn2")
  bn.moving_variance.assign(np.zeros(bn.moving_variance.shape, np.float32))
  with pytest.warns(keras_mpq.InputRangeAssumedWarning):
    result = keras_mpq.quantize(model, "8bit", num_samples=32, seed=0, progress=False)
  check = result.report["data"]["realism"]["batchnorm"]["summary"]
  assert check["degenerate"] == ["bn2"], check
  assert np.all(np.isfinite(result.calibration_data))
  assert "degenerate statistics" in keras_mpq.summary_table(result.report)
