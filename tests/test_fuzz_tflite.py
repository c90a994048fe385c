"""Damaged .tflite files: inspect_tflite and validate_tflite succeed or raise KerasMpqError.

Seeded mutations (byte flips, truncations, random bytes, splices of two real
files) of a real exported file. The LiteRT interpreter is native code, so
validation runs in a child process that reports one line per file; a child
that dies (e.g. a segfault) is recorded as a crash, not hidden.
"""

import collections
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Dict, List, Tuple

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
pytest.importorskip("ai_edge_quantizer")

from keras_mpq import model_zoo
from keras_mpq import tflite_inspect  # pylint: disable=g-import-not-at-top
from keras_mpq.types import KerasMpqError, QuantizationPlan

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
KINDS = ("flip", "truncate", "random", "splice")


def export_pair(d) -> Tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """Exports a tiny Conv+Dense model (mobile, int8 and fc at 4 bits); returns paths and x."""
  from keras_mpq import export as export_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq.compat import keras, set_global_seed  # pylint: disable=g-import-not-at-top
  d = pathlib.Path(d)
  model = model_zoo.tiny_conv_dense(seed=0)
  x = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)
  plan = QuantizationPlan({"conv": 8, "fc": 8})
  a = export_lib.export_tflite(model, d / "a.tflite", plan, "mobile", calibration_data=x)
  b = export_lib.export_tflite(model, d / "b.tflite", plan.replace(fc=4), "mobile",
                               calibration_data=x)
  x_path = d / "x.npz"
  np.savez(x_path, x=x, y=np.arange(16) % 4)
  return pathlib.Path(a.path), pathlib.Path(b.path), x_path


def mutations(a: bytes, b: bytes, n: int, seed: int) -> List[Tuple[str, bytes]]:
  """``n`` seeded mutated blobs, cycling through KINDS; names say kind and index."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    kind = KINDS[i % len(KINDS)]
    if kind == "flip":
      blob = bytearray(a)
      for pos in rng.integers(0, len(blob), size=int(rng.integers(1, 17))):
        blob[pos] ^= int(rng.integers(1, 256))
      blob = bytes(blob)
    elif kind == "truncate":
      blob = a[:int(rng.integers(0, len(a)))]
    elif kind == "random":
      blob = rng.bytes(int(rng.integers(0, 2 * len(a))))
    else:  # splice: head of one file, tail of the other
      cut = int(rng.integers(0, min(len(a), len(b))))
      first, second = (a, b) if rng.random() < 0.5 else (b, a)
      blob = first[:cut] + second[cut:]
    out.append((f"{kind}-{i:03d}", blob))
  return out


def write_mutations(d, a_path, b_path, n, seed) -> List[pathlib.Path]:
  d = pathlib.Path(d)
  d.mkdir(parents=True, exist_ok=True)
  paths = []
  for name, blob in mutations(a_path.read_bytes(), b_path.read_bytes(), n, seed):
    p = d / f"{name}.tflite"
    p.write_bytes(blob)
    paths.append(p)
  return paths


def inspect_outcome(path) -> str:
  """'ok', 'clear' (KerasMpqError) or 'crash:<Type>' for inspect_tflite in process."""
  try:
    tflite_inspect.inspect_tflite(path)
    tflite_inspect.list_ops(path)
  except KerasMpqError:
    return "clear"
  except Exception as e:  # pylint: disable=broad-except
    return f"crash:{type(e).__name__}: {str(e)[:200]}"
  return "ok"


_CHILD = textwrap.dedent("""
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    from keras_mpq.validate import validate_tflite
    from keras_mpq.types import KerasMpqError
    with np.load(sys.argv[1]) as z:
      x, y = z["x"], z["y"]
    for path in sys.argv[2:]:
      print("START", path, flush=True)
      try:
        validate_tflite(path, x, y)
        r = "ok"
      except KerasMpqError:
        r = "clear"
      except Exception as e:
        r = "crash:" + type(e).__name__ + ": " + str(e)[:200].replace(chr(10), " ")
      print("RESULT", path, r, flush=True)
""")


def validate_outcomes(paths, x_path, timeout=600) -> Dict[str, str]:
  """Outcome per path of validate_tflite, run in child processes.

  A child that dies mid-file is recorded as 'crash:died (exit N)' for that
  file and a new child continues with the rest.
  """
  results: Dict[str, str] = {}
  todo = [str(p) for p in paths]
  while todo:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(x_path), *todo],
                          capture_output=True, text=True, env=ENV, timeout=timeout)
    current = None
    for line in proc.stdout.splitlines():
      if line.startswith("START "):
        current = line[6:]
      elif line.startswith("RESULT "):
        path, _, r = line[7:].partition(" ")
        results[path] = r
        current = None
    if proc.returncode == 0 and current is None:
      break
    if current is None:  # died before the first file (import error, ...)
      raise RuntimeError(f"validation child failed: {proc.stderr[-2000:]}")
    results[current] = f"crash:died (exit {proc.returncode})"
    todo = todo[todo.index(current) + 1:]
  return results


def summarize(outcomes: Dict[str, str]) -> Dict[str, collections.Counter]:
  """Counter of 'ok'/'clear'/'crash' per mutation kind."""
  by_kind: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for path, r in outcomes.items():
    kind = pathlib.Path(path).stem.split("-")[0]
    by_kind[kind][r.split(":")[0]] += 1
  return dict(by_kind)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
  return export_pair(tmp_path_factory.mktemp("fuzz"))


def _mutated(originals, tmp_path, n, seed):
  a, b, x_path = originals
  paths = write_mutations(tmp_path / "mut", a, b, n, seed)
  assert len(paths) == n
  return paths, x_path


def _assert_no_crash(outcomes, n):
  crashes = {pathlib.Path(p).name: r for p, r in outcomes.items() if r.startswith("crash")}
  assert not crashes, crashes
  # The mutations are not all harmless: most damaged files must be refused.
  refused = sum(r == "clear" for r in outcomes.values())
  assert refused >= n // 4, summarize(outcomes)




def test_originals_are_valid(originals):
  a, b, x_path = originals
  assert inspect_outcome(a) == "ok" and inspect_outcome(b) == "ok"
  assert set(validate_outcomes([a, b], x_path).values()) == {"ok"}


def test_mutations_are_seeded():
  a, b = bytes(range(256)) * 4, bytes(reversed(range(256))) * 4
  assert mutations(a, b, 8, 3) == mutations(a, b, 8, 3)
  assert mutations(a, b, 8, 3) != mutations(a, b, 8, 4)


def test_40_mutations_validate_succeeds_or_raises_clearly(originals, tmp_path):
  paths, x_path = _mutated(originals, tmp_path, 40, seed=0)
  outcomes = validate_outcomes(paths, x_path)
  assert len(outcomes) == 40
  _assert_no_crash(outcomes, 40)


def test_truncated_random_and_spliced_files_inspect_clearly(originals, tmp_path):
  paths, _ = _mutated(originals, tmp_path, 40, seed=0)
  outcomes = {str(p): inspect_outcome(p) for p in paths if not p.name.startswith("flip")}
  assert len(outcomes) == 30
  _assert_no_crash(outcomes, 30)


def test_40_mutations_inspect_succeeds_or_raises_clearly(originals, tmp_path):
  paths, _ = _mutated(originals, tmp_path, 40, seed=0)
  _assert_no_crash({str(p): inspect_outcome(p) for p in paths}, 40)


def test_cli_inspect_of_a_bit_flipped_file_exits_2(originals, tmp_path):
  # Byte flips that damage fields read lazily used to escape as struct.error
  # ('internal error', exit 1); every damaged file must now be a clear error.
  paths, _ = _mutated(originals, tmp_path, 40, seed=0)
  flipped = next(p for p in paths if "flip" in p.name and inspect_outcome(p) == "clear")
  proc = subprocess.run([sys.executable, "-m", "keras_mpq.cli", "inspect", str(flipped)],
                        capture_output=True, text=True, env=ENV, timeout=300)
  assert proc.returncode == 2, proc.stderr[-1000:]
  assert "keras-mpq: error" in proc.stderr


@pytest.mark.slow
def test_400_mutations_validate_succeeds_or_raises_clearly(originals, tmp_path):
  paths, x_path = _mutated(originals, tmp_path, 400, seed=1)
  _assert_no_crash(validate_outcomes(paths, x_path), 400)


@pytest.mark.slow
def test_400_mutations_inspect_succeeds_or_raises_clearly(originals, tmp_path):
  paths, _ = _mutated(originals, tmp_path, 400, seed=1)
  _assert_no_crash({str(p): inspect_outcome(p) for p in paths}, 400)
