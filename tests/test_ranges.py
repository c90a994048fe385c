"""Tests for keras_mpq.export.ranges: the rules on the exported file's activation ranges."""

import math

import numpy as np
import pytest

pytest.importorskip("ai_edge_quantizer")
pytest.importorskip("ai_edge_litert")

from keras_mpq.base.compat import keras, set_global_seed  # pylint: disable=g-import-not-at-top
from keras_mpq.base.types import QuantizationPlan
from keras_mpq.export import convert as convert_lib
from keras_mpq.export import exporter as exporter_lib
from keras_mpq.export import ranges as ranges_lib
from keras_mpq.export import reader as reader_lib
from keras_mpq.export import runtime as runtime_lib
from keras_mpq.export.targets import RUNTIME_OF_TARGET


def test_collapsed_activation_ranges_are_widened():
  # A tensor constant during calibration (a channel zeroed by 2-bit weights) must not
  # get a zero-width range: LiteRT then refuses the file (integer overflow check).
  calib = {"const": {"min": np.array(0.0, np.float32), "max": np.array(0.0, np.float32)},
           "normal": {"min": np.array(-1.0, np.float32), "max": np.array(3.0, np.float32)},
           "other": {"value": 1}}
  ranges_lib.widen_collapsed_ranges(calib)
  assert float(calib["const"]["max"] - calib["const"]["min"]) >= ranges_lib.MIN_RANGE_WIDTH - 1e-9
  assert float(calib["const"]["min"]) <= 0.0 <= float(calib["const"]["max"])
  assert float(calib["normal"]["min"]) == -1.0 and float(calib["normal"]["max"]) == 3.0
  assert calib["other"] == {"value": 1}


def test_softmax_margin_grows_with_classes():
  assert ranges_lib.softmax_margin(10) == pytest.approx(math.log(10240))
  assert ranges_lib.softmax_margin(1000) > ranges_lib.softmax_margin(10)


def _head(activation, units, seed=0, logits_out=False):
  set_global_seed(seed)
  inp = keras.Input((16,), name="x")
  hidden = keras.layers.Dense(32, activation="relu", name="fc1")(inp)
  logits = keras.layers.Dense(units, name="fc2")(hidden)
  out = keras.layers.Activation(activation, name="act")(logits)
  return keras.Model(inp, [logits, out] if logits_out else out)


def _logits_range(path):
  """(low, high) of the int8 tensor feeding the file's SOFTMAX or LOGISTIC."""
  reader = reader_lib.parse(path)
  op = next(o for o in reader.ops if o.op in ("SOFTMAX", "LOGISTIC"))
  t = reader.tensors[op.inputs[0]]
  q = t.Quantization()
  scale, zero = float(q.ScaleAsNumpy()[0]), int(q.ZeroPointAsNumpy()[0])
  return (-128 - zero) * scale, (127 - zero) * scale


def test_saturating_inputs_skip_logits_that_are_also_an_output():
  found = ranges_lib.saturating_inputs(reader_lib.parse(convert_lib.to_float_tflite(_head("softmax", 5))))
  assert [v["op"] for v in found.values()] == ["SOFTMAX"]
  assert list(found.values())[0]["classes"] == 5 and list(found.values())[0]["beta"] == 1.0
  both = reader_lib.parse(convert_lib.to_float_tflite(_head("softmax", 5, logits_out=True)))
  assert ranges_lib.saturating_inputs(both) == {}


def _export(model, x, path, target):
  plan = QuantizationPlan.uniform(["fc1", "fc2"], 8)
  return exporter_lib.export_tflite(model, path, plan, target, calibration_data=x).path


@pytest.mark.parametrize("target", ["mobile", "mcu"])
def test_far_logits_do_not_coarsen_the_softmax_input(tmp_path, monkeypatch, target):
  # One class the model never predicts (bias -60, as cross-entropy training
  # leaves rare classes, and as labeled synthesis pushes non-target logits):
  # min/max calibration gave the logits a range 6x their useful spread, so
  # the file's argmax parted from the Keras model's near decision
  # boundaries. Only logits within softmax_margin of a row's largest can
  # change the int8 output, so the low end rises to (smallest row max - margin).
  model = _head("softmax", 10)
  kernel, bias = model.get_layer("fc2").get_weights()
  bias[9] = -60.0
  model.get_layer("fc2").set_weights([kernel, bias])
  x = np.random.default_rng(0).normal(0, 1, (1200, 16)).astype(np.float32)
  cal, held = x[:200], x[200:]
  logits = keras.Model(model.input, model.get_layer("fc2").output).predict(cal, verbose=0)
  fitted = _export(model, cal, tmp_path / "fitted.tflite", target)
  low, high = _logits_range(fitted)
  expected_low = logits.max(-1).min() - ranges_lib.softmax_margin(10)
  assert logits.min() < expected_low - 20  # the rule had something to do
  assert low == pytest.approx(expected_low, abs=2 * (high - low) / 255)
  assert high == pytest.approx(logits.max(), abs=2 * (high - low) / 255)
  monkeypatch.setattr(ranges_lib, "fit_saturating_inputs", lambda *a, **k: {})
  plain = _export(model, cal, tmp_path / "plain.tflite", target)
  assert _logits_range(plain)[0] == pytest.approx(logits.min(), rel=0.02)
  ref = model.predict(held, verbose=0)
  runtime = RUNTIME_OF_TARGET[target]
  if runtime == "tflm":
    pytest.importorskip("tflite_micro")
  errors = {}
  for name, path in (("fitted", fitted), ("plain", plain)):
    out = runtime_lib.run_tflite(path, held, runtime=runtime)
    errors[name] = (np.mean(out.argmax(-1) != ref.argmax(-1)), np.mean(np.abs(out - ref)))
  assert errors["fitted"][0] <= errors["plain"][0]
  assert errors["fitted"][1] < 0.7 * errors["plain"][1]


def test_logistic_input_is_clipped_where_the_output_saturates(tmp_path, monkeypatch):
  model = _head("sigmoid", 3)
  kernel, bias = model.get_layer("fc2").get_weights()
  model.get_layer("fc2").set_weights([8 * kernel, bias])
  x = np.random.default_rng(1).normal(0, 1, (600, 16)).astype(np.float32)
  logits = keras.Model(model.input, model.get_layer("fc2").output).predict(x[:200], verbose=0)
  limit = ranges_lib.LOGISTIC_INPUT_LIMIT
  assert logits.min() < -limit - 4 and logits.max() > limit + 2
  fitted = _export(model, x[:200], tmp_path / "fitted.tflite", "mobile")
  low, high = _logits_range(fitted)
  step = (high - low) / 255
  assert -limit - step <= low < -6 and 6 < high <= limit + step
  monkeypatch.setattr(ranges_lib, "fit_saturating_inputs", lambda *a, **k: {})
  plain = _export(model, x[:200], tmp_path / "plain.tflite", "mobile")
  ref = model.predict(x[200:], verbose=0)
  err = {name: np.mean(np.abs(runtime_lib.run_tflite(p, x[200:], runtime="litert") - ref))
         for name, p in (("fitted", fitted), ("plain", plain))}
  assert err["fitted"] < 0.95 * err["plain"]
