"""Any model, not only classifiers (issue 31): an anomaly autoencoder, a per-pixel
mask network, a regression MLP and a two-headed model, trained here on real data
(scikit-learn's digits and diabetes tables), quantized data-free and run in LiteRT
and TFLite Micro. Seeded regression tests with loose margins; the full figures are
in benchmarks/bench_any.py."""

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_digits
from sklearn.metrics import r2_score, roc_auc_score

import keras_mpq
from keras_mpq.base.compat import keras
from keras_mpq.base.errors import InvalidInputError, UnsupportedModelError
from keras_mpq.export import runtime as runtime_lib

L = keras.layers


@pytest.fixture(scope="module")
def digits():
  d = load_digits()
  x = (d.images / 16.0).astype("float32")[..., None]
  return x, d.target.astype(np.int64)


def _fit(model, x, y, loss, epochs, seed=0):
  keras.utils.set_random_seed(seed)
  model.compile(keras.optimizers.Adam(3e-3), loss)
  model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
  return model


@pytest.fixture(scope="module")
def autoencoder(digits):
  x, y = digits
  keras.utils.set_random_seed(0)
  inp = keras.Input((8, 8, 1))
  h = L.Conv2D(8, 3, padding="same", activation="relu", name="enc1")(inp)
  h = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="enc2")(h)
  h = L.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu", name="dec1")(h)
  out = L.Conv2D(1, 3, padding="same", activation="sigmoid", name="reconstruction")(h)
  model = keras.Model(inp, out)
  normal = x[:1200][y[:1200] < 5]
  return _fit(model, normal, normal, "mse", 30), x[1200:], y[1200:] >= 5


def _auc(out, x, anomalous):
  return roc_auc_score(anomalous, np.mean((np.asarray(out) - x) ** 2, axis=(1, 2, 3)))


def test_autoencoder_anomaly_auc_holds_data_free(autoencoder, tmp_path):
  model, x, anomalous = autoencoder
  float_auc = _auc(model.predict(x, verbose=0), x, anomalous)
  result = keras_mpq.quantize(model, "8bit", seed=0, progress=False)
  assert result.report["outputs"]["classifier"] is False
  assert result.report["settings"]["synthesis"] == "diverse"
  assert result.sensitivity.info["objective"] == "distortion"
  aucs = {}
  for target in ("mobile", "mcu"):
    path = tmp_path / f"ae_{target}.tflite"
    result.export(path, target=target)
    out = runtime_lib.run_tflite(path, x if target == "mobile" else x[:150],
                                 runtime="tflm" if target == "mcu" else "auto")
    aucs[target] = _auc(out, x[:len(out)], anomalous[:len(out)])
  print("AE AUC float", float_auc, aucs)
  assert float_auc > 0.7
  assert aucs["mobile"] > float_auc - 0.02, (float_auc, aucs)
  float_mcu = _auc(model.predict(x[:150], verbose=0), x[:150], anomalous[:150])
  assert aucs["mcu"] > float_mcu - 0.03, (float_mcu, aucs)
  four = keras_mpq.quantize(model, "4bit", seed=0, progress=False)
  path = tmp_path / "ae4.tflite"
  four.export(path, target="mobile")
  auc4 = _auc(runtime_lib.run_tflite(path, x), x, anomalous)
  print("AE AUC 4bit", auc4)
  assert auc4 > float_auc - 0.05, (float_auc, auc4)
  checked = keras_mpq.validate_tflite(path, x, reference=model)
  assert checked.fidelity["reconstruction"]["correlation"] > 0.97, checked
  assert "fidelity" in checked.note and checked.accuracy is None


def test_mask_network_iou_holds_data_free(digits, tmp_path):
  x, _ = digits
  rng = np.random.default_rng(0)
  noisy = np.clip(x + rng.normal(0, 0.25, x.shape), 0, 1).astype("float32")
  mask = (x > 0.5).astype("float32")
  keras.utils.set_random_seed(0)
  inp = keras.Input((8, 8, 1))
  a = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
  b = L.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="down")(a)
  u = L.UpSampling2D(name="up")(b)
  h = L.Concatenate(name="skip")([a, u])
  h = L.Conv2D(8, 3, padding="same", activation="relu", name="c2")(h)
  out = L.Conv2D(1, 1, activation="sigmoid", name="mask")(h)
  model = _fit(keras.Model(inp, out), noisy[:1200], mask[:1200], "binary_crossentropy", 25)

  def iou(p):
    p, t = np.asarray(p) > 0.5, mask[1200:] > 0.5
    return float(np.sum(p & t) / max(np.sum(p | t), 1))

  float_iou = iou(model.predict(noisy[1200:], verbose=0))
  result = keras_mpq.quantize(model, "8bit", seed=0, progress=False)
  path = tmp_path / "mask.tflite"
  result.export(path, target="mobile")
  q_iou = iou(runtime_lib.run_tflite(path, noisy[1200:]))
  print("mask IoU", float_iou, q_iou)
  assert float_iou > 0.6 and q_iou > float_iou - 0.02, (float_iou, q_iou)


def test_regression_mlp_r2_holds_data_free(tmp_path):
  xs, ys = load_diabetes(return_X_y=True)
  xs = ((xs - xs[:350].mean(0)) / xs[:350].std(0)).astype("float32")
  ys = ((ys - ys[:350].mean()) / ys[:350].std()).astype("float32")
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((10,)), L.Dense(32, activation="relu", name="d1"),
                            L.Dense(16, activation="relu", name="d2"), L.Dense(1, name="y")])
  model = _fit(model, xs[:350], ys[:350], "mse", 60)
  float_r2 = r2_score(ys[350:], model.predict(xs[350:], verbose=0)[:, 0])
  result = keras_mpq.quantize(model, "8bit", seed=0, progress=False, input_range=(-4, 4))
  path = tmp_path / "reg.tflite"
  result.export(path, target="mobile")
  q_r2 = r2_score(ys[350:], runtime_lib.run_tflite(path, xs[350:])[:, 0])
  print("R2", float_r2, q_r2)
  assert float_r2 > 0.3 and q_r2 > float_r2 - 0.03, (float_r2, q_r2)
  checked = keras_mpq.validate_tflite(path, xs[350:], ys[350:], metric="mae")
  assert checked.metric_name == "mae" and 0 < checked.metric < 1.5


def _two_head(x, y):
  keras.utils.set_random_seed(0)
  inp = keras.Input((8, 8, 1))
  h = L.Conv2D(16, 3, activation="relu", name="conv")(inp)
  h = L.Flatten()(h)
  h = L.Dense(32, activation="relu", name="fc")(h)
  cls = L.Dense(10, activation="softmax", name="cls")(h)
  box = L.Dense(4, activation="sigmoid", name="box")(h)
  model = keras.Model(inp, [cls, box])
  model.compile(keras.optimizers.Adam(3e-3), ["sparse_categorical_crossentropy", "mse"])
  model.fit(x[:1200], [y[:1200], _boxes(x[:1200])], epochs=25, batch_size=64, verbose=0)
  return model


def _boxes(x):
  """Each digit's ink box [ymin, xmin, ymax, xmax] / 8."""
  ink = x[..., 0] > 0.3
  rows, cols = ink.any(2), ink.any(1)
  first = lambda a: a.argmax(1)
  last = lambda a: a.shape[1] - 1 - a[:, ::-1].argmax(1)
  return (np.stack([first(rows), first(cols), last(rows) + 1, last(cols) + 1], 1) / 8.0
          ).astype("float32")


def test_two_headed_model_keeps_its_class_head_and_box(digits, tmp_path):
  x, y = digits
  model = _two_head(x, y)
  xt, yt, bt = x[1200:], y[1200:], _boxes(x[1200:])
  fc, fb = model.predict(xt, verbose=0)
  result = keras_mpq.quantize(model, "8bit", seed=0, progress=False)
  assert result.report["settings"]["synthesis"] == "labeled"  # from the class head
  assert [h["name"] for h in result.report["outputs"]["heads"]] == ["cls", "box"]
  for target in ("mobile", "mcu"):
    path = tmp_path / f"two_{target}.tflite"
    result.export(path, target=target)
    n = len(xt) if target == "mobile" else 120
    qc, qb = runtime_lib.run_tflite(path, xt[:n], runtime="tflm" if target == "mcu" else "auto")
    f_acc, q_acc = np.mean(fc[:n].argmax(1) == yt[:n]), np.mean(qc.argmax(1) == yt[:n])
    f_err, q_err = np.abs(fb[:n] - bt[:n]).mean(), np.abs(qb - bt[:n]).mean()
    print(target, "acc", f_acc, q_acc, "box", f_err, q_err)
    assert f_acc > 0.85 and q_acc > f_acc - 0.02, (target, f_acc, q_acc)
    assert q_err < f_err + 0.01, (target, f_err, q_err)
  checked = keras_mpq.validate_tflite(tmp_path / "two_mobile.tflite", xt, reference=model)
  assert set(checked.fidelity) == {"cls", "box"}


def test_non_classifier_bad_inputs_are_clear(digits, tmp_path):
  x, _ = digits
  inp = keras.Input((8, 8, 1))
  model = keras.Model(inp, L.Conv2D(1, 3, padding="same", name="maps")(inp))
  with pytest.raises(InvalidInputError, match=r"data=x alone.*'maps'"):
    keras_mpq.quantize(model, "8bit", data=(x[:64], np.zeros(64)), progress=False)
  with pytest.raises(UnsupportedModelError, match=r"class head.*'diverse'"):
    keras_mpq.quantize(model, "8bit", synthesis="labeled", num_samples=8, progress=False)
  with pytest.raises(InvalidInputError, match=r"output_kinds to name the model's outputs \['maps'\]"):
    keras_mpq.quantize(model, "8bit", output_kinds={"map": "linear"}, progress=False)
  result = keras_mpq.quantize(model, "8bit", data=x[:64], progress=False)
  path = tmp_path / "maps.tflite"
  result.export(path, target="mobile")
  with pytest.raises(InvalidInputError, match=r"finite value from metric '_nan_metric'"):
    keras_mpq.validate_tflite(path, x[:16], x[:16], metric=_nan_metric)
  with pytest.raises(InvalidInputError, match=r"y \(the targets\) with metric="):
    keras_mpq.validate_tflite(path, x[:16], metric="mae")
  checked = keras_mpq.validate_tflite(path, x[:16])
  assert checked.fidelity is None and "pass reference=" in checked.note


def _nan_metric(y, out):
  return float("nan")


def test_own_loss_is_the_objective_and_bad_losses_are_clear(digits):
  x, y = digits
  model = _two_head(x, y)
  targets = [y[:128], _boxes(x[:128])]

  def loss(y_true, y_pred):
    cls = keras.losses.sparse_categorical_crossentropy(y_true[0], y_pred[0])
    return cls + keras.backend.mean(keras.backend.square(y_true[1] - y_pred[1]), axis=-1)

  table = keras_mpq.measure_sensitivity(model, (x[:128], targets), weight_bits=(2, 8),
                                        loss=loss, clean=False)
  assert table.info["objective"] == "loss" and table.info["labels"] == "given (loss=)"
  assert np.all(table.scores[:, 0] > table.scores[:, 1])
  result = keras_mpq.quantize(model, "6bit", data=(x[:128], {"cls": y[:128], "box": targets[1]}),
                              loss=loss, progress=False)
  assert result.report["settings"]["loss"] == "loss"
  with pytest.raises(InvalidInputError, match=r"finite values from loss= on the outputs \['cls', 'box'\]"):
    keras_mpq.measure_sensitivity(model, (x[:64], [t[:64] for t in targets]),
                                  loss=lambda a, b: b[1][:, 0] * np.nan)
  with pytest.raises(InvalidInputError, match=r"one target array per output \['cls', 'box'\]"):
    keras_mpq.measure_sensitivity(model, (x[:64], y[:64]), loss="mse")
  with pytest.raises(InvalidInputError, match=r"data=\(x, y\) with loss="):
    keras_mpq.quantize(model, "8bit", loss="mse", progress=False)
