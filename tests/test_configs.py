"""Tests of keras_mpq.quantization.configs: the arithmetic, the quantizers, the configs."""

import numpy as np
import pytest

from keras_mpq.base import layers as layers_lib
from keras_mpq.quantization import configs as configs_lib
from keras_mpq.base.compat import keras, tf, tfmot
from keras_mpq.base.types import FLOAT_BITS
from keras_mpq.base.errors import InvalidInputError

L = keras.layers
_AXES = (0, 1, 2)  # Conv2D kernel (h, w, in, out): one scale per output channel


@pytest.fixture
def kernel(rng):
  w = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
  w[..., 0] *= 10.0  # channels with very different ranges
  w[..., 1] *= 0.01
  return w


# --------------------------------------------------------------------------- quantize_array


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_quantize_array_error_at_most_half_step_per_channel(kernel, bits):
  q, ints, scales = layers_lib.quantize_array(kernel, bits, _AXES)
  assert scales.shape == (1, 1, 1, 6)
  err = np.abs(q - kernel)
  assert np.all(err <= scales / 2 + 1e-6 * scales)
  np.testing.assert_allclose(ints * scales, q, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_array_levels_per_channel(kernel, bits):
  q, ints, _ = layers_lib.quantize_array(kernel, bits, _AXES)
  qmax = 2 ** (bits - 1) - 1
  assert ints.min() >= -qmax and ints.max() <= qmax
  for c in range(kernel.shape[-1]):
    assert len(np.unique(q[..., c])) <= 2 ** bits - 1
  # the channel's largest magnitude is kept exactly (narrow-range max-abs grid)
  np.testing.assert_allclose(np.max(np.abs(q), axis=_AXES), np.max(np.abs(kernel), axis=_AXES),
                             rtol=1e-6)


def test_quantize_array_error_decreases_with_bits(kernel):
  errors = [float(np.mean((layers_lib.quantize_array(kernel, b, _AXES)[0] - kernel) ** 2))
            for b in range(2, 9)]
  assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_quantize_array_float_passthrough_and_zero_channel(kernel):
  q, ints, scales = layers_lib.quantize_array(kernel, FLOAT_BITS, _AXES)
  assert ints is None and scales is None
  np.testing.assert_array_equal(q, kernel)
  z = kernel.copy()
  z[..., 3] = 0.0
  q, _, scales = layers_lib.quantize_array(z, 4, _AXES)
  assert np.all(q[..., 3] == 0) and np.all(np.isfinite(scales))


@pytest.mark.parametrize("bits", [1, 9, 16, 4.0, True])
def test_quantize_array_rejects_bad_bits(kernel, bits):
  with pytest.raises(InvalidInputError, match="Expected"):
    layers_lib.quantize_array(kernel, bits, _AXES)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, FLOAT_BITS])
def test_fake_quant_weights_equals_quantize_array(kernel, bits):
  got = layers_lib.fake_quant_weights(tf.constant(kernel), tf.constant(float(bits)), _AXES)
  want = layers_lib.quantize_array(kernel, bits, _AXES)[0]
  np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)


def test_fake_quant_weights_gradient_is_straight_through(kernel):
  w = tf.Variable(kernel)
  upstream = tf.constant(np.random.default_rng(1).normal(size=kernel.shape), tf.float32)
  with tf.GradientTape() as tape:
    out = tf.reduce_sum(layers_lib.fake_quant_weights(w, tf.constant(3.0), _AXES) * upstream)
  np.testing.assert_allclose(tape.gradient(out, w).numpy(), upstream.numpy(), rtol=1e-6)


# --------------------------------------------------------------------------- configs and quantizers


def test_config_round_trips():
  objs = [
      configs_lib.WeightQuantizer(3, (0, 1)),
      configs_lib.ActivationQuantizer(16, ema_decay=0.99),
      configs_lib.MixedPrecisionConfig(5, 16, (("depthwise_kernel", (0, 1)),
                                              ("pointwise_kernel", (0, 1, 2))),
                                      quantize_output=False),
      configs_lib.OutputConfig(16),
  ]
  for obj in objs:
    back = type(obj).from_config(obj.get_config())
    assert back == obj and back.get_config() == obj.get_config()
    assert back != type(obj).from_config({**obj.get_config(),
                                         **_changed(obj.get_config())})
  with configs_lib.quantize_scope():
    for obj in objs:
      ser = keras.utils.serialize_keras_object(obj)
      assert keras.utils.deserialize_keras_object(ser) == obj


def _changed(config):
  if "weight_bits" in config:
    return {"weight_bits": 8 if config["weight_bits"] != 8 else 7}
  if "num_bits" in config:
    return {"num_bits": 8 if config["num_bits"] != 8 else (16 if "ema_decay" in config else 7)}
  return {"activation_bits": 8 if config["activation_bits"] != 8 else 16}


def test_config_rejects_bad_bits():
  with pytest.raises(InvalidInputError, match="weight_bits"):
    configs_lib.MixedPrecisionConfig(1)
  with pytest.raises(InvalidInputError, match="activation bits"):
    configs_lib.OutputConfig(4)


def test_layer_roles_and_configs():
  assert layers_lib.layer_role(L.Conv2D(2, 3)) == "weights"
  assert layers_lib.layer_role(L.Add()) == "output"
  assert layers_lib.layer_role(L.Flatten()) == "passthrough"
  assert layers_lib.layer_role(L.LayerNormalization()) == "unsupported"
  assert layers_lib.weight_spec(L.SeparableConv2D(2, 3)) == (
      ("depthwise_kernel", (0, 1)), ("pointwise_kernel", (0, 1, 2)))
  assert isinstance(configs_lib.config_for_layer(L.Dense(2), 4), configs_lib.MixedPrecisionConfig)
  assert isinstance(configs_lib.config_for_layer(L.Add()), configs_lib.OutputConfig)
  assert configs_lib.config_for_layer(L.Flatten()) is None
  assert configs_lib.config_for_layer(L.LayerNormalization()) is None
  with pytest.raises(ValueError, match="weight_bits"):
    configs_lib.config_for_layer(L.Dense(2))
  assert layers_lib.is_fusable_activation(L.ReLU(6.0))
  assert not layers_lib.is_fusable_activation(L.ReLU(negative_slope=0.1))
  assert not layers_lib.is_fusable_activation(L.Activation("swish"))


def _two_layer_model(bits_a, bits_b):
  inp = keras.Input((8,))
  a = tfmot.quantization.keras.quantize_annotate_layer(
      L.Dense(8, name="a"), configs_lib.config_for_layer(L.Dense(8), bits_a))
  b = tfmot.quantization.keras.quantize_annotate_layer(
      L.Dense(8, name="b"), configs_lib.config_for_layer(L.Dense(8), bits_b))
  model = keras.Model(inp, b(a(inp)))
  with configs_lib.quantize_scope():
    return tfmot.quantization.keras.quantize_apply(
        model, scheme=configs_lib.MixedPrecisionScheme())


def test_layers_with_different_bits_never_share_state():
  """The trap of tfmot's n-bit registry: a later, 8-bit model must not change an earlier one."""
  first = _two_layer_model(2, 4)
  second = _two_layer_model(8, 8)
  wrappers = {l.layer.name: l for l in first.layers if hasattr(l, "_weight_vars")}
  bits = {n: [float(qv["bits"].numpy()) for _, _, qv in w._weight_vars]
          for n, w in wrappers.items()}
  assert bits == {"a": [2.0], "b": [4.0]}
  quantizer_a = wrappers["a"]._weight_vars[0][1]
  quantizer_b = wrappers["b"]._weight_vars[0][1]
  assert quantizer_a is not quantizer_b and quantizer_a.num_bits == 2
  var_a = wrappers["a"]._weight_vars[0][2]["bits"]
  var_b = wrappers["b"]._weight_vars[0][2]["bits"]
  var_a.assign(3.0)
  assert float(var_b.numpy()) == 4.0
  second_bits = [float(qv["bits"].numpy()) for l in second.layers
                 if hasattr(l, "_weight_vars") for _, _, qv in l._weight_vars]
  assert second_bits == [8.0, 8.0]
  # the 2-bit layer really produces at most 3 levels per output channel
  w = wrappers["a"]._weight_vars[0][0]
  var_a.assign(2.0)
  q = layers_lib.fake_quant_weights(w, var_a, (0,)).numpy()
  assert max(len(np.unique(q[:, c])) for c in range(q.shape[1])) <= 3


def _activation_quantizer_layer(num_bits, ema_decay=0.5):
  layer = L.Layer()
  quantizer = configs_lib.ActivationQuantizer(num_bits, ema_decay=ema_decay)
  return quantizer, quantizer.build((None, 4), "output", layer)


def test_activation_quantizer_levels_and_switch():
  quantizer, v = _activation_quantizer_layer(8)
  v["min"].assign(-1.0)
  v["max"].assign(3.0)
  x = tf.constant(np.linspace(-2, 5, 1001, dtype=np.float32))
  y = quantizer(x, False, v).numpy()
  step = 4.0 / 255
  assert len(np.unique(y)) <= 256
  # the range is nudged (by under a step) so that 0 is exactly representable
  assert y.min() >= -1.0 - step and y.max() <= 3.0 + step
  assert float(quantizer(tf.constant([0.0]), False, v).numpy()[0]) == 0.0
  inside = (x.numpy() > -1 + step) & (x.numpy() < 3 - step)
  assert np.max(np.abs(y - x.numpy())[inside]) <= step / 2 + 1e-6
  v["on"].assign(0.0)
  np.testing.assert_array_equal(quantizer(x, False, v).numpy(), x.numpy())


def test_activation_quantizer_16_bit_is_symmetric():
  quantizer, v = _activation_quantizer_layer(16)
  v["min"].assign(-1.0)
  v["max"].assign(3.0)
  y = quantizer(tf.constant([-5.0, -2.0, 0.0, 5.0]), False, v).numpy()
  np.testing.assert_allclose(y, [-3.0, -2.0, 0.0, 3.0], atol=1e-3)


def test_activation_quantizer_ema_and_freeze():
  quantizer, v = _activation_quantizer_layer(8, ema_decay=0.5)
  v["min"].assign(0.0)
  v["max"].assign(1.0)
  x = tf.constant([-2.0, 3.0])
  quantizer(x, False, v)  # inference: no update
  assert (float(v["min"].numpy()), float(v["max"].numpy())) == (0.0, 1.0)
  quantizer(x, True, v)  # training: EMA toward the batch range
  assert (float(v["min"].numpy()), float(v["max"].numpy())) == (-1.0, 2.0)
  v["ema"].assign(0.0)  # frozen
  quantizer(x, True, v)
  assert (float(v["min"].numpy()), float(v["max"].numpy())) == (-1.0, 2.0)


def test_activation_quantizer_gradient_inside_range():
  quantizer, v = _activation_quantizer_layer(8)
  v["min"].assign(-1.0)
  v["max"].assign(1.0)
  x = tf.Variable([-0.5, 0.2, 0.9, 3.0])
  with tf.GradientTape() as tape:
    y = tf.reduce_sum(quantizer(x, False, v))
  np.testing.assert_allclose(tape.gradient(y, x).numpy(), [1.0, 1.0, 1.0, 0.0])
