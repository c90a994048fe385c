"""Tests for keras_mpq.export.runtime: runtimes, quantized I/O, bad inputs, latency."""

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
pytest.importorskip("ai_edge_quantizer")

from keras_mpq import model_zoo as model_zoo_lib
from keras_mpq.export import convert as convert_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import exporter as exporter_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import runtime as runtime_lib
from keras_mpq import validate as validate_lib
from keras_mpq.base.compat import keras, set_global_seed
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.types import QuantizationPlan


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  model = model_zoo_lib.tiny_conv_dense(seed=0)
  x = np.random.default_rng(0).random((32, 8, 8, 1)).astype(np.float32)
  d = tmp_path_factory.mktemp("validate")
  plan = QuantizationPlan({"conv": 8, "fc": 8})
  mobile = exporter_lib.export_tflite(model, d / "mobile.tflite", plan, "mobile", calibration_data=x)
  mcu = exporter_lib.export_tflite(model, d / "mcu.tflite", plan, "mcu", calibration_data=x)
  exporter_lib.export_tflite(model, d / "mobile_fc4.tflite", plan.replace(fc=4), "mobile",
                           calibration_data=x)
  float_path = d / "float.tflite"
  float_path.write_bytes(convert_lib.to_float_tflite(model))
  return model, x, mobile.path, mcu.path, str(float_path)


def test_litert_matches_keras(exported):
  model, x, mobile, _, _ = exported
  ref = model.predict(x, verbose=0)
  y = ref.argmax(1)
  r = validate_lib.validate_tflite(mobile, x, y, reference=model)
  assert r.runtime == "litert" and r.n == len(x)
  assert r.agreement >= 0.9 and r.accuracy == r.agreement
  assert r.max_abs_error < 0.05 * np.ptp(ref)
  assert 0 < r.mean_abs_error <= r.max_abs_error


def test_float_file_and_per_layer_errors(exported):
  model, x, _, _, float_path = exported
  r = validate_lib.validate_tflite(float_path, x, reference=model, per_layer=True, float_model=model)
  assert r.max_abs_error < 1e-4 and r.agreement == 1.0
  assert set(r.layer_errors) == {"conv", "fc"}
  assert max(r.layer_errors.values()) < 1e-4


def test_batch1_file_loops_and_tflm(exported):
  pytest.importorskip("tflite_micro")
  model, x, _, mcu, _ = exported
  assert runtime_lib.is_full_integer_batch1(mcu)
  lite = runtime_lib.run_tflite(mcu, x[:5])
  micro = runtime_lib.run_tflite(mcu, x[:5], runtime="tflm")
  assert lite.shape == micro.shape == (5, 4)
  ref = model.predict(x[:5], verbose=0)
  assert np.max(np.abs(micro - ref)) < 0.05 * np.ptp(ref)
  assert np.max(np.abs(micro - lite)) < 0.05 * np.ptp(ref)


def test_mobile_file_refused_by_tflm(exported):
  pytest.importorskip("tflite_micro")
  _, x, mobile, _, _ = exported
  assert not runtime_lib.is_full_integer_batch1(mobile)
  fc4 = mobile.replace("mobile.tflite", "mobile_fc4.tflite")  # packed INT4 FULLY_CONNECTED
  with pytest.raises(InvalidInputError, match="TFLite Micro could not allocate"):
    runtime_lib.run_tflite(fc4, x[:2], runtime="tflm")


def test_bad_data_raises_clearly(exported):
  _, x, mobile, _, _ = exported
  with pytest.raises(InvalidInputError, match="shape"):
    validate_lib.validate_tflite(mobile, x[:, :4])
  with pytest.raises(InvalidInputError, match="batch axis"):
    validate_lib.validate_tflite(mobile, x[0])
  with pytest.raises(InvalidInputError, match="numeric"):
    validate_lib.validate_tflite(mobile, np.array([["a"]]))
  with pytest.raises(InvalidInputError, match="one label per input"):
    validate_lib.validate_tflite(mobile, x, y=np.zeros(3))
  with pytest.raises(InvalidInputError, match="runtime"):
    validate_lib.validate_tflite(mobile, x, runtime="gpu")


def test_data_on_another_scale_is_refused_not_clipped(exported):
  # The files' int8 inputs hold about [0, 1]; pixels 0..255 would be clipped to
  # 1.0 and give near-constant outputs that look like a working model.
  model, x, mobile, mcu, _ = exported
  runtimes = [(mobile, "litert"), (mcu, "litert")]
  try:
    import tflite_micro  # pylint: disable=g-import-not-at-top,unused-import
    runtimes.append((mcu, "tflm"))
  except ImportError:
    pass
  for path, runtime in runtimes:
    with pytest.raises(InvalidInputError, match=r"inside the file's input range \[0, 0?\.99"
                       r".*Received: inputs in \[.*, 25\d"):
      runtime_lib.run_tflite(path, x[:4] * 255.0, runtime=runtime)
    with pytest.raises(InvalidInputError, match="Rescale them"):
      validate_lib.validate_tflite(path, x[:4] * 255.0, reference=model, runtime=runtime)
    # A little outside the range is clipping, as the file does with any data.
    out = runtime_lib.run_tflite(path, np.clip(x[:4] * 1.1, 0, None), runtime=runtime)
    assert out.shape == (4, 4)


def test_corrupted_files_raise_clearly(exported, tmp_path):
  _, x, mobile, _, _ = exported
  data = open(mobile, "rb").read()
  cases = {"random": np.random.default_rng(1).bytes(len(data)),
           "truncated": data[: len(data) // 2], "empty": b""}
  for name, blob in cases.items():
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(blob)
    with pytest.raises(InvalidInputError):
      validate_lib.validate_tflite(path, x)
    with pytest.raises(InvalidInputError):
      runtime_lib.benchmark_latency(path, runs=2)


def test_benchmark_latency(exported):
  _, _, mobile, _, _ = exported
  ms = runtime_lib.benchmark_latency(mobile, runs=10, threads=1)
  assert 0 < ms < 1000


def test_a_native_crash_of_tflite_micro_is_an_error_not_the_end_of_python(monkeypatch, tmp_path):
  # issue 30: TFLite Micro aborted inside invoke on MobileNetV2 at 224x224, killing
  # the caller's process; it now runs in a child and a crash is an error.
  import os as os_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.export import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(runtime_lib, "_run_tflm_here", lambda data, x: os_lib.abort())
  monkeypatch.setattr(runtime_lib, "_check_references", lambda reader: None)
  monkeypatch.setattr(runtime_lib.reader_lib, "parse", lambda data: None)
  with pytest.raises(InvalidInputError, match=r"TFLite Micro crashed .*signal 6"):
    runtime_lib.run_tflite(b"TFL3" * 8, np.zeros((1, 4), np.float32), runtime="tflm")
