"""Runs the nearest peer, Sony's model-compression-toolkit (MCT), on our models.

MCT's Keras mixed precision only runs with TensorFlow < 2.16, so it lives in
its own venv (``benchmarks/peer_mct/setup_env.sh``, default ``/work/main/
.mct_venv``, override with env ``MCT_VENV``). `run_peer` is called from
keras_mpq's venv (TF 2.21, tf_keras): it saves the model as ``.h5`` and the
data as ``.npz`` in a work directory, builds the MCT venv if it is missing,
runs ``benchmarks/peer_mct/run_mct.py`` there in a subprocess, and returns one
result dict per budget.

Budgets: ``kind="avg_bits"`` (default) is the apples-to-apples comparison with
keras_mpq's ``Budget.avg_bits``: MCT's weights memory counts quantized kernel
elements only (biases stay float, no scales), so an average of ``B`` bits is
``weights_memory = n_kernel_params * B / 8`` bytes. ``kind="bytes"`` passes the
value straight to MCT as its kernel-only weights memory (NOT keras_mpq's
``Budget.bytes``, which also counts biases and per-channel scales).

Example:

>>> from benchmarks import peer_mct                                  # doctest: +SKIP
>>> rows = peer_mct.run_peer(model, x_calib, x_test, y_test, [4, 3],  # doctest: +SKIP
...                          "bench_out/peer_mct")
>>> rows[0]["accuracy"], rows[0]["bits"]                             # doctest: +SKIP

Command line (trains the zoo plain_cnn, runs MCT at 4 and 3 average bits):

  .venv/bin/python benchmarks/peer_mct.py --workdir bench_out/peer_mct
"""

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make `keras_mpq` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from keras_mpq.base.types import Budget, BudgetKind
from keras_mpq.base.errors import InvalidInputError, KerasMpqError, MissingDependencyError

HERE = pathlib.Path(__file__).resolve().parent / "peer_mct"
REPO = HERE.parents[1]
SETUP_SCRIPT = HERE / "setup_env.sh"
RUN_SCRIPT = HERE / "run_mct.py"

__all__ = ["run_peer", "mct_venv", "ensure_env", "format_table"]


def mct_venv() -> pathlib.Path:
  """The MCT venv directory: env ``MCT_VENV`` or ``<repo>/.mct_venv``."""
  return pathlib.Path(os.environ.get("MCT_VENV", str(REPO / ".mct_venv")))


def _clean_env() -> Dict[str, str]:
  """Environment for the MCT subprocesses, without keras_mpq's venv leaking in."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TF_USE_LEGACY_KERAS")}
  env["TF_CPP_MIN_LOG_LEVEL"] = env.get("TF_CPP_MIN_LOG_LEVEL", "2")
  env["MCT_VENV"] = str(mct_venv())
  return env


def ensure_env(timeout_s: float = 1800) -> pathlib.Path:
  """Returns the MCT venv's python, running setup_env.sh first if the venv is missing.

  Raises:
    MissingDependencyError: the venv cannot be built (no python3.11, no PyPI).

  Example:

  >>> python = ensure_env()          # doctest: +SKIP
  """
  python = mct_venv() / "bin" / "python"
  marker = mct_venv() / "lib" / "python3.11" / "site-packages" / "model_compression_toolkit"
  if python.exists() and marker.exists():
    return python
  try:
    proc = subprocess.run(["bash", str(SETUP_SCRIPT)], env=_clean_env(), capture_output=True,
                          text=True, timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    raise MissingDependencyError(
        f"Expected {SETUP_SCRIPT} to build the MCT venv within {timeout_s:.0f} s. "
        f"Received: timeout; run it by hand to see where it stops.") from None
  if proc.returncode != 0 or not python.exists():
    tail = (proc.stdout + proc.stderr)[-3000:]
    raise MissingDependencyError(
        f"Expected {SETUP_SCRIPT} to build the MCT venv at {mct_venv()} (python3.11, "
        f"tensorflow==2.15.1, model-compression-toolkit from PyPI). Received: exit "
        f"code {proc.returncode}. Output tail:\n{tail}")
  return python


def _budgets(budgets, kind: str):
  """(cli flag, [values]) for run_mct.py from floats or keras_mpq Budgets."""
  if isinstance(budgets, (int, float, Budget)):
    budgets = [budgets]
  budgets = list(budgets)
  if not budgets:
    raise InvalidInputError("Expected at least one budget. Received: budgets=[]")
  if kind not in ("avg_bits", "bytes"):
    raise InvalidInputError(
        f"Expected kind 'avg_bits' or 'bytes'. Received: kind={kind!r}")
  kinds, values = set(), []
  for b in budgets:
    if isinstance(b, Budget):
      if b.kind not in (BudgetKind.AVG_BITS, BudgetKind.BYTES):
        raise InvalidInputError(
            "Expected avg_bits or bytes budgets (MCT limits weight memory). "
            f"Received: budget={b!r}")
      kinds.add(b.kind.value)
      values.append(b.value)
    else:
      kinds.add(kind)
      try:
        values.append(float(b))
      except (TypeError, ValueError):
        raise InvalidInputError(
            f"Expected numeric budgets. Received: budget={b!r}") from None
  if len(kinds) != 1:
    raise InvalidInputError(
        f"Expected budgets of one kind. Received: kinds={sorted(kinds)}")
  if any(not math.isfinite(v) or v <= 0 for v in values):
    raise InvalidInputError(
        f"Expected positive finite budgets. Received: budgets={values}")
  kind = kinds.pop()
  return ("--avg-bits" if kind == "avg_bits" else "--weights-bytes"), values


def _save_inputs(model, x_calib, x_test, y_test, workdir: pathlib.Path):
  workdir.mkdir(parents=True, exist_ok=True)
  model_path = workdir / "model.h5"
  data_path = workdir / "data.npz"
  fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".tmp_model_", suffix=".h5")
  os.close(fd)
  try:
    model.save(tmp, save_format="h5", include_optimizer=False)
    os.replace(tmp, model_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".tmp_data_", suffix=".npz")
  os.close(fd)
  try:
    np.savez(tmp, x_calib=np.asarray(x_calib, np.float32),
             x_test=np.asarray(x_test, np.float32),
             y_test=np.asarray(y_test).reshape(-1).astype(np.int64))
    os.replace(tmp, data_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return model_path, data_path


def run_peer(model, x_calib, x_test, y_test, budgets: Sequence[Any], workdir,
             kind: str = "avg_bits", timeout_s: float = 1800, seed: int = 0,
             mp_images: int = 32, batch_size: int = 32,
             return_meta: bool = False, export: bool = False):
  """Runs MCT mixed-precision PTQ on ``model`` once per budget.

  Args:
    model: a built tf_keras model (Conv2D/Dense/DepthwiseConv2D/BN/ReLU... layers).
    x_calib: calibration images (MCT uses them for statistics and, the first
      ``mp_images`` of them, for its mixed-precision sensitivity). Keep small
      (e.g. 256): MCT runs on CPU here.
    x_test, y_test: evaluation set; accuracy is top-1 of the fake-quant model.
    budgets: average kernel bits (``kind="avg_bits"``), MCT kernel weight
      bytes (``kind="bytes"``), or keras_mpq `Budget` objects of those kinds.
    workdir: directory for model.h5, data.npz and results.json.
    kind: how to read bare numbers in ``budgets``: "avg_bits" or "bytes".
    timeout_s: limit for the MCT subprocess (and for building the venv).
    seed: passed to run_mct.py (TF/NumPy seeds).
    mp_images: MixedPrecisionQuantizationConfig.num_of_images.
    batch_size: calibration batch size.
    return_meta: also return the whole results dict (float accuracy, versions).
    export: also write MCT's INT8 .tflite of each budget into ``workdir`` (MCT's
      exporter); each row then has ``tflite_path`` (or ``tflite_error``).

  Returns:
    One dict per budget: ``budget_kind``, ``budget_value``,
    ``target_weights_bytes``, ``achieved_weights_bytes`` (MCT's own report),
    ``accuracy``, ``bits`` ({layer: kernel bits}), ``avg_bits``, ``seconds``,
    ``error`` (None, or the message when MCT failed on that budget). With
    ``return_meta=True``: ``(rows, results)``.

  Raises:
    InvalidInputError: bad budgets.
    MissingDependencyError: the MCT venv cannot be built.
    KerasMpqError: run_mct.py failed or timed out.

  Example:

  >>> rows = run_peer(model, x[:256], x_test, y_test, [4, 3], "out")  # doctest: +SKIP
  """
  flag, values = _budgets(budgets, kind)
  workdir = pathlib.Path(workdir)
  x_calib, x_test, y_test = np.asarray(x_calib), np.asarray(x_test), np.asarray(y_test)
  if len(x_calib) == 0 or len(x_test) == 0 or len(x_test) != len(y_test.reshape(-1)):
    raise InvalidInputError(
        "Expected non-empty x_calib and x_test with len(y_test) == len(x_test). "
        f"Received: len(x_calib)={len(x_calib)}, len(x_test)={len(x_test)}, "
        f"len(y_test)={len(y_test.reshape(-1))}")
  python = ensure_env(timeout_s)
  model_path, data_path = _save_inputs(model, x_calib, x_test, y_test, workdir)
  out_path = workdir / "results.json"
  if out_path.exists():
    out_path.unlink()
  cmd = [str(python), str(RUN_SCRIPT), "--model", str(model_path), "--data", str(data_path),
         flag, *[repr(float(v)) for v in values], "--out", str(out_path),
         "--seed", str(seed), "--mp-images", str(mp_images), "--batch-size", str(batch_size)]
  if export:
    cmd += ["--export-dir", str(workdir.resolve())]
  try:
    proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True,
                          timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    raise KerasMpqError(
        f"Expected MCT to finish within timeout_s={timeout_s:.0f} s. Received: timeout; "
        "use fewer calibration images or a larger timeout_s.") from None
  (workdir / "mct_log.txt").write_text(proc.stdout + proc.stderr)
  if proc.returncode != 0 or not out_path.exists():
    tail = (proc.stdout + proc.stderr)[-4000:]
    raise KerasMpqError(
        f"Expected run_mct.py to write {out_path}. Received: exit code "
        f"{proc.returncode}. Full log in {workdir / 'mct_log.txt'}. Tail:\n{tail}")
  results = json.loads(out_path.read_text())
  rows = results["runs"]
  return (rows, results) if return_meta else rows


def format_table(rows: List[Dict[str, Any]], float_accuracy: Optional[float] = None) -> str:
  """A plain-text table of `run_peer` rows.

  Example:

  >>> print(format_table([{"budget_kind": "avg_bits", "budget_value": 4.0,
  ...     "target_weights_bytes": 100.0, "achieved_weights_bytes": 99.0,
  ...     "accuracy": 0.9, "avg_bits": 3.96, "seconds": 1.0, "bits": {"a": 4},
  ...     "error": None}]))  # doctest: +NORMALIZE_WHITESPACE
  budget          target B  MCT B   avg bits  accuracy  time s  bits
  avg_bits=4      100       99      3.96      0.9000    1.0     a:4
  """
  lines = []
  if float_accuracy is not None:
    lines.append(f"float accuracy: {float_accuracy:.4f}")
  lines.append(f"{'budget':<15} {'target B':<9} {'MCT B':<7} {'avg bits':<9} "
               f"{'accuracy':<9} {'time s':<7} bits")
  for r in rows:
    budget = f"{r['budget_kind']}={r['budget_value']:g}"
    if r.get("error"):
      lines.append(f"{budget:<15} {r['target_weights_bytes']:<9.0f} ERROR: {r['error']}")
      continue
    bits = " ".join(f"{k}:{v}" for k, v in r["bits"].items())
    achieved = r.get("achieved_weights_bytes")
    lines.append(
        f"{budget:<15} {r['target_weights_bytes']:<9.0f} "
        f"{(achieved if achieved is not None else float('nan')):<7.0f} "
        f"{r.get('avg_bits', float('nan')):<9.2f} {r['accuracy']:<9.4f} "
        f"{r['seconds']:<7.1f} {bits}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description="MCT mixed precision on the zoo plain_cnn.")
  parser.add_argument("--workdir", default=str(REPO / "bench_out" / "peer_mct"))
  parser.add_argument("--model", default="plain_cnn", help="zoo model name")
  parser.add_argument("--avg-bits", type=float, nargs="+", default=[4.0, 3.0])
  parser.add_argument("--n-calib", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--timeout", type=float, default=1800)
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  from keras_mpq.model import size as size_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq import demo_data as demo_data_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq import model_zoo as model_zoo_lib  # pylint: disable=g-import-not-at-top
  data = demo_data_lib.load_default()
  model = model_zoo_lib.build_and_train(args.model, data, seed=args.seed)
  n_params = sum(c.n_params for c in size_lib.layer_costs(model))
  rng = np.random.default_rng(args.seed)
  idx = rng.choice(len(data.x_train), size=min(args.n_calib, len(data.x_train)), replace=False)
  # Byte targets from keras_mpq's own kernel counts: n_params * bits / 8.
  targets = [n_params * b / 8.0 for b in args.avg_bits]
  rows, results = run_peer(model, data.x_train[np.sort(idx)], data.x_test, data.y_test,
                           targets, args.workdir, kind="bytes", timeout_s=args.timeout,
                           seed=args.seed, return_meta=True)
  for r, b in zip(rows, args.avg_bits):
    r["budget_kind"], r["budget_value"] = "avg_bits", b
  print(f"MCT {results['mct_version']} (TF {results['tensorflow_version']}), "
        f"TPC {results['tpc']}; model {args.model}: {n_params} kernel params "
        f"(MCT counts {results['n_kernel_params']}); calib {results['n_calib']}, "
        f"test {results['n_test']}")
  logits = model.predict(data.x_test, batch_size=256, verbose=0)
  ours = float(np.mean(np.argmax(logits, -1) == data.y_test))
  print(f"float accuracy: {ours:.4f} (TF 2.21 tf_keras), "
        f"{results['float_accuracy']:.4f} (reloaded in MCT's TF)")
  print(format_table(rows))
  print(f"results: {pathlib.Path(args.workdir) / 'results.json'}")


if __name__ == "__main__":
  main()
