"""Tests for keras_mpq.export.exporter: tensor types per target, sizes, runtimes, atomic writes."""

import json
import os
import pathlib

import numpy as np
import pytest

pytest.importorskip("ai_edge_quantizer")
pytest.importorskip("ai_edge_litert")

from keras_mpq.export import checks as export_checks_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import convert as convert_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import exporter as exporter_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import recipe as export_recipe_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import targets as targets_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import vela as vela_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.base import layers as layers_lib
from keras_mpq.export import reader as reader_lib
from keras_mpq.export import runtime as runtime_lib
from keras_mpq import validate as validate_lib
from keras_mpq.base.compat import keras, set_global_seed
from keras_mpq.base.types import FLOAT_BITS, QuantizationPlan
from keras_mpq.base.errors import InvalidInputError

PROBE = pathlib.Path(__file__).resolve().parents[1] / "export" / "targets_probe.json"

LAYERS = {
    "Conv2D": (lambda: keras.layers.Conv2D(8, 3, name="layer"), (8, 8, 2), "CONV_2D"),
    "DepthwiseConv2D": (lambda: keras.layers.DepthwiseConv2D(3, name="layer"), (8, 8, 4),
                        "DEPTHWISE_CONV_2D"),
    "Dense": (lambda: keras.layers.Dense(8, name="layer"), (16,), "FULLY_CONNECTED"),
    "Conv1D": (lambda: keras.layers.Conv1D(8, 3, name="layer"), (12, 3), "CONV_2D"),
}


def _single(kind, seed=0):
  set_global_seed(seed)
  make, shape, _ = LAYERS[kind]
  inp = keras.Input(shape, name="x")
  model = keras.Model(inp, make()(inp))
  rng = np.random.default_rng(seed)
  model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
  x = rng.normal(0, 1, (16,) + shape).astype(np.float32)
  return model, x


def _weight_dtype(path):
  ops = reader_lib.layer_weight_ops(path, ["layer"])["layer"]
  rows = {r.name: r for r in reader_lib.inspect_tflite(path)}
  return rows[ops[0]["weight_name"]].dtype, rows[ops[0]["weight_name"]].levels


def _expected(target, op, bits):
  if bits == FLOAT_BITS:
    return "FLOAT32" if target == "mobile" else "INT8"
  if bits <= 4 and targets_lib.supported(target, op, "int4", 8):
    return "INT4"
  return "INT8"


@pytest.mark.parametrize("target", ["mobile", "mcu"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("bits", [2, 4, 8, FLOAT_BITS])
def test_single_layer_tensor_types(tmp_path, target, kind, bits):
  model, x = _single(kind)
  plan = QuantizationPlan({"layer": bits})
  path = tmp_path / "m.tflite"
  result = exporter_lib.export_tflite(model, path, plan, target, calibration_data=x)
  dtype, levels = _weight_dtype(path)
  assert dtype == _expected(target, LAYERS[kind][2], bits)
  if bits != FLOAT_BITS:
    assert levels <= 2**bits - 1
    assert reader_lib.check_against_plan(path, plan) == []
  assert result.layers[0].stored_type == dtype
  assert result.size == path.stat().st_size
  if target == "mcu":
    assert runtime_lib.is_full_integer_batch1(path)


def test_int16_activations_mobile(tmp_path):
  model, x = _single("Conv2D")
  plan = QuantizationPlan({"layer": 8}, {"layer": 16})
  path = tmp_path / "a16.tflite"
  exporter_lib.export_tflite(model, path, plan, "mobile", calibration_data=x)
  types = {r.dtype for r in reader_lib.inspect_tflite(path) if not r.is_constant}
  assert "INT16" in types
  out = runtime_lib.run_tflite(path, x)
  ref = model.predict(x, verbose=0)
  assert np.max(np.abs(out - ref)) < 0.02 * np.ptp(ref)


def test_unsupported_int4_falls_back_and_says_so(tmp_path):
  model, x = _single("Dense")
  plan = QuantizationPlan({"layer": 4})
  result = exporter_lib.export_tflite(model, tmp_path / "m.tflite", plan, "mcu", calibration_data=x)
  layer = result.layers[0]
  assert layer.stored_type == "INT8" and layer.storage == "int8 holding 15 levels"
  assert "does not run on tflm" in layer.note
  assert any("does not run on tflm" in n for n in result.notes)


def test_three_bit_repacked_exact_grid(tmp_path):
  model, x = _single("Conv2D")
  plan = QuantizationPlan({"layer": 3})
  path = tmp_path / "m.tflite"
  result = exporter_lib.export_tflite(model, path, plan, "mobile", calibration_data=x)
  assert result.layers[0].storage.startswith("int4 holding")
  reader = reader_lib.parse(path)
  w = reader_lib.layer_weight_ops(reader, ["layer"])["layer"][0]["weight_tensor"]
  assert np.abs(reader.int_values(w)).max() <= 3  # the 3-bit grid, not the int4 one
  out = runtime_lib.run_tflite(path, x)
  snapped = convert_lib.snap_to_plan(model, plan).predict(x, verbose=0)
  assert np.max(np.abs(out - snapped)) < 0.02 * np.ptp(snapped)


def test_grid_matches_keras_quantizer(tmp_path):
  """ai-edge-quantizer's max-abs grid reproduces keras_mpq.quantization.configs' integers."""
  from keras_mpq.base import layers as layers_lib  # pylint: disable=g-import-not-at-top
  model, x = _single("Conv2D")
  for bits in (4, 8):
    path = tmp_path / f"m{bits}.tflite"
    exporter_lib.export_tflite(model, path, QuantizationPlan({"layer": bits}), "mobile",
                             calibration_data=x)
    reader = reader_lib.parse(path)
    w = reader_lib.layer_weight_ops(reader, ["layer"])["layer"][0]["weight_tensor"]
    stored = reader.int_values(w).reshape(reader.shape(w))  # (out, h, w, in)
    _, ints, _ = layers_lib.quantize_array(model.get_layer("layer").kernel.numpy(), bits,
                                           (0, 1, 2))
    assert np.array_equal(stored, np.transpose(ints, (3, 0, 1, 2)))


def test_mobile_on_mnist_matches_keras_and_shrinks(tmp_path, trained_cnn, small_data):
  from keras_mpq.quantization import access as access_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.quantization import fold as fold_lib  # pylint: disable=g-import-not-at-top
  x_cal, _, x_test, y_test = small_data
  model = fold_lib.fold_batchnorm(trained_cnn)
  names = [l for l in access_lib.plan_layers(model)]
  plan8 = QuantizationPlan.uniform(names, 8)
  plan4 = plan8.replace(**{n: 4 for n in names[1:-1]})
  r8 = exporter_lib.export_tflite(model, tmp_path / "w8.tflite", plan8, "mobile",
                                calibration_data=x_cal)
  r4 = exporter_lib.export_tflite(model, tmp_path / "w4.tflite", plan4, "mobile",
                                calibration_data=x_cal)
  assert r4.size < r8.size
  assert os.path.getsize(r4.path) < os.path.getsize(r8.path)
  for r, plan in ((r8, plan8), (r4, plan4)):
    v = validate_lib.validate_tflite(r.path, x_test, y_test,
                                 reference=convert_lib.snap_to_plan(model, plan))
    assert v.runtime == "litert"
    assert v.agreement >= 0.97
    assert v.accuracy >= 0.9


def test_mcu_runs_in_tflm(tmp_path, trained_cnn, small_data):
  pytest.importorskip("tflite_micro")
  from keras_mpq.quantization import access as access_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.quantization import fold as fold_lib  # pylint: disable=g-import-not-at-top
  x_cal, _, x_test, y_test = small_data
  model = fold_lib.fold_batchnorm(trained_cnn)
  names = access_lib.plan_layers(model)
  plan = QuantizationPlan.uniform(names, 8).replace(**{names[1]: 4, names[-2]: 4})
  r = exporter_lib.export_tflite(model, tmp_path / "mcu.tflite", plan, "mcu",
                               calibration_data=x_cal)
  storage = {l.layer: l.storage for l in r.layers}
  assert storage[names[1]] == "int4 packed"  # CONV_2D packs on TFLM
  assert storage[names[-2]] == "int8 holding 15 levels"  # FULLY_CONNECTED cannot
  micro = validate_lib.validate_tflite(r.path, x_test[:200], y_test[:200], runtime="tflm")
  lite = validate_lib.validate_tflite(r.path, x_test[:200], y_test[:200])
  assert micro.runtime == "tflm" and micro.accuracy >= 0.9
  assert abs(micro.accuracy - lite.accuracy) <= 0.01


def test_ethos_u_vela(tmp_path):
  pytest.importorskip("ethosu.vela")
  model, x = _single("Conv2D")
  r = exporter_lib.export_tflite(model, tmp_path / "npu.tflite", QuantizationPlan({"layer": 4}),
                               "ethos-u", calibration_data=x)
  assert r.vela["npu_op_share"] == 1.0
  assert r.vela["sram_kib"] > 0 and r.vela["total_cycles"] > 0 and r.vela["npu_cycles"] > 0
  # Vela's own weight totals (its compression shows on larger tensors: bench_deploy.py)
  assert r.vela["weights_bytes"] == r.layers[0].bytes and 0 < r.vela["encoded_weights_bytes"]
  assert r.layers[0].stored_type == "INT8"  # Vela crashes on INT4
  assert os.path.exists(r.mcu_path) and os.path.exists(r.path)
  assert runtime_lib.run_tflite(r.mcu_path, x[:2], runtime="tflm").shape[0] == 2
  with pytest.raises(InvalidInputError, match="Vela-compiled"):
    runtime_lib.run_tflite(r.path, x[:2])  # the NPU file does not run in LiteRT


def test_ethos_u_without_vela_is_clear(monkeypatch):
  monkeypatch.setattr(vela_lib.shutil, "which", lambda name: None)
  monkeypatch.setattr(vela_lib.os.path, "exists", lambda p: False)
  import builtins  # pylint: disable=g-import-not-at-top
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name.startswith("ethosu"):
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", fake_import)
  from keras_mpq.base.errors import MissingDependencyError  # pylint: disable=g-import-not-at-top
  with pytest.raises(MissingDependencyError, match="pip install 'ethos-u-vela"):
    vela_lib.compile_vela(b"")


def test_capability_table_agrees_with_probe():
  probe = json.loads(PROBE.read_text())
  for runtime, table in targets_lib.CAPABILITIES.items():
    for op, containers in table.items():
      for container, acts in containers.items():
        assert sorted(acts) == sorted(probe["capabilities"][runtime][op][container]), (
            runtime, op, container)


def test_bad_arguments_raise_clearly(tmp_path):
  model, x = _single("Dense")
  plan = QuantizationPlan({"layer": 8})
  with pytest.raises(InvalidInputError, match="target"):
    exporter_lib.export_tflite(model, tmp_path / "m.tflite", plan, "gpu", calibration_data=x)
  with pytest.raises(InvalidInputError, match="does not have"):
    exporter_lib.export_tflite(model, tmp_path / "m.tflite", QuantizationPlan({"nope": 8}),
                             calibration_data=x)
  with pytest.raises(InvalidInputError, match="shape"):
    exporter_lib.export_tflite(model, tmp_path / "m.tflite", plan, calibration_data=x[:, :3])
  with pytest.raises(InvalidInputError, match="calibration_data"):
    exporter_lib.export_tflite(model, tmp_path / "m.tflite", plan)
  assert not (tmp_path / "m.tflite").exists()


def test_write_is_atomic(tmp_path, monkeypatch):
  model, x = _single("Dense")
  path = tmp_path / "m.tflite"
  path.write_bytes(b"previous")

  def boom(*args, **kwargs):
    raise RuntimeError("killed")

  monkeypatch.setattr(exporter_lib, "_read_back", boom)
  with pytest.raises(RuntimeError):
    exporter_lib.export_tflite(model, path, QuantizationPlan({"layer": 8}), calibration_data=x)
  assert path.read_bytes() == b"previous"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite"]


# --------------------------------------------------------------------------- integer read-back


def _stored_ints(reader, entry):
  t = entry["weight_tensor"]
  return reader.int_values(t).reshape(reader.shape(t)), reader_lib.inspect_tflite(
      reader.data)[t].dtype


def test_exported_integers_equal_the_keras_models(tmp_path, trained_cnn, small_data):
  """GPTQ weights at 2/3/4/8 bits: the file holds the Keras model's integers, value for value.

  On 'mcu' the 4-bit Dense layer has no INT4 kernel: its INT4 integers are
  unpacked into INT8, not re-derived on the 8-bit grid.
  """
  from keras_mpq.quantization import access as access_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.quantization import apply as apply_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.quantization import fold as fold_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.quantization import optimize as optimize_lib  # pylint: disable=g-import-not-at-top
  x_cal = small_data[0][:64]
  folded = fold_lib.fold_batchnorm(trained_cnn)
  names = access_lib.plan_layers(folded)
  assert names == ["conv1", "conv2", "conv3", "fc1", "logits"]
  plan = QuantizationPlan(dict(zip(names, [2, 3, 8, 4, 4])))
  q = apply_lib.apply_plan(folded, plan, x_cal, fold_bn=False, weight_method="gptq")
  assert any(r["method"] == "gptq" for r in optimize_lib.weight_report(q))
  keras_ints = access_lib.weight_integers(q)
  baked = access_lib.bake(q)
  layout = {"CONV_2D": (3, 0, 1, 2), "FULLY_CONNECTED": (1, 0)}
  for target in ("mobile", "mcu"):
    path = tmp_path / f"{target}.tflite"
    exporter_lib.export_tflite(baked, path, plan, target, calibration_data=x_cal)
    reader = reader_lib.parse(path)
    ops = reader_lib.layer_weight_ops(reader, names)
    for name in names:
      (entry,) = ops[name]
      got, dtype = _stored_ints(reader, entry)
      want = np.transpose(keras_ints[name]["kernel"], layout[entry["op"]])
      multiple = 1
      if plan.weight_bits[name] == 2:  # {-1, 0, 1} stored as +-7 (INT4) or +-3 (INT8)
        multiple = 7 if dtype == "INT4" else 3
      np.testing.assert_array_equal(got, want * multiple, err_msg=f"{target} {name}")
    fc_dtype = _stored_ints(reader, ops["fc1"][0])[1]
    assert fc_dtype == ("INT4" if target == "mobile" else "INT8")


def test_export_fails_naming_the_tensor_whose_integers_differ(tmp_path, monkeypatch):
  from tflite_micro.tensorflow.lite.micro.compression import model_editor  # pylint: disable=g-import-not-at-top
  model, x = _single("Conv2D")
  original = export_recipe_lib.quantize_with_recipe

  def corrupted(*args, **kwargs):
    edited = model_editor.read(original(*args, **kwargs))
    for tensor in edited.subgraphs[0].tensors:
      if "layer" in (tensor.name or "") and tensor.array is not None and \
          tensor.array.dtype == np.int8 and tensor.array.ndim == 4:
        values = tensor.array.copy()
        values.flat[0] = -values.flat[0] if values.flat[0] else 1
        tensor.array = values
    return bytes(edited.build())

  monkeypatch.setattr(exporter_lib, "quantize_with_recipe", corrupted)
  path = tmp_path / "m.tflite"
  with pytest.raises(exporter_lib.KerasMpqError, match=r"layer 'layer'.*1 of \d+ integers differ"):
    exporter_lib.export_tflite(model, path, QuantizationPlan({"layer": 8}), "mobile",
                             calibration_data=x)
  assert not path.exists()


def _rescaled_stem(seed=0):
  """Rescaling(1/255) -> Conv (no bias) -> BN -> swish -> pool -> Dense, BN folded.

  EfficientNet's stem: the converter folds the scalar multiply into the
  convolution's kernel (and removes the Mul), so the file's scales are the
  Keras model's times 1/255 while its integers stay the same.
  """
  from keras_mpq.quantization import fold as fold_lib  # pylint: disable=g-import-not-at-top
  set_global_seed(seed)
  inp = keras.Input((12, 12, 3), name="x")
  h = keras.layers.Rescaling(1 / 255.0, name="rescale")(inp)
  h = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(h)
  h = keras.layers.BatchNormalization(name="stem_bn")(h)
  h = keras.layers.Activation("swish")(h)
  h = keras.layers.GlobalAveragePooling2D()(h)
  model = keras.Model(inp, keras.layers.Dense(4, name="head")(h))
  rng = np.random.default_rng(seed)
  weights = []
  for w in model.weights:
    values = rng.normal(0, 0.5, w.shape)
    if "variance" in w.name:  # BN statistics must be positive
      values = values ** 2 + 0.1
    weights.append(values.astype(np.float32))
  model.set_weights(weights)
  x = rng.uniform(0, 255, (32, 12, 12, 3)).astype(np.float32)
  return fold_lib.fold_batchnorm(model), x


@pytest.mark.parametrize("target", ["mobile", "mcu"])
def test_scalar_folded_into_a_kernel_by_the_converter_exports(tmp_path, target):
  model, x = _rescaled_stem()
  float_bytes = convert_lib.to_float_tflite(model)
  reader = reader_lib.parse(float_bytes)
  (entry,) = reader_lib.layer_weight_ops(reader, ["stem_conv"])["stem_conv"]
  kernel = model.get_layer("stem_conv").get_weights()[0]
  assert reader.ops[0].op == "CONV_2D"  # no MUL before it: the Rescaling is inside the conv
  values = reader.float_values(entry["weight_tensor"])
  factor = export_checks_lib.converter_factor(values, kernel)
  np.testing.assert_allclose(factor, 1 / 255.0, rtol=1e-5)
  perturbed = kernel.copy()
  perturbed.flat[0] *= 1.5  # no longer a scalar multiple: no factor is assumed
  assert export_checks_lib.converter_factor(values, perturbed) == 1.0

  plan = QuantizationPlan({"stem_conv": 4, "head": 8})
  path = tmp_path / f"{target}.tflite"
  exporter_lib.export_tflite(model, path, plan, target, calibration_data=x)
  q = reader_lib.parse(path)
  (qentry,) = reader_lib.layer_weight_ops(q, ["stem_conv"])["stem_conv"]
  stored = q.tensors[qentry["weight_tensor"]].Quantization().ScaleAsNumpy()
  snapped = convert_lib.snap_to_plan(model, plan).get_layer("stem_conv").get_weights()[0]
  _, _, keras_scales = layers_lib.quantize_array(snapped, 4, (0, 1, 2))
  np.testing.assert_allclose(np.sort(stored), np.sort(np.ravel(keras_scales)) / 255.0, rtol=1e-5)
  want = model.predict(x, verbose=0)
  got = runtime_lib.run_tflite(str(path), x, runtime="tflm" if target == "mcu" else "auto")
  # 4-bit stem: close to the float model, not equal; a lost 1/255 would be off by ~255x.
  assert np.corrcoef(want.ravel(), np.asarray(got, np.float64).ravel())[0, 1] > 0.9


def test_large_model_4bit_dense_is_unpacked_for_tflm(tmp_path):
  """A model with over 256 KiB of constants: ai-edge-quantizer writes its buffers
  after the flatbuffer, which the model editor did not see, so a 4-bit Dense stayed
  INT4 on 'mcu' and TFLite Micro refused the file (MobileNetV2 at 32x32)."""
  set_global_seed(0)
  inp = keras.Input((1024,), name="x")
  h = keras.layers.Dense(96, activation="relu", name="fc")(inp)
  h = keras.layers.Dense(3200, activation="relu", name="big")(h)  # 300 KiB at 8 bits
  model = keras.Model(inp, keras.layers.Dense(10, name="out")(h))
  x = np.random.default_rng(0).normal(0, 1, (16, 1024)).astype(np.float32)
  path = tmp_path / "m.tflite"
  exporter_lib.export_tflite(model, path, QuantizationPlan({"fc": 4, "big": 8, "out": 8}),
                           "mcu", calibration_data=x)
  reader = reader_lib.parse(path)
  dtypes = {e["op"]: _stored_ints(reader, e)[1]
            for e in reader_lib.layer_weight_ops(reader, ["fc"])["fc"]}
  assert dtypes == {"FULLY_CONNECTED": "INT8"}
  out = runtime_lib.run_tflite(str(path), x[:4], runtime="tflm")
  np.testing.assert_allclose(out, model.predict(x[:4], verbose=0), atol=0.5)


def _pooled_model(pool, seed=0):
  """Conv -> ReLU -> AveragePooling2D(pool) on 6x4 -> Dense: a keyword-spotter tail."""
  set_global_seed(seed)
  inp = keras.Input((6, 4, 2), name="x")
  h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv")(inp)
  h = keras.layers.AveragePooling2D(pool, name="pool")(h)
  h = keras.layers.Flatten()(h)
  model = keras.Model(inp, keras.layers.Dense(4, name="fc")(h))
  rng = np.random.default_rng(seed)
  return model, rng.normal(0, 1, (64, 6, 4, 2)).astype(np.float32)


@pytest.mark.parametrize("target", ["mobile", "mcu"])
def test_whole_input_average_pool_is_written_as_mean(tmp_path, target):
  # TFLite's AVERAGE_POOL_2D keeps its input's scale; a pool over the whole input is a
  # mean, and MEAN gives the pooled features a scale of their own, as Keras does.
  model, x = _pooled_model((6, 4))
  plan = QuantizationPlan.uniform(["conv", "fc"], 8)
  r = exporter_lib.export_tflite(model, tmp_path / "m.tflite", plan, target, calibration_data=x)
  reader = reader_lib.parse(r.path)
  names = [op.op for op in reader.ops]
  assert "MEAN" in names and "AVERAGE_POOL_2D" not in names
  assert any("pool" in n and "MEAN" in n for n in r.notes)
  if target == "mobile":  # LiteRT reads the scales (a stripped mcu file: TFLite Micro only)
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
    mean = next(op for op in reader.ops if op.op == "MEAN")
    scale = {d["index"]: d["quantization"][0]
             for d in Interpreter(model_path=str(r.path)).get_tensor_details()}
    pooled = keras.Model(model.inputs, model.get_layer("pool").output).predict(x, verbose=0)
    conv = keras.Model(model.inputs, model.get_layer("conv").output).predict(x, verbose=0)
    # Its own scale, fitted to the pooled values, finer than the conv output's.
    assert scale[mean.outputs[0]] < scale[mean.inputs[0]]
    assert scale[mean.outputs[0]] == pytest.approx(
        (pooled.max() - min(pooled.min(), 0)) / 255, rel=0.05)
    assert scale[mean.inputs[0]] == pytest.approx(
        (conv.max() - min(conv.min(), 0)) / 255, rel=0.05)
  out = runtime_lib.run_tflite(r.path, x, runtime="tflm" if target == "mcu" else "auto")
  ref = convert_lib.snap_to_plan(model, plan).predict(x, verbose=0)
  assert np.max(np.abs(out - ref)) < 0.05 * np.ptp(ref)


def test_partial_average_pool_stays_a_pool(tmp_path):
  model, x = _pooled_model((2, 2))
  assert convert_lib.global_pools(model) == (model, [])
  plan = QuantizationPlan.uniform(["conv", "fc"], 8)
  r = exporter_lib.export_tflite(model, tmp_path / "m.tflite", plan, "mobile",
                                 calibration_data=x)
  assert "AVERAGE_POOL_2D" in [op.op for op in reader_lib.parse(r.path).ops]


def _softmax_head(classes, seed=0):
  set_global_seed(seed)
  inp = keras.Input((64,), name="x")
  model = keras.Model(inp, keras.layers.Dense(classes, activation="softmax", name="fc")(inp))
  return model, np.random.default_rng(seed).uniform(-1, 1, (32, 64)).astype(np.float32)


def test_softmax_over_many_classes_is_float_on_tflm(tmp_path):
  # TFLite Micro's int8 SOFTMAX aborted the process on 1000 near-equal logits
  # (MobileNetV2 with 1000 classes); wider than 256 classes it is written in float.
  pytest.importorskip("tflite_micro")
  model, x = _softmax_head(1000)
  plan = QuantizationPlan.uniform(["fc"], 8)
  r = exporter_lib.export_tflite(model, tmp_path / "m.tflite", plan, "mcu", calibration_data=x)
  assert any("softmax over more than 256 classes" in n for n in r.notes)
  reader = reader_lib.parse(r.path)
  softmax = next(op for op in reader.ops if op.op == "SOFTMAX")
  assert reader.type_name(softmax.outputs[0]) == "FLOAT32"
  out = runtime_lib.run_tflite(r.path, x[:4], runtime="tflm")
  ref = model.predict(x[:4], verbose=0)
  assert out.dtype == np.float32 and np.allclose(out.sum(-1), 1, atol=1e-3)
  assert np.max(np.abs(out - ref)) < 0.1 * ref.max()
  # Narrower softmaxes, and every softmax on 'mobile', stay int8.
  model, x = _softmax_head(100)
  r = exporter_lib.export_tflite(model, tmp_path / "n.tflite", plan, "mcu", calibration_data=x)
  reader = reader_lib.parse(r.path)
  softmax = next(op for op in reader.ops if op.op == "SOFTMAX")
  assert reader.type_name(softmax.outputs[0]) == "INT8"
  assert export_recipe_lib.wide_softmaxes(reader_lib.parse(
      convert_lib.to_float_tflite(_softmax_head(1000)[0])), "mobile") == []
