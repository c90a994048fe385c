"""The benchmark's regression check, runnable from pytest (slow: about a minute or two)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


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
