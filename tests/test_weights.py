"""Tests for keras_mpq.quantization.weights: clipping, GPTQ, bias correction, im2col, fallbacks."""

import numpy as np
import pytest

from keras_mpq.base import layers as layers_lib
from keras_mpq.quantization import weights as weights_lib
from keras_mpq.base.compat import keras, set_global_seed
from keras_mpq.base.errors import InvalidInputError


def _dense_case(seed=0, d=48, n=12, rows=1500):
  """A Dense kernel and strongly correlated, offset inputs (what GPTQ exploits)."""
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((d, d)) * 0.4 + np.eye(d)
  x = (rng.standard_normal((rows, d)) @ mix + 0.3).astype(np.float32)
  w = rng.standard_normal((d, n)).astype(np.float32)
  w[0, :] *= 4.0  # an outlier row: max-abs wastes levels on it
  stats = weights_lib.InputStats.empty("matrix", 1, d)
  stats.update(x[:, None, :])
  return w, x, stats


def _out_mse(x, w, q):
  return float(np.mean((x @ (q - w)) ** 2))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clipping_beats_round_to_nearest_weight_mse(bits):
  w, _, _ = _dense_case()
  rtn = weights_lib.quantize_kernel(w, bits, (0,), "rtn")
  mse = weights_lib.quantize_kernel(w, bits, (0,), "mse")
  assert mse.measure == rtn.measure == "weight"
  err_rtn = np.sum((rtn.values - w) ** 2)
  err_mse = np.sum((mse.values - w) ** 2)
  assert err_mse < (0.9 if bits < 4 else 0.99) * err_rtn
  assert np.isclose(mse.error, err_mse, rtol=1e-4)
  assert np.abs(mse.integers).max() <= 2 ** (bits - 1) - 1
  np.testing.assert_allclose(mse.values, mse.integers * mse.scales, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_lowers_output_error(bits):
  w, x, stats = _dense_case()
  rtn = weights_lib.quantize_kernel(w, bits, (0,), "rtn", stats)
  mse = weights_lib.quantize_kernel(w, bits, (0,), "mse", stats)
  gptq = weights_lib.quantize_kernel(w, bits, (0,), "gptq", stats)
  assert gptq.method == "gptq" and gptq.channels["gptq"] > 0
  e_rtn, e_mse, e_gptq = (_out_mse(x, w, r.values) for r in (rtn, mse, gptq))
  assert e_mse <= e_rtn * (1 + 1e-6)
  assert e_gptq < 0.8 * e_rtn
  assert e_gptq < e_mse
  # The reported error is the measured one (E[x x^T] form, summed over channels).
  assert np.isclose(gptq.error / w.shape[1], e_gptq, rtol=1e-3)


@pytest.mark.parametrize("method", weights_lib.METHODS)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_max_abs_rederivation_reproduces_the_integers(method, bits):
  """The dequantized kernel re-quantized on its max-abs grid gives back the same integers."""
  w, _, stats = _dense_case(seed=bits)
  r = weights_lib.quantize_kernel(w, bits, (0,), method, stats)
  _, ints, scales = layers_lib.quantize_array(r.values, bits, (0,))
  np.testing.assert_array_equal(ints, r.integers)
  np.testing.assert_allclose(scales, r.scales, rtol=1e-6)


def test_bias_correction_zeroes_the_mean_shift():
  w, x, stats = _dense_case()
  r = weights_lib.quantize_kernel(w, 2, (0,), "mse", stats)
  delta, note = weights_lib.bias_correction(w, r.values, (0,), stats.mean)
  assert note is None
  shift_before = np.mean(x @ r.values - x @ w, axis=0)
  shift_after = np.mean(x @ r.values + delta - x @ w, axis=0)
  assert np.max(np.abs(shift_before)) > 0.05
  np.testing.assert_allclose(shift_after, 0.0, atol=1e-4)
  # With quantized inputs x_q, the target is still the float layer on float inputs.
  xq = x + 0.05
  stats_q = weights_lib.InputStats.empty("matrix", 1, w.shape[0])
  stats_q.update(xq[:, None, :])
  delta, _ = weights_lib.bias_correction(w, r.values, (0,), stats.mean, stats_q.mean)
  np.testing.assert_allclose(np.mean(xq @ r.values + delta, 0), np.mean(x @ w, 0), atol=1e-4)


def test_non_finite_bias_correction_is_skipped():
  w = np.ones((2, 1))
  delta, note = weights_lib.bias_correction(w, w, (0,), np.array([[np.inf, 0.0]]))
  assert note and np.all(delta == 0)


def _layer_and_input(kind, seed=0):
  set_global_seed(seed)
  rng = np.random.default_rng(seed)
  if kind == "Conv2D":
    layer, shape = keras.layers.Conv2D(6, 3, strides=2, padding="same", use_bias=False), (9, 9, 3)
  elif kind == "Conv2D-dilated":
    layer, shape = keras.layers.Conv2D(4, 3, dilation_rate=2, use_bias=False), (10, 10, 2)
  elif kind == "DepthwiseConv2D":
    layer, shape = (keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2,
                                                 use_bias=False), (7, 7, 3))
  elif kind == "Conv1D":
    layer, shape = keras.layers.Conv1D(5, 3, strides=2, padding="same", use_bias=False), (11, 4)
  else:
    layer, shape = keras.layers.Dense(5, use_bias=False), (3, 7)
  x = rng.standard_normal((4,) + shape).astype(np.float32)
  y = layer(x).numpy()
  return layer, x, y


@pytest.mark.parametrize("kind", ["Conv2D", "Conv2D-dilated", "DepthwiseConv2D", "Conv1D",
                                  "Dense"])
def test_layer_columns_reproduce_the_layer(kind):
  """im2col patches times the grouped kernel equal the layer's own output."""
  layer, x, y = _layer_and_input(kind)
  cols = weights_lib.layer_columns(layer, x)
  kernel = layer.weights[0].numpy()
  axes = dict(layers_lib.weight_spec(layer))[layer.weights[0].name.split("/")[-1].split(":")[0]]
  w3, _ = weights_lib._to_groups(kernel, axes, weights_lib.stats_kind(layer))  # pylint: disable=protected-access
  out = np.einsum("rgd,gdn->rgn", cols, w3).reshape(len(cols), -1)
  np.testing.assert_allclose(out, y.reshape(len(cols), -1), atol=1e-4)


def test_depthwise_gptq_on_real_layer_inputs():
  layer, x, _ = _layer_and_input("DepthwiseConv2D")
  stats = weights_lib.accumulate(None, layer, np.repeat(x, 8, axis=0) * np.linspace(
      0.5, 1.5, 32)[:, None, None, None])
  assert stats.kind == "depthwise" and stats.hessian_sum.shape == (3, 9, 9)
  kernel = layer.depthwise_kernel.numpy()
  rtn = weights_lib.quantize_kernel(kernel, 3, (0, 1), "rtn", stats)
  best = weights_lib.quantize_kernel(kernel, 3, (0, 1), "gptq", stats)
  assert best.integers.shape == kernel.shape and best.scales.shape == (1, 1, 3, 2)
  assert weights_lib.output_error(kernel, best.values, (0, 1), stats) <= \
      weights_lib.output_error(kernel, rtn.values, (0, 1), stats) * (1 + 1e-9)


def test_accumulate_subsamples_the_hessian_rows():
  layer, x, _ = _layer_and_input("Conv2D")
  stats = weights_lib.accumulate(None, layer, x, max_hessian_rows=10)
  assert stats.rows == len(weights_lib.layer_columns(layer, x)) and stats.hessian_rows == 10


# --------------------------------------------------------------------------- fallbacks


@pytest.mark.parametrize("method", weights_lib.METHODS)
def test_zero_and_constant_channels(method):
  w, _, stats = _dense_case(n=4)
  w[:, 1] = 0.0
  w[:, 2] = 0.37
  r = weights_lib.quantize_kernel(w, 3, (0,), method, stats)
  assert np.all(np.isfinite(r.values)) and np.all(r.integers[:, 1] == 0)
  np.testing.assert_allclose(r.values[:, 2], 0.37, rtol=1e-6)
  assert r.scales[0, 1] == 1.0


def test_all_zero_kernel():
  r = weights_lib.quantize_kernel(np.zeros((3, 3, 2, 4), np.float32), 2, (0, 1, 2), "gptq")
  assert np.all(r.values == 0) and np.all(r.integers == 0) and r.error == 0


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_nan_kernel_does_not_crash_and_says_so(method):
  w, _, stats = _dense_case(n=3)
  w[2, 1] = np.nan
  r = weights_lib.quantize_kernel(w, 3, (0,), method, stats)
  assert r.method == "rtn" and any("non-finite kernel" in n for n in r.notes)


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_nan_inputs_fall_back_to_weight_error(method):
  w, _, stats = _dense_case(n=3)
  stats.hessian_sum[0, 0, 0] = np.nan
  r = weights_lib.quantize_kernel(w, 3, (0,), method, stats)
  assert r.measure == "weight" and r.method == "mse" and r.notes


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_too_few_samples_for_the_hessian(method):
  """5 input rows for 48 inputs: damped, reported, never worse than RTN on its measure."""
  w, x, _ = _dense_case()
  stats = weights_lib.InputStats.empty("matrix", 1, w.shape[0])
  stats.update(x[:5, None, :])
  r = weights_lib.quantize_kernel(w, 3, (0,), method, stats)
  assert any("damped" in n for n in r.notes)
  assert r.error <= r.rtn_error
  assert np.all(np.isfinite(r.values))


def test_no_rows_means_weight_error():
  w, _, _ = _dense_case(n=3)
  r = weights_lib.quantize_kernel(w, 3, (0,), "gptq", weights_lib.InputStats.empty("matrix", 1, w.shape[0]))
  assert r.measure == "weight" and r.notes


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_never_worse_than_rtn_per_channel(method):
  for seed in range(5):
    w, _, stats = _dense_case(seed=seed, d=16, n=6, rows=20)
    for bits in (2, 3, 4):
      r = weights_lib.quantize_kernel(w, bits, (0,), method, stats)
      assert r.error <= r.rtn_error * (1 + 1e-9)


def test_bad_arguments():
  with pytest.raises(InvalidInputError, match="method"):
    weights_lib.quantize_kernel(np.ones((2, 2)), 4, (0,), "brecq")
  with pytest.raises(InvalidInputError, match="group"):
    weights_lib.quantize_kernel(np.ones((4, 2)), 4, (0,), "gptq", weights_lib.InputStats.empty("matrix", 1, 3))
  with pytest.raises(InvalidInputError):
    weights_lib.layer_columns(keras.layers.Flatten(), np.ones((1, 2, 2)))


def test_gptq_factorization_is_reused_across_bits():
  """One Cholesky factorization per layer (and Hessian block) serves every bit-width."""
  w, x, stats = _dense_case()
  fresh = {}
  for bits in (2, 3, 4):
    cached = weights_lib.quantize_kernel(w, bits, (0,), "gptq", stats)
    alone = weights_lib.InputStats.empty("matrix", 1, w.shape[0])
    alone.update(x[:, None, :])
    fresh[bits] = weights_lib.quantize_kernel(w, bits, (0,), "gptq", alone)
    np.testing.assert_array_equal(cached.integers, fresh[bits].integers)
  assert len(stats.factorizations) == 1
  # Split into Hessian blocks: one entry per block, the same integers as without a cache.
  w3 = w[None].astype(np.float64)
  scales = np.max(np.abs(w3), axis=1) / 3.0
  cache = {}
  split = weights_lib.gptq(w3, scales, 3, stats.hessian, max_dim=16, cache=cache)
  again = weights_lib.gptq(w3, scales, 3, stats.hessian, max_dim=16, cache=cache)
  plain = weights_lib.gptq(w3, scales, 3, stats.hessian, max_dim=16)
  assert len(cache) == 3
  np.testing.assert_array_equal(split, plain)
  np.testing.assert_array_equal(again, plain)
  stats.update(x[:10, None, :])  # new rows: the old factorization no longer applies
  assert not stats.factorizations


@pytest.mark.parametrize("bits", [2, 3])
def test_adaround_lowers_output_error_below_gptq(bits):
  """Seeded: AdaRound from GPTQ's integers cuts the output error further at 2 and 3 bits."""
  w, x, stats = _dense_case()
  gptq = weights_lib.quantize_kernel(w, bits, (0,), "gptq", stats)
  ada = weights_lib.quantize_kernel(w, bits, (0,), "adaround", stats)
  assert ada.method == "adaround" and ada.channels["adaround"] > w.shape[1] // 2
  e_gptq, e_ada = (_out_mse(x, w, r.values) for r in (gptq, ada))
  assert e_ada < 0.95 * e_gptq, (e_ada, e_gptq)
  assert ada.error <= ada.rtn_error
  assert np.abs(ada.integers).max() <= 2 ** (bits - 1) - 1


def test_adaround_with_fewer_rows_than_inputs_uses_the_rows():
  """A rank-deficient Hessian (the rows kept as its factor) works too, and matches the full form."""
  w, x, _ = _dense_case(d=48, n=6)
  few = weights_lib.InputStats.empty("matrix", 1, w.shape[0])
  few.update(x[:30, None, :])
  assert few.factor() is not None
  r = weights_lib.quantize_kernel(w, 2, (0,), "adaround", few)
  assert r.error <= r.rtn_error and np.all(np.isfinite(r.values))
  w3 = w[None].astype(np.float64)
  scales = np.max(np.abs(w3), axis=1)
  init = np.clip(np.round(w3 / scales[:, None, :]), -1, 1)
  by_rows = weights_lib.adaround(w3, scales, 2, weights_lib._Factor(few.factor()), init, steps=50)
  by_matrix = weights_lib.adaround(w3, scales, 2, few.hessian, init, steps=50)
  assert np.mean(by_rows == by_matrix) > 0.95


def test_adaround_over_the_cost_cap_keeps_gptq_and_says_so(monkeypatch):
  w, _, stats = _dense_case()
  monkeypatch.setattr(weights_lib, "ADAROUND_MAX_FLOPS", 1.0)
  r = weights_lib.quantize_kernel(w, 2, (0,), "adaround", stats)
  assert "adaround" not in r.channels and r.method == "gptq"
  assert any("adaround skipped" in n for n in r.notes)


def test_refit_scales_is_never_worse_for_the_same_integers():
  rng = np.random.default_rng(3)
  for trial in range(20):
    w3 = rng.standard_normal((1, 12, 5))
    h = rng.standard_normal((40, 12))
    h = (h.T @ h / 40)[None]
    scales = rng.uniform(0.2, 2.0, (1, 5))
    ints = np.clip(np.round(w3 / scales[:, None, :]), -3, 3)
    new = weights_lib.refit_scales(w3, ints, scales, h)
    before = weights_lib._channel_error(ints * scales[:, None, :] - w3, h)
    after = weights_lib._channel_error(ints * new[:, None, :] - w3, h)
    assert np.all(after <= before * (1 + 1e-12) + 1e-15), trial
    assert np.all(new > 0)
  # All-zero integers: nothing to fit, the scales stay.
  zero = weights_lib.refit_scales(w3, np.zeros_like(w3), scales, h)
  np.testing.assert_array_equal(zero, scales)


def test_gptq_damped_lies_between_clipping_and_gptq():
  w, x, stats = _dense_case()
  mse = weights_lib.quantize_kernel(w, 3, (0,), "mse", stats)
  gptq = weights_lib.quantize_kernel(w, 3, (0,), "gptq", stats)
  damped = weights_lib.quantize_kernel(w, 3, (0,), "gptq-damped", stats)
  assert damped.method == "gptq" and damped.error <= damped.rtn_error
  e_mse, e_gptq, e_damped = (_out_mse(x, w, r.values) for r in (mse, gptq, damped))
  assert e_gptq < e_damped < e_mse
  # Data-free it has no Hessian either: clipping on the weight error, said so.
  alone = weights_lib.quantize_kernel(w, 3, (0,), "gptq-damped")
  assert alone.method == "mse" and alone.notes


def test_data_free_defaults():
  from keras_mpq.quantization import optimize as optimize_lib  # pylint: disable=g-import-not-at-top
  assert optimize_lib.check_weight_method(None, None) == (optimize_lib.DEFAULT_WEIGHT_METHOD,
                                                   optimize_lib.DEFAULT_BIAS_CORRECTION)
  assert optimize_lib.check_weight_method(None, None, data_free=True) == (
      optimize_lib.DATA_FREE_WEIGHT_METHOD, optimize_lib.DATA_FREE_BIAS_CORRECTION)
  assert optimize_lib.check_weight_method("mse", True, data_free=True) == ("mse", True)
  with pytest.raises(InvalidInputError, match="weight_method"):
    optimize_lib.check_weight_method("brecq", None, data_free=True)
