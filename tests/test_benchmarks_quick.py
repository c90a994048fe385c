"""The benchmark's regression check: its logic (fast) and the real run (slow, a minute or two)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _bench_module(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _rows(mixed_acc, uniform_acc, mixed_bytes=9000.0):
  return {"cnn": [
      {"config": "uniform 4-bit", "data": "synthetic", "acc": uniform_acc, "bytes": 9000.0,
       "bits": "4 4 4"},
      {"config": "mixed <= 4 bits {2,4,8}", "data": "synthetic", "acc": mixed_acc,
       "bytes": mixed_bytes, "bits": "8 4 2"},
  ]}


def test_regression_check_fails_only_beyond_tolerance():
  bench = _bench_module("bench_accuracy_size")
  tol = bench.TOLERANCE
  assert bench.regression_check(_rows(0.90, 0.90)) == []
  assert bench.regression_check(_rows(0.90 - tol / 2, 0.90)) == []
  failures = bench.regression_check(_rows(0.90 - 2 * tol, 0.90))
  assert len(failures) == 1 and "FAIL" in failures[0]


def test_verdicts_say_where_mixed_does_not_beat_uniform():
  bench = _bench_module("bench_accuracy_size")
  below = bench.verdicts(_rows(0.85, 0.90))
  assert len(below) == 1 and "BELOW uniform" in below[0] and "-5.0 points" in below[0]
  tie = bench.verdicts(_rows(0.901, 0.90))
  assert "does NOT beat uniform" in tie[0]
  win = bench.verdicts(_rows(0.95, 0.90, mixed_bytes=9900.0))
  assert "beats uniform" in win[0] and "10% larger in predicted bytes" in win[0]


def test_stage_scaling_notes_compare_sample_counts():
  bench = _bench_module("bench_stages")
  rows = [{"model": "plain_cnn", "samples": 64, "synthesis_s": 2.0,
           "sensitivity_allocation_s": 1.0, "apply_s": 0.5, "weight_layers": 5,
           "evaluations": 10},
          {"model": "plain_cnn", "samples": 256, "synthesis_s": 6.0,
           "sensitivity_allocation_s": 2.0, "apply_s": 0.5, "weight_layers": 5,
           "evaluations": 10},
          {"model": "ResNet50", "samples": 32, "error": "export failed"}]
  notes = bench.scaling_notes(rows)
  assert "(x4)" in notes[0] and "synthesis 2.0 s -> 6.0 s (x3.0)" in notes[0]
  assert "0.20 s per layer" in notes[1] and "ResNet50" not in notes[1]


@pytest.mark.slow
def test_mixed_precision_not_below_uniform_at_equal_size(tmp_path):
  out = tmp_path / "accuracy_size.md"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "bench_accuracy_size.py"), "--quick",
       "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=1200,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  text = out.read_text()
  assert "Regression check" in text and "passed" in text
  assert "plain_cnn" in text and "separable_cnn" in text
