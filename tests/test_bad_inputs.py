"""Bad inputs end in one clear KerasMpqError (CLI: one line, exit 2), never a traceback.

The cases are data (`make_cases`) so benchmarks/bench_bad_inputs.py runs the
very same ones and counts outcomes for RELIABILITY.md.
"""

import dataclasses
import os
import re
import subprocess
import sys
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import pytest

import keras_mpq
from keras_mpq.base.errors import KerasMpqError

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


@dataclasses.dataclass
class Case:
  """One bad input: run through the CLI (``argv``) or in process (``call``)."""
  group: str  # class of bad input (a row of the RELIABILITY.md table)
  name: str
  match: str  # regex the error message must match
  argv: Optional[Sequence[str]] = None
  call: Optional[Callable[[], Any]] = None
  check: Optional[Callable[[], None]] = None  # extra assertion after the run

  @property
  def how(self) -> str:
    return "cli" if self.argv is not None else "api"


@dataclasses.dataclass
class Outcome:
  case: Case
  kind: str  # "clear" (KerasMpqError / exit 2), "crash" (other exception / exit 1 or
  # signal / traceback), "wrong_exit" (exit 0 or other), "no_error" (api returned)
  message: str


def run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "keras_mpq.cli", *args], capture_output=True,
                        text=True, env=ENV, timeout=timeout)


def tiny_model(nan=False, no_quantizable=False):
  """A tf_keras 8x8x1 -> 3-class Conv+Dense model (or one without quantizable layers)."""
  from keras_mpq.base.compat import keras, set_global_seed
  set_global_seed(0)
  inp = keras.Input((8, 8, 1))
  if no_quantizable:
    h = keras.layers.Flatten()(inp)
    out = keras.layers.Activation("softmax")(keras.layers.Reshape((64,))(h))
    return keras.Model(inp, out)
  h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
  h = keras.layers.Flatten()(h)
  out = keras.layers.Dense(3, name="fc")(h)
  model = keras.Model(inp, out)
  if nan:
    w = model.get_layer("conv").get_weights()
    w[0][0, 0, 0, 0] = np.nan
    model.get_layer("conv").set_weights(w)
  return model


def make_files(d):
  """Writes every bad file the cases need into directory ``d``; returns their paths."""
  import pathlib
  d = pathlib.Path(d)
  f = {}
  f["good_h5"] = d / "good.h5"
  tiny_model().save(f["good_h5"])
  f["nan_h5"] = d / "nan.h5"
  tiny_model(nan=True).save(f["nan_h5"])
  f["noq_h5"] = d / "noq.h5"
  tiny_model(no_quantizable=True).save(f["noq_h5"])
  for suffix in ("h5", "keras"):
    f[f"text_{suffix}"] = d / f"notes.{suffix}"
    f[f"text_{suffix}"].write_text("this is not a model\n" * 20)
  # Keras 3 .keras file with a Lambda that would create a marker file if run.
  import keras as keras3  # Keras 3, as a user has it
  marker = d / "lambda_ran"
  code = f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]"
  inp = keras3.Input((8, 8, 1))
  h = keras3.layers.Lambda(eval(code), name="evil")(inp)  # pylint: disable=eval-used
  h = keras3.layers.Flatten()(h)
  k3 = keras3.Model(inp, keras3.layers.Dense(3)(h))
  f["lambda_keras"] = d / "lambda.keras"
  k3.save(f["lambda_keras"])
  assert marker.exists()  # the probe works: it ran while the model was built
  marker.unlink()
  f["marker"] = marker
  f["npz_no_x"] = d / "no_x.npz"
  np.savez(f["npz_no_x"], images_wrong=np.zeros((4, 8, 8, 1), np.float32))
  f["npz_empty"] = d / "empty.npz"
  np.savez(f["npz_empty"], x=np.zeros((0, 8, 8, 1), np.float32))
  f["npz_shape"] = d / "shape.npz"
  np.savez(f["npz_shape"], x=np.zeros((4, 5, 5, 1), np.float32))
  f["a_file"] = d / "regular_file"
  f["a_file"].write_text("x")
  return f


def make_cases(d) -> List[Case]:
  """Every bad-input case, over the files written by `make_files` into ``d``."""
  f = make_files(d)
  out = str(d / "out")
  good = str(f["good_h5"])
  x_ok = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)

  def api(**kw):
    args = {"model": good, "budget": "4bit", "num_samples": 16, "seed": 0, "progress": False}
    args.update(kw)
    return lambda: keras_mpq.quantize(**args)

  def marker_absent():
    assert not f["marker"].exists(), "the Lambda's code ran while loading"

  q = ["quantize"]
  tail = ["--budget", "4bit", "--out", out, "--samples", "16", "--noprogress"]
  cases = [
      # Missing / unreadable model files.
      Case("missing model file", "cli", "does not exist",
           argv=q + [str(d / "missing.h5")] + tail),
      Case("missing model file", "api .h5", "does not exist", call=api(model=str(d / "x.h5"))),
      Case("missing model file", "api .keras", "does not exist",
           call=api(model=str(d / "x.keras"))),
      Case("missing model file", "api dir", "does not exist",
           call=api(model=str(d / "nodir" / "m"))),
      Case("text file renamed", "cli .keras", "not a zip",
           argv=q + [str(f["text_keras"])] + tail),
      Case("text file renamed", "api .h5", "not an HDF5", call=api(model=str(f["text_h5"]))),
      Case("text file renamed", "api .keras", "not a zip",
           call=api(model=str(f["text_keras"]))),
      Case("Lambda layer (Keras 3 .keras)", "cli", "Lambda",
           argv=q + [str(f["lambda_keras"])] + tail, check=marker_absent),
      Case("Lambda layer (Keras 3 .keras)", "api", "Lambda",
           call=api(model=str(f["lambda_keras"])), check=marker_absent),
      Case("no quantizable layer", "api", "quantizable layer", call=api(model=str(f["noq_h5"]))),
      Case("no quantizable layer", "api object", "quantizable layer",
           call=api(model=tiny_model(no_quantizable=True))),
      Case("NaN weights", "api .h5", "NaN", call=api(model=str(f["nan_h5"]))),
      Case("NaN weights", "cli", "NaN", argv=q + [str(f["nan_h5"])] + tail),
      Case("empty data", "api", "at least one sample",
           call=api(data=np.zeros((0, 8, 8, 1), np.float32))),
      Case("empty data", "api labeled", "at least one sample",
           call=api(data=(np.zeros((0, 8, 8, 1), np.float32), np.zeros(0, np.int64)))),
      Case("empty data", "cli .npz", "at least one sample",
           argv=q + [good] + tail + ["--data", str(f["npz_empty"])]),
      Case("wrongly shaped data", "api", "shape", call=api(data=np.zeros((4, 5, 5, 1)))),
      Case("wrongly shaped data", "api no batch axis", "shape", call=api(data=x_ok[0])),
      Case("wrongly shaped data", "api labels count", "labels",
           call=api(data=(x_ok, np.zeros(3, np.int64)))),
      Case("wrongly shaped data", "api NaN inputs", "NaN",
           call=api(data=np.full((4, 8, 8, 1), np.nan, np.float32))),
      Case("wrongly shaped data", "cli .npz", "shape",
           argv=q + [good] + tail + ["--data", str(f["npz_shape"])]),
      Case("data file without 'x'", "cli quantize", "expected 'x'",
           argv=q + [good] + tail + ["--data", str(f["npz_no_x"])]),
      Case("data file without 'x'", "cli missing file", "not found",
           argv=q + [good] + tail + ["--data", str(d / "nope.npz")]),
      Case("impossible budget", "api avg bits", r"at least 2(\.0+)? ?bit",
           call=api(budget="0.5bit", data=x_ok)),
      Case("impossible budget", "api bytes", r"at least \d",
           call=api(budget="10B", data=x_ok)),
      Case("impossible budget", "cli bytes", r"at least \d",
           argv=q + [good, "--budget", "10B", "--out", out, "--samples", "16", "--noprogress"]),
      Case("impossible budget", "api negative", "budget such as", call=api(budget="-3bit")),
      Case("unknown target", "api", "target", call=api(target="gpu")),
      Case("unknown target", "api empty", "target", call=api(target="")),
      Case("output dir under a regular file", "cli", "output directory",
           argv=q + [good, "--budget", "4bit", "--out", str(f["a_file"] / "sub"),
                     "--samples", "16", "--noprogress"]),
      Case("output dir under a regular file", "api cache_dir", "output directory",
           call=api(cache_dir=str(f["a_file"] / "cache"), data=x_ok)),
  ]
  return cases


def run_case(case: Case) -> Outcome:
  """Runs one case and classifies what happened."""
  if case.argv is not None:
    proc = run_cli(*case.argv)
    err = proc.stderr
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if proc.returncode == 2 and "keras-mpq: error" in err and "Traceback" not in err:
      return Outcome(case, "clear", last)
    if proc.returncode == 0:
      return Outcome(case, "wrong_exit", "exit 0")
    if proc.returncode == 1 or proc.returncode < 0 or "Traceback" in err:
      return Outcome(case, "crash", f"exit {proc.returncode}: {last}")
    return Outcome(case, "wrong_exit", f"exit {proc.returncode}: {last}")
  try:
    case.call()
  except KerasMpqError as e:
    return Outcome(case, "clear", str(e))
  except Exception as e:  # pylint: disable=broad-except
    return Outcome(case, "crash", f"{type(e).__name__}: {e}")
  return Outcome(case, "no_error", "returned normally")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  return {f"{c.group}/{c.name}": c for c in make_cases(tmp_path_factory.mktemp("bad"))}


# Fixed ids so the cases parametrize without building files at collection time;
# test_case_ids_match_the_cases keeps them in sync with make_cases.
CASE_IDS = [
    "missing model file/cli", "missing model file/api .h5", "missing model file/api .keras",
    "missing model file/api dir", "text file renamed/cli .keras", "text file renamed/api .h5",
    "text file renamed/api .keras", "Lambda layer (Keras 3 .keras)/cli",
    "Lambda layer (Keras 3 .keras)/api", "no quantizable layer/api",
    "no quantizable layer/api object", "NaN weights/api .h5", "NaN weights/cli",
    "empty data/api", "empty data/api labeled", "empty data/cli .npz",
    "wrongly shaped data/api", "wrongly shaped data/api no batch axis",
    "wrongly shaped data/api labels count", "wrongly shaped data/api NaN inputs",
    "wrongly shaped data/cli .npz", "data file without 'x'/cli quantize",
    "data file without 'x'/cli missing file", "impossible budget/api avg bits",
    "impossible budget/api bytes", "impossible budget/cli bytes",
    "impossible budget/api negative", "unknown target/api", "unknown target/api empty",
    "output dir under a regular file/cli", "output dir under a regular file/api cache_dir",
]


def test_case_ids_match_the_cases(cases):
  assert sorted(cases) == sorted(CASE_IDS)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input_gives_a_clear_error(cases, case_id):
  case = cases[case_id]
  outcome = run_case(case)
  assert outcome.kind == "clear", f"{case_id}: {outcome.kind}: {outcome.message[-2000:]}"
  assert re.search(case.match, outcome.message), outcome.message
  if case.how == "cli":
    assert "\n" not in outcome.message.strip()
  if case.check is not None:
    case.check()


def test_impossible_budget_error_carries_the_smallest(cases):
  from keras_mpq.base.errors import BudgetInfeasibleError
  with pytest.raises(BudgetInfeasibleError) as info:
    cases["impossible budget/api avg bits"].call()
  assert info.value.smallest >= 2.0  # every layer at 2 bits (plus any float layers)
  assert f"{info.value.smallest:g}"[:1] in str(info.value)
