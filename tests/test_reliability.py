"""Reliability: bad inputs fail early with one clear message; killed runs lie about nothing.

Complements test_cli / test_api (the lead's end-to-end runs and their
argument errors) and test_bad_inputs (model files, data shapes, budgets and
targets given to `quantize`): here are the other entry points and commands
(`validate`, `inspect`, flag parsing, --plan, --eval_data, labels), the
checks that must happen *before* the minutes-long stages, damaged caches,
model files that would run code, and a `keras-mpq quantize` killed with
SIGKILL twice (once after its synthetic data is cached, once while it writes
its outputs) and then resumed.
"""

import contextlib
import io
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import keras_mpq
from keras_mpq import cli as cli_lib
from keras_mpq.base import fileio as fileio_lib
from keras_mpq.base.errors import BudgetInfeasibleError, InvalidInputError, KerasMpqError, UnsupportedModelError
from keras_mpq.base.types import QuantizationPlan

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
TEMP_NAME = re.compile(r"^\..+\.tmp")  # what fileio.atomic_path names its temporary files


def run_cli(argv, timeout=600):
  """``keras-mpq ARGV`` in a child process."""
  return subprocess.run([sys.executable, "-m", "keras_mpq.cli", *argv], capture_output=True,
                        text=True, env=ENV, timeout=timeout)


def cli_in_process(argv):
  """``keras-mpq ARGV`` through `cli.main` in this process: (exit code, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli_lib.main(["keras-mpq", *[str(a) for a in argv]])
  return code, out.getvalue(), err.getvalue()


def assert_clear(code, err, match):
  """Exit 2, one 'keras-mpq: error:' line matching ``match``, no traceback."""
  assert code == 2, err[-2000:]
  assert "Traceback" not in err and "internal error" not in err, err[-2000:]
  lines = [l for l in err.strip().splitlines() if l.startswith("keras-mpq: error:")]
  assert len(lines) == 1, err[-2000:]
  assert re.search(match, lines[0]), lines[0]


def tiny_model(classes=3):
  from keras_mpq.base.compat import keras, set_global_seed  # pylint: disable=g-import-not-at-top
  set_global_seed(0)
  inp = keras.Input((8, 8, 1))
  h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
  h = keras.layers.Flatten()(h)
  return keras.Model(inp, keras.layers.Dense(classes, name="fc")(h))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny model (.h5), its mobile .tflite, data files good and bad."""
  d = tmp_path_factory.mktemp("reliability")
  model = tiny_model()
  model.save(d / "tiny.h5")
  x = np.random.default_rng(0).random((32, 8, 8, 1)).astype(np.float32)
  y = np.arange(32) % 3
  exported = keras_mpq.export_tflite(model, d / "tiny.tflite",
                                     QuantizationPlan({"conv": 8, "fc": 8}), "mobile",
                                     calibration_data=x)
  f = {"dir": d, "model": d / "tiny.h5", "tflite": pathlib.Path(exported.path), "x": x, "y": y}
  np.savez(d / "good.npz", x=x, y=y)
  f["good"] = d / "good.npz"
  bad = {
      "str_labels": dict(x=x, y=np.array(["cat"] * 32)),
      "short_labels": dict(x=x, y=y[:5]),
      "object_x": dict(x=np.array([object()] * 4, dtype=object)),
      "unlabeled": dict(x=x),
  }
  for name, arrays in bad.items():
    f[name] = d / f"{name}.npz"
    np.savez(f[name], **arrays)
  f["not_npz"] = d / "text.npz"
  f["not_npz"].write_text("x,y\n1,2\n")
  f["plan_garbage"] = d / "garbage_plan.json"
  f["plan_garbage"].write_text("{not json")
  f["plan_list"] = d / "list_plan.json"
  f["plan_list"].write_text("[8, 4]")
  f["a_file"] = d / "regular_file"
  f["a_file"].write_text("x")
  return f


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv,match", [
    (["quantize", "M", "--budget", "4bit", "--out", "O", "--target", "gpu"], "--target"),
    (["quantize", "M", "--budget", "4bit", "--out", "O", "--samples", "many"], "--samples"),
    (["quantize", "M", "--budgt", "4bit"], "budgt"),
    (["inspect", "T", "--plan", "/nonexistent/plan.json"], "--plan"),
])
def test_flag_and_plan_errors_exit_2_in_a_real_process(files, argv, match):
  """Flag errors used to exit 1 (absl's code, also our 'internal error'); now 2."""
  subst = {"M": str(files["model"]), "O": str(files["dir"] / "o"), "T": str(files["tflite"])}
  proc = run_cli([subst.get(a, a) for a in argv], timeout=120)
  assert_clear(proc.returncode, proc.stderr, match)


@pytest.mark.parametrize("data,match", [
    ("str_labels", "integer class labels"),
    ("short_labels", "one label per input"),
    ("object_x", "Cannot read data file"),
    ("not_npz", "Cannot read data file"),
    ("unlabeled", "no labels|labels"),
    ("missing", "not found"),
])
def test_validate_refuses_bad_data(files, data, match):
  path = files.get(data, files["dir"] / "missing.npz")
  code, _, err = cli_in_process(["validate", files["tflite"], "--data", path])
  assert_clear(code, err, match)  # unlabeled: before, exit 0 with "accuracy: None"


def test_validate_library_refuses_string_labels(files):
  """Before: accuracy 0.0 was reported for labels 'cat' (a number that lied)."""
  with pytest.raises(InvalidInputError, match="integer class labels"):
    keras_mpq.validate_tflite(files["tflite"], files["x"], np.array(["cat"] * 32))
  with pytest.raises(InvalidInputError, match="integer class labels"):
    keras_mpq.validate_tflite(files["tflite"], files["x"], np.full(32, 0.5))


@pytest.mark.parametrize("plan,match", [
    ("plan_garbage", "not valid JSON"), ("plan_list", "weight_bits|plan"),
    ("dir", "Is a directory"), ("missing", "No such file"),
])
def test_inspect_refuses_bad_plan_files(files, plan, match):
  path = files.get(plan, files["dir"] / "missing.json")
  code, out, err = cli_in_process(["inspect", files["tflite"], "--plan", path])
  assert_clear(code, err, match)
  assert out == ""  # the check is refused before any table is printed


def test_inspect_plan_mismatch_is_a_result_not_an_error(files, tmp_path):
  plan = tmp_path / "plan.json"
  plan.write_text(QuantizationPlan({"conv": 2, "fc": 2}).to_json())
  code, out, err = cli_in_process(["inspect", files["tflite"], "--plan", plan])
  assert code == 1 and "plan check FAILED" in out and "conv" in out, out + err


# --------------------------------------------------------------------------- fail before the long stages


@pytest.fixture
def no_synthesis(monkeypatch):
  """Makes any synthesis call fail the test: these errors must come first."""
  from keras_mpq.synthesis import generators as generators_lib  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise AssertionError("synthesis ran before the bad setting was refused")

  monkeypatch.setattr(generators_lib, "synthesize_with_info", refuse)
  monkeypatch.setattr(generators_lib, "synthesize", refuse)


@pytest.mark.parametrize("extra,match", [
    (["--rounds", "0"], "rounds"),
    (["--metric", "nope"], "sensitivity metric"),
    (["--synthesis", "nope"], "method"),
    (["--pin", "nope=8"], "pinned layers"),
    (["--pin", "conv=5"], "pinned bits"),
    (["--budget", "5ms"], "latency"),
    (["--budget", "10B"], r"at least \d"),
    (["--eval_data", "UNLABELED"], "no labels"),
    (["--eval_data", "MISSING"], "not found"),
    (["--input_range", "image=0,1"], r"NAME one of the model's inputs \['\w+'\]"),
    (["--input_range=0,1;-1,1"], "LO,HI twice"),
    (["--input_range=1,0"], "LO < HI"),
])
def test_quantize_refuses_bad_settings_before_synthesis(files, tmp_path, no_synthesis, extra,
                                                        match):
  """Before: --rounds 0 took 34 s (all of synthesis) to be refused; --eval_data after the run."""
  subst = {"UNLABELED": files["unlabeled"], "MISSING": files["dir"] / "missing.npz"}
  extra = [subst.get(a, a) for a in extra]
  budget = [] if "--budget" in extra else ["--budget", "4bit"]
  start = time.perf_counter()
  code, _, err = cli_in_process(["quantize", files["model"], *budget, "--out", tmp_path / "o",
                                 "--samples", "16", "--noprogress", *extra])
  assert_clear(code, err, match)
  assert time.perf_counter() - start < 20
  assert not list((tmp_path / "o").rglob("*.json"))  # nothing was written


def test_api_refuses_bad_settings_before_synthesis(files, no_synthesis):
  model = str(files["model"])
  with pytest.raises(BudgetInfeasibleError) as err:
    keras_mpq.quantize(model, "0.5bit", progress=False)
  assert err.value.smallest == pytest.approx(2.0)
  for kwargs, match in [(dict(seed="a"), "seed"), (dict(seed=-1), "seed"),
                        (dict(rounds=1.5), "rounds"), (dict(metric=None), "metric"),
                        (dict(pinned={"fc": 5}), "pinned bits")]:
    with pytest.raises(InvalidInputError, match=match):
      keras_mpq.quantize(model, "4bit", progress=False, **kwargs)


@pytest.mark.parametrize("labels,match", [
    (np.array(["a"] * 32), "integer class labels"),
    (np.array([None] * 32, dtype=object), "integer class labels"),
    (np.full(32, 0.5), "integer class labels"),
    (np.full(32, 7), r"labels in 0\.\.2"),
])
def test_api_refuses_bad_labels(files, labels, match):
  with pytest.raises(InvalidInputError, match=match):
    keras_mpq.quantize(str(files["model"]), "4bit", data=(files["x"], labels), progress=False)


@pytest.mark.parametrize("spec", [{"kind": "joules", "value": 1}, {"value": 1},
                                  {"kind": "bytes", "value": "lots"}, {"kind": "bytes"}])
def test_malformed_budget_dicts_are_clear(spec):
  with pytest.raises(InvalidInputError):
    keras_mpq.Budget.parse(spec)


# --------------------------------------------------------------------------- model files that would run code


def test_tf_keras_h5_lambda_is_refused_without_running_it(tmp_path):
  from keras_mpq.base.compat import keras  # pylint: disable=g-import-not-at-top
  marker = tmp_path / "lambda_ran"
  code = f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]"
  inp = keras.Input((8, 8, 1))
  h = keras.layers.Lambda(eval(code), name="evil")(inp)  # pylint: disable=eval-used
  model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
  model.save(tmp_path / "lambda.h5")
  assert marker.exists()  # the probe works: building the model ran it
  marker.unlink()
  with pytest.raises(UnsupportedModelError, match="Lambda"):
    keras_mpq.load_model(tmp_path / "lambda.h5")
  code, _, err = cli_in_process(["quantize", tmp_path / "lambda.h5", "--budget", "4bit",
                                 "--out", tmp_path / "o"])
  assert_clear(code, err, "Lambda")
  assert not marker.exists()


def test_keras3_custom_layer_is_refused_without_importing_it(tmp_path):
  import keras as keras3  # pylint: disable=g-import-not-at-top
  marker = tmp_path / "custom_ran"

  @keras3.saving.register_keras_serializable(package="evil")
  class Evil(keras3.layers.Layer):  # pylint: disable=unused-variable

    def call(self, x):
      open(marker, "w").close()  # pylint: disable=consider-using-with
      return x

  inp = keras3.Input((8, 8, 1))
  h = keras3.layers.Flatten()(Evil(name="evil")(inp))
  keras3.Model(inp, keras3.layers.Dense(3)(h)).save(tmp_path / "custom.keras")
  marker.unlink()
  with pytest.raises(UnsupportedModelError, match="custom"):
    keras_mpq.load_model(tmp_path / "custom.keras")
  assert not marker.exists()


@pytest.mark.parametrize("name,content,match", [
    ("empty.h5", b"", "not an HDF5"),
    ("truncated.h5", "TRUNCATED", "HDF5|load"),
    ("noconfig.keras", "ZIP", "config.json"),
    ("empty.keras", b"", "not a zip"),
])
def test_damaged_model_files(files, tmp_path, name, content, match):
  path = tmp_path / name
  if content == "TRUNCATED":
    path.write_bytes(files["model"].read_bytes()[:3000])
  elif content == "ZIP":
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("metadata.json", "{}")
  else:
    path.write_bytes(content)
  with pytest.raises(InvalidInputError, match=match):
    keras_mpq.load_model(path)


def test_directory_that_is_not_a_saved_model(tmp_path):
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "weights.bin").write_bytes(b"\0" * 10)
  with pytest.raises(InvalidInputError, match="saved_model.pb"):
    keras_mpq.load_model(tmp_path / "m")


# --------------------------------------------------------------------------- outputs


def test_export_to_an_unwritable_place_is_clear(files):
  model = tiny_model()
  plan = QuantizationPlan({"conv": 8, "fc": 8})
  for where in (files["a_file"] / "m.tflite", pathlib.Path("/proc/keras_mpq/m.tflite")):
    with pytest.raises(InvalidInputError, match="output directory"):
      keras_mpq.export_tflite(model, where, plan, "mobile", calibration_data=files["x"])
  with pytest.raises(InvalidInputError, match="target"):
    keras_mpq.export_tflite(model, files["dir"] / "x.tflite", plan, "gpu",
                            calibration_data=files["x"])


def test_damaged_caches_are_recomputed_not_trusted(files, tmp_path):
  """A cache file cut short or overwritten (disk full, a crash of an old version) is ignored."""
  kwargs = dict(num_samples=16, seed=0, progress=False, cache_dir=tmp_path)
  first = keras_mpq.quantize(str(files["model"]), "4bit", **kwargs)
  synthetic = next(tmp_path.glob("synthetic-*.npz"))
  search = next(tmp_path.glob("search-*.json"))
  synthetic.write_bytes(synthetic.read_bytes()[:100])
  search.write_text('{"plan": {"weight_bits": {"conv": 8}}')
  second = keras_mpq.quantize(str(files["model"]), "4bit", **kwargs)
  assert second.plan.weight_bits == first.plan.weight_bits
  assert "cached" not in second.report["data"]  # recomputed, and the caches are whole again
  with np.load(synthetic) as z:
    np.testing.assert_array_equal(z["x"], first.calibration_data)
  assert json.loads(search.read_text())["plan"]["weight_bits"] == first.plan.weight_bits
  # cached data that does not fit the model (another input shape) is not used either
  np.savez(synthetic, x=np.zeros((16, 5, 5, 1), np.float32), y=np.zeros(16, np.int64))
  third = keras_mpq.quantize(str(files["model"]), "4bit", **kwargs)
  assert third.calibration_data.shape[1:] == (8, 8, 1)
  assert [p.name for p in tmp_path.iterdir() if TEMP_NAME.match(p.name)] == []


# --------------------------------------------------------------------------- killed runs


@pytest.fixture(scope="module")
def trained_h5(tmp_path_factory, dataset):
  """The zoo's plain CNN trained for 1 epoch on 1000 real images, saved as .h5."""
  from keras_mpq import model_zoo as model_zoo_lib  # pylint: disable=g-import-not-at-top
  model = model_zoo_lib.plain_cnn(input_shape=dataset.x_train.shape[1:],
                              num_classes=int(dataset.y_train.max()) + 1)
  model_zoo_lib.train(model, dataset.x_train[:1000], dataset.y_train[:1000], epochs=1, seed=0)
  path = tmp_path_factory.mktemp("trained") / "cnn.h5"
  model.save(path)
  return path


def _quantize_argv(model, out):
  return ["quantize", str(model), "--budget", "4bit", "--out", str(out), "--samples", "32",
          "--seed", "0", "--noprogress"]


def _outputs(directory):
  """{name: bytes} of the visible files of a finished run (the cache excluded)."""
  return {p.name: p.read_bytes() for p in directory.iterdir()
          if p.is_file() and not p.name.startswith(".")}


def _signal_at(argv, spec, timeout=300):
  """Runs ``keras-mpq ARGV`` with fileio's test hook set to ``spec``: the child signals itself.

  ``spec`` is "SIGNAL before|after GLOB" (see fileio.TEST_SIGNAL_ENV): e.g.
  "KILL before report.json" kills the run exactly when report.json's
  temporary file is written and not yet renamed. No polling, no race.
  """
  from keras_mpq.base import fileio as fileio_lib  # pylint: disable=g-import-not-at-top
  # The child starts with SIGINT at its default even where this process ignores it
  # (a suite run in the background by a shell without job control: `make test &`);
  # Python then installs its KeyboardInterrupt handler, as in a terminal.
  return subprocess.run([sys.executable, "-m", "keras_mpq.cli", *argv],
                        env={**ENV, fileio_lib.TEST_SIGNAL_ENV: spec}, capture_output=True,
                        text=True, timeout=timeout,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _complete(path: pathlib.Path) -> bool:
  """True if the file is whole: JSON parses, PNG ends with IEND, TFLite parses."""
  data = path.read_bytes()
  if path.suffix == ".json":
    json.loads(data)
    return True
  if path.suffix == ".png":
    return data.startswith(b"\x89PNG") and data.rstrip(b"\0").endswith(b"IEND\xaeB`\x82")
  if path.suffix == ".tflite":
    keras_mpq.inspect_tflite(path)
    return True
  return False


def test_killed_run_leaves_outputs_whole_and_resumes_to_the_same_plan(trained_h5, tmp_path):
  # 1. The uninterrupted reference (in process: TensorFlow is already imported).
  ref = tmp_path / "ref"
  code, _, err = cli_in_process(_quantize_argv(trained_h5, ref))
  assert code == 0, err[-3000:]
  reference = _outputs(ref)
  assert {"plan.json", "report.json", "sensitivity.json", "model_mobile.tflite"} <= set(reference)

  # 2. The same run into a directory holding the reference's outputs, killed
  #    right after its synthetic data is cached: the outputs are untouched.
  run = tmp_path / "run"
  run.mkdir()
  for name, data in reference.items():
    (run / name).write_bytes(data)
  proc = _signal_at(_quantize_argv(trained_h5, run), "KILL after synthetic-*.npz")
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert _outputs(run) == reference
  with np.load(next((run / "cache").glob("synthetic-*.npz"))) as z:  # whole, not half written
    assert z["x"].shape == (32, 28, 28, 1) and z["y"].shape == (32,)

  # 3. Resumed, and killed again while it writes its outputs: report.json's
  #    temporary file is whole on disk, the rename has not happened. Every
  #    visible file is the old one or a whole new one; report.json is the old one.
  proc = _signal_at(_quantize_argv(trained_h5, run), "KILL before report.json")
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  after = _outputs(run)
  assert set(after) == set(reference)
  for name in after:
    assert after[name] == reference[name] or _complete(run / name), name
  assert after["report.json"] == reference["report.json"]
  leftovers = sorted(n for n in os.listdir(run) if n.startswith("."))
  temps = [n for n in leftovers if TEMP_NAME.match(n)]
  assert len(temps) == 1 and temps[0].startswith(".report.json."), leftovers
  assert set(leftovers) - set(temps) <= {fileio_lib.LOCK_NAME}, leftovers  # a dead run's lock

  # 4. Resumed to completion: the same plan as the uninterrupted run.
  code, _, err = cli_in_process(_quantize_argv(trained_h5, run))
  assert code == 0, err[-3000:]
  assert json.loads((run / "plan.json").read_text())["weight_bits"] == \
      json.loads(reference["plan.json"])["weight_bits"]
  report = json.loads((run / "report.json").read_text())
  assert "cached" in report["data"]  # it resumed from the cache
  assert report["within_budget"]
  # the killed run's temporary file and lock were cleaned up by this one
  assert [n for n in os.listdir(run) if n.startswith(".")] == []
  assert [n for n in os.listdir(run / "cache") if n.startswith(".")] == []
  shutil.rmtree(ref)


# --------------------------------------------------------------------------- Ctrl-C, lock, leftovers


def _tiny_argv(files, out, *extra):
  return ["quantize", str(files["model"]), "--budget", "4bit", "--out", str(out),
          "--samples", "16", "--noprogress", *extra]


@pytest.mark.parametrize("spec", ["INT after synthetic-*.npz", "INT before plan.json"])
def test_ctrl_c_is_one_line_exit_130_and_leaves_no_partial_output(files, tmp_path, spec):
  out = tmp_path / "o"
  proc = _signal_at(_tiny_argv(files, out), spec)
  assert proc.returncode == 130, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("keras-mpq: interrupted"), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  visible = sorted(p.name for p in out.iterdir())
  assert "plan.json" not in visible, visible  # no plan was published
  assert not [p for p in out.rglob(".*")], list(out.rglob(".*"))  # no temp file, no lock
  cached = list((out / "cache").glob("synthetic-*.npz"))
  assert len(cached) == 1
  with np.load(cached[0]) as z:  # the cache is whole and the rerun uses it
    assert z["x"].shape == (16, 8, 8, 1)
  code, _, err = cli_in_process(_tiny_argv(files, out))
  assert code == 0, err[-2000:]
  assert "cached" in json.loads((out / "report.json").read_text())["data"]


def test_second_run_into_a_locked_out_dir_is_refused(files, tmp_path):
  out = tmp_path / "o"
  with fileio_lib.lock_dir(out):
    code, _, err = cli_in_process(_tiny_argv(files, out))
    assert_clear(code, err, r"in use by another run \(process \d+\)")
  assert list(out.iterdir()) == []  # the refused run wrote nothing


def test_stale_lock_and_temp_files_are_taken_over_and_removed(files, tmp_path, no_synthesis):
  """A lock file and temporary files from a killed run: the next run cleans them up."""
  out = tmp_path / "o"
  (out / "cache").mkdir(parents=True)
  (out / fileio_lib.LOCK_NAME).write_text("999999")  # a dead process; no flock is held
  stale = [out / ".plan.json.k2x9q0ab.tmp.json", out / ".model_mobile.tflite.a1b2c3d4.tmp.tflite",
           out / "cache" / ".synthetic-0123456789abcdef.npz.zz00yy11.tmp.npz"]
  for path in stale:
    path.write_text("half")
  keep = out / ".my_notes"
  keep.write_text("not ours")
  code, _, err = cli_in_process(_tiny_argv(files, out, "--rounds", "0"))
  assert_clear(code, err, "rounds")  # the lock was taken: the error is about the flag
  assert not any(p.exists() for p in stale)
  assert keep.exists() and not (out / fileio_lib.LOCK_NAME).exists()


def test_error_runs_leave_no_empty_output_dirs(files, tmp_path, no_synthesis):
  out = tmp_path / "new" / "o"
  code, _, err = cli_in_process(_tiny_argv(files, out, "--rounds", "0"))
  assert_clear(code, err, "rounds")
  assert not (tmp_path / "new").exists()
  existing = tmp_path / "existing"
  existing.mkdir()
  code, _, err = cli_in_process(_tiny_argv(files, existing, "--metric", "nope"))
  assert_clear(code, err, "metric")
  assert existing.is_dir() and list(existing.iterdir()) == []  # the user's folder is kept
