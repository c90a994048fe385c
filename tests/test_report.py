"""Report: the summary table a person reads and the PNG plots."""

import os

import numpy as np
import pytest

from keras_mpq import report as report_lib
from keras_mpq.base.types import CostTable, QuantizationPlan, SensitivityTable
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.results import ParetoPoint

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def table():
  return SensitivityTable(("conv1", "fc1"), (2, 4, 8),
                          np.array([[0.9, 0.1, 0.0], [0.3, 0.02, 0.0]]))


def _report():
  return {
      "layers": [
          {"layer": "conv1", "type": "Conv2D", "role": "weights", "params": 144,
           "weight_bits": 8, "activation_bits": 8, "weight_bytes": 300.0,
           "sensitivity": 0.0},
          {"layer": "relu1", "type": "ReLU", "role": "output", "weight_bits": None},
          {"layer": "fc1", "type": "Dense", "role": "weights", "params": 2000,
           "weight_bits": 2, "activation_bits": 8, "weight_bytes": 1100.0,
           "sensitivity": 0.3}],
      "achieved": {"bytes": 1400.0, "avg_bits": 2.46},
      "budget": {"kind": "avg_bits", "value": 3.0, "text": "3 bits avg"},
      "within_budget": True, "float_weight_bytes": 8576.0,
      "unsupported_layers": ["lambda"], "search_rounds": [{"round": 0, "measured_loss": 0.5}],
      "timings_s": {"synthesis": 1.25, "apply": 0.5},
  }


def test_summary_table_lists_weight_layers_and_totals():
  text = report_lib.summary_table(_report())
  lines = text.splitlines()
  assert lines[0].split()[:4] == ["layer", "type", "params", "w_bits"]
  assert any(l.startswith("conv1") and " 8 " in l for l in lines)
  assert not any(l.startswith("relu1") for l in lines)  # only weight layers
  assert "within budget" in text and "6.1x smaller" in text
  assert "left float" in text and "lambda" in text
  assert "synthesis 1.2" in text or "synthesis 1.3" in text
  assert "scale tuning" not in text  # the report has no tuning entry


def test_summary_table_says_what_the_scale_tuning_did():
  r = _report()
  r["tuning"] = {"steps": 200, "temperature": 4.0, "kl_before": 0.0561, "kl_after": 0.0193,
                 "kept": True}
  assert "scale tuning (200 steps, temperature 4): held-out KL 0.0561 -> 0.0193, kept" in (
      report_lib.summary_table(r))
  r["tuning"] = {"steps": 0, "reason": "no quantized weight layer"}
  assert "scale tuning skipped: no quantized weight layer" in report_lib.summary_table(r)


def test_summary_table_reads_at_a_glance():
  r = _report()
  r["achieved"]["bytes"] = 10240.0
  r["achieved"]["bops"] = 2.76e8
  r["metric"] = "task_interaction"
  r["layers"][2]["sensitivity"] = -0.0123456
  r["layers"][2]["params"] = 123456
  text = report_lib.summary_table(r)
  lines = text.splitlines()
  assert "e+" not in text  # no scientific notation for bytes
  assert "10.0 KiB of weights" in text and "8.4 KiB float" in text and "276 MBOPs" in text
  assert "1.1 KiB" in text and "300 B" in text  # per-layer bytes with units
  assert "sensitivity (nats)" in lines[0]
  assert "-0.012" in text and "-0.0123456" not in text  # three digits, not fifteen
  assert "negative for fc1" in text
  assert "123,456" in text
  # every row of the table is as wide as its header; columns line up
  table = lines[:lines.index("") if "" in lines else 4]
  rows = [l for l in table[2:] if not l.startswith("(")]
  header_ends = [i + 1 for i, c in enumerate(lines[1]) if c == "-" and
                 (i + 1 == len(lines[1]) or lines[1][i + 1] == " ")]
  for row in rows:
    for end in header_ends[2:]:  # right-aligned numeric columns end at the rule's end
      assert row[end - 1] != " ", (row, end)
  assert " - " not in " ".join(rows)


def test_summary_table_flags_over_budget():
  r = _report()
  r["within_budget"] = False
  assert "OVER BUDGET" in report_lib.summary_table(r)


def test_plots_are_pngs_written_atomically(table, tmp_path):
  paths = [report_lib.plot_sensitivity(table, tmp_path / "s.png"),
           report_lib.plot_bits(_report(), tmp_path / "b.png"),
           report_lib.plot_pareto([ParetoPoint(100.0, 0.5, QuantizationPlan({"conv1": 2})),
                               ParetoPoint(200.0, 0.1, QuantizationPlan({"conv1": 8}))],
                              tmp_path / "p.png", chosen=(200.0, 0.1))]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == PNG
  assert sorted(os.listdir(tmp_path)) == ["b.png", "p.png", "s.png"]  # no temp files
  with pytest.raises(InvalidInputError, match="SensitivityTable"):
    report_lib.plot_sensitivity({"a": 1}, tmp_path / "x.png")


def test_format_table_aligns_columns():
  text = report_lib.format_table([{"a": 1, "b": "xy"}, {"a": 123, "b": None}], ["a", "b"])
  lines = text.splitlines()
  assert len({len(l.rstrip()) for l in lines[:2]}) == 1 or len(lines) == 4
  assert lines[3].split() == ["123"]  # a missing value is blank, not a column-breaking '-'
  assert lines[2].index("1") == lines[3].index("3")  # numbers right-aligned


def test_summary_table_judges_file_budget_by_written_file():
  r = _report()
  r.update(budget={"kind": "bytes", "value": 2000.0, "text": "2000B"}, cost_target="mcu",
           fixed_file_bytes=600.0, file_bytes=2100, within_budget=False,
           within_budget_basis="written file (2100 B)",
           budget_note=None,
           export={"deployment": {"flash_bytes": 2100, "arena_bytes": 4064, "latency_ms": 0.01},
                   "other_layers": {"lambda": "int8"}})
  text = report_lib.summary_table(r)
  assert "OVER BUDGET, written file (2100 B)" in text
  assert "predicted 1400 B (fixed part 600 B), written 2100 B" in text
  assert "arena) 4064 B" in text
  # the per-target truth from the file replaces "left float"
  assert "lambda (int8)" in text and "left float" not in text


def test_summary_table_says_when_budget_does_not_bind():
  r = _report()
  r["budget_note"] = "budget 1e+06B does not bind: the all-8-bit plan costs 5000 (bytes)"
  assert "does not bind" in report_lib.summary_table(r)


def test_summary_table_says_why_a_tied_plan_won():
  r = _report()
  r["plan_selection"] = {
      "winner": "uniform 4-bit", "objective": "kl", "measured_on": "48 held-out samples",
      "gain_over_allocated": -2e-9,
      "candidates": [{"name": "allocated", "measured_loss": 1.6e-8},
                     {"name": "uniform 4-bit", "measured_loss": 1.7e-8}],
      "tie_break": {"rule": "more bits", "lowest_loss": "allocated",
                    "loss_above_lowest": 1e-9, "stderr": 9e-9, "noise_z": 2.0}}
  text = report_lib.summary_table(r)
  assert "uniform 4-bit returned (ties go to more bits: within 2 standard errors of " \
         "allocated" in text
  assert "below the allocated plan" not in text  # it is not below: it is tied


def test_summary_table_lists_each_input_range_and_warns_for_assumed_ones_first():
  r = dict(_report())
  r["input_range"] = {"inputs": {
      "image": {"low": 0.0, "high": 1.0, "source": "assumed [0, 1]", "assumed": True},
      "table": {"low": 0.0, "high": 16.0, "source": "Rescaling layer 'scale'", "assumed": False},
      "audio": {"low": -1.0, "high": 1.0, "source": "assumed", "assumed": True}},
      "assumed": True}
  lines = report_lib.summary_table(r).splitlines()
  assert lines[0].startswith("WARNING: input 'image': range ASSUMED [0, 1]")
  assert lines[2].startswith("WARNING: input 'audio': range ASSUMED [-1, 1]")
  assert "input 'table': range [0, 16] (Rescaling layer 'scale')" in lines
