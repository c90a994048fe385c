"""Tests of keras_mpq.callbacks: quantization-aware fine-tuning chores with model.fit."""

import importlib
import os
import sys
import types

import numpy as np
import pytest

from keras_mpq.quantization import access as access_lib
from keras_mpq.quantization import apply as apply_lib
from keras_mpq import callbacks as callbacks_lib
from keras_mpq.base import layers as layers_lib
from keras_mpq.base.compat import keras
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.types import QuantizationPlan, SensitivityTable

L = keras.layers


def _toy_data(n=128, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, (n, 8, 8, 1)).astype(np.float32)
  y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype(np.int64)
  return x, y


def _toy_model(with_unfoldable_bn=False):
  inp = keras.Input((8, 8, 1))
  x = L.BatchNormalization(name="input_bn")(inp) if with_unfoldable_bn else inp
  x = L.Conv2D(4, 3, padding="same", use_bias=False, name="c1")(x)
  x = L.BatchNormalization(name="c1_bn")(x)
  x = L.ReLU(name="r1")(x)
  y = L.Conv2D(4, 3, padding="same", name="c2")(x)
  x = L.Add(name="add")([x, y])
  if with_unfoldable_bn:
    x = L.BatchNormalization(name="add_bn")(x)
  x = L.GlobalAveragePooling2D(name="gap")(x)
  return keras.Model(inp, L.Dense(2, name="fc")(x))


def _quantized(model, x, bits=8, lr=1e-3):
  qmodel = apply_lib.apply_plan(model, QuantizationPlan.uniform(access_lib.plan_layers(model), bits),
                            x[:32])
  qmodel.compile(keras.optimizers.Adam(lr),
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 metrics=["accuracy"])
  return qmodel


def _kernel(qmodel, name):
  """The float kernel variable of a wrapped layer (its ``.kernel`` is the quantized tensor)."""
  variable = qmodel.get_layer(f"quant_{name}")._weight_vars[0][0]
  return variable.numpy().copy()


class _Recorder(keras.callbacks.Callback):

  def __init__(self, fn, per="batch"):
    super().__init__()
    self.fn, self.per, self.values = fn, per, []

  def on_train_batch_end(self, batch, logs=None):
    if self.per == "batch":
      self.values.append(self.fn(self.model))

  def on_epoch_end(self, epoch, logs=None):
    if self.per == "epoch":
      self.values.append(self.fn(self.model))


# --------------------------------------------------------------------------- FreezeRanges


def test_freeze_ranges_after_steps():
  x, y = _toy_data()
  qmodel = _quantized(_toy_model(), x)
  freeze = callbacks_lib.FreezeRanges(after_steps=3)
  recorder = _Recorder(access_lib.activation_ranges)
  qmodel.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
             callbacks=[freeze, recorder])
  ranges = recorder.values
  assert len(ranges) == 16
  assert ranges[0] != ranges[1] and ranges[1] != ranges[2]  # moving before the freeze
  assert all(r == ranges[2] for r in ranges[3:])  # frozen after step 3
  assert freeze.frozen and freeze.frozen_at_step == 3 and freeze.steps == 16
  # a second fit continues the count: still frozen from the start
  qmodel.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[freeze])
  assert access_lib.activation_ranges(qmodel) == ranges[-1]


def test_freeze_ranges_zero_steps_and_bad_arguments():
  x, y = _toy_data(64)
  qmodel = _quantized(_toy_model(), x)
  before = access_lib.activation_ranges(qmodel)
  qmodel.fit(x, y, batch_size=16, epochs=1, verbose=0,
             callbacks=[callbacks_lib.FreezeRanges(after_steps=0)])
  assert access_lib.activation_ranges(qmodel) == before
  with pytest.raises(InvalidInputError, match="after_steps"):
    callbacks_lib.FreezeRanges(after_steps=-1)
  float_model = _toy_model()
  float_model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  with pytest.raises(InvalidInputError, match="apply_plan"):
    float_model.fit(x, y, epochs=1, verbose=0, callbacks=[callbacks_lib.FreezeRanges(1)])


# --------------------------------------------------------------------------- FreezeBatchNorm


def _bn_stats(model):
  return {bn.name: (bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy())
          for bn in callbacks_lib.batchnorm_layers(model)}


def _same(a, b):
  return all(np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1]) for k in a)


def test_freeze_batchnorm_after_epochs():
  x, y = _toy_data()
  qmodel = _quantized(_toy_model(with_unfoldable_bn=True), x)
  assert sorted(_bn_stats(qmodel)) == ["add_bn", "input_bn"]  # c1_bn was folded
  initial = _bn_stats(qmodel)
  freeze = callbacks_lib.FreezeBatchNorm(after_epochs=1)
  stats = _Recorder(_bn_stats, per="epoch")
  kernels = _Recorder(lambda m: _kernel(m, "c2"), per="epoch")
  qmodel.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[freeze, stats, kernels])
  assert not _same(stats.values[0], initial)  # statistics move during epoch 1
  assert _same(stats.values[1], stats.values[0]) and _same(stats.values[2], stats.values[0])
  assert freeze.frozen and sorted(freeze.frozen_layers) == ["add_bn", "input_bn"]
  assert not np.array_equal(kernels.values[1], kernels.values[2])  # still training


def test_freeze_batchnorm_from_the_start():
  x, y = _toy_data(64)
  qmodel = _quantized(_toy_model(with_unfoldable_bn=True), x)
  initial = _bn_stats(qmodel)
  qmodel.fit(x, y, batch_size=16, epochs=1, verbose=0,
             callbacks=[callbacks_lib.FreezeBatchNorm(after_epochs=0)])
  assert _same(_bn_stats(qmodel), initial)
  with pytest.raises(InvalidInputError, match="after_epochs"):
    callbacks_lib.FreezeBatchNorm(after_epochs=1.5)


# --------------------------------------------------------------------------- ExportAndValidate


@pytest.fixture
def fake_export_modules(monkeypatch):
  """Stand-ins for keras_mpq.export.exporter / keras_mpq.validate that record their calls."""
  calls = {"export": [], "validate": []}
  export = types.ModuleType("keras_mpq.export.exporter")
  validate = types.ModuleType("keras_mpq.validate")

  def export_tflite(model, path, plan, target, calibration_data):
    calls["export"].append((model, path, plan, target, len(calibration_data)))
    with open(path, "wb") as f:
      f.write(b"x" * (100 + len(calls["export"])))
    return types.SimpleNamespace(path=path)

  def validate_tflite(path, x, y, runtime="auto"):
    assert runtime == "tflm"  # the fixture exports for mcu: validated in TFLite Micro
    calls["validate"].append((path, len(x)))
    return types.SimpleNamespace(accuracy=0.5 + 0.1 * len(calls["validate"]))

  export.export_tflite = export_tflite
  validate.validate_tflite = validate_tflite
  monkeypatch.setitem(sys.modules, "keras_mpq.export.exporter", export)
  monkeypatch.setitem(sys.modules, "keras_mpq.validate", validate)
  return calls


def test_export_and_validate_logs_into_history(tmp_path, fake_export_modules):
  x, y = _toy_data(64)
  qmodel = _quantized(_toy_model(), x)
  access_lib.set_weight_bits(qmodel, {"c2": 4})
  cb = callbacks_lib.ExportAndValidate(str(tmp_path / "m_{epoch}.tflite"), x[:40], y[:40],
                                   target="mcu", calibration_data=x[:16], every_n_epochs=2)
  history = qmodel.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[cb])
  calls = fake_export_modules
  assert [c[1] for c in calls["export"]] == [str(tmp_path / "m_2.tflite"),
                                             str(tmp_path / "m_4.tflite")]
  baked, _, plan, target, n_cal = calls["export"][0]
  assert target == "mcu" and n_cal == 16
  assert plan.weight_bits == {"c1": 8, "c2": 4, "fc": 8}
  assert not any("Quantize" in type(l).__name__ for l in baked.layers)
  assert calls["validate"] == [(str(tmp_path / "m_2.tflite"), 40),
                               (str(tmp_path / "m_4.tflite"), 40)]
  assert history.history["tflite_accuracy"] == pytest.approx([0.6, 0.7])
  assert history.history["tflite_bytes"] == [101, 102]
  assert [r[0] for r in cb.results] == [2, 4]


def test_export_and_validate_checks_arguments():
  x, y = _toy_data(16)
  with pytest.raises(InvalidInputError, match="same, non-zero number"):
    callbacks_lib.ExportAndValidate("m.tflite", x, y[:3])
  with pytest.raises(InvalidInputError, match="every_n_epochs"):
    callbacks_lib.ExportAndValidate("m.tflite", x, y, every_n_epochs=0)


def _have(module):
  try:
    importlib.import_module(module)
    return True
  except ImportError:
    return False


@pytest.mark.skipif(not (_have("keras_mpq.export.exporter") and _have("keras_mpq.export.runtime")),
                    reason="keras_mpq.export.exporter / keras_mpq.export.runtime not available")
def test_export_and_validate_real_tflite(tmp_path, trained_cnn, small_data):
  x_train, y_train, x_test, y_test = small_data
  qmodel = _quantized(trained_cnn, x_train, bits=8, lr=1e-4)
  path = str(tmp_path / "cnn.tflite")
  cb = callbacks_lib.ExportAndValidate(path, x_test[:200], y_test[:200], target="mobile",
                                   calibration_data=x_train[:64])
  history = qmodel.fit(x_train[:256], y_train[:256], batch_size=64, epochs=1, verbose=0,
                       callbacks=[cb])
  assert os.path.getsize(path) == history.history["tflite_bytes"][0] > 0
  keras_acc = np.mean(np.argmax(qmodel.predict(x_test[:200], verbose=0), -1) == y_test[:200])
  assert history.history["tflite_accuracy"][0] > 0.9
  assert abs(history.history["tflite_accuracy"][0] - keras_acc) < 0.03


# --------------------------------------------------------------------------- SensitivityMonitor


def test_sensitivity_monitor_task_interaction(trained_cnn, small_data):
  x_train, y_train, _, _ = small_data
  qmodel = _quantized(trained_cnn, x_train, bits=8, lr=1e-4)
  access_lib.set_weight_bits(qmodel, {"conv2": 4})
  context = access_lib.get_weight_bits(qmodel)
  monitor = callbacks_lib.SensitivityMonitor((x_train[:128], y_train[:128]), bits=(2, 4, 8))
  history = qmodel.fit(x_train[:128], y_train[:128], batch_size=64, epochs=2, verbose=0,
                       callbacks=[monitor])
  assert access_lib.get_weight_bits(qmodel) == context  # bits restored after each measurement
  assert [epoch for epoch, _ in monitor.history] == [1, 2]
  table = monitor.history[-1][1]
  assert isinstance(table, SensitivityTable) and table.metric == "task_interaction"
  assert table.layers == tuple(access_lib.plan_layers(trained_cnn)) and table.bits == (2, 4, 8)
  # a layer set to the bits it already has does not change the loss
  for name, bits in context.items():
    assert table.score(name, bits) == pytest.approx(0.0, abs=1e-6)
  assert np.mean(table.scores[:, 0]) > np.mean(table.scores[:, 2])  # 2 bits hurts more
  lowest = table.scores[:, 0]
  assert history.history["sensitivity_max_layer"][-1] == int(np.argmax(lowest))
  assert history.history["sensitivity_max"][-1] == pytest.approx(float(np.max(lowest)))
  # one entry checked by hand: L(c[conv3<-2]) - L(c)
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  base = float(loss(y_train[:128], qmodel(x_train[:128])))
  with access_lib.weight_bits_override(qmodel, {"conv3": 2}):
    dropped = float(loss(y_train[:128], qmodel(x_train[:128])))
  assert table.score("conv3", 2) == pytest.approx(dropped - base, rel=1e-3, abs=1e-5)


def test_sensitivity_monitor_weight_mse():
  x, y = _toy_data(64)
  qmodel = _quantized(_toy_model(), x)
  monitor = callbacks_lib.SensitivityMonitor(metric="weight_mse", bits=(8, 2, 4),
                                         every_n_epochs=2)
  history = qmodel.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor])
  (epoch, table), = monitor.history
  assert epoch == 2 and table.bits == (2, 4, 8) and table.metric == "weight_mse"
  assert np.all(np.diff(table.scores, axis=1) < 0)  # error falls as bits grow
  w = _kernel(qmodel, "c1")
  q = layers_lib.quantize_array(w, 2, (0, 1, 2))[0]
  assert table.score("c1", 2) == pytest.approx(np.sum((q - w) ** 2) / np.sum(w ** 2), rel=1e-5)
  assert history.history["sensitivity_max_layer"] == [int(np.argmax(table.scores[:, 0]))]


def test_sensitivity_monitor_checks_arguments():
  with pytest.raises(InvalidInputError, match="metric"):
    callbacks_lib.SensitivityMonitor(metric="hessian")
  with pytest.raises(InvalidInputError, match=r"data=\(x, y\)"):
    callbacks_lib.SensitivityMonitor(None)
  with pytest.raises(InvalidInputError, match="weight bits"):
    callbacks_lib.SensitivityMonitor(metric="weight_mse", bits=(1, 4))


def _two_inputs(n=64, seed=0):
  """A two-input model (``image``, ``table``) and seeded data whose label needs both inputs."""
  rng = np.random.default_rng(seed)
  image = rng.uniform(0, 1, (n, 8, 8, 1)).astype(np.float32)
  table = rng.uniform(0, 1, (n, 3)).astype(np.float32)
  y = (image.mean(axis=(1, 2, 3)) + table[:, 0] > 1.0).astype(np.int64)
  keras.utils.set_random_seed(seed)
  a, b = keras.Input((8, 8, 1), name="image"), keras.Input((3,), name="table")
  h = L.Flatten()(L.Conv2D(4, 3, activation="relu", name="conv")(a))
  h = L.Concatenate()([h, L.Dense(4, activation="relu", name="fb")(b)])
  return keras.Model([a, b], L.Dense(2, name="fc")(h)), image, table, y


def test_export_and_validate_takes_a_list_or_a_dict_of_inputs():
  x = [np.zeros((300, 3), np.float32), np.zeros((300, 2), np.float32)]
  callback = callbacks_lib.ExportAndValidate("m.tflite", x, np.zeros(300, np.int64))
  assert [a.shape for a in callback.calibration_data] == [(256, 3), (256, 2)]
  by_name = callbacks_lib.ExportAndValidate("m.tflite", {"b": x[1], "a": x[0]},
                                            np.zeros(300, np.int64))
  assert {k: v.shape for k, v in by_name.calibration_data.items()} == {"a": (256, 3),
                                                                        "b": (256, 2)}
  with pytest.raises(InvalidInputError, match="same, non-zero number"):
    callbacks_lib.ExportAndValidate("m.tflite", {"a": x[0], "b": x[1]}, np.zeros(5, np.int64))


@pytest.mark.skipif(not (_have("keras_mpq.export.exporter") and _have("keras_mpq.export.runtime")),
                    reason="keras_mpq.export.exporter / keras_mpq.export.runtime not available")
def test_export_and_validate_matches_a_dict_by_input_name(tmp_path):
  from keras_mpq import validate as validate_lib  # pylint: disable=g-import-not-at-top
  model, image, table, y = _two_inputs()
  qmodel = apply_lib.apply_plan(model, QuantizationPlan.uniform(access_lib.plan_layers(model), 8),
                                [image[:32], table[:32]])
  qmodel.compile(keras.optimizers.Adam(1e-3),
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  path = str(tmp_path / "two_{epoch}.tflite")
  # not the model's order, for the exporter's calibration as well as for validation
  cb = callbacks_lib.ExportAndValidate(path, {"table": table, "image": image}, y,
                                       target="mcu",
                                       calibration_data={"table": table[:32], "image": image[:32]})
  history = qmodel.fit([image, table], y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
  (epoch, accuracy, size, written), = cb.results
  assert epoch == 1 and written == str(tmp_path / "two_1.tflite")
  assert history.history["tflite_bytes"] == [size] and size > 0
  listed = validate_lib.validate_tflite(written, [image, table], y, runtime="tflm")
  assert history.history["tflite_accuracy"] == [accuracy] == [listed.accuracy]
  assert [a.shape for a in cb.x_val] == [image.shape, table.shape]  # in the model's order
  np.testing.assert_array_equal(cb.calibration_data[1], table[:32])
  bad = callbacks_lib.ExportAndValidate(path, {"tabel": table, "image": image}, y, target="mcu")
  with pytest.raises(InvalidInputError, match=r"x_val.*\['image', 'table'\].*unknown \['tabel'\]"):
    qmodel.fit([image, table], y, epochs=1, verbose=0, callbacks=[bad])
