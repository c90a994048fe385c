"""Tests for keras_mpq.export.reader: parsing, levels, plan checks, damaged files."""

import numpy as np
import pytest

pytest.importorskip("tflite")

from keras_mpq import model_zoo as model_zoo_lib
from keras_mpq.export import exporter as exporter_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import reader as reader_lib
from keras_mpq.base.compat import keras, set_global_seed
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.types import QuantizationPlan


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  pytest.importorskip("ai_edge_quantizer")
  model = model_zoo_lib.tiny_conv_dense(seed=0)
  x = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)
  d = tmp_path_factory.mktemp("inspect")
  plan = QuantizationPlan({"conv": 2, "fc": 8})
  exporter_lib.export_tflite(model, d / "m.tflite", plan, "mobile", calibration_data=x)
  return d / "m.tflite", plan


def test_rows_report_real_levels(files):
  path, _ = files
  rows = {r.name: r for r in reader_lib.inspect_tflite(path)}
  ops = reader_lib.layer_weight_ops(path, ["conv", "fc"])
  conv = rows[ops["conv"][0]["weight_name"]]
  fc = rows[ops["fc"][0]["weight_name"]]
  assert conv.dtype == "INT4" and conv.levels == 3 and conv.bits_used == 2
  assert conv.bytes == (8 * 3 * 3 + 1) // 2
  assert fc.dtype == "INT8" and 3 < fc.levels <= 255 and fc.is_constant
  first_output = reader_lib.list_ops(path)[0].outputs[0]
  activation = next(r for r in rows.values() if r.index == first_output)
  assert not activation.is_constant and activation.levels is None


def test_check_against_plan(files):
  path, plan = files
  assert reader_lib.check_against_plan(path, plan) == []
  stricter = plan.replace(fc=4)
  problems = reader_lib.check_against_plan(path, stricter)
  assert len(problems) == 1 and problems[0].startswith("fc:")


def test_format_rows(files):
  path, _ = files
  rows = reader_lib.inspect_tflite(path)
  text = reader_lib.format_rows(rows, file_size=path.stat().st_size)
  assert "INT4" in text and "constant tensor data" in text
  total = text.splitlines()[-1]
  assert "file size" in total and total.split()[-1] == str(path.stat().st_size)


def test_int32_biases_have_no_bits(files):
  """Biases are stored as INT32 at full width: a 'bits' value for them meant nothing."""
  path, _ = files
  rows = reader_lib.inspect_tflite(path)
  biases = [r for r in rows if r.is_constant and r.dtype == "INT32" and len(r.shape) == 1]
  assert biases  # conv and fc each have one
  assert all(r.bits_used is None and r.levels is None for r in biases)
  text = reader_lib.format_rows(rows)
  for r in biases:
    line = next(l for l in text.splitlines() if l.startswith(r.name[:45]))
    assert line.rstrip().endswith(str(r.bytes)), line


def test_unpack_int4_roundtrip():
  from ai_edge_quantizer.transformations import transformation_utils  # pylint: disable=g-import-not-at-top
  values = np.arange(-8, 8, dtype=np.int8).repeat(3)
  packed = transformation_utils.pack_data(4, values.view(np.uint8))
  assert reader_lib.unpack_int4(packed, values.size).tolist() == values.tolist()


def test_name_matching_is_by_segment():
  assert reader_lib.name_has_layer("m/conv1/Relu;m/conv1/Conv2D", "conv1")
  assert not reader_lib.name_has_layer("m/conv1_bn/Relu", "conv1")


def test_damaged_files_raise_clearly(tmp_path, files):
  path, _ = files
  data = path.read_bytes()
  (tmp_path / "random.tflite").write_bytes(np.random.default_rng(0).bytes(4000))
  (tmp_path / "trunc.tflite").write_bytes(data[: len(data) // 3])
  for name in ("random.tflite", "trunc.tflite"):
    with pytest.raises(InvalidInputError):
      reader_lib.inspect_tflite(tmp_path / name)
  with pytest.raises(InvalidInputError, match="existing"):
    reader_lib.inspect_tflite(tmp_path / "missing.tflite")
