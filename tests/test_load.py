"""Tests of keras_mpq.model.load: loading, Keras 3 conversion, checks, fingerprints."""

import os
import zipfile

import numpy as np
import pytest

from keras_mpq.base import layers as layers_lib
from keras_mpq.model import checks as model_checks_lib
from keras_mpq.model import keras3 as keras3_lib
from keras_mpq.model import load as load_lib
from keras_mpq.model import outputs as outputs_lib
from keras_mpq.base.compat import keras, tf
from keras_mpq.base.errors import InvalidInputError, UnsupportedModelError

keras3 = pytest.importorskip("keras")
L3 = keras3.layers


# --------------------------------------------------------------------------- helpers


def _randomize(model, seed=0):
  """Gives every float weight of a Keras 3 or tf_keras model random values."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    weights = layer.get_weights()
    if not weights:
      continue
    names = [w.name for w in layer.weights]
    new = []
    for name, w in zip(names, weights):
      if not np.issubdtype(w.dtype, np.floating):
        new.append(w)
      elif "variance" in name:
        new.append(rng.uniform(0.5, 1.5, w.shape).astype(w.dtype))
      else:
        new.append(rng.normal(0.0, 0.3, w.shape).astype(w.dtype))
    layer.set_weights(new)
  return model


def _inputs(model, seed=1, batch=4):
  rng = np.random.default_rng(seed)
  shape = (batch,) + tuple(model.inputs[0].shape)[1:]
  return rng.uniform(0.0, 1.0, shape).astype(np.float32)


def _max_diff(a, b, x):
  return float(np.max(np.abs(np.asarray(a(x, training=False))
                             - np.asarray(b(x, training=False)))))


def _small_keras3_cnn(name="k3_cnn"):
  inp = keras3.Input((12, 12, 1), name="image")
  x = L3.Conv2D(4, 3, activation="relu", name="conv1")(inp)
  x = L3.BatchNormalization(name="bn1")(x)
  x = L3.MaxPooling2D(name="pool")(x)
  x = L3.Flatten(name="flat")(x)
  out = L3.Dense(3, name="logits")(x)
  return _randomize(keras3.Model(inp, out, name=name))


def _small_tf_keras_cnn(name="tfk_cnn"):
  inp = keras.Input((12, 12, 1), name="image")
  x = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inp)
  x = keras.layers.BatchNormalization(name="bn1")(x)
  x = keras.layers.Flatten(name="flat")(x)
  out = keras.layers.Dense(3, name="logits")(x)
  return _randomize(keras.Model(inp, out, name=name))


def _marker_lambda(marker):
  """A lambda (serialized as bytecode) that creates ``marker`` when it runs."""
  source = f"lambda t: (open({str(marker)!r}, 'w').close(), t * 2.0)[1]"
  return eval(source)  # pylint: disable=eval-used


def _is_tf_keras(model):
  return isinstance(model, keras.Model) and type(model).__module__.startswith("tf_keras")


# --------------------------------------------------------------------------- objects


def test_tf_keras_model_is_returned_as_is():
  model = _small_tf_keras_cnn()
  assert load_lib.load_model(model) is model


def test_unbuilt_tf_keras_sequential_is_refused():
  model = keras.Sequential([keras.layers.Dense(3)])
  with pytest.raises(InvalidInputError, match="not built"):
    load_lib.load_model(model)


@pytest.mark.parametrize("bad", [42, None, np.zeros(3), {"model": 1}])
def test_non_model_objects_are_refused(bad):
  with pytest.raises(InvalidInputError, match="Expected a tf_keras or Keras 3 model"):
    load_lib.load_model(bad)


def test_keras3_cnn_object_converts_with_same_outputs_and_names():
  k3 = _small_keras3_cnn()
  model = load_lib.load_model(k3)
  assert _is_tf_keras(model)
  assert [l.name for l in model.layers] == [l.name for l in k3.layers]
  x = _inputs(k3)
  assert _max_diff(k3, model, x) < 1e-5
  # The weights are copies: changing the tf_keras model leaves Keras 3 alone.
  np.testing.assert_array_equal(model.get_layer("conv1").get_weights()[0],
                                k3.get_layer("conv1").get_weights()[0])


def test_keras3_residual_add_model_converts_identically():
  inp = keras3.Input((8, 8, 3))
  x = L3.Conv2D(6, 3, padding="same", name="stem")(inp)
  y = L3.Conv2D(6, 3, padding="same", activation="relu", name="branch")(x)
  y = L3.BatchNormalization(name="branch_bn")(y)
  x = L3.Add(name="residual")([x, y])
  x = L3.ReLU(name="relu")(x)
  x = L3.GlobalAveragePooling2D(name="gap")(x)
  out = L3.Dense(4, name="logits")(x)
  k3 = _randomize(keras3.Model(inp, out))
  model = keras3_lib.keras3_to_tf_keras(k3)
  x = _inputs(k3)
  assert _max_diff(k3, model, x) < 1e-5
  residual = model.get_layer("residual")
  assert isinstance(residual, keras.layers.Add)
  assert {n.name for n in residual._inbound_nodes[0].inbound_layers} == {"stem", "branch_bn"}


def test_keras3_concatenate_model_converts_identically():
  inp = keras3.Input((10, 10, 2))
  a = L3.Conv2D(3, 1, name="a")(inp)
  b = L3.Conv2D(5, 3, padding="same", name="b")(inp)
  x = L3.Concatenate(name="cat")([a, b])
  x = L3.Flatten()(x)
  out = L3.Dense(3, name="logits")(x)
  k3 = _randomize(keras3.Model(inp, out))
  model = keras3_lib.keras3_to_tf_keras(k3)
  assert model.get_layer("cat").output.shape[-1] == 8
  assert _max_diff(k3, model, _inputs(k3)) < 1e-5


def _adapted_normalization():
  layer = L3.Normalization(name="norm")
  layer.adapt(np.random.default_rng(0).normal(2.0, 3.0, (64, 6)).astype(np.float32))
  return layer


# Each case: a Keras 3 input shape and the layers between it and a Dense head.
_LAYER_CASES = {
    "dense": ((6,), lambda: [L3.Dense(5, activation="tanh")]),
    "conv1d": ((10, 3), lambda: [L3.Conv1D(4, 3, strides=2, activation="sigmoid"),
                                 L3.MaxPooling1D(), L3.Flatten()]),
    "conv2d_relu6": ((8, 8, 2), lambda: [L3.Conv2D(4, 3, activation="relu6"), L3.Flatten()]),
    "depthwise": ((8, 8, 3), lambda: [L3.DepthwiseConv2D(3, depth_multiplier=2),
                                      L3.GlobalAveragePooling2D()]),
    "separable": ((8, 8, 3), lambda: [L3.SeparableConv2D(4, 3, activation="swish"),
                                      L3.GlobalMaxPooling2D()]),
    "transpose": ((4, 4, 3), lambda: [L3.Conv2DTranspose(2, 3, strides=2, padding="same"),
                                      L3.Flatten()]),
    "batchnorm": ((6,), lambda: [L3.BatchNormalization(), L3.Activation("relu")]),
    "activation_relu6": ((6,), lambda: [L3.Activation("relu6")]),
    "relu_leaky": ((6,), lambda: [L3.ReLU(max_value=2.0, negative_slope=0.1)]),
    "softmax": ((6,), lambda: [L3.Softmax()]),
    "pool1d": ((12, 2), lambda: [L3.AveragePooling1D(2), L3.GlobalAveragePooling1D()]),
    "pool1d_max": ((12, 2), lambda: [L3.GlobalMaxPooling1D()]),
    "pool2d": ((8, 8, 2), lambda: [L3.ZeroPadding2D(1), L3.AveragePooling2D(2),
                                   L3.MaxPooling2D(2), L3.Flatten()]),
    "reshape_dropout": ((12,), lambda: [L3.Reshape((3, 4)), L3.Dropout(0.5), L3.Flatten()]),
    "rescaling": ((6,), lambda: [L3.Rescaling(1.0 / 127.5, offset=-1.0)]),
    "normalization": ((6,), lambda: [_adapted_normalization()]),
}


@pytest.mark.parametrize("case", sorted(_LAYER_CASES))
def test_standard_keras3_layers_convert_with_same_outputs(case):
  shape, make = _LAYER_CASES[case]
  inp = keras3.Input(shape)
  x = inp
  for layer in make():
    x = layer(x)
  out = L3.Dense(3, name="head")(x)
  k3 = keras3.Model(inp, out)
  norm = [l for l in k3.layers if isinstance(l, L3.Normalization)]
  _randomize(k3)
  if norm:  # keep the adapted statistics, not random ones
    norm[0].set_weights(_adapted_normalization().get_weights())
  model = keras3_lib.keras3_to_tf_keras(k3)
  x = _inputs(k3) * 4.0 - 2.0
  assert _max_diff(k3, model, x) < 1e-5
  assert len(model.get_weights()) == len(k3.get_weights())


def test_keras3_multiply_model_converts():
  inp = keras3.Input((6,))
  gate = L3.Dense(6, activation="sigmoid", name="gate")(inp)
  x = L3.Multiply(name="mul")([inp, gate])
  out = L3.Dense(2, name="head")(x)
  k3 = _randomize(keras3.Model(inp, out))
  assert _max_diff(k3, keras3_lib.keras3_to_tf_keras(k3), _inputs(k3)) < 1e-5


def test_keras3_sequential_and_nested_models_are_inlined():
  block = keras3.Sequential([L3.Conv2D(3, 3, name="inner_conv"), L3.ReLU(name="inner_relu")],
                            name="block")
  inp = keras3.Input((8, 8, 1))
  x = block(inp)
  x = L3.Flatten()(x)
  out = L3.Dense(2, name="head")(x)
  k3 = _randomize(keras3.Model(inp, out))
  model = load_lib.load_model(k3)
  names = [l.name for l in model.layers]
  assert "inner_conv" in names and "block" not in names
  assert not any(isinstance(l, keras.Model) for l in model.layers)
  assert _max_diff(k3, model, _inputs(k3)) < 1e-5
  seq = _randomize(keras3.Sequential([keras3.Input((5,)), L3.Dense(4), L3.Dense(2)]))
  assert _max_diff(seq, load_lib.load_model(seq), _inputs(seq)) < 1e-5


def test_keras3_shared_layer_keeps_one_set_of_weights():
  shared = L3.Dense(3, name="shared")
  a, b = keras3.Input((4,), name="a"), keras3.Input((4,), name="b")
  k3 = _randomize(keras3.Model([a, b], L3.Add(name="sum")([shared(a), shared(b)])))
  model = keras3_lib.keras3_to_tf_keras(k3)
  assert [l.name for l in model.layers].count("shared") == 1
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(2, 4)).astype(np.float32) for _ in range(2)]
  np.testing.assert_allclose(np.asarray(model(xs)), np.asarray(k3(xs)), atol=1e-6)


def test_tf_keras_alias_of_keras3_is_converted():
  # In TF >= 2.16 tf.keras is Keras 3 (unless TF_USE_LEGACY_KERAS=1).
  tfk3 = tf.keras.Sequential([tf.keras.Input((5,)), tf.keras.layers.Dense(2, name="fc")])
  model = load_lib.load_model(tfk3)
  assert _is_tf_keras(model)
  assert _max_diff(tfk3, model, _inputs(tfk3)) < 1e-6


def test_unbuilt_keras3_sequential_is_refused():
  with pytest.raises(UnsupportedModelError, match="not built"):
    load_lib.load_model(keras3.Sequential([L3.Dense(2)]))


def test_keras3_mobilenetv2_converts():
  k3 = keras3.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None,
                                       classes=10, classifier_activation=None)
  _randomize(k3, seed=3)
  model = keras3_lib.keras3_to_tf_keras(k3)
  assert len(model.get_weights()) == len(k3.get_weights())
  x = _inputs(k3, batch=2)
  ref = np.asarray(k3(x, training=False))
  assert np.max(np.abs(ref - np.asarray(model(x, training=False)))) <= 1e-4 * max(
      1.0, np.max(np.abs(ref)))
  model_checks_lib.check_model(model)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ResNet50", "EfficientNetB0"])
def test_keras3_applications_convert(arch, tmp_path):
  k3 = getattr(keras3.applications, arch)(weights=None, input_shape=(64, 64, 3), classes=10,
                                          classifier_activation=None)
  path = tmp_path / f"{arch}.keras"
  k3.save(path)
  x = _inputs(k3, batch=2)
  ref = np.asarray(k3(x, training=False))
  for model in (keras3_lib.keras3_to_tf_keras(k3), load_lib.load_model(path)):
    assert _is_tf_keras(model)
    assert len(model.get_weights()) == len(k3.get_weights())
    assert np.max(np.abs(ref - np.asarray(model(x, training=False)))) <= 1e-4 * max(
        1.0, np.max(np.abs(ref)))
    model_checks_lib.check_model(model)


def test_keras3_lambda_layer_object_is_refused():
  inp = keras3.Input((4,))
  x = L3.Lambda(lambda t: t * 2.0, name="double")(inp)
  k3 = keras3.Model(inp, L3.Dense(2)(x))
  with pytest.raises(UnsupportedModelError, match="'double' of class Lambda"):
    load_lib.load_model(k3)


class _Scale(keras3.layers.Layer):

  def call(self, x):
    return x * 3.0


def test_keras3_custom_layer_is_refused_with_advice():
  inp = keras3.Input((4,))
  k3 = keras3.Model(inp, L3.Dense(2)(_Scale(name="scale")(inp)))
  with pytest.raises(UnsupportedModelError,
                     match=r"'scale' of custom class _Scale.*standard Keras layers"):
    keras3_lib.keras3_to_tf_keras(k3)


def test_keras3_raw_ops_in_graph_are_refused():
  inp = keras3.Input((4,))
  x = keras3.ops.sin(inp)
  k3 = keras3.Model(inp, L3.Dense(2)(x))
  with pytest.raises(UnsupportedModelError, match="raw keras.ops call"):
    keras3_lib.keras3_to_tf_keras(k3)


def test_keras3_ops_arithmetic_becomes_layers():
  # keras.applications' MobileNetV3 writes hard_sigmoid as ReLU(6)(x + 3) * (1 / 6).
  inp = keras3.Input((6,), name="x")
  h = L3.Dense(6, name="fc1")(inp)
  g = L3.ReLU(6.0, name="r6")(h + 3.0) * (1.0 / 6.0)
  y = (2.0 - g) / 4.0 + h * g - h
  k3 = _randomize(keras3.Model(inp, L3.Dense(3, name="fc2")(y)))
  tfk = keras3_lib.keras3_to_tf_keras(k3)
  kinds = [type(l).__name__ for l in tfk.layers]
  assert kinds.count("Rescaling") == 4 and "Multiply" in kinds and "Subtract" in kinds
  x = _inputs(k3)
  assert _max_diff(k3, tfk, x) < 1e-5


@pytest.mark.parametrize("activation", ["hard_silu", "hard_swish", "hard_sigmoid",
                                        "relu6", "leaky_relu"])
def test_keras3_activations_without_tf_keras_twin(activation):
  inp = keras3.Input((8,))
  x = L3.Dense(8, activation=activation, name="fc")(inp)  # as a layer option
  x = L3.Activation(activation, name="act")(x)  # and as its own layer
  k3 = _randomize(keras3.Model(inp, L3.Dense(2, name="out")(x)))
  tfk = keras3_lib.keras3_to_tf_keras(k3)
  x = np.random.default_rng(0).normal(0, 4, (16, 8)).astype(np.float32)  # all pieces
  assert _max_diff(k3, tfk, x) < 1e-5
  names = [l.name for l in tfk.layers]
  assert "act" in names and "out" in names  # consumers see the original name
  for layer in tfk.layers:
    assert layers_lib.layer_role(layer) != "unsupported", layer.name


def test_hard_silu_converts_to_one_hard_swish_op():
  inp = keras3.Input((6, 6, 2))
  x = L3.Conv2D(4, 3, name="conv")(inp)
  x = L3.Activation("hard_silu", name="hs")(x)
  k3 = _randomize(keras3.Model(inp, L3.Dense(2)(L3.GlobalAveragePooling2D()(x))))
  tfk = keras3_lib.keras3_to_tf_keras(k3)
  flat = tf.lite.TFLiteConverter.from_keras_model(tfk).convert()
  ops = {d["op_name"] for d in tf.lite.Interpreter(model_content=flat)._get_ops_details()}
  assert "HARD_SWISH" in ops, ops


def test_keras3_subclassed_model_is_refused():

  class Net(keras3.Model):

    def __init__(self):
      super().__init__()
      self.fc = L3.Dense(2)

    def call(self, x):
      return self.fc(x)

  net = Net()
  net(np.zeros((1, 4), np.float32))
  with pytest.raises(UnsupportedModelError, match="subclassed"):
    load_lib.load_model(net)


def test_keras3_activation_without_equivalent_is_refused():
  inp = keras3.Input((4,))
  k3 = keras3.Model(inp, L3.Dense(2, activation="hard_tanh", name="ht")(inp))
  with pytest.raises(UnsupportedModelError, match="'ht'.*hard_tanh"):
    keras3_lib.keras3_to_tf_keras(k3)


def test_numeric_check_catches_a_layer_that_differs(monkeypatch):
  # tf_keras' hard_sigmoid is a different function from Keras 3's: if the
  # translation table wrongly claimed they match, the output check must fail.
  monkeypatch.setitem(keras3_lib._SAME_ACTIVATIONS, "hard_sigmoid", "hard_sigmoid")
  inp = keras3.Input((4,))
  x = L3.Dense(8, activation="hard_sigmoid", name="hs")(inp)
  k3 = _randomize(keras3.Model(inp, L3.Dense(2)(x)))
  with pytest.raises(UnsupportedModelError, match="max abs output difference"):
    keras3_lib.keras3_to_tf_keras(k3)


def test_keras3_quantized_model_is_refused():
  inp = keras3.Input((8,))
  k3 = keras3.Model(inp, L3.Dense(4, name="fc")(inp))
  k3.quantize("int8")
  with pytest.raises(UnsupportedModelError, match="quantized by Keras 3"):
    keras3_lib.keras3_to_tf_keras(k3)


# --------------------------------------------------------------------------- files


def test_keras3_dot_keras_file_loads_with_same_outputs(tmp_path):
  k3 = _small_keras3_cnn()
  path = tmp_path / "k3.keras"
  k3.save(path)
  model = load_lib.load_model(path)
  assert _is_tf_keras(model)
  x = _inputs(k3)
  assert _max_diff(k3, model, x) < 1e-5
  assert load_lib.load_model(str(path)).count_params() == k3.count_params()


def test_keras3_lambda_in_dot_keras_file_is_refused_and_never_run(tmp_path):
  marker = tmp_path / "lambda_ran"
  fn = _marker_lambda(marker)
  inp = keras3.Input((4,))
  x = L3.Lambda(fn, name="evil")(inp)
  k3 = keras3.Model(inp, L3.Dense(2)(x))
  path = tmp_path / "lambda.keras"
  k3.save(path)
  assert marker.exists()  # the probe works: it ran while the model was built
  marker.unlink()
  with pytest.raises(UnsupportedModelError, match="'evil' of class Lambda"):
    load_lib.load_model(path)
  assert not marker.exists()


def test_tf_keras_lambda_in_h5_is_refused_and_never_run(tmp_path):
  marker = tmp_path / "lambda_ran"
  fn = _marker_lambda(marker)
  inp = keras.Input((4,))
  model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Lambda(fn, name="evil")(inp)))
  path = tmp_path / "lambda.h5"
  model.save(path)
  assert marker.exists()  # the probe works: it ran while the model was built
  marker.unlink()
  with pytest.raises(UnsupportedModelError, match="'evil' of class Lambda"):
    load_lib.load_model(path)
  assert not marker.exists()


def test_tf_keras_lambda_in_savedmodel_is_refused_and_never_run(tmp_path):
  marker = tmp_path / "lambda_ran"
  fn = _marker_lambda(marker)
  inp = keras.Input((4,))
  model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Lambda(fn, name="evil")(inp)))
  path = tmp_path / "saved"
  model.save(str(path), save_format="tf")
  assert marker.exists()  # the probe works: it ran while the model was built
  marker.unlink()
  with pytest.raises(UnsupportedModelError, match="'evil' of class Lambda"):
    load_lib.load_model(path)
  assert not marker.exists()


def test_tf_keras_dot_keras_file_loads_with_tf_keras(tmp_path):
  model = _small_tf_keras_cnn()
  path = tmp_path / "tfk.keras"
  model.save(path)
  loaded = load_lib.load_model(path)
  assert _is_tf_keras(loaded)
  assert _max_diff(model, loaded, _inputs(model)) == 0.0


def test_h5_round_trip_keeps_outputs_and_fingerprint(tmp_path):
  model = _small_tf_keras_cnn()
  path = tmp_path / "model.h5"
  model.save(path)
  loaded = load_lib.load_model(path)
  assert _is_tf_keras(loaded)
  assert _max_diff(model, loaded, _inputs(model)) == 0.0
  assert model_checks_lib.fingerprint(loaded) == model_checks_lib.fingerprint(model)


def test_keras3_h5_file_is_loaded_and_converted(tmp_path):
  k3 = _small_keras3_cnn()
  path = tmp_path / "k3.h5"
  k3.save(path)
  model = load_lib.load_model(path)
  assert _is_tf_keras(model)
  assert _max_diff(k3, model, _inputs(k3)) < 1e-5


def test_savedmodel_round_trip(tmp_path):
  model = _small_tf_keras_cnn()
  path = tmp_path / "saved"
  model.save(str(path), save_format="tf")
  loaded = load_lib.load_model(path)
  assert _is_tf_keras(loaded)
  assert _max_diff(model, loaded, _inputs(model)) < 1e-6
  model_checks_lib.check_model(loaded)


def test_bare_tf_savedmodel_is_refused(tmp_path):
  module = tf.Module()
  module.v = tf.Variable(2.0)
  module.f = tf.function(lambda x: x * module.v,
                         input_signature=[tf.TensorSpec([None, 3], tf.float32)])
  path = tmp_path / "bare"
  tf.saved_model.save(module, str(path))
  with pytest.raises(InvalidInputError, match="without Keras metadata.*Pass the Keras model"):
    load_lib.load_model(path)


def _write(path, data):
  path.write_bytes(data)
  return path


def test_garbage_files_give_clear_errors(tmp_path):
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
  cases = [
      (_write(tmp_path / "text.h5", b"this is not a model\n"), "not an HDF5 file"),
      (_write(tmp_path / "text.keras", b"this is not a model\n"), "not a zip file"),
      (_write(tmp_path / "noise.h5", noise), "not an HDF5 file"),
      (_write(tmp_path / "noise.keras", noise), "not a zip file"),
      (_write(tmp_path / "noise.bin", noise), "neither a '.keras' archive nor an HDF5"),
      (_write(tmp_path / "empty.keras", b""), "not a zip file"),
  ]
  with zipfile.ZipFile(tmp_path / "other.keras", "w") as z:
    z.writestr("readme.txt", "hello")
  cases.append((tmp_path / "other.keras", "config.json"))
  with zipfile.ZipFile(tmp_path / "junk_config.keras", "w") as z:
    z.writestr("config.json", '{"hello": 1}')
    z.writestr("metadata.json", '{"keras_version": "3.15.1"}')
  cases.append((tmp_path / "junk_config.keras", "failed to load"))
  for path, message in cases:
    with pytest.raises(InvalidInputError, match=message) as info:
      load_lib.load_model(path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is None


def test_truncated_h5_is_refused(tmp_path):
  model = _small_tf_keras_cnn()
  full = tmp_path / "full.h5"
  model.save(full)
  cut = _write(tmp_path / "cut.h5", full.read_bytes()[:600])
  with pytest.raises(InvalidInputError, match="cut.h5"):
    load_lib.load_model(cut)


def test_weights_only_h5_is_refused(tmp_path):
  model = _small_tf_keras_cnn()
  path = tmp_path / "weights.h5"
  model.save_weights(path)
  with pytest.raises(InvalidInputError, match="weights only"):
    load_lib.load_model(path)


def test_missing_path_and_non_savedmodel_directory(tmp_path):
  with pytest.raises(InvalidInputError, match="does not exist"):
    load_lib.load_model(tmp_path / "nope.keras")
  (tmp_path / "dir").mkdir()
  (tmp_path / "dir" / "x.txt").write_text("hi")
  with pytest.raises(InvalidInputError, match="without saved_model.pb"):
    load_lib.load_model(tmp_path / "dir")
  broken = tmp_path / "broken"
  broken.mkdir()
  _write(broken / "saved_model.pb", b"garbage")
  _write(broken / "keras_metadata.pb", b"garbage")
  with pytest.raises(InvalidInputError, match="broken"):
    load_lib.load_model(broken)


def test_unreadable_file_is_refused(tmp_path, monkeypatch):
  # Tests run as root, which reads any file: inject the PermissionError instead.
  path = _write(tmp_path / "locked.h5", b"\x89HDF\r\n\x1a\n")

  def denied(*args, **kwargs):
    raise PermissionError(13, "Permission denied", str(path))

  monkeypatch.setattr(load_lib, "open", denied, raising=False)
  with pytest.raises(InvalidInputError, match="cannot be read.*Permission denied"):
    load_lib.load_model(path)


# --------------------------------------------------------------------------- check_model


def test_check_model_accepts_a_classifier():
  model = _small_tf_keras_cnn()
  assert model_checks_lib.check_model(model) is model


def test_check_model_needs_a_quantizable_layer():
  inp = keras.Input((6,))
  model = keras.Model(inp, keras.layers.Softmax()(keras.layers.Rescaling(2.0)(inp)))
  with pytest.raises(UnsupportedModelError, match="at least one quantizable layer"):
    model_checks_lib.check_model(model)


def test_check_model_names_the_layer_with_nan_weights():
  model = _small_tf_keras_cnn()
  kernel, bias = model.get_layer("logits").get_weights()
  kernel[0, 0] = np.nan
  bias[1] = np.inf
  model.get_layer("logits").set_weights([kernel, bias])
  with pytest.raises(InvalidInputError, match="layer 'logits' has 1 NaN or Inf"):
    model_checks_lib.check_model(model)


def test_check_model_refuses_subclassed_models():

  class Net(keras.Model):

    def __init__(self):
      super().__init__()
      self.fc = keras.layers.Dense(2)

    def call(self, x):
      return self.fc(x)

  net = Net()
  net(np.zeros((1, 4), np.float32))
  with pytest.raises(UnsupportedModelError, match="subclassed"):
    model_checks_lib.check_model(net)


def test_check_model_takes_several_inputs_and_several_outputs():
  a, b = keras.Input((4,)), keras.Input((4,))
  two_in = keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate()([a, b])))
  assert model_checks_lib.check_model(two_in) is two_in
  ids = keras.Input((4,), dtype="int32")
  mixed = keras.Model([a, ids], keras.layers.Dense(2)(keras.layers.Concatenate()(
      [a, keras.layers.Lambda(lambda t: tf.cast(t, tf.float32))(ids)])))
  with pytest.raises(UnsupportedModelError, match="integer input"):
    model_checks_lib.check_token_input(mixed)
  two_out = keras.Model(a, [keras.layers.Dense(2)(a), keras.layers.Dense(3)(a)])
  assert model_checks_lib.check_model(two_out) is two_out


def test_check_model_takes_per_pixel_outputs_and_refuses_unmeasurable_ones():
  inp = keras.Input((8, 8, 1))
  model = keras.Model(inp, keras.layers.Conv2D(2, 3, name="mask")(inp))
  assert model_checks_lib.check_model(model) is model
  flat = keras.Input((4,))
  rank0 = keras.Model(flat, keras.layers.Reshape(())(keras.layers.Dense(1, name="score")(flat)))
  with pytest.raises(UnsupportedModelError, match=r"output 'reshape.*rank 0.*Reshape\(\(1,\)\)"):
    model_checks_lib.check_model(rank0)
  ints = keras.Model(flat, keras.layers.Lambda(lambda t: tf.cast(t, "int32"), name="ids")(
      keras.layers.Dense(3)(flat)))
  with pytest.raises(UnsupportedModelError, match=r"output 'ids' of dtype int32"):
    model_checks_lib.check_model(ints)


def test_load_model_inlines_nested_tf_keras_models():
  inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc", activation="relu")],
                           name="inner")
  inp = keras.Input((4,))
  nested = keras.Model(inp, keras.layers.Dense(2, name="fc_out")(inner(inp)))
  flat = load_lib.load_model(nested)
  assert [l.name for l in flat.layers][1:] == ["fc", "fc_out"]
  x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
  np.testing.assert_allclose(flat(x).numpy(), nested(x).numpy(), atol=1e-6)
  assert model_checks_lib.check_model(flat) is flat


def test_check_model_refuses_nested_and_keras3_models():
  inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="inner")
  inp = keras.Input((4,))
  nested = keras.Model(inp, keras.layers.Dense(2)(inner(inp)))
  with pytest.raises(UnsupportedModelError, match="'inner' is a nested model"):
    model_checks_lib.check_model(nested)
  with pytest.raises(InvalidInputError, match="load_model"):
    model_checks_lib.check_model(_small_keras3_cnn())


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_tracks_weights():
  model = _small_tf_keras_cnn()
  first = model_checks_lib.fingerprint(model)
  assert first == model_checks_lib.fingerprint(model)
  assert len(first) == 16 and int(first, 16) >= 0
  clone = keras.models.clone_model(model)
  clone.set_weights(model.get_weights())
  assert model_checks_lib.fingerprint(clone) == first
  weights = model.get_weights()
  weights[0] = weights[0].copy()
  weights[0].flat[0] += 1e-3
  clone.set_weights(weights)
  assert model_checks_lib.fingerprint(clone) != first


def test_fingerprint_of_converted_keras3_model_is_repeatable():
  k3 = _small_keras3_cnn()
  assert (model_checks_lib.fingerprint(load_lib.load_model(k3))
          == model_checks_lib.fingerprint(load_lib.load_model(k3)))


# --------------------------------------------------------------------------- heads


def _head_model(head, input_dtype="float32"):
  inp = keras.Input((6,), dtype=input_dtype)
  return keras.Model(inp, head(keras.layers.Dense(4, activation="relu")(inp)))


def _kinds(model, **kw):
  heads = outputs_lib.heads_of(model, **kw)
  return [(h.name, str(h.kind)) for h in heads.heads], heads.classifier


def test_heads_read_classifiers_as_before():
  D = keras.layers.Dense
  assert _kinds(_head_model(lambda x: D(1, activation="sigmoid", name="p")(x))) == (
      [("p", "sigmoid")], True)
  assert _kinds(_head_model(lambda x: D(3, name="z")(x))) == ([("z", "logits")], True)
  assert _kinds(_head_model(lambda x: keras.layers.Softmax(name="s")(D(3)(x)))) == (
      [("s", "softmax")], True)


@pytest.mark.parametrize("head,kind", [
    (lambda x: keras.layers.Dense(1, name="price")(x), "linear"),
    (lambda x: keras.layers.Dense(3, activation="relu", name="boxes")(x), "linear"),
    (lambda x: keras.layers.Dense(3, activation="sigmoid", name="tags")(x), "sigmoid"),
    (lambda x: keras.layers.Dense(6, name="reconstruction")(x), "linear"),  # the input's shape
])
def test_heads_of_non_classifiers(head, kind):
  names, classifier = _kinds(_head_model(head))
  assert names[0][1] == kind and not classifier


def test_heads_of_two_heads_keeps_the_class_head_and_takes_overrides():
  inp = keras.Input((6,))
  h = keras.layers.Dense(8, activation="relu")(inp)
  model = keras.Model(inp, [keras.layers.Dense(3, activation="softmax", name="cls")(h),
                            keras.layers.Dense(4, name="box")(h)])
  heads = outputs_lib.heads_of(model)
  assert not heads.classifier and heads.class_head().name == "cls"
  assert [str(h.kind) for h in heads.heads] == ["softmax", "linear"]
  single = _head_model(lambda x: keras.layers.Dense(16, name="embedding")(x))
  assert _kinds(single) == ([("embedding", "logits")], True)
  assert _kinds(single, kinds={"embedding": "linear"}) == ([("embedding", "linear")], False)
  with pytest.raises(InvalidInputError, match=r"output_kinds to name the model's outputs \['cls', 'box'\]"):
    outputs_lib.heads_of(model, kinds={"boxes": "linear"})
  with pytest.raises(InvalidInputError, match=r"output_kinds\['box'\] to be one of"):
    outputs_lib.heads_of(model, kinds={"box": "regression"})
  with pytest.raises(InvalidInputError, match=r"output_weights\['box'\] to be a finite weight"):
    outputs_lib.heads_of(model, weights={"box": -1})


def test_distortion_terms_per_head_kind():
  heads = outputs_lib.Heads((outputs_lib.Head("p", "softmax", (2,)),
                             outputs_lib.Head("s", "sigmoid", (1,)),
                             outputs_lib.Head("y", "linear", (2,), weight=2.0)))
  f = np.log([[0.5, 0.5]])
  ref = np.concatenate([f, [[0.5]], [[0.0, 0.0]]], axis=1)
  q = np.concatenate([np.log([[0.9, 0.1]]), [[0.9]], [[1.0, 3.0]]], axis=1)
  terms = heads.head_distortion(q, ref, [1.0, 1.0, 5.0])[0]
  kl = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
  assert np.allclose(terms, [kl, kl, 2.0 * (1 + 9) / 2 / 5.0])
  assert np.allclose(heads.distortion(ref, ref, [1, 1, 5]), 0.0)
  assert heads.scales(np.concatenate([ref, ref + [[0, 0, 0, 2, 2]]]))[2] == pytest.approx(1.0)


def test_token_inputs_are_refused_with_a_fitting_message():
  model = keras.Sequential([keras.Input((6,), dtype="int32"), keras.layers.Embedding(20, 4, name="tok"),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
  with pytest.raises(UnsupportedModelError, match=r"token ids.*Embedding layer \('tok'\)"):
    model_checks_lib.check_token_input(model)
  model_checks_lib.check_token_input(_head_model(lambda x: keras.layers.Dense(3)(x)))


def test_shared_layer_is_refused():
  inp = keras.Input((4,))
  shared = keras.layers.Dense(4, name="twice")
  model = keras.Model(inp, keras.layers.Dense(2)(shared(shared(inp))))
  with pytest.raises(UnsupportedModelError, match="'twice'.*shared.*called 2 times"):
    model_checks_lib.check_model(model)


def test_h5_with_a_custom_layer_names_it_and_custom_objects(tmp_path):
  # issue 30: a tf_keras .h5 with a custom layer failed deep inside Keras.
  class Doubler(keras.layers.Layer):
    def call(self, x):
      return 2.0 * x

  inp = keras.Input((4,))
  model = keras.Model(inp, keras.layers.Dense(3)(Doubler(name="twice")(inp)))
  path = tmp_path / "custom.h5"
  model.save(path)
  with pytest.raises(UnsupportedModelError,
                     match=r"'twice' of class Doubler.*custom_objects=\{'Doubler': Doubler\}"):
    load_lib.load_model(path)
