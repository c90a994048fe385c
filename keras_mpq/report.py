"""Tables and plots of a run: the summary a person reads, the PNGs they look at.

Example:

>>> print(summary_table(result.report))  # doctest: +SKIP
layer   type     params  bits  act  bytes   sensitivity
conv1   Conv2D      144     8    8   ...
"""

from __future__ import annotations

import pathlib
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from keras_mpq import fileio
from keras_mpq.types import FLOAT_BITS, InvalidInputError, SensitivityTable


def _fmt(v, digits=4) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.{digits}g}"
  return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                 headers: Optional[Sequence[str]] = None) -> str:
  """Plain-text table with aligned columns."""
  headers = list(headers or columns)
  cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
  widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
  lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
  lines.append("  ".join("-" * w for w in widths))
  for row in cells:
    lines.append("  ".join(c.rjust(w) if c.replace(".", "").replace("-", "").isdigit()
                           else c.ljust(w) for c, w in zip(row, widths)))
  return "\n".join(lines)


def summary_table(report: Mapping[str, Any]) -> str:
  """The per-layer table and the totals of a `quantize` report."""
  rows = [r for r in report["layers"] if r["role"] == "weights"]
  table = format_table(
      rows, ["layer", "type", "params", "weight_bits", "activation_bits",
             "weight_bytes", "sensitivity"],
      ["layer", "type", "params", "w_bits", "a_bits", "bytes", "sensitivity"])
  achieved = report["achieved"]
  budget = report["budget"]
  lines = [table, ""]
  lines.append(f"budget {budget['text']}: achieved "
               + ", ".join(f"{k}={_fmt(v)}" for k, v in achieved.items())
               + ("  (within budget" if report["within_budget"] else "  (OVER BUDGET")
               + (f", {report['within_budget_basis']})" if report.get("within_budget_basis")
                  else ")"))
  if report.get("cost_target"):
    written = report.get("file_bytes")
    lines.append(f"file for {report['cost_target']}: predicted "
                 f"{achieved.get('bytes', float('nan')):.0f} B (fixed part "
                 f"{report.get('fixed_file_bytes') or 0:.0f} B)"
                 + (f", written {written} B" if written is not None else ""))
  if report.get("budget_note"):
    lines.append(report["budget_note"])
  deploy = (report.get("export") or {}).get("deployment")
  if deploy:
    lines.append(f"deployment: flash {deploy.get('flash_bytes')} B"
                 + (f", RAM (TFLite Micro arena) {deploy['arena_bytes']} B"
                    if deploy.get("arena_bytes") is not None else "")
                 + (f", LiteRT latency {deploy['latency_ms']} ms"
                    if deploy.get("latency_ms") is not None else ""))
  other = (report.get("export") or {}).get("other_layers") or {}
  unsupported = report.get("unsupported_layers") or []
  if unsupported and other:
    report = dict(report, unsupported_layers=[])
    lines.append("layers the search does not quantize, as stored in the file: "
                 + ", ".join(f"{n} ({other.get(n, 'no operators')})" for n in unsupported))
  lines.append(f"float weights {report['float_weight_bytes']:.0f} B -> "
               f"{achieved.get('bytes', float('nan')):.0f} B predicted "
               f"({report['float_weight_bytes'] / max(achieved.get('bytes', 1), 1):.1f}x smaller)")
  if report.get("unsupported_layers"):
    lines.append("left float (no quantizer supports them): "
                 + ", ".join(report["unsupported_layers"]))
  rounds = report.get("search_rounds") or []
  if rounds:
    lines.append("search rounds: " + "; ".join(
        f"#{r.get('round')}: measured loss {_fmt(r.get('measured_loss'))}"
        for r in rounds))
  lines.append("timings (s): " + ", ".join(f"{k} {v:.1f}"
                                          for k, v in report["timings_s"].items()))
  return "\n".join(lines)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path) -> str:
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
  _pyplot().close(fig)
  return str(path)


def plot_sensitivity(table: SensitivityTable, path) -> str:
  """Heatmap of ``table`` (layers x bits, annotated) written as a PNG, atomically.

  >>> plot_sensitivity(table, "sensitivity.png")  # doctest: +SKIP
  'sensitivity.png'
  """
  if not isinstance(table, SensitivityTable):
    raise InvalidInputError(
        f"Expected a keras_mpq.SensitivityTable. Received: {type(table).__name__}")
  plt = _pyplot()
  scores = table.scores
  fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(table.bits),
                                  1.2 + 0.32 * len(table.layers)))
  limit = float(np.max(np.abs(scores))) or 1.0
  image = ax.imshow(scores, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
  ax.set_xticks(range(len(table.bits)))
  ax.set_xticklabels([f"{b}-bit" for b in table.bits])
  ax.set_yticks(range(len(table.layers)))
  ax.set_yticklabels(table.layers, fontsize=8)
  if len(table.layers) * len(table.bits) <= 200:
    for i in range(len(table.layers)):
      for j in range(len(table.bits)):
        dark = abs(scores[i, j]) > 0.6 * limit
        ax.text(j, i, f"{scores[i, j]:.3g}", ha="center", va="center", fontsize=7,
                color="white" if dark else "black")
  fig.colorbar(image, ax=ax, label=f"sensitivity ({table.metric})")
  ax.set_title(f"Per-layer sensitivity: {table.metric}")
  return _save(fig, path)


def plot_bits(report: Mapping[str, Any], path) -> str:
  """Chosen weight bits per layer, bar width-coded by parameter share (PNG)."""
  plt = _pyplot()
  rows = [r for r in report["layers"] if r["role"] == "weights"]
  names = [r["layer"] for r in rows]
  bits = [min(r["weight_bits"], 16) for r in rows]
  fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows) + 2), 3.5))
  ax.bar(range(len(rows)), bits, color=["#c44" if b <= 2 else "#e90" if b <= 4 else "#38c"
                                       for b in bits])
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
  ax.set_ylabel("weight bits")
  ax.set_title(f"Chosen bits (budget {report['budget']['text']})")
  return _save(fig, path)


def plot_pareto(front: Sequence[Any], path, chosen: Optional[tuple] = None,
                kind: str = "bytes") -> str:
  """Predicted loss versus cost along the budget range, the chosen plan marked (PNG)."""
  plt = _pyplot()
  costs = [p.cost if hasattr(p, "cost") else p[0] for p in front]
  losses = [p.predicted_loss if hasattr(p, "predicted_loss") else p[1] for p in front]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(costs, losses, "o-", label="Pareto front")
  if chosen is not None:
    ax.plot([chosen[0]], [chosen[1]], "r*", markersize=14, label="chosen plan")
  ax.set_xlabel(kind)
  ax.set_ylabel("predicted loss increase")
  ax.set_title("Cost versus predicted loss")
  ax.legend()
  return _save(fig, path)


def write_plots(result, directory) -> Dict[str, str]:
  """sensitivity.png, bits.png and pareto.png for a `QuantizationResult`."""
  from keras_mpq import allocation  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  files = {"sensitivity_png": plot_sensitivity(result.sensitivity,
                                               directory / "sensitivity.png"),
           "bits_png": plot_bits(result.report, directory / "bits.png")}
  kind = result.report["budget"]["kind"]
  if not result.costs.has(kind):
    kind = "bytes"
  front = allocation.pareto_front(result.sensitivity, result.costs, kind=kind, points=20)
  chosen = (result.costs.plan_cost(result.plan, kind), result.sensitivity.predicted(result.plan))
  files["pareto_png"] = plot_pareto(front, directory / "pareto.png", chosen, kind)
  return files
