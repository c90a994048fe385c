"""benchmarks/bench_any.py and any_data.py: their logic (no TensorFlow), and one small real run."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _bench_module(name):
  sys.path.insert(0, str(ROOT / "benchmarks"))
  spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_targets_judge_every_file_and_fail_a_missing_one():
  bench = _bench_module("bench_any")
  fl = {"ROC AUC": 0.85}
  assert bench.check_targets("conv_autoencoder", "8bit", fl,
                             {"LiteRT": {"ROC AUC": 0.845}, "TFLM": {"ROC AUC": 0.842}})[1] == "pass"
  assert bench.check_targets("conv_autoencoder", "8bit", fl,
                             {"LiteRT": {"ROC AUC": 0.845}, "TFLM": {"ROC AUC": 0.83}})[1] == "FAIL"
  assert bench.check_targets("conv_autoencoder", "4bit", fl,
                             {"LiteRT": {"ROC AUC": 0.835}})[1] == "pass"
  assert bench.check_targets("conv_autoencoder", "8bit", fl, {"LiteRT": None})[1] == "FAIL"
  assert bench.check_targets("conv_autoencoder", "3.5bit", fl, {"LiteRT": None}) == ("-", "-")
  # two heads: accuracy within 1 point and box error at most 0.01 worse
  fl2 = {"accuracy": 0.97, "box MAE": 0.017}
  ok = {"accuracy": 0.962, "box MAE": 0.026}
  worse_box = {"accuracy": 0.97, "box MAE": 0.028}
  assert bench.check_targets("two_head", "8bit", fl2, {"LiteRT": ok})[1] == "pass"
  assert bench.check_targets("two_head", "8bit", fl2, {"LiteRT": worse_box})[1] == "FAIL"
  # pretrained files without a target: both files must run
  verdict = bench.check_targets("autoencoder_example", "8bit", {}, {"LiteRT": {}, "TFLM": None})
  assert verdict[1] == "FAIL"


def test_outputs_are_matched_by_signature_name_shape_then_order():
  bench = _bench_module("bench_any")
  details = [{"index": 7, "name": "StatefulPartitionedCall:1", "shape": np.array([1, 4])},
             {"index": 5, "name": "StatefulPartitionedCall:0", "shape": np.array([1, 10])}]
  names, shapes = ["class", "box"], [(None, 10), (None, 4)]
  assert bench._match_outputs(names, shapes, details, {"class": 5, "box": 7}) == (
      [1, 0], "by signature")
  assert bench._match_outputs(names, shapes, details, {}) == ([1, 0], "by shape")
  named = [dict(d, name=n) for d, n in zip(details, ("model/box/Sigmoid", "model/class/Softmax"))]
  assert bench._match_outputs(names, shapes, named, {}) == ([1, 0], "by tensor name")
  same = [dict(d, shape=np.array([1, 4])) for d in details]
  assert bench._match_outputs(names, [(None, 4), (None, 4)], same, {}) == ([0, 1], "by order")


def test_mixed_against_uniform_pairs_rows():
  bench = _bench_module("bench_any")
  rows = [{"model": "mask_net", "seed": 0, "calibration": "data-free", "budget": "4bit",
           "metrics": {"LiteRT": {"IoU": 0.70}}},
          {"model": "mask_net", "seed": 0, "calibration": "data-free", "budget": "uniform4",
           "metrics": {"LiteRT": {"IoU": 0.69}}},
          {"model": "mask_net", "seed": 0, "calibration": "real", "budget": "4bit",
           "metrics": {"LiteRT": {"IoU": 0.60}}},
          {"model": "mask_net", "seed": 0, "calibration": "real", "budget": "uniform4",
           "metrics": {"LiteRT": {"IoU": 0.69}}}]
  lines = bench.mixed_vs_uniform(rows)
  assert len(lines) == 2 and "pass" in lines[0] and "FAIL" in lines[1]


def test_any_data_metrics_and_front_end():
  any_data = _bench_module("any_data")
  x = np.zeros((2, 28, 28, 1), np.float32)
  x[0, 5:10, 7:20] = 1.0
  b = any_data.boxes(x)
  assert np.allclose(b[0], np.array([5, 7, 10, 20]) / 28) and np.allclose(b[1], 0)
  assert np.allclose(any_data.box_iou(b[:1], b[:1]), 1.0)
  target = x > 0.5
  metric = any_data._iou_metric(target)
  assert metric(x)["IoU"] == pytest.approx(1.0)  # the empty image counts 1
  assert metric(x[:1], idx=np.array([0]))["IoU"] == pytest.approx(1.0)
  assert metric(np.zeros_like(x[:1]), idx=np.array([0]))["IoU"] == pytest.approx(0.0)
  fb = any_data.mel_filterbank()
  assert fb.shape == (128, 513) and np.all(fb >= 0) and np.all(fb.sum(1) > 0)
  tone = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
  db = any_data.log_mel(tone)
  assert db.shape == (32, 128)
  peak = int(np.argmax(db[10]))
  assert 900 < any_data._mel_to_hz(np.linspace(0, any_data._hz_to_mel(8000), 130)[peak + 1]) < 1100
  z, y, zt, yt, mean, std = any_data.diabetes_split()
  assert z.shape == (342, 10) and zt.shape == (100, 10)
  assert np.allclose(z.mean(0), 0, atol=1e-5) and np.allclose(z.std(0), 1, atol=1e-4)


@pytest.mark.skipif(not (ROOT.parent / "shared").exists(), reason="needs ../shared")
def test_quick_run_of_the_regression_model(tmp_path):
  """The script end to end on the smallest model: trains, quantizes, exports, runs, writes."""
  out = tmp_path / "any.md"
  env = dict(os.environ, KERAS_MPQ_ANY_CACHE=str(tmp_path / "cache"), TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "bench_any.py"), "--quick", "--models",
       "regression_mlp", "--calibrations", "real", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = out.read_text()
  assert "| regression_mlp | 0 | real | 8bit |" in text
  assert "R2" in text and "Partial" not in text
