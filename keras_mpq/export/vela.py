"""Arm Ethos-U: compiling a TFLite Micro file with Vela, and reading its summary.

>>> vela_bytes, summary = compile_vela(tflm_bytes, "ethos-u55-128")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Sequence, Tuple

from keras_mpq.base.errors import MissingDependencyError, UnsupportedModelError
from keras_mpq.export.targets import DEFAULT_VELA_ACCELERATOR

# --------------------------------------------------------------------------- vela


def _vela_command() -> List[str]:
  exe = shutil.which("vela") or os.path.join(os.path.dirname(sys.executable), "vela")
  if os.path.exists(exe):
    return [exe]
  try:
    import ethosu.vela  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise MissingDependencyError(
        "Expected Arm's Vela compiler for target='ethos-u'. Install it with: "
        "pip install 'ethos-u-vela==5.2.*' (or pip install 'keras-mpq[mcu]')") from None
  return [sys.executable, "-m", "ethosu.vela.vela"]


def compile_vela(mcu_bytes: bytes, accelerator: str = DEFAULT_VELA_ACCELERATOR,
                 options: Sequence[str] = ()) -> Tuple[bytes, Dict[str, Any]]:
  """Compiles a TFLite Micro file with Vela; returns (compiled bytes, summary).

  The summary has the share of ops placed on the NPU, SRAM and flash bytes,
  Vela's cycle and inference-time estimate, from its summary CSV.
  """
  cmd = _vela_command()
  with tempfile.TemporaryDirectory(prefix="keras_mpq_vela_") as tmp:
    src = os.path.join(tmp, "model.tflite")
    with open(src, "wb") as f:
      f.write(mcu_bytes)
    out_dir = os.path.join(tmp, "out")
    args = cmd + [src, "--accelerator-config", accelerator, "--output-dir", out_dir] + list(options)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      raise UnsupportedModelError(
          f"Vela failed on this model (exit {proc.returncode}): {' | '.join(tail)}")
    compiled = os.path.join(out_dir, "model_vela.tflite")
    with open(compiled, "rb") as f:
      data = f.read()
    summary = _vela_summary(out_dir, proc.stdout)
  summary["accelerator"] = accelerator
  return data, summary


def _vela_summary(out_dir: str, stdout: str) -> Dict[str, Any]:
  summary: Dict[str, Any] = {}
  csvs = [f for f in os.listdir(out_dir) if f.endswith("_summary_" + "") or f.endswith(".csv")]
  for name in csvs:
    if "summary" not in name:
      continue
    with open(os.path.join(out_dir, name), newline="") as f:
      rows = list(csv.DictReader(f))
    if rows:
      row = {k.strip(): v for k, v in rows[0].items() if k}
      pick = {
          "sram_kib": "sram_memory_used", "flash_kib": "off_chip_flash_memory_used",
          "npu_cycles": "cycles_npu", "total_cycles": "cycles_total",
          "inference_time_s": "inference_time", "inferences_per_second": "inferences_per_second",
          "cpu_ops": "cpu_operators", "npu_ops": "npu_operators",
          "on_chip_flash_kib": "on_chip_flash_memory_used",
          "weights_bytes": "total_original_weights",
          "encoded_weights_bytes": "total_npu_encoded_weights",
      }
      for key, col in pick.items():
        for k, v in row.items():
          if k.lower().startswith(col):
            summary[key] = _num(v)
            break
  # Vela prints "CPU operators = N (x%)" and "NPU operators = M (y%)".
  for label, key in (("CPU operators", "cpu_ops"), ("NPU operators", "npu_ops")):
    m = re.search(label + r"\s*=\s*(\d+)", stdout)
    if m:
      summary[key] = int(m.group(1))
  for label, key in (("Total SRAM used", "sram_kib"), ("Total Off-chip Flash used", "flash_kib"),
                     ("Neural network macs", "macs")):
    m = re.search(label + r"\s+([0-9.]+)", stdout)
    if m:
      summary.setdefault(key, float(m.group(1)))
  m = re.search(r"Batch Inference time\s+([0-9.]+) ms", stdout)
  if m:
    summary["inference_ms"] = float(m.group(1))
  m = re.search(r"NPU cycles\s+(\d+)", stdout)
  if m:
    summary.setdefault("npu_cycles", int(m.group(1)))
  total = summary.get("cpu_ops", 0) + summary.get("npu_ops", 0)
  summary["npu_op_share"] = summary.get("npu_ops", 0) / total if total else 0.0
  summary["stdout"] = stdout[-3000:]
  return summary


def _num(v):
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return int(f) if f.is_integer() else f
