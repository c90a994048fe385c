"""Models with several inputs through the whole line (issue 31, build item 3).

A digits classifier that takes the 8x8 image and a table of its 16 row and
column sums (0..16, read through a Rescaling layer) as two inputs, and a
two-input model with two outputs (the class logits and the image's mean
intensity); trained here on scikit-learn's digits (seeded), quantized with
real data (a list or a dict by input name) and data-free, exported for LiteRT,
TFLite Micro and Ethos-U (Vela; that test skips without it), and run there
with the inputs matched by name; and a byte budget that is the two-input
file's size. Loose margins: these are regression tests, not benchmarks.
"""

import numpy as np
import pytest
from sklearn.datasets import load_digits

import keras_mpq
from keras_mpq.base.compat import keras
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.types import QuantizationPlan
from keras_mpq.export import reader as reader_lib
from keras_mpq.export import runtime as runtime_lib
from keras_mpq.export import storage as storage_lib
from keras_mpq.plan import costs as costs_lib

L = keras.layers
TRAIN = 1300


@pytest.fixture(scope="module")
def digits():
  d = load_digits()
  image = (d.images / 16.0).astype("float32")[..., None]
  table = np.concatenate([d.images.sum(axis=2), d.images.sum(axis=1)], axis=1) / 8.0
  return {"image": image, "table": table.astype("float32")}, d.target.astype(np.int64)


def _split(x, part):
  return {k: (v[:TRAIN] if part == "train" else v[TRAIN:]) for k, v in x.items()}


def _branches():
  image, table = keras.Input((8, 8, 1), name="image"), keras.Input((16,), name="table")
  h = L.Conv2D(8, 3, activation="relu", name="conv")(image)
  h = L.Flatten()(L.MaxPooling2D()(h))
  g = L.Dense(16, activation="relu", name="fb")(L.Rescaling(1 / 16, name="scale")(table))
  return [image, table], L.Concatenate()([h, g])


@pytest.fixture(scope="module")
def classifier(digits):
  x, y = digits
  keras.utils.set_random_seed(0)
  inputs, h = _branches()
  model = keras.Model(inputs, L.Dense(10, name="logits")(L.Dense(32, activation="relu",
                                                                 name="fc")(h)))
  model.compile(keras.optimizers.Adam(3e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
  model.fit(_split(x, "train"), y[:TRAIN], epochs=25, batch_size=32, verbose=0)
  return model


def _accuracy(out, y):
  return float(np.mean(np.argmax(out, axis=-1) == y))


def test_real_data_as_list_or_dict_at_8_bits_runs_in_litert_and_tflm(classifier, digits,
                                                                     tmp_path):
  x, y = digits
  test, y_test = _split(x, "test"), y[TRAIN:]
  float_acc = _accuracy(classifier.predict(test, verbose=0), y_test)
  assert float_acc > 0.88
  calib = _split(x, "train")
  as_list = ([calib["image"][:256], calib["table"][:256]], y[:256])
  result = keras_mpq.quantize(classifier, "8bit", data=as_list, seed=0, progress=False)
  by_dict = keras_mpq.quantize(classifier, "8bit", seed=0, progress=False, data=(
      {"table": calib["table"][:256], "image": calib["image"][:256]}, y[:256]))
  keras_acc = _accuracy(result.model.predict([test["image"], test["table"]], verbose=0), y_test)
  np.testing.assert_array_equal(by_dict.model.predict(test, verbose=0),
                                result.model.predict(test, verbose=0))
  assert keras_acc >= float_acc - 0.03
  ranges = result.report["input_range"]["inputs"]
  assert (ranges["table"]["low"], ranges["table"]["high"]) == (0.0, 16.0)
  assert "Rescaling" in ranges["table"]["source"] and ranges["image"]["assumed"]
  assert ranges["table"]["data_range"][1] > 1.0  # each input checked against its own range
  reversed_dict = {"table": test["table"], "image": test["image"]}  # not the model's order
  for target, runtime in (("mobile", "auto"), ("mcu", "tflm")):
    path = tmp_path / f"two_inputs_{target}.tflite"
    result.export(path, target=target)
    checked = keras_mpq.validate_tflite(path, reversed_dict, y_test, reference=result.model,
                                        runtime=runtime)
    print(f"two inputs 8-bit {target}: float {float_acc:.4f}, keras {keras_acc:.4f}, "
          f"file {checked.accuracy:.4f}, agreement {checked.agreement:.4f}")
    assert checked.accuracy >= float_acc - 0.03 and checked.agreement >= 0.97
    listed = runtime_lib.run_tflite(path, [test["image"][:16], test["table"][:16]],
                                    runtime=runtime)
    named = runtime_lib.run_tflite(path, {"table": test["table"][:16],
                                          "image": test["image"][:16]}, runtime=runtime,
                                   input_names=["image", "table"])
    np.testing.assert_array_equal(listed, named)
  # The file's inputs are in the model's order under the Keras names (LiteRT's view).
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  details = Interpreter(model_path=str(tmp_path / "two_inputs_mobile.tflite")).get_input_details()
  assert [d["name"] for d in details] == ["image", "table"]
  assert [tuple(d["shape"][1:]) for d in details] == [(8, 8, 1), (16,)]
  scales = [d["quantization"][0] for d in details]  # each from its own range
  assert scales[1] > 10 * scales[0]


def test_at_4_bits_data_free_each_input_synthesized_in_its_range_and_real(classifier, digits, tmp_path):
  x, y = digits
  test, y_test = _split(x, "test"), y[TRAIN:]
  float_acc = _accuracy(classifier.predict(test, verbose=0), y_test)
  result = keras_mpq.quantize(classifier, "4bit", seed=0, num_samples=128, progress=False)
  data = result.calibration_data
  assert isinstance(data, list) and [a.shape[1:] for a in data] == [(8, 8, 1), (16,)]
  assert 0.0 <= data[0].min() and data[0].max() <= 1.0 and data[1].max() <= 16.0
  assert data[1].max() > 1.0
  keras_acc = _accuracy(result.model.predict(test, verbose=0), y_test)
  path = tmp_path / "two_inputs_4bit_mcu.tflite"
  result.export(path, target="mcu")
  checked = keras_mpq.validate_tflite(path, test, y_test, reference=result.model,
                                      runtime="tflm")
  print(f"two inputs data-free 4-bit: float {float_acc:.4f}, keras {keras_acc:.4f}, "
        f"mcu file {checked.accuracy:.4f}")
  assert keras_acc >= float_acc - 0.10 and checked.accuracy >= keras_acc - 0.03
  calib = _split(x, "train")
  real = keras_mpq.quantize(classifier, "4bit", seed=0, progress=False, data=(
      {"table": calib["table"][:256], "image": calib["image"][:256]}, y[:256]))
  real_acc = _accuracy(real.model.predict(test, verbose=0), y_test)
  path = tmp_path / "two_inputs_4bit_mobile.tflite"
  real.export(path, target="mobile")
  real_file = keras_mpq.validate_tflite(path, test, y_test, reference=real.model)
  print(f"two inputs real-data 4-bit: keras {real_acc:.4f}, mobile file "
        f"{real_file.accuracy:.4f}")
  assert real_acc >= float_acc - 0.05 and real_file.agreement >= 0.97


def test_two_inputs_two_outputs_matched_by_name(digits, tmp_path):
  x, y = digits
  keras.utils.set_random_seed(1)
  inputs, h = _branches()
  h = L.Dense(32, activation="relu", name="fc")(h)
  model = keras.Model(inputs, [L.Dense(10, name="logits")(h),
                               L.Dense(1, name="intensity")(h)])
  model.compile(keras.optimizers.Adam(3e-3),
                [keras.losses.SparseCategoricalCrossentropy(from_logits=True), "mse"])
  train = _split(x, "train")
  intensity = train["image"].mean(axis=(1, 2))
  model.fit(train, [y[:TRAIN], intensity], epochs=8, batch_size=32, verbose=0)
  test = _split(x, "test")
  result = keras_mpq.quantize(model, "8bit", data={k: v[:256] for k, v in train.items()},
                              seed=0, progress=False)
  assert result.report["outputs"]["classifier"] is False
  for target, runtime in (("mobile", "auto"), ("mcu", "tflm")):
    path = tmp_path / f"two_by_two_{target}.tflite"
    result.export(path, target=target)
    out = runtime_lib.run_tflite(path, [test["image"][:64], test["table"][:64]],
                                 runtime=runtime)
    assert [o.shape for o in out] == [(64, 10), (64, 1)]
    checked = keras_mpq.validate_tflite(path, {"table": test["table"], "image": test["image"]},
                                        reference=model, runtime=runtime)
    assert set(checked.fidelity) == {"logits", "intensity"}
    print(f"two inputs, two outputs {target}: {checked.fidelity}")
    assert all(f["correlation"] > 0.97 for f in checked.fidelity.values())


def test_bad_inputs_are_refused_clearly(classifier, digits, tmp_path):
  x, y = digits
  image, table = x["image"][:64], x["table"][:64]
  with pytest.raises(InvalidInputError, match=r"2 arrays, one per model input.*Received: 3"):
    keras_mpq.quantize(classifier, "8bit", data=[image, table, table], progress=False)
  with pytest.raises(InvalidInputError, match=r"unknown \['tabel'\]; missing \['table'\]"):
    keras_mpq.quantize(classifier, "8bit", data={"image": image, "tabel": table},
                       progress=False)
  with pytest.raises(InvalidInputError, match=r"same number of samples.*'image': 64, 'table': 32"):
    keras_mpq.quantize(classifier, "8bit", data=([image, table[:32]], y[:64]), progress=False)
  with pytest.raises(InvalidInputError, match=r"data\['table'\] inside the model's input range"):
    keras_mpq.quantize(classifier, "8bit", data=[image, table * 10], progress=False)
  plan = keras_mpq.QuantizationPlan.uniform(["conv", "fb", "fc", "logits"], 8)
  folded = keras_mpq.fold_batchnorm(classifier)
  path = tmp_path / "plain.tflite"
  keras_mpq.export_tflite(folded, path, plan, "mobile", calibration_data=[image, table],
                          deployment=False)
  with pytest.raises(InvalidInputError, match=r"2 arrays, one per input of this file.*"
                                               r"\['image', 'table'\].*Received: one ndarray"):
    runtime_lib.run_tflite(path, image)
  with pytest.raises(InvalidInputError, match=r"unknown \['img'\]; missing \['image'\]"):
    keras_mpq.validate_tflite(path, {"img": image, "table": table}, y[:64])
  with pytest.raises(InvalidInputError, match="same number of samples"):
    runtime_lib.run_tflite(path, [image, table[:10]])


def _real(x, y, n=256):
  """The first ``n`` training rows as ``(dict by input name, labels)``."""
  return {k: v[:n] for k, v in _split(x, "train").items()}, y[:n]


@pytest.mark.parametrize("target,runtime", [("mobile", "auto"), ("mcu", "tflm")])
def test_byte_budget_is_the_two_input_file(classifier, digits, tmp_path, target, runtime):
  x, y = digits
  test, y_test = _split(x, "test"), y[TRAIN:]
  folded = keras_mpq.fold_batchnorm(classifier)
  table = costs_lib.file_cost_table(folded, storage_lib.measure_storage(folded, target),
                                    bits=(2, 4, 8))
  high, low = (table.plan_cost(QuantizationPlan.uniform(table.layers, b), "bytes")
               for b in (8, 2))
  budget = int((high + low) / 2)  # below the 8-bit file: some layer must go lower
  result = keras_mpq.quantize(classifier, f"{budget}B", target=target, seed=0, progress=False,
                              data=_real(x, y))
  report = result.report
  assert report["within_budget"] and report["budget_binds"], report.get("budget_note")
  assert report["achieved"]["bytes"] <= budget < high
  path = tmp_path / f"budget_{target}.tflite"
  exported = result.export(path, target=target)
  assert exported.size == path.stat().st_size <= budget
  checked = keras_mpq.validate_tflite(path, {"table": test["table"], "image": test["image"]},
                                      y_test, reference=result.model, runtime=runtime)
  print(f"two inputs, {budget} B on {target}: file {exported.size} B, plan "
        f"{result.plan.weight_bits}, accuracy {checked.accuracy:.4f}, agreement "
        f"{checked.agreement:.4f}")
  assert checked.agreement >= 0.95


def test_ethos_u_export_of_two_inputs(classifier, digits, tmp_path):
  pytest.importorskip("ethosu.vela")
  x, y = digits
  test, y_test = _split(x, "test"), y[TRAIN:]
  result = keras_mpq.quantize(classifier, "4bit", target="ethos-u", seed=0, progress=False,
                              data=_real(x, y))
  path = tmp_path / "two_inputs_npu.tflite"
  exported = result.export(path, target="ethos-u")
  assert exported.target == "ethos-u" and exported.vela["npu_op_share"] == 1.0
  # the Vela file and its TFLite Micro companion keep the model's input order
  for file in (path, exported.mcu_path):
    reader = reader_lib.parse(file)
    shapes = [reader.shape(reader.sg.Inputs(i)) for i in range(reader.sg.InputsLength())]
    assert [s[1:] for s in shapes] == [(8, 8, 1), (16,)], file
  with pytest.raises(InvalidInputError, match="Vela-compiled"):
    runtime_lib.run_tflite(path, [test["image"][:2], test["table"][:2]])
  reversed_dict = {"table": test["table"], "image": test["image"]}
  checked = keras_mpq.validate_tflite(exported.mcu_path, reversed_dict, y_test,
                                      reference=result.model, runtime="tflm")
  keras_acc = _accuracy(result.model.predict(test, verbose=0), y_test)
  print(f"two inputs 4-bit ethos-u: keras {keras_acc:.4f}, mcu file {checked.accuracy:.4f}, "
        f"Vela {exported.vela['npu_ops']} NPU ops, {exported.size} B")
  assert checked.agreement >= 0.97 and checked.accuracy >= keras_acc - 0.03
