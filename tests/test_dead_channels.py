"""Dead filters (issue 30): all-zero or decayed (~1e-32) output channels export exactly.

ai-edge-quantizer floors a weight channel's max|w| at 1e-9 (scale 1e-9 / q):
a decayed channel got +-q on the Keras side and 0 in the file (the integer
check refused the export), and a channel of zeros got a bias scale so small
that its int32 bias overflowed (the file silently computed another model).
keras_mpq quantizes channels below `keras_mpq.base.layers.MIN_WEIGHT_BOUND` to 0, and
the exporter gives all-zero channels a scale their bias fits in.
"""

import numpy as np
import pytest

import keras_mpq
from keras_mpq.base import layers as layers_lib
from keras_mpq.base.compat import keras, tf
from keras_mpq.export import reader as reader_lib
from keras_mpq.export import runtime as runtime_lib
from keras_mpq.quantization import access as access_lib

L = keras.layers
DEAD_C1 = [2, 5]  # channels of the 3x3 stem conv: BatchNorm variance 0, beta > 0
DEAD_PW = [1, 4, 9]  # channels of the 1x1 conv: decayed to ~1e-32


def _model(c1_weight_scale: float, pw_dead: bool, seed: int = 0):
  """Conv-BN-ReLU, depthwise-BN-ReLU, 1x1 conv-BN-ReLU, Dense softmax, with dead filters.

  The stem conv's `DEAD_C1` filters are ``c1_weight_scale * noise`` (0: exact
  zeros) with BatchNorm mean and variance 0, so they output beta (> 0) as a
  dead filter does; with ``pw_dead`` the 1x1 conv's `DEAD_PW` filters are ~1e-32.
  """
  tf.random.set_seed(seed)
  rng = np.random.default_rng(seed)
  inp = keras.Input((16, 16, 1))
  h = L.Conv2D(8, 3, use_bias=False, name="c1")(inp)
  h = L.ReLU()(L.BatchNormalization(name="bn1")(h))
  h = L.DepthwiseConv2D(3, use_bias=False, name="dw")(h)
  h = L.ReLU()(L.BatchNormalization(name="bn2")(h))
  h = L.Conv2D(16, 1, use_bias=False, name="pw")(h)
  h = L.ReLU()(L.BatchNormalization(name="bn3")(h))
  out = L.Dense(4, activation="softmax", name="fc")(L.GlobalAveragePooling2D()(h))
  model = keras.Model(inp, out)
  for name in ("bn1", "bn2", "bn3"):
    bn = model.get_layer(name)
    n = bn.gamma.shape[0]
    bn.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n),
                    rng.uniform(0.5, 2.0, n)])
  k = model.get_layer("c1").get_weights()[0]
  k[..., DEAD_C1] = c1_weight_scale * rng.standard_normal(k[..., DEAD_C1].shape)
  model.get_layer("c1").set_weights([k])
  gamma, beta, mean, var = model.get_layer("bn1").get_weights()
  beta[DEAD_C1], mean[DEAD_C1], var[DEAD_C1] = [0.5, 0.8], 0.0, 0.0
  model.get_layer("bn1").set_weights([gamma, beta, mean, var])
  if pw_dead:
    k = model.get_layer("pw").get_weights()[0]
    k[..., DEAD_PW] = 1e-32 * rng.standard_normal(k[..., DEAD_PW].shape)
    model.get_layer("pw").set_weights([k])
  return model


def _data(n=32, seed=1):
  return np.random.default_rng(seed).uniform(0, 1, (n, 16, 16, 1)).astype(np.float32)


def _file_bias(data: bytes, layer: str):
  """(dequantized bias, bias scales) of ``layer``'s weight op in an exported file."""
  reader = reader_lib.parse(data)
  entry = reader_lib.layer_weight_ops(reader, [layer])[layer][0]
  op = reader.ops[entry["op_index"]]
  scales = reader.tensors[op.inputs[2]].Quantization().ScaleAsNumpy().astype(np.float64)
  return reader.int_values(op.inputs[2]).astype(np.float64) * scales, scales


def _export_and_compare(result, tmp_path, x, dead):
  """Exports for mobile and mcu; the dead channels' biases and the outputs match Keras."""
  baked = access_lib.bake(result.model)
  keras_out = result.model.predict(x, verbose=0)
  for target in ("mobile", "mcu"):
    path = str(tmp_path / f"{target}.tflite")
    result.export(path, target=target, deployment=False)
    data = open(path, "rb").read()
    for layer, channels in dead.items():
      want = baked.get_layer(layer).bias.numpy()[channels]
      got, step = (v[channels] for v in _file_bias(data, layer))
      assert np.all(np.abs(got - want) <= 0.5 * step * 1.001 + 1e-6), (target, got, want)
    got = runtime_lib.run_tflite(data, x)
    # The output quantization step alone gives ~2.5e-3 here; before the fix the
    # overflowed biases gave 3.3e-2 to 3.9e-2.
    assert np.max(np.abs(got - keras_out)) < 1e-2, target


@pytest.mark.parametrize("bits", [8])
def test_zero_filters_with_zero_variance_keep_their_bias(bits, tmp_path):
  """Pattern (a), exact zeros: the export passed but the dead channel's bias overflowed."""
  model, x = _model(0.0, pw_dead=False), _data()
  result = keras_mpq.quantize(model, f"{bits}bit", data=x, weight_bits=[bits], seed=0,
                              progress=False)
  assert set(result.plan.weight_bits.values()) == {bits}
  assert not np.any(access_lib.weight_integers(result.model)["c1"]["kernel"][..., DEAD_C1])
  _export_and_compare(result, tmp_path, x, {"c1": DEAD_C1})


@pytest.mark.parametrize("bits", [4])
def test_decayed_filters_export_for_mobile_and_mcu(bits, tmp_path):
  """Pattern (b) (1x1 conv at ~1e-32) and (a) as met (stem filters ~1e-20, variance 0)."""
  model, x = _model(1e-20, pw_dead=True), _data()
  float_out = model.predict(x, verbose=0)
  result = keras_mpq.quantize(model, f"{bits}bit", data=x, weight_bits=[bits], seed=0,
                              progress=False)
  assert set(result.plan.weight_bits.values()) == {bits}
  # The float model is untouched; the quantized one holds the dead channels at 0.
  np.testing.assert_allclose(result.float_model.predict(x, verbose=0), float_out, atol=1e-6)
  ints = access_lib.weight_integers(result.model)
  assert not np.any(ints["c1"]["kernel"][..., DEAD_C1])
  assert not np.any(ints["pw"]["kernel"][..., DEAD_PW])
  assert np.all(np.abs(ints["pw"]["kernel"]).max(axis=(0, 1, 2))[
      [c for c in range(16) if c not in DEAD_PW]] == 2 ** (bits - 1) - 1)
  _export_and_compare(result, tmp_path, x, {"c1": DEAD_C1, "pw": DEAD_PW})


def test_dead_channel_rule_matches_ai_edge_quantizer():
  """After snapping, ai-edge-quantizer's integers are keras_mpq's, around its 1e-9 floor."""
  uq = pytest.importorskip(
      "ai_edge_quantizer.algorithms.uniform_quantize.uniform_quantize_tensor")
  qtyping = pytest.importorskip("ai_edge_quantizer.qtyping")
  rng = np.random.default_rng(0)
  peaks = np.array([1.0, 3e-3, 2e-9, 1e-9, 9.9e-10, 5e-10, 1e-12, 1e-32, 1e-40, 0.0])
  u = rng.uniform(-1, 1, (3, 3, 4, peaks.size))
  w = (u / np.max(np.abs(u), axis=(0, 1, 2)) * peaks).astype(np.float32)  # max|w| = peak
  for bits in (8, 4, 3):
    snapped, ints, _ = layers_lib.quantize_array(w, bits, (0, 1, 2))
    dead = np.max(np.abs(w), axis=(0, 1, 2)) < layers_lib.MIN_WEIGHT_BOUND
    assert dead.tolist() == [False] * 4 + [True] * 6
    assert not np.any(ints[..., dead])
    lo, hi = snapped.min(axis=(0, 1, 2), keepdims=True), snapped.max(axis=(0, 1, 2), keepdims=True)
    zp, scale = uq.tensor_zp_scale_from_min_max(lo, hi, bits, True,
                                                qtyping.QuantGranularity.CHANNELWISE)
    params = qtyping.UniformQuantParams(num_bits=bits, quantized_dimension=3, scale=scale,
                                        zero_point=zp, symmetric=True)
    np.testing.assert_array_equal(uq.uniform_quantize(snapped, params), ints)
    # Without the dead-channel rule the max-abs grid puts +-q where the converter puts 0.
    raw = uq.uniform_quantize(w, qtyping.UniformQuantParams(
        num_bits=bits, quantized_dimension=3, zero_point=zp, symmetric=True,
        scale=uq.tensor_zp_scale_from_min_max(w.min(axis=(0, 1, 2), keepdims=True),
                                              w.max(axis=(0, 1, 2), keepdims=True), bits, True,
                                              qtyping.QuantGranularity.CHANNELWISE)[1]))
    assert not np.any(raw[..., 6:])  # 1e-12 and below: 0 in the file too
    np.testing.assert_array_equal(raw[..., :4], ints[..., :4])
