"""Tests of keras_mpq.plan.costs: counts read off tiny hand-built models, checked by hand."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from keras_mpq.model import size as size_lib
from keras_mpq.plan import costs as costs_lib
from keras_mpq.base.compat import keras
from keras_mpq.base.types import FLOAT_BITS, LayerCost
from keras_mpq.base.errors import InvalidInputError, UnsupportedModelError

L = keras.layers


def _single(layer, input_shape):
  model = keras.Sequential([keras.Input(input_shape), layer])
  (cost,) = size_lib.layer_costs(model)
  return cost


# Each case: layer, input shape, (n_params, n_bias, n_scales, macs) computed by hand.
HAND_COUNTED = {
    # 3x3x3x4 kernel; valid, stride 2 on 9x9 -> 4x4 output; 108 * 16 MACs.
    "conv2d": (lambda: L.Conv2D(4, 3, strides=2, name="c"), (9, 9, 3), (108, 4, 4, 1728)),
    # channels_first: input (3, 9, 9), output (4, 7, 7); 108 * 49.
    "conv2d_channels_first": (
        lambda: L.Conv2D(4, 3, data_format="channels_first", name="c"), (3, 9, 9),
        (108, 4, 4, 5292)),
    # 3x3x3x2 depthwise kernel; 6 channels out; same padding on 8x8 -> 54 * 64.
    "depthwise": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="c"),
                  (8, 8, 3), (54, 6, 6, 3456)),
    # depthwise 3x3x4x1 = 36 + pointwise 1x1x4x5 = 20; scales 4 + 5; 6x6 -> 4x4.
    "separable": (lambda: L.SeparableConv2D(5, 3, name="c"), (6, 6, 4), (56, 5, 9, 896)),
    # 10x7 kernel, one position.
    "dense": (lambda: L.Dense(7, name="c"), (10,), (70, 7, 7, 70)),
    # Dense on a sequence applies the kernel at each of 5 positions.
    "dense_3d": (lambda: L.Dense(7, name="c"), (5, 10), (70, 7, 7, 350)),
    # 3x2x6 kernel; length 20 valid -> 18 positions.
    "conv1d": (lambda: L.Conv1D(6, 3, name="c"), (20, 2), (36, 6, 6, 648)),
    # kernel (3, 3, 5, 3) = 135; each of the 4x4 input pixels meets the whole kernel.
    "conv2d_transpose": (lambda: L.Conv2DTranspose(5, 3, strides=2, padding="same", name="c"),
                         (4, 4, 3), (135, 5, 5, 2160)),
    "no_bias": (lambda: L.Conv2D(4, 1, use_bias=False, name="c"), (2, 2, 3), (12, 0, 4, 48)),
}


@pytest.mark.parametrize("case", sorted(HAND_COUNTED))
def test_layer_costs_match_hand_counts(case):
  make, input_shape, expected = HAND_COUNTED[case]
  layer = make()
  cost = _single(layer, input_shape)
  assert (cost.n_params, cost.n_bias, cost.n_scales, cost.macs) == expected
  assert cost.name == "c"
  assert cost.layer_type == type(layer).__name__


def test_conv2d_transpose_output_shape_is_as_assumed():
  layer = L.Conv2DTranspose(5, 3, strides=2, padding="same")
  keras.Sequential([keras.Input((4, 4, 3)), layer])
  assert tuple(layer.output_shape) == (None, 8, 8, 5)


def test_layer_costs_in_model_order_and_subset():
  inp = keras.Input((8, 8, 3))
  x = L.Conv2D(4, 3, name="first")(inp)
  x = L.BatchNormalization(name="bn")(x)
  x = L.Flatten()(x)
  out = L.Dense(2, name="last")(x)
  model = keras.Model(inp, out)
  assert [c.name for c in size_lib.layer_costs(model)] == ["first", "last"]
  assert [c.name for c in size_lib.layer_costs(model, layers=["last"])] == ["last"]
  # Dense on the flattened 6*6*4 = 144 features.
  assert size_lib.layer_costs(model, layers=[model.get_layer("last")])[0].macs == 288
  with pytest.raises(InvalidInputError, match="quantizable layers are"):
    size_lib.layer_costs(model, layers=["bn"])


def test_shared_layer_counts_each_call():
  inp = keras.Input((6,))
  dense = L.Dense(6, name="shared")
  model = keras.Model(inp, dense(dense(inp)))
  (cost,) = size_lib.layer_costs(model)
  assert cost.n_params == 36
  assert cost.macs == 72


def test_unknown_spatial_size_gives_no_macs_and_no_bops():
  model = keras.Sequential([keras.Input((None, None, 3)), L.Conv2D(4, 3, name="c")])
  (cost,) = size_lib.layer_costs(model)
  assert cost.macs is None and cost.n_params == 108
  table = costs_lib.cost_table(model, bits=(4, 8))
  assert not table.has("bops") and table.has("bytes")
  with pytest.raises(InvalidInputError, match="bops"):
    table.matrix("bops")


def test_folded_batchnorm_adds_a_bias():
  from keras_mpq.quantization import fold as fold_lib  # pylint: disable=g-import-not-at-top
  inp = keras.Input((6, 6, 2))
  x = L.Conv2D(3, 3, use_bias=False, name="conv")(inp)
  x = L.BatchNormalization(name="bn")(x)
  model = keras.Model(inp, L.Flatten()(x))
  assert size_lib.layer_costs(model)[0].n_bias == 0
  assert size_lib.layer_costs(fold_lib.fold_batchnorm(model))[0].n_bias == 3


def test_zoo_models_are_costed():
  from keras_mpq import model_zoo as model_zoo_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.base import layers as layers_lib  # pylint: disable=g-import-not-at-top
  for model in (model_zoo_lib.plain_cnn(), model_zoo_lib.separable_cnn()):
    got = size_lib.layer_costs(model)
    assert [c.name for c in got] == [l.name for l in layers_lib.quantizable_layers(model)]
    assert sum(c.n_params for c in got) == sum(
        int(np.prod(l.kernel.shape)) if hasattr(l, "kernel") else
        int(np.prod(l.depthwise_kernel.shape))
        for l in layers_lib.quantizable_layers(model))
    assert all(c.macs > 0 for c in got)
  # plain_cnn conv1: 3x3x1x16 kernel over 28x28 (same padding).
  assert size_lib.layer_costs(model_zoo_lib.plain_cnn())[0].macs == 144 * 28 * 28


def test_bytes_formula():
  dense = LayerCost("d", "Dense", n_params=70, n_bias=7, n_scales=7, macs=70)
  table = costs_lib.cost_table([dense], bits=(2, 4, 8, FLOAT_BITS))
  # int4 containers for 2 and 4 bits, int8 for 8; int32 bias; 12 B per scale.
  assert table.matrix("bytes").tolist() == [[35 + 28 + 84, 35 + 28 + 84, 70 + 28 + 84,
                                             4 * (70 + 7)]]
  assert table.matrix("bytes")[0, 1] == dense.weight_bytes(4)


def test_avg_bits_sum_to_the_average():
  a = LayerCost("a", "Dense", n_params=300, n_bias=0, n_scales=3, macs=300)
  b = LayerCost("b", "Conv2D", n_params=100, n_bias=0, n_scales=3, macs=1000)
  table = costs_lib.cost_table([a, b], bits=(2, 8))
  m = table.matrix("avg_bits")
  # a at 2 bits, b at 8 bits: (300 * 2 + 100 * 8) / 400 = 3.5
  assert m[0, 0] + m[1, 1] == pytest.approx(3.5)
  assert m[0, 1] + m[1, 1] == pytest.approx(8.0)


def test_bops_with_activation_bits_and_float():
  a = LayerCost("a", "Dense", n_params=10, n_bias=0, n_scales=1, macs=10)
  b = LayerCost("b", "Conv2D", n_params=10, n_bias=0, n_scales=1, macs=1000)
  table = costs_lib.cost_table([a, b], bits=(4, FLOAT_BITS), activation_bits={"b": 16})
  assert table.matrix("bops").tolist() == [[10 * 4 * 8, 10 * 32 * 32],
                                           [1000 * 4 * 16, 1000 * 32 * 32]]
  with pytest.raises(InvalidInputError, match="unknown layers"):
    costs_lib.cost_table([a, b], activation_bits={"zz": 16})
  with pytest.raises(InvalidInputError, match="activation bits"):
    costs_lib.cost_table([a, b], activation_bits=4)


def test_latency_by_name_then_type():
  a = LayerCost("a", "Dense", n_params=10, n_bias=0, n_scales=1, macs=10)
  b = LayerCost("b", "Dense", n_params=10, n_bias=0, n_scales=1, macs=10)
  table = costs_lib.cost_table(
      [a, b], bits=(4, 8, FLOAT_BITS),
      latency_table={"Dense": {"4": 1.0, 8: 2.0, "float": 5.0}, "b": {4: 0.5, 8: 0.7, 32: 3}})
  assert table.matrix("latency").tolist() == [[1.0, 2.0, 5.0], [0.5, 0.7, 3.0]]
  with pytest.raises(InvalidInputError, match=r"none for \['c \(Conv2D\)'\]"):
    costs_lib.cost_table([a, LayerCost("c", "Conv2D", 1, 0, 1, 1)], bits=(4,),
                     latency_table={"Dense": {4: 1.0}})
  with pytest.raises(InvalidInputError, match=r"has none for \[8\]"):
    costs_lib.cost_table([a], bits=(4, 8), latency_table={"Dense": {4: 1.0}})
  with pytest.raises(InvalidInputError, match="finite latencies"):
    costs_lib.cost_table([a], bits=(4,), latency_table={"Dense": {4: -1.0}})
  assert not costs_lib.cost_table([a], bits=(4,)).has("latency")


def test_cost_table_from_model_lines_up_with_layer_costs():
  model = keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(3, 3, name="c"),
                            L.Flatten(), L.Dense(4, name="d")])
  table = costs_lib.cost_table(model, bits=(8, 2, 4))
  assert table.layers == ("c", "d") and table.bits == (2, 4, 8)
  assert [c.name for c in table.layer_costs] == ["c", "d"]
  assert set(table.table) == {"bytes", "avg_bits", "bops"}
  assert table.matrix("bops")[1, 2] == 48 * 4 * 8 * 8


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(InvalidInputError, match="Expected a tf_keras Model"):
    size_lib.layer_costs("model.h5")
  with pytest.raises(UnsupportedModelError, match="at least one quantizable layer"):
    size_lib.layer_costs(keras.Sequential([keras.Input((4,)), L.ReLU()]))
  with pytest.raises(UnsupportedModelError, match="Expected a built model"):
    size_lib.layer_costs(keras.Sequential([L.Dense(3)]))
  with pytest.raises(InvalidInputError, match="distinct"):
    costs_lib.cost_table([LayerCost("a", "Dense", 1, 0, 1, 1)], bits=(4, 4))
  with pytest.raises(InvalidInputError, match="weight bits"):
    costs_lib.cost_table([LayerCost("a", "Dense", 1, 0, 1, 1)], bits=(1, 4))
  with pytest.raises(InvalidInputError, match="empty list"):
    costs_lib.cost_table([])
  with pytest.raises(InvalidInputError, match="distinct layer names"):
    costs_lib.cost_table([LayerCost("a", "Dense", 1, 0, 1, 1)] * 2)
