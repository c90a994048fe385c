"""A `keras-mpq quantize` killed with SIGKILL leaves every file whole, and resumes.

Reference run to completion; then a second run of the same command (same
seed) into a directory pre-filled with copies of the reference outputs is
killed as soon as its synthetic-data cache appears. Every pre-existing file
must be byte-identical (writes are atomic), no temporary file may be left
outside the cache, and a rerun must reuse the cache and give the same plan.
"""

import filecmp
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict

import pytest

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def trained_model_file(d) -> pathlib.Path:
  """The zoo's plain CNN trained 1 epoch on 1000 real images, saved as .h5."""
  from keras_mpq import demo_data, model_zoo  # pylint: disable=g-import-not-at-top
  data = demo_data.load_default()
  model = model_zoo.plain_cnn()
  model_zoo.train(model, data.x_train[:1000], data.y_train[:1000], epochs=1, seed=0)
  path = pathlib.Path(d) / "cnn.h5"
  model.save(path)
  return path


def quantize_argv(model_path, out):
  return [sys.executable, "-m", "keras_mpq.cli", "quantize", str(model_path), "--budget",
          "4bit", "--target", "mobile", "--out", str(out), "--samples", "64",
          "--noprogress", "--seed", "0"]


def snapshot(d) -> Dict[str, bytes]:
  d = pathlib.Path(d)
  return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _plan_core(plan):
  """The plan without the solver's wall time (the only field that may differ)."""
  plan = json.loads(json.dumps(plan))
  plan.get("info", {}).get("solver", {}).pop("time_s", None)
  return plan


def run_kill_resume(d, timeout=600) -> Dict[str, object]:
  """Runs the whole scenario in directory ``d``; returns facts for the assertions."""
  d = pathlib.Path(d)
  model_path = trained_model_file(d)
  ref = d / "ref"
  start = time.perf_counter()
  proc = subprocess.run(quantize_argv(model_path, ref), capture_output=True, text=True,
                        env=ENV, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ref_s = time.perf_counter() - start
  reference = snapshot(ref)

  out = d / "out2"
  shutil.copytree(ref, out, ignore=shutil.ignore_patterns("cache"))
  before = snapshot(out)
  child = subprocess.Popen(quantize_argv(model_path, out), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=ENV)
  killed_at = None
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and child.poll() is None:
    if list((out / "cache").glob("synthetic-*.npz")):
      child.send_signal(signal.SIGKILL)
      killed_at = "after synthetic cache"
      break
    time.sleep(0.05)
  child.wait(timeout=60)
  after_kill = snapshot(out)
  changed = sorted(k for k, v in before.items() if after_kill.get(k) != v)
  extra = sorted(k for k in after_kill if k not in before)
  stray = [k for k in extra if not k.startswith("cache/")]
  cache_tmp = [k for k in extra if k.startswith("cache/") and ".tmp" in k]

  start = time.perf_counter()
  proc = subprocess.run(quantize_argv(model_path, out), capture_output=True, text=True,
                        env=ENV, timeout=timeout)
  resume_s = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / "report.json").read_text())
  return {
      "killed": killed_at, "returncode_after_kill": child.returncode,
      "changed_after_kill": changed, "stray_after_kill": stray,
      "cache_tmp_after_kill": cache_tmp, "cache_files_after_kill": extra,
      "plan_equal": _plan_core(json.loads((out / "plan.json").read_text()))
                    == _plan_core(json.loads(reference["plan.json"])),
      "data_cached": report["data"].get("cached"), "reference_s": round(ref_s, 1),
      "resume_s": round(resume_s, 1),
      "tflite_equal": filecmp.cmp(ref / "model_mobile.tflite", out / "model_mobile.tflite",
                                  shallow=False),
  }


def test_killed_quantize_leaves_files_whole_and_resumes(tmp_path):
  facts = run_kill_resume(tmp_path)
  assert facts["killed"], "the run ended before its cache appeared; nothing was tested"
  assert facts["returncode_after_kill"] == -signal.SIGKILL
  assert facts["changed_after_kill"] == [], facts
  assert facts["stray_after_kill"] == [], facts
  assert facts["cache_tmp_after_kill"] == [], facts
  assert facts["plan_equal"], facts
  assert facts["data_cached"] and "synthetic-" in facts["data_cached"], facts
