"""Byte budgets are file bytes per target (issue 15): storage rules, fixed part, checks.

Covers keras_mpq.plan.costs.file_cost_table / storage_bytes, export.measure_storage,
the exporter's TFLite Micro operator check, scale check, stripping, RAM limit
and deployment report, and quantize's budget errors.
"""

import numpy as np
import pytest

pytest.importorskip("ai_edge_quantizer")
pytest.importorskip("ai_edge_litert")
pytest.importorskip("tflite_micro")

import keras_mpq  # pylint: disable=g-import-not-at-top
from keras_mpq.export import storage as storage_lib
from keras_mpq.plan import costs as costs_lib
from keras_mpq.export import reader as reader_lib
from keras_mpq.export import runtime as runtime_lib
from keras_mpq.export import checks as export_checks_lib
from keras_mpq.export import convert as convert_lib
from keras_mpq.export import exporter as exporter_lib
from keras_mpq.export import flatbuffer as flatbuffer_lib
from keras_mpq.export import recipe as export_recipe_lib
from keras_mpq.export import targets as targets_lib
from keras_mpq.base.compat import keras, set_global_seed
from keras_mpq.base.errors import BudgetInfeasibleError, FileOverBudgetError, InvalidInputError, RamLimitError, UnsupportedModelError
from keras_mpq.base.types import LayerCost, QuantizationPlan


def _conv_dense(seed=0):
  set_global_seed(seed)
  inp = keras.Input((8, 8, 2), name="x")
  h = keras.layers.Conv2D(16, 3, activation="relu", name="conv")(inp)
  h = keras.layers.Flatten(name="flat")(h)
  out = keras.layers.Dense(10, name="fc")(h)
  model = keras.Model(inp, out)
  rng = np.random.default_rng(seed)
  model.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
  x = rng.normal(0, 1, (32, 8, 8, 2)).astype(np.float32)
  return model, x


@pytest.fixture(scope="module")
def conv_dense():
  return _conv_dense()


def test_storage_rules_per_target():
  c = LayerCost("fc", "Dense", n_params=1000, n_bias=10, n_scales=10, macs=1000)
  ops = [("FULLY_CONNECTED", 1000)]
  # mobile packs int4 fully connected; mcu stores it int8 (TFLite Micro cannot run it).
  quant = 4 * 10 + 8 * 10 + (4 + 4) * 10 + 8 * 10
  # (mobile: a non-int8 buffer is charged its data rounded up to 16 bytes, plus 16)
  assert storage_lib.storage_bytes(c, ops, 4, 8, "mobile") == 512 + 16 + quant
  # (the exact 4-bit integers are unpacked into int8 by a rebuild of the file,
  # charged as costs.REPACK_ALLOWANCE: 4 bits saves nothing over 8 there)
  # (mcu files align each buffer to 16 bytes: 1000 weights take 1008)
  assert storage_lib.storage_bytes(c, ops, 4, 8, "mcu") == 1008 + quant + storage_lib.REPACK_ALLOWANCE
  assert storage_lib.storage_bytes(c, ops, 8, 8, "mcu") == 1008 + quant
  # conv packs int4 on mcu too
  conv = [("CONV_2D", 1000)]
  assert storage_lib.storage_bytes(c, conv, 4, 8, "mcu") == 512 + quant
  # stripped zero points: one int64 per tensor instead of one per channel
  assert storage_lib.storage_bytes(c, ops, 8, 8, "mcu", zero_points_stripped=True) == \
      1008 + 4 * 10 + 8 + (4 + 4) * 10 + 8


def _two_inputs(seed=0):
  """A conv branch on ``image`` and a Dense branch on ``table``, joined: three weight layers."""
  set_global_seed(seed)
  image, table = keras.Input((8, 8, 2), name="image"), keras.Input((6,), name="table")
  h = keras.layers.Flatten(name="flat")(keras.layers.Conv2D(16, 3, activation="relu",
                                                            name="conv")(image))
  g = keras.layers.Dense(8, activation="relu", name="fb")(table)
  model = keras.Model([image, table], keras.layers.Dense(10, name="fc")(
      keras.layers.Concatenate(name="join")([h, g])))
  rng = np.random.default_rng(seed)
  model.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
  x = [rng.normal(0, 1, (32, 8, 8, 2)).astype(np.float32),
       rng.normal(0, 1, (32, 6)).astype(np.float32)]
  return model, x


@pytest.mark.parametrize("inputs", ["one", "two"])
@pytest.mark.parametrize("target", ["mobile", "mcu"])
def test_predicted_file_bytes_equal_written(tmp_path, conv_dense, target, inputs):
  model, x = conv_dense if inputs == "one" else _two_inputs()
  profile = storage_lib.measure_storage(model, target)
  table = costs_lib.file_cost_table(model, profile, bits=(2, 4, 8))
  assert table.target == target and table.fixed_bytes > 0
  layers = list(table.layers)
  assert layers == (["conv", "fc"] if inputs == "one" else ["conv", "fb", "fc"])
  for bits in ((4, 8, 2), (2, 4, 8), (8, 2, 4)):
    plan = QuantizationPlan(dict(zip(layers, bits)))
    r = exporter_lib.export_tflite(model, tmp_path / "m.tflite", plan, target, x,
                                 deployment=False)
    predicted = table.plan_cost(plan, "bytes")
    rebuilt = any(export_recipe_lib.decide(name, op, b, 8, target).unpack_int8
                  or export_recipe_lib.decide(name, op, b, 8, target).repack_int4
                  for name, b in plan.weight_bits.items()
                  for op in ("CONV_2D", "FULLY_CONNECTED"))
    if rebuilt:  # the model editor's rebuild is charged as an upper bound
      assert predicted - storage_lib.REPACK_ALLOWANCE <= r.size <= predicted, (target, bits)
    elif target == "mobile" and min(plan.weight_bits.values()) < 8:  # int4 buffers: an upper bound too
      slack = 2 * len(layers) * storage_lib.BUFFER_ALIGNMENT
      assert predicted - slack <= r.size <= predicted, (target, bits)
    else:
      assert r.size == pytest.approx(predicted, abs=1), (target, bits)
  # the fixed part is what the table's rows do not account for
  plan8 = QuantizationPlan.uniform(layers, 8)
  own = sum(table.layer_bytes(name, 8) for name in layers)
  assert table.plan_cost(plan8, "bytes") == pytest.approx(own + table.fixed_bytes)


def test_export_refuses_file_over_max_bytes(tmp_path, conv_dense):
  model, x = conv_dense
  path = tmp_path / "m.tflite"
  with pytest.raises(FileOverBudgetError) as e:
    exporter_lib.export_tflite(model, path, QuantizationPlan({"conv": 8, "fc": 8}), "mcu", x,
                             max_bytes=1000, deployment=False)
  assert e.value.size > 1000 and "nothing was written" in str(e.value)
  assert not path.exists()


def test_ethos_u_file_over_budget_names_the_budget_that_fits(tmp_path, conv_dense):
  # Vela encodes weights its own way, which the cost table does not predict; a
  # budget a few bytes short must say which budget fits, and write nothing.
  pytest.importorskip("ethosu.vela")
  model, x = conv_dense
  plan = QuantizationPlan({"conv": 8, "fc": 8})
  fits = exporter_lib.export_tflite(model, tmp_path / "fits.tflite", plan, "ethos-u", x,
                                    deployment=False)
  path = tmp_path / "m.tflite"
  with pytest.raises(FileOverBudgetError) as e:
    exporter_lib.export_tflite(model, path, plan, "ethos-u", x, max_bytes=fits.size - 1,
                               deployment=False)
  assert f"a budget of {fits.size} bytes fits this file" in str(e.value)
  assert not path.exists()


def test_mcu_stripping_saves_bytes_and_keeps_tflm_outputs(tmp_path, conv_dense):
  model, x = conv_dense
  plan = QuantizationPlan({"conv": 4, "fc": 8})
  full = exporter_lib.export_tflite(model, tmp_path / "full.tflite", plan, "mcu", x, strip=False)
  default = exporter_lib.export_tflite(model, tmp_path / "default.tflite", plan, "mcu", x)
  small = exporter_lib.export_tflite(model, tmp_path / "small.tflite", plan, "mcu", x, strip=True)
  # mcu strips everything by default; the names step keeps each weight tensor's layer name
  assert small.size == default.size < full.size
  assert default.deployment["steps"] == small.deployment["steps"]
  steps = small.deployment["steps"]
  assert small.size < full.size
  for step in ("names", "signatures", "metadata", "zero_points"):
    assert steps[step] > 0, steps
  assert steps["quantized_file"] - sum(v for k, v in steps.items() if k != "quantized_file") \
      == small.size
  a = runtime_lib.run_tflite(full.path, x[:8], runtime="tflm")
  b = runtime_lib.run_tflite(small.path, x[:8], runtime="tflm")
  np.testing.assert_array_equal(a, b)
  names = {r.name for r in reader_lib.inspect_tflite(small.path)}
  assert names == {"", "conv", "fc"}, names
  assert reader_lib.check_against_plan(small.path, plan) == []
  ops = reader_lib.layer_weight_ops(small.path, ["conv", "fc"])
  assert [e["op"] for e in ops["conv"]] == ["CONV_2D"] and len(ops["fc"]) == 1
  # LiteRT runs the stripped file too (zero points restored in memory)
  c = runtime_lib.run_tflite(small.path, x[:8], runtime="litert")
  np.testing.assert_allclose(c, b, atol=0.02 * float(np.ptp(b)))
  with pytest.raises(InvalidInputError, match="zero_points"):
    exporter_lib.export_tflite(model, tmp_path / "m.tflite", plan, "mobile", x,
                             strip=["zero_points"])


def test_deployment_report_arena_is_what_tflm_needs(tmp_path, conv_dense):
  model, x = conv_dense
  r = exporter_lib.export_tflite(model, tmp_path / "m.tflite", QuantizationPlan({"conv": 8, "fc": 8}),
                               "mcu", x)
  d = r.deployment
  assert d["flash_bytes"] == r.size == (tmp_path / "m.tflite").stat().st_size
  arena = d["arena_bytes"]
  assert arena > 0 and d["latency_ms"] > 0
  from tflite_micro.python.tflite_micro import runtime as tflm  # pylint: disable=g-import-not-at-top
  data = (tmp_path / "m.tflite").read_bytes()
  sample = np.zeros((1, 8, 8, 2), np.int8)
  interp = tflm.Interpreter.from_bytes(data, arena_size=arena)  # enough
  interp.set_input(sample, 0)
  interp.invoke()
  with pytest.raises(Exception):  # too little: TFLite Micro cannot allocate
    tflm.Interpreter.from_bytes(data, arena_size=arena // 2)
  assert "arena" in runtime_lib.format_deployment(d)


def test_ram_limit_refuses_before_writing(tmp_path, conv_dense):
  model, x = conv_dense
  path = tmp_path / "m.tflite"
  with pytest.raises(RamLimitError) as e:
    exporter_lib.export_tflite(model, path, QuantizationPlan({"conv": 8, "fc": 8}), "mcu", x,
                             ram=100)
  assert e.value.arena > 100 and "TFLite Micro" in str(e.value)
  assert not path.exists()
  with pytest.raises(InvalidInputError):
    exporter_lib.export_tflite(model, path, QuantizationPlan({"conv": 8}), "mcu", x, ram=-1)


def test_scale_check_names_bad_tensor(conv_dense, tmp_path):
  model, x = conv_dense
  r = exporter_lib.export_tflite(model, tmp_path / "m.tflite", QuantizationPlan({"conv": 8, "fc": 8}),
                               "mobile", x, deployment=False)
  data = (tmp_path / "m.tflite").read_bytes()
  assert export_checks_lib.check_scales(data) == []
  from tensorflow.lite.tools import flatbuffer_utils as fu  # pylint: disable=g-import-not-at-top
  m = fu.read_model_from_bytearray(bytearray(data))
  bad = next(t for t in m.subgraphs[0].tensors
             if t.quantization is not None and t.quantization.scale is not None
             and len(t.quantization.scale) > 1)
  bad.quantization.scale = np.array(bad.quantization.scale, np.float32)
  bad.quantization.scale[0] = np.nan
  bad.quantization.scale[1] = 0.0
  problems = export_checks_lib.check_scales(bytes(fu.convert_object_to_bytearray(m)))
  assert len(problems) == 1 and bad.name.decode() in problems[0]
  assert "NaN" in problems[0] and "zero-width" in problems[0]
  assert r.size > 0


def _gelu_model(seed=0):
  set_global_seed(seed)
  inp = keras.Input((16,), name="x")
  h = keras.layers.Dense(32, name="fc1")(inp)
  h = keras.layers.LayerNormalization(name="ln")(h)
  h = keras.layers.Activation("gelu", name="act")(h)
  out = keras.layers.Dense(4, name="out")(h)
  x = np.random.default_rng(seed).normal(0, 1, (64, 16)).astype(np.float32)
  return keras.Model(inp, out), x


def test_gelu_is_written_in_tanh_form_for_mcu(tmp_path):
  model, x = _gelu_model()
  plan = QuantizationPlan({"fc1": 8, "out": 8})
  r = exporter_lib.export_tflite(model, tmp_path / "m.tflite", plan, "mcu", x)
  ops = {o.op for o in reader_lib.list_ops(tmp_path / "m.tflite")}
  assert "GELU" not in ops and "LOGISTIC" in ops
  assert any("GELU" in n and "tanh form" in n for n in r.notes)
  y = runtime_lib.run_tflite(r.path, x, runtime="tflm")  # runs in TFLite Micro itself
  assert y.shape == (64, 4)
  # LayerNorm is integer on mcu: the file says so, per target.
  assert r.other_layers.get("ln") == "int8"
  mobile = exporter_lib.export_tflite(model, tmp_path / "f.tflite", plan, "mobile", x)
  assert "GELU" in {o.op for o in reader_lib.list_ops(mobile.path)}


def test_operator_without_tflm_kernel_is_refused_naming_layer(tmp_path):
  inp = keras.Input((16,), name="x")
  h = keras.layers.Dense(8, name="fc")(inp)
  h = keras.layers.Lambda(lambda t: tf_sign(t), name="sign_layer")(h)
  model = keras.Model(inp, keras.layers.Dense(3, name="out")(h))
  x = np.random.default_rng(0).normal(0, 1, (16, 16)).astype(np.float32)
  path = tmp_path / "m.tflite"
  with pytest.raises(UnsupportedModelError, match="SIGN.*sign_layer") as e:
    exporter_lib.export_tflite(model, path, QuantizationPlan({"fc": 8, "out": 8}), "mcu", x)
  assert "TFLite Micro" in str(e.value)
  assert not path.exists()


def tf_sign(t):
  from keras_mpq.base.compat import tf  # pylint: disable=g-import-not-at-top
  return tf.math.sign(t)


def test_gelu_refused_when_tanh_form_does_not_match(tmp_path, monkeypatch):
  model, x = _gelu_model()
  monkeypatch.setattr(convert_lib, "GELU_MATCH_TOLERANCE", 0.0)
  with pytest.raises(UnsupportedModelError, match="GELU in layers \\['act'\\]"):
    exporter_lib.export_tflite(model, tmp_path / "m.tflite", QuantizationPlan({"fc1": 8}),
                             "mcu", x)
  assert not (tmp_path / "m.tflite").exists()


def test_runtime_op_table_matches_tflm():
  """Ops the table says TFLite Micro has load there; GELU (absent) is refused by TFLM."""
  model, x = _gelu_model()
  float_bytes = convert_lib.to_float_tflite(model, 1)
  from tflite_micro.python.tflite_micro import runtime as tflm  # pylint: disable=g-import-not-at-top
  assert "GELU" not in targets_lib.TFLM_KERNELS
  assert "GELU" in {o.op for o in reader_lib.list_ops(float_bytes)}
  with pytest.raises(Exception):  # "Didn't find op for builtin opcode 'GELU'" on stderr
    tflm.Interpreter.from_bytes(float_bytes, arena_size=1 << 20)
  ok = convert_lib.to_float_tflite(convert_lib.replace_gelu(model)[0], 1)
  ops = {o.op for o in reader_lib.list_ops(ok)}
  assert ops <= targets_lib.TFLM_KERNELS
  tflm.Interpreter.from_bytes(ok, arena_size=1 << 20)


def test_quantize_refuses_budget_below_fixed_part(dataset):
  model, x = _conv_dense()
  y = np.argmax(model.predict(x, verbose=0), axis=1)
  with pytest.raises(BudgetInfeasibleError) as e:
    keras_mpq.quantize(model, "500B", data=(x, y), target="mcu", num_samples=16)
  assert "fixed part" in str(e.value) and e.value.smallest > 500


def test_quantize_file_budget_end_to_end(tmp_path):
  model, x = _conv_dense()
  y = np.argmax(model.predict(x, verbose=0), axis=1)
  profile = storage_lib.measure_storage(model, "mcu")
  table = costs_lib.file_cost_table(model, profile, bits=(2, 4, 8))
  all8 = table.plan_cost(QuantizationPlan({"conv": 8, "fc": 8}), "bytes")
  all_low = table.plan_cost(QuantizationPlan({"conv": 2, "fc": 2}), "bytes")
  budget = int((all8 + all_low) / 2)
  r = keras_mpq.quantize(model, f"{budget}B", data=(x, y), target="mcu", num_samples=16,
                         input_range=(float(x.min()), float(x.max())))
  assert r.report["within_budget"] and r.report["budget_binds"]
  assert r.report["achieved"]["bytes"] <= budget
  ex = r.export(tmp_path / "m.tflite", target="mcu")
  assert ex.size <= budget
  assert ex.size == pytest.approx(r.report["achieved"]["bytes"], abs=300)
  loose = keras_mpq.quantize(model, "1MB", data=(x, y), target="mcu", num_samples=16,
                             input_range=(float(x.min()), float(x.max())))
  assert not loose.report["budget_binds"] and "does not bind" in loose.report["budget_note"]
  assert str(int(all8)) in loose.report["budget_note"]


def test_mcu_file_with_large_weights_has_inline_buffers_and_right_tflm_outputs(tmp_path,
                                                                               monkeypatch):
  # ai-edge-quantizer puts the buffers of a model with >= 256 KiB of constants after
  # the flatbuffer, at offsets; the installed TFLite Micro then computes wrong outputs.
  set_global_seed(3)
  model = keras.Sequential([keras.Input((1024,)), keras.layers.Dense(300, name="fc1"),
                            keras.layers.Dense(10, name="fc2")])
  rng = np.random.default_rng(3)
  x = rng.normal(0, 1, (16, 1024)).astype(np.float32)
  plan = QuantizationPlan({"fc1": 8, "fc2": 8})
  r = exporter_lib.export_tflite(model, tmp_path / "m.tflite", plan, "mcu", x, strip=False,
                               deployment=False)
  reader = reader_lib.parse(r.path)
  assert not any(reader.model.Buffers(i).Offset() > 1 for i in range(reader.n_buffers))
  ref = model.predict(x[:8], verbose=0)
  got = runtime_lib.run_tflite(r.path, x[:8], runtime="tflm")
  assert np.abs(got - ref).max() < 0.05 * np.ptp(ref)
  # without inlining, the same export's file has offset buffers and TFLite Micro is off
  monkeypatch.setattr(exporter_lib, "inline_buffers", lambda b, **kwargs: b)
  raw = exporter_lib.export_tflite(model, tmp_path / "raw.tflite", plan, "mcu", x, strip=False,
                                 deployment=False)
  reader = reader_lib.parse(raw.path)
  assert any(reader.model.Buffers(i).Offset() > 1 for i in range(reader.n_buffers))
  bad = runtime_lib.run_tflite(raw.path, x[:8], runtime="tflm")
  assert np.abs(bad - ref).max() > 0.05 * np.ptp(ref)


def test_digits_cnn_mcu_files_within_three_byte_budgets(tmp_path):
  # the bench_deploy.py rows in small: a seeded separable CNN on digits, three budgets
  from keras_mpq import demo_data as demo_data_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq import model_zoo as model_zoo_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.types import SensitivityTable  # pylint: disable=g-import-not-at-top
  data = demo_data_lib.load_digits()
  set_global_seed(5)
  model = keras_mpq.fold_batchnorm(model_zoo_lib.separable_cnn(input_shape=data.x_train.shape[1:]))
  x = np.asarray(data.x_train[:16], np.float32)
  profile = storage_lib.measure_storage(model, "mcu")
  assert set(profile.strip) == set(flatbuffer_lib.STRIP_STEPS)  # all stripping is the mcu default
  table = costs_lib.file_cost_table(model, profile, bits=(2, 4, 8))
  by = {c.name: c for c in table.layer_costs}
  sens = SensitivityTable(table.layers, table.bits, np.array(
      [[by[n].n_params * 4.0 ** -b for b in table.bits] for n in table.layers]))
  low = float(table.matrix("bytes").min(axis=1).sum())
  high = float(table.plan_cost(QuantizationPlan({n: 8 for n in table.layers}), "bytes"))
  assert low < high
  plans = set()
  for frac in (0.1, 0.5, 0.9):
    budget = low + frac * (high - low)
    plan = keras_mpq.allocate(sens, keras_mpq.Budget.bytes(budget), table)
    plan = plan.plan if hasattr(plan, "plan") else plan
    plans.add(tuple(sorted(plan.weight_bits.items())))
    predicted = table.plan_cost(plan, "bytes")
    r = exporter_lib.export_tflite(model, tmp_path / "m.tflite", plan, "mcu", x,
                                 max_bytes=budget, deployment=False)
    assert r.size == (tmp_path / "m.tflite").stat().st_size <= budget
    assert predicted - storage_lib.REPACK_ALLOWANCE * len(table.layers) <= r.size <= predicted
  assert len(plans) >= 2  # the budgets bind differently
