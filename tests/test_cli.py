"""The keras-mpq command: a real run on a .keras file saved by plain Keras 3, and its errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from keras_mpq import cli as cli_lib
from keras_mpq.base.errors import InvalidInputError

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "keras_mpq.cli", *args], capture_output=True,
                        text=True, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def keras3_file(tmp_path_factory, dataset):
  """A small CNN built, trained (2 epochs on 4000 real images, ~91%) and saved by plain Keras 3."""
  import keras  # Keras 3, as a user has it
  keras.utils.set_random_seed(0)
  model = keras.Sequential([
      keras.Input((28, 28, 1)),
      keras.layers.Conv2D(8, 3, activation="relu"),
      keras.layers.MaxPooling2D(),
      keras.layers.Conv2D(16, 3, activation="relu"),
      keras.layers.MaxPooling2D(),
      keras.layers.Flatten(),
      keras.layers.Dense(10),
  ])
  model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(dataset.x_train[:4000], dataset.y_train[:4000], epochs=2, verbose=0)
  path = tmp_path_factory.mktemp("k3") / "user_model.keras"
  model.save(path)
  return path


def test_quantize_keras3_file_end_to_end(keras3_file, tmp_path, dataset):
  data = tmp_path / "test.npz"
  np.savez(data, x=dataset.x_test[:300], y=dataset.y_test[:300])
  out = tmp_path / "out"
  proc = _run("quantize", str(keras3_file), "--budget", "4bit", "--target", "mobile",
              "--out", str(out), "--samples", "32", "--rounds", "1",
              "--eval_data", str(data), "--noprogress")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("model_mobile.tflite", "plan.json", "sensitivity.json", "report.json",
               "sensitivity.png", "bits.png", "pareto.png"):
    assert (out / name).stat().st_size > 0, name
  report = json.loads((out / "report.json").read_text())
  assert report["within_budget"]
  assert report["validation"]["accuracy"] > 0.8  # ~91% float; LiteRT on real test images
  assert "w_bits" in proc.stdout and "exported" in proc.stdout
  assert "e+" not in proc.stdout and "KiB" in proc.stdout  # bytes people read
  assert re.search(r"accuracy 0\.\d{3},", proc.stdout), proc.stdout  # three digits

  proc = _run("inspect", str(out / "model_mobile.tflite"), "--plan", str(out / "plan.json"))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "plan check passed" in proc.stdout

  proc = _run("validate", str(out / "model_mobile.tflite"), "--data", str(data))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "accuracy" in proc.stdout


@pytest.mark.parametrize("args,match", [
    (["quantize", "/nonexistent/model.keras", "--budget", "4bit", "--out", "OUT"], "not found|No such|does not exist"),
    (["quantize", "MODEL", "--out", "OUT"], "--budget"),
    (["quantize", "MODEL", "--budget", "4 parsecs", "--out", "OUT"], "budget unit"),
    (["quantize", "MODEL", "--budget", "4bit", "--out", "/proc/nope"], "output directory"),
    (["quantize", "MODEL", "--budget", "4bit", "--out", "OUT", "--pin", "conv1"], "--pin"),
    (["validate", "GARBAGE", "--data", "DATA"], "tflite|TFLite|flatbuffer"),
    (["inspect", "GARBAGE"], "tflite|TFLite|flatbuffer"),
    (["frobnicate", "x"], "expected a command"),
])
def test_errors_are_one_line_and_exit_2(args, match, keras3_file, tmp_path, capsys):
  garbage = tmp_path / "garbage.tflite"
  garbage.write_bytes(os.urandom(300))
  data = tmp_path / "d.npz"
  np.savez(data, x=np.zeros((2, 28, 28, 1), np.float32), y=np.zeros(2, np.int64))
  subst = {"MODEL": str(keras3_file), "OUT": str(tmp_path / "o"), "GARBAGE": str(garbage),
           "DATA": str(data)}
  argv = ["keras-mpq"] + [subst.get(a, a) for a in args]
  code = cli_lib.main(argv)
  err = capsys.readouterr().err
  assert code == 2
  assert "Traceback" not in err
  assert "error" in err
  assert re.search(match, err), err


OWN_FLAGS = {"quantize": ["--budget", "--target", "--out", "--data", "--eval_data", "--pin",
                          "--seed"],
             "validate": ["--data", "--runtime"], "inspect": ["--plan"]}


@pytest.mark.parametrize("command", sorted(OWN_FLAGS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_each_command_has_its_own_help(command, flag, capsys):
  assert cli_lib.main(["keras-mpq", command, flag]) == 0
  text = capsys.readouterr().out
  assert text.startswith(f"usage: keras-mpq {command}")
  for own in OWN_FLAGS[command]:
    assert own in text, own
  for other, flags in OWN_FLAGS.items():
    for foreign in set(flags) - set(OWN_FLAGS[command]):
      assert foreign + " " not in text, (command, foreign)  # only its own flags
  assert "example:\n  keras-mpq " + command in text
  assert "general:" in text and "--verbose" in text
  assert "--helpfull" not in text and "--logtostderr" not in text  # no absl flags


def test_top_level_help_lists_the_commands(capsys):
  for argv in (["--help"], ["-h"]):
    assert cli_lib.main(["keras-mpq", *argv]) == 0
    text = capsys.readouterr().out
    for command in OWN_FLAGS:
      assert f"    {command}  " in text
  assert cli_lib.main(["keras-mpq"]) == 2  # no command: the same help, as a usage error
  assert "quantize" in capsys.readouterr().err


def test_help_in_a_real_process_exits_0():
  proc = _run("quantize", "--help", timeout=120)
  assert proc.returncode == 0 and "--budget" in proc.stdout and proc.stderr == ""


def test_a_run_prints_no_tensorflow_start_up_lines(tmp_path):
  """Before: ~8 lines, among them 'failed call to cuInit: INTERNAL: CUDA error'."""
  import keras_mpq  # pylint: disable=g-import-not-at-top
  from keras_mpq import model_zoo as model_zoo_lib  # pylint: disable=g-import-not-at-top
  path = tmp_path / "m.tflite"
  x = np.random.default_rng(0).random((8, 8, 8, 1)).astype(np.float32)
  keras_mpq.export_tflite(model_zoo_lib.tiny_conv_dense(seed=0), path,
                          keras_mpq.QuantizationPlan({"conv": 8, "fc": 8}), "mobile",
                          calibration_data=x)
  data = tmp_path / "d.npz"
  np.savez(data, x=x, y=np.arange(8) % 4)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "ABSL", "GLOG"))}
  for argv in (["inspect", str(path)], ["validate", str(path), "--data", str(data)]):
    proc = subprocess.run([sys.executable, "-m", "keras_mpq.cli", *argv], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == "", proc.stderr[-2000:]  # LiteRT's XNNPACK line included


def test_bad_ram_flag_is_one_line_error(keras3_file, tmp_path, capsys):
  argv = ["keras-mpq", "quantize", str(keras3_file), "--budget", "4bit", "--out",
          str(tmp_path / "o"), "--ram", "lots"]
  code = cli_lib.main(argv)
  err = capsys.readouterr().err
  assert code == 2 and "--ram" in err and "Traceback" not in err


def test_inspect_deploy_view(tmp_path, capsys):
  pytest.importorskip("tflite_micro")
  from keras_mpq.export import exporter as exporter_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.compat import keras  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.types import QuantizationPlan  # pylint: disable=g-import-not-at-top
  inp = keras.Input((12,))
  model = keras.Model(inp, keras.layers.Dense(4, name="fc")(inp))
  x = np.random.default_rng(0).normal(0, 1, (16, 12)).astype(np.float32)
  path = tmp_path / "m.tflite"
  exporter_lib.export_tflite(model, path, QuantizationPlan({"fc": 8}), "mcu", x)
  argv = ["keras-mpq", "inspect", str(path), "--view", "deploy"]
  code = cli_lib.main(argv)
  out = capsys.readouterr().out
  assert code == 0
  assert f"flash {path.stat().st_size} bytes" in out and "TFLite Micro arena" in out


def test_quantize_and_validate_a_non_classifier(tmp_path, capsys):
  """An autoencoder through the command: fidelity on --eval_data x, --eval_metric, --reference."""
  from keras_mpq.base.compat import keras  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  x = (load_digits().images / 16.0).astype(np.float32)[..., None]
  keras.utils.set_random_seed(0)
  inp = keras.Input((8, 8, 1))
  h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="enc")(inp)
  model = keras.Model(inp, keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid",
                                               name="reconstruction")(h))
  model.compile("adam", "mse")
  model.fit(x[:512], x[:512], epochs=2, verbose=0)
  model_path = tmp_path / "ae.h5"
  model.save(model_path)
  np.savez(tmp_path / "eval.npz", x=x[512:640])
  np.savez(tmp_path / "eval_xy.npz", x=x[512:640], y=x[512:640])
  out_dir = tmp_path / "out"
  code = cli_lib.main(["keras-mpq", "quantize", str(model_path), "--budget", "8bit",
                       "--out", str(out_dir), "--eval_data", str(tmp_path / "eval.npz"),
                       "--samples", "32", "--nocache", "--output_kinds", "reconstruction=sigmoid"])
  captured = capsys.readouterr()
  printed = captured.out
  assert code == 0, captured.err
  assert re.search(r"reconstruction: correlation 0\.9\d+", printed), printed
  report = json.loads((out_dir / "report.json").read_text())
  assert report["outputs"]["heads"][0]["kind"] == "sigmoid"
  assert report["validation"]["fidelity"]["reconstruction"]["correlation"] > 0.95
  code = cli_lib.main(["keras-mpq", "validate", str(out_dir / "model_mobile.tflite"),
                       "--data", str(tmp_path / "eval_xy.npz"), "--metric", "mae",
                       "--reference", str(model_path)])
  printed = capsys.readouterr().out
  assert code == 0 and "metric_name: mae" in printed and "fidelity reconstruction" in printed


def test_load_data_reads_one_array_per_input_by_name(tmp_path):
  path = tmp_path / "two.npz"
  image, table, y = np.zeros((3, 8, 8, 1)), np.ones((3, 16)), np.arange(3)
  np.savez(path, x_image=image, x_table=table, y=y)
  x, labels = cli_lib.load_data(str(path))
  assert sorted(x) == ["image", "table"] and x["table"].shape == (3, 16)
  np.testing.assert_array_equal(labels, y)
  np.savez(path, x_test=image, y_test=y)  # one input: x_test stays the inputs
  x, _ = cli_lib.load_data(str(path))
  assert isinstance(x, np.ndarray) and x.shape == (3, 8, 8, 1)
  np.savez(path, inputs=image)
  with pytest.raises(InvalidInputError, match="'x_NAME' per input"):
    cli_lib.load_data(str(path))


# --------------------------------------------------------------------------- --input_range


@pytest.mark.parametrize("values,expected", [
    ([], None),
    (["-1,1"], (-1.0, 1.0)),
    (["image=0,1", "table=-3,3"], {"image": (0.0, 1.0), "table": (-3.0, 3.0)}),
    (["image=0,1;table=-3,3"], {"image": (0.0, 1.0), "table": (-3.0, 3.0)}),
    (["table=-3,3"], {"table": (-3.0, 3.0)}),  # the other inputs keep their defaults
])
def test_input_range_flag_forms(values, expected):
  assert cli_lib._parse_range(values) == expected  # pylint: disable=protected-access


@pytest.mark.parametrize("values,match", [
    (["table=3"], r"NAME=LO,HI per input.*Received: --input_range 'table=3'"),
    (["table=a,b"], r"two numbers LO < HI.*'table=a,b'"),
    (["=0,1"], r"Received: --input_range '=0,1'"),
    (["table=3,-3"], r"LO < HI.*'table=3,-3' \(LO 3, HI -3\)"),
    (["1,1"], r"LO < HI.*\(LO 1, HI 1\)"),
    (["0,inf"], "finite"),
    (["0,1", "table=0,2"], "not both forms"),
    (["0,1;0,2"], "not both forms or LO,HI twice"),
    (["table=0,1", "table=0,2"], r"'table' twice"),
])
def test_input_range_flag_errors(values, match):
  with pytest.raises(InvalidInputError, match=match):
    cli_lib._parse_range(values)  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def two_input_files(tmp_path_factory):
  """A small two-input classifier (``image`` 8x8x1 in [0, 1], ``table`` 4 numbers in
  [-3, 3], no Rescaling) saved as .h5, and an .npz of inputs by name with labels."""
  from keras_mpq.base.compat import keras  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("two_inputs")
  rng = np.random.default_rng(0)
  image = rng.uniform(0, 1, (96, 8, 8, 1)).astype(np.float32)
  table = rng.uniform(-3, 3, (96, 4)).astype(np.float32)
  y = ((image.mean(axis=(1, 2, 3)) > 0.5).astype(np.int64) + 2 * (table[:, 0] > 0))
  keras.utils.set_random_seed(0)
  a, b = keras.Input((8, 8, 1), name="image"), keras.Input((4,), name="table")
  h = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="relu", name="conv")(a))
  h = keras.layers.Concatenate()([h, keras.layers.Dense(8, activation="relu", name="fb")(b)])
  model = keras.Model([a, b], keras.layers.Dense(4, name="fc")(h))
  model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit([image, table], y, epochs=2, verbose=0)
  model.save(d / "two.h5")
  np.savez(d / "two.npz", x_image=image, x_table=table, y=y)
  return d / "two.h5", d / "two.npz"


def test_input_range_per_input_name_reaches_quantize(two_input_files, tmp_path, capsys):
  model_path, data = two_input_files
  out = tmp_path / "out"
  code = cli_lib.main(["keras-mpq", "quantize", str(model_path), "--budget", "8bit",
                       "--out", str(out), "--data", str(data), "--nocache", "--noprogress",
                       "--input_range", "image=0,1", "--input_range", "table=-3,3"])
  assert code == 0, capsys.readouterr().err[-3000:]
  ranges = json.loads((out / "report.json").read_text())["input_range"]["inputs"]
  assert [(ranges[n]["low"], ranges[n]["high"], ranges[n]["assumed"])
          for n in ("image", "table")] == [(0.0, 1.0, False), (-3.0, 3.0, False)]
  # without it the table's range is assumed [0, 1], and its real data is refused
  code = cli_lib.main(["keras-mpq", "quantize", str(model_path), "--budget", "8bit",
                       "--out", str(tmp_path / "out2"), "--data", str(data), "--nocache",
                       "--noprogress"])
  assert code == 2 and "data['table']" in capsys.readouterr().err


@pytest.mark.parametrize("values,match", [
    (["tabel=-3,3"], r"--input_range NAME=LO,HI with NAME one of the model's inputs "
                     r"\['image', 'table'\]\. Received: 'tabel'"),
    (["image=0,1;table=3"], r"Received: --input_range 'table=3'"),
    (["table=3,-3"], r"LO < HI"),
    (["0,1", "table=0,2"], "not both"),
])
def test_bad_input_range_is_one_line_exit_2_before_quantize(two_input_files, tmp_path, capsys,
                                                           monkeypatch, values, match):
  import keras_mpq  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise AssertionError("quantize ran before the bad --input_range was refused")

  monkeypatch.setattr(keras_mpq, "quantize", refuse)
  model_path, data = two_input_files
  out = tmp_path / "new" / "out"
  flags = [a for v in values for a in ("--input_range", v)]
  code = cli_lib.main(["keras-mpq", "quantize", str(model_path), "--budget", "8bit",
                       "--out", str(out), "--data", str(data), *flags])
  err = capsys.readouterr().err
  lines = [l for l in err.strip().splitlines() if l.startswith("keras-mpq: error:")]
  assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
  assert re.search(match, lines[0]), lines[0]
  assert not (tmp_path / "new").exists()  # refused before the output folder was made


def test_a_named_input_range_of_a_one_input_model_is_its_range():
  from keras_mpq.base.compat import keras  # pylint: disable=g-import-not-at-top
  inp = keras.Input((3,), name="features")
  model = keras.Model(inp, keras.layers.Dense(2)(inp))
  check = cli_lib._check_range_names  # pylint: disable=protected-access
  assert check({"features": (-2.0, 2.0)}, model) == (-2.0, 2.0)
  assert check((0.0, 1.0), model) == (0.0, 1.0)
  with pytest.raises(InvalidInputError, match=r"inputs \['features'\]\. Received: 'x'"):
    check({"x": (0.0, 1.0)}, model)
