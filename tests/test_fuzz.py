"""Fuzzing the .tflite readers: random bytes and damaged real files.

Every reader of a user's .tflite file (`inspect_tflite`, `check_against_plan`,
`validate_tflite` with LiteRT and with TFLite Micro, and the ``keras-mpq
inspect`` / ``validate`` commands) must either succeed or raise a
`KerasMpqError` (exit status 2) - never another exception, never a dead
interpreter. Inputs are seeded mutations of two real exported files (a mobile
file with a packed int4 layer, and a batch-1 full-integer microcontroller
file): byte flips, truncations, splices of the two, 32-bit words overwritten
with extreme values, and random bytes behind a valid 'TFL3' header.

The native runtimes run in child processes that report one line per case, so
a segfault is recorded as a finding instead of killing pytest. Two such
findings (TFLite Micro segfaulting on a file LiteRT refuses, and on a stored
output shape of [2**31 - 1, 4]) are kept below as regression tests.
"""

import collections
import contextlib
import io
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Dict, List, Tuple

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
pytest.importorskip("tflite")

from keras_mpq import model_zoo as model_zoo_lib
from keras_mpq import cli as cli_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.export import reader as reader_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.base.errors import KerasMpqError
from keras_mpq.base.types import QuantizationPlan

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
KINDS = ("flip", "truncate", "splice", "word", "random")
PLAN = QuantizationPlan({"conv": 8, "fc": 8})
STEPS = ("litert", "tflm", "cli")  # what the validation child runs per file, in order


# --------------------------------------------------------------------------- inputs


def export_originals(d) -> Dict[str, pathlib.Path]:
  """A mobile file (fc packed at 4 bits) and an mcu file of a tiny Conv+Dense model."""
  from keras_mpq.export import exporter as exporter_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.base.compat import keras, set_global_seed  # pylint: disable=g-import-not-at-top
  d = pathlib.Path(d)
  model = model_zoo_lib.tiny_conv_dense(seed=0)
  x = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)
  mobile = exporter_lib.export_tflite(model, d / "mobile.tflite", PLAN.replace(fc=4), "mobile",
                                    calibration_data=x)
  mcu = exporter_lib.export_tflite(model, d / "mcu.tflite", PLAN, "mcu", calibration_data=x)
  np.savez(d / "data.npz", x=x, y=np.arange(16) % 4)
  return {"mobile": pathlib.Path(mobile.path), "mcu": pathlib.Path(mcu.path),
          "data": d / "data.npz"}


def mutate(a: bytes, b: bytes, n: int, seed: int) -> List[Tuple[str, bytes]]:
  """``n`` seeded damaged files, cycling through KINDS and alternating the source."""
  rng = np.random.default_rng(seed)
  extremes = [0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0x80000000, 0xFFFF, len(a), len(a) + 4]
  out = []
  for i in range(n):
    kind = KINDS[i % len(KINDS)]
    src, other = (a, b) if i % 2 == 0 else (b, a)
    blob = bytearray(src)
    if kind == "flip":
      for pos in rng.integers(0, len(blob), size=int(rng.integers(1, 9))):
        blob[pos] ^= int(rng.integers(1, 256))
    elif kind == "truncate":
      blob = blob[:int(rng.integers(8, len(blob)))]
    elif kind == "splice":
      cut = int(rng.integers(0, min(len(a), len(b))))
      blob = bytearray(src[:cut] + other[cut:])
    elif kind == "word":  # an aligned 32-bit field (offset, index, length, shape) set extreme
      pos = int(rng.integers(8, len(blob) - 4)) // 4 * 4
      blob[pos:pos + 4] = int(rng.choice(extremes)).to_bytes(4, "little")
    else:  # random body behind a valid header, so the parser itself is exercised
      blob = bytearray(src[:8] + rng.bytes(int(rng.integers(8, 2 * len(src)))))
    out.append((f"{kind}-{i:04d}", bytes(blob)))
  return out


def write_cases(d, originals, n, seed) -> List[pathlib.Path]:
  d = pathlib.Path(d)
  d.mkdir(parents=True, exist_ok=True)
  blobs = mutate(originals["mobile"].read_bytes(), originals["mcu"].read_bytes(), n, seed)
  paths = []
  for name, blob in blobs:
    path = d / f"{name}.tflite"
    path.write_bytes(blob)
    paths.append(path)
  return paths


# --------------------------------------------------------------------------- runners


def run_cli_in_process(argv: List[str]) -> Tuple[int, str]:
  """``keras-mpq ARGV`` through `cli.main` in this process: (exit code, stderr)."""
  err, out = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    code = cli_lib.main(["keras-mpq", *argv])
  return code, err.getvalue()


def inspect_outcome(path, plan_json=None) -> str:
  """'ok' / 'clear' / 'crash:...' for the pure-Python readers and `keras-mpq inspect`.

  With ``plan_json`` the command also checks the file against PLAN (exit 1 when
  the check fails); it must fail with status 2 exactly when the library raised.
  """
  try:
    reader_lib.inspect_tflite(path)
    reader_lib.check_against_plan(path, PLAN)
    reader_lib.list_ops(path)
    result = "ok"
  except KerasMpqError:
    result = "clear"
  except Exception as e:  # pylint: disable=broad-except
    return f"crash:{type(e).__name__}: {str(e)[:200]}"
  code, err = run_cli_in_process(["inspect", str(path)] +
                                 (["--plan", str(plan_json)] if plan_json else []))
  if code not in (0, 1, 2) or "Traceback" in err or "internal error" in err:
    return f"crash:cli exit {code}: {err.strip()[-300:]}"
  if plan_json and (code == 2) != (result == "clear"):
    return f"crash:cli exit {code} but the library said {result}"
  return result


# The child: validate_tflite with LiteRT and with TFLite Micro, then `keras-mpq
# validate` for the same file. One START line before and one RESULT line after
# each step, so the parent knows which step a dead child was running.
_CHILD = textwrap.dedent("""
    import contextlib, io, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    from keras_mpq.validate import validate_tflite
    from keras_mpq.base.types import KerasMpqError
    data = sys.argv[1]
    with np.load(data) as z:
      x, y = z["x"], z["y"]
    def cli(argv):
      from keras_mpq import cli
      err = io.StringIO()
      with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["keras-mpq", *argv])
      if code == 1 or "Traceback" in err.getvalue():
        raise RuntimeError("cli exit %d: %s" % (code, err.getvalue()[-200:]))
      if code == 2:
        raise KerasMpqError(err.getvalue())
    steps = {
        "litert": lambda p: validate_tflite(p, x, y),
        "tflm": lambda p: validate_tflite(p, x, y, runtime="tflm"),
        "cli": lambda p: cli(["validate", p, "--data", data, "--runtime", "tflm"]),
    }
    for path in sys.argv[2:]:
      for step, fn in steps.items():
        print("START", step, path, flush=True)
        try:
          fn(path)
          r = "ok"
        except KerasMpqError:
          r = "clear"
        except Exception as e:
          r = "crash:" + type(e).__name__ + ": " + str(e)[:200].replace(chr(10), " ")
        print("RESULT", step, path, r, flush=True)
""")


def validate_outcomes(paths, data_path, timeout=600) -> Dict[Tuple[str, str], str]:
  """{(step, path): outcome} with the native runtimes in child processes.

  A child that dies records 'crash:died (exit N)' for the step it was running;
  a new child goes on with the next file.
  """
  results: Dict[Tuple[str, str], str] = {}
  todo = [str(p) for p in paths]
  while todo:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(data_path), *todo],
                          capture_output=True, text=True, env=ENV, timeout=timeout)
    current = None
    for line in proc.stdout.splitlines():
      parts = line.split(" ", 3)
      if parts[0] == "START":
        current = (parts[1], parts[2])
      elif parts[0] == "RESULT":
        results[(parts[1], parts[2])] = parts[3]
        current = None
    if proc.returncode == 0 and current is None:
      break
    if current is None:
      raise RuntimeError(f"validation child failed to start: {proc.stderr[-2000:]}")
    results[current] = f"crash:died (exit {proc.returncode})"
    for step in STEPS:  # the steps the dead child never reached for that file
      results.setdefault((step, current[1]), "skipped:the child died")
    todo = todo[todo.index(current[1]) + 1:]
  return results


def summarize(outcomes: Dict[str, str]) -> Dict[str, collections.Counter]:
  """{mutation kind: Counter of ok / clear / crash}."""
  by_kind: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for path, r in outcomes.items():
    by_kind[pathlib.Path(path).stem.split("-")[0]][r.split(":")[0]] += 1
  return dict(by_kind)


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
  return export_originals(tmp_path_factory.mktemp("fuzz_originals"))


def test_mutations_are_seeded_and_damaging(originals):
  a, b = originals["mobile"].read_bytes(), originals["mcu"].read_bytes()
  assert mutate(a, b, 10, 7) == mutate(a, b, 10, 7)
  assert mutate(a, b, 10, 7) != mutate(a, b, 10, 8)
  assert all(blob not in (a, b) for _, blob in mutate(a, b, 10, 7))


def test_originals_pass_every_reader(originals):
  for key in ("mobile", "mcu"):
    assert inspect_outcome(originals[key]) == "ok"
  got = validate_outcomes([originals["mcu"]], originals["data"])
  assert set(got.values()) == {"ok"}, got
  # the mobile file packs int4 fully-connected weights, which TFLite Micro refuses, clearly
  got = validate_outcomes([originals["mobile"]], originals["data"])
  assert got[("litert", str(originals["mobile"]))] == "ok"
  assert got[("tflm", str(originals["mobile"]))] == "clear"


def _fuzz(originals, tmp_path, n, seed):
  paths = write_cases(tmp_path / "cases", originals, n, seed)
  plan_json = tmp_path / "plan.json"
  plan_json.write_text(PLAN.to_json())
  inspected = {str(p): inspect_outcome(p, plan_json) for p in paths}
  validated = validate_outcomes(paths, originals["data"])
  assert len(validated) == 3 * n
  crashes = {p: r for p, r in inspected.items() if r.startswith("crash")}
  crashes.update({f"{p} ({step})": r for (step, p), r in validated.items()
                  if r not in ("ok", "clear")})
  assert not crashes, crashes
  # The damage is real: most files are refused, and by each reader.
  for step in ("litert", "tflm"):
    refused = sum(r == "clear" for (s, _), r in validated.items() if s == step)
    assert refused >= n // 2, (step, summarize({p: r for (s, p), r in validated.items()
                                                if s == step}))
  assert sum(r == "clear" for r in inspected.values()) >= n // 3, summarize(inspected)


def test_50_damaged_files_succeed_or_fail_clearly(originals, tmp_path):
  _fuzz(originals, tmp_path, 50, seed=0)


@pytest.mark.slow
def test_1000_damaged_files_succeed_or_fail_clearly(originals, tmp_path):
  _fuzz(originals, tmp_path, 1000, seed=1)


def test_random_bytes_are_refused_clearly(tmp_path):
  rng = np.random.default_rng(3)
  for i, size in enumerate([0, 1, 7, 16, 100, 5000]):
    path = tmp_path / f"random{i}.tflite"
    path.write_bytes(rng.bytes(size))
    assert inspect_outcome(path) == "clear", size
    code, err = run_cli_in_process(["validate", str(path), "--data", "digits"])
    assert code == 2 and "TFL3" in err, err


def _field_position(data: bytes, what: str) -> int:
  """Byte offset of a field of subgraph 0 (the last output index, or its shape[0])."""
  import tflite  # pylint: disable=g-import-not-at-top
  sg = tflite.Model.GetRootAsModel(data, 0).Subgraphs(0)
  if what == "output_index":
    vector = sg._tab.Vector(sg._tab.Offset(8))  # Subgraph.outputs  # pylint: disable=protected-access
    return vector + 4 * (sg.OutputsLength() - 1)
  tensor = sg.Tensors(sg.Outputs(0))
  return tensor._tab.Vector(tensor._tab.Offset(4))  # Tensor.shape[0]  # pylint: disable=protected-access


@pytest.mark.parametrize("what,value", [("output_shape", 0x7FFFFFFF),
                                        ("output_index", 0xFFFFFFFF)])
def test_tflm_never_sees_a_file_litert_would_refuse(originals, tmp_path, what, value):
  """Regression: both files segfaulted the TFLite Micro interpreter before validate checked."""
  data = bytearray(originals["mcu"].read_bytes())
  pos = _field_position(bytes(data), what)
  assert int.from_bytes(data[pos:pos + 4], "little") in (1, 7, 8)  # the field as written
  data[pos:pos + 4] = value.to_bytes(4, "little")
  path = tmp_path / f"{what}.tflite"
  path.write_bytes(bytes(data))
  got = validate_outcomes([path], originals["data"])
  assert got[("tflm", str(path))] == "clear", got
  assert got[("cli", str(path))] == "clear", got


def test_cli_inspect_of_a_bit_flipped_file_exits_2(originals, tmp_path):
  # Byte flips that damage fields read lazily used to escape as struct.error
  # ('internal error', exit 1); in a real process the command must exit 2.
  a, b = originals["mobile"].read_bytes(), originals["mcu"].read_bytes()
  flipped = None
  for name, blob in mutate(a, b, 40, seed=0):
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(blob)
    if name.startswith("flip-") and inspect_outcome(path) == "clear":
      flipped = path
      break
  assert flipped is not None, "no bit flip damaged the file: the mutations are too weak"
  proc = subprocess.run([sys.executable, "-m", "keras_mpq.cli", "inspect", str(flipped)],
                        capture_output=True, text=True, env=ENV, timeout=300)
  assert proc.returncode == 2, proc.stderr[-1000:]
  assert "keras-mpq: error" in proc.stderr and "Traceback" not in proc.stderr
