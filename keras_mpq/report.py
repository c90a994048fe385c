"""Tables and plots of a run: the summary a person reads, the PNGs they look at.

Example:

>>> print(summary_table(result.report))  # doctest: +SKIP
layer  type    params  w_bits  a_bits   weights  sensitivity (nats)
conv1  Conv2D     144       8       8     144 B               0.000
...
>>> human_bytes(10240)
'10.0 KiB'
>>> fmt_fraction(0.91349)
'0.913'
"""

from __future__ import annotations

import pathlib
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from keras_mpq.base import fileio as fileio_lib
from keras_mpq.synthesis import realism as realism_lib
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.types import FLOAT_BITS, QuantizationPlan, SensitivityTable
from keras_mpq.quantization import access as access_lib
from keras_mpq.quantization import calibrate as calibrate_lib


def range_report(qmodel, folded, x, policy: str) -> Dict[str, Any]:
  """The range policy and, per layer it clipped, the range against the min/max seen."""
  info: Dict[str, Any] = {"policy": policy, "clipped": {}}
  if policy == "minmax":
    return info
  chosen = access_lib.activation_ranges(qmodel)
  seen = calibrate_lib.observed_ranges(qmodel, x)
  for name, (lo, hi) in chosen.items():
    if name in seen and (lo, hi) != seen[name]:
      info["clipped"][name] = {"range": [lo, hi], "minmax": list(seen[name])}
  return info


def build_report(folded, qmodel, plan, table, cost_table, budget, target, data_info,
                 rounds_info, timings, settings) -> Dict[str, Any]:
  """The JSON-able report of a run: what was asked, what was chosen, what it costs."""
  by_name = {c.name: c for c in cost_table.layer_costs}
  rows = []
  for row in access_lib.layer_report(qmodel):
    name = row["layer"]
    cost = by_name.get(name)
    b = plan.weight_bits.get(name)
    rows.append({
        **row,
        "params": cost.n_params if cost else None,
        "macs": cost.macs if cost else None,
        "weight_bytes": cost.weight_bytes(b) if cost and b is not None else None,
        "sensitivity": (table.score(name, b) if name in table.layers and b in table.bits
                        else None),
    })
  achieved = {kind: cost_table.plan_cost(plan, kind) for kind in cost_table.table}
  total_params = sum(c.n_params for c in cost_table.layer_costs)
  float_bytes = sum(c.weight_bytes(FLOAT_BITS) for c in cost_table.layer_costs)
  if cost_table.target is not None:
    for row in rows:
      b = plan.weight_bits.get(row["layer"])
      if row["layer"] in cost_table.layers and b in cost_table.bits:
        row["weight_bytes"] = cost_table.layer_bytes(row["layer"], b)
  top = QuantizationPlan({n: max(cost_table.bits) for n in cost_table.layers})
  top_cost = cost_table.plan_cost(top, budget.kind) if cost_table.has(budget.kind) else None
  binds = not (top_cost is not None and top_cost <= budget.value
               and all(plan.weight_bits.get(n) == max(cost_table.bits) for n in cost_table.layers))
  note = None
  if not binds:
    note = (f"budget {budget.describe()} does not bind: the all-{max(cost_table.bits)}-bit plan "
            f"costs {top_cost:.6g} ({budget.kind.value}), so every layer got "
            f"{max(cost_table.bits)} bits")
  return {
      "budget": {**budget.to_dict(), "text": budget.describe()},
      "achieved": achieved,
      "within_budget": achieved[budget.kind.value] <= budget.value * (1 + 1e-9),
      "within_budget_basis": ("predicted file bytes for target " + str(cost_table.target)
                              if cost_table.target else "predicted costs"),
      "budget_binds": binds,
      "budget_note": note,
      "fixed_file_bytes": cost_table.fixed_bytes if cost_table.target else None,
      "cost_target": cost_table.target,
      "float_weight_bytes": float_bytes,
      "total_params": total_params,
      "predicted_loss_increase": table.predicted(plan),
      "target": target,
      "data": data_info,
      "metric": table.metric,
      "search_rounds": rounds_info,
      "plan_selection": plan.info.get("selection"),
      "notes": [n for n in (plan.info.get("note"),
                            (plan.info.get("selection") or {}).get("note"),
                            ((plan.info.get("search") or {}).get("holdout") or {}).get("note"))
                if n],
      "layers": rows,
      "unsupported_layers": access_lib.unsupported_layers(folded),
      "timings_s": dict(timings),
      "settings": settings,
  }

# What a sensitivity score of each metric measures (the table's unit).
METRIC_UNITS = {
    "task_interaction": "nats",      # increase of the task cross-entropy
    "task_float_context": "nats",
    "zeroq_kl": "nats",              # KL divergence to the float outputs
    "hessian_trace": "trace x MSE",
    "weight_mse": "weight MSE",
}


def human_bytes(n) -> str:
  """``n`` bytes as people read them: '300 B', '10.0 KiB', '1.50 MiB'.

  >>> [human_bytes(v) for v in (300, 1536, 3 * 2**20 / 2)]
  ['300 B', '1.5 KiB', '1.5 MiB']
  """
  if n is None:
    return ""
  n = float(n)
  if abs(n) < 1024:
    return f"{n:.0f} B"
  for unit in ("KiB", "MiB", "GiB"):
    n /= 1024
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
  raise AssertionError  # unreachable


def _si(v: float) -> str:
  """1.2e8 -> '120 M' (three digits and an SI prefix, for BOPs and MACs)."""
  for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(v) >= scale:
      return f"{v / scale:.3g} {prefix}"
  return f"{v:.3g} "


def fmt_fraction(v) -> str:
  """An accuracy or agreement in [0, 1] with three digits ('0.913'); '' for None."""
  return "" if v is None else f"{float(v):.3f}"


def _fmt(v, digits=3) -> str:
  if v is None:
    return ""
  if isinstance(v, (float, np.floating)):
    return f"{float(v):.{digits}g}"
  if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
    return f"{int(v):,}"
  return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                 headers: Optional[Sequence[str]] = None,
                 formats: Optional[Mapping[str, Any]] = None) -> str:
  """Plain-text table with aligned columns; a missing value is a blank cell.

  ``formats`` maps a column to a function of its value (default `_fmt`).
  A column is right-aligned when all its cells are numbers or blank.

  >>> print(format_table([{"a": 1, "b": "xy"}, {"a": 1234, "b": None}], ["a", "b"]))
      a  b
  -----  --
      1  xy
  1,234
  """
  headers = list(headers or columns)
  formats = dict(formats or {})
  cells = [[formats.get(c, _fmt)(r.get(c)) for c in columns] for r in rows]
  widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
  numeric = [all(_numeric(row[i]) for row in cells) for i in range(len(headers))]
  def line(values):
    return "  ".join(v.rjust(w) if num else v.ljust(w)
                     for v, w, num in zip(values, widths, numeric)).rstrip()
  lines = [line(headers), "  ".join("-" * w for w in widths)]
  lines += [line(row) for row in cells]
  return "\n".join(lines)


def _numeric(cell: str) -> bool:
  """A number, possibly with a unit ('1,234', '-0.5', '10.0 KiB'), or blank."""
  head = cell.split(" ")[0].replace(",", "").replace(".", "").lstrip("-+")
  return cell == "" or head.replace("e", "").replace("-", "").isdigit()


def _achieved(kind: str, value) -> str:
  if value is None:
    return f"{kind} ?"
  if kind == "bytes":
    return f"{human_bytes(value)} of weights"
  if kind == "avg_bits":
    return f"{value:.2f} bits average"
  if kind == "bops":
    return f"{_si(value)}BOPs"
  return f"{kind} {_fmt(value)}"


def summary_table(report: Mapping[str, Any]) -> str:
  """The per-layer table and the totals of a `quantize` report."""
  rows = [r for r in report["layers"] if r["role"] == "weights"]
  unit = METRIC_UNITS.get(report.get("metric"), "score")
  table = format_table(
      rows, ["layer", "type", "params", "weight_bits", "activation_bits",
             "weight_bytes", "sensitivity"],
      ["layer", "type", "params", "w_bits", "a_bits", "weights", f"sensitivity ({unit})"],
      formats={"weight_bytes": human_bytes,
               "sensitivity": lambda v: "" if v is None else f"{float(v):.3f}"
               if abs(float(v)) >= 1e-3 or v == 0 else f"{float(v):.1e}"})
  achieved = report["achieved"]
  budget = report["budget"]
  lines = [table]
  in_range = report.get("input_range") or {}
  if "inputs" in in_range:  # several inputs: a line each, assumed ones first as warnings
    warned = 0
    for name, r in in_range["inputs"].items():
      flag = "ASSUMED " if r.get("assumed") else ""
      line = f"input {name!r}: range {flag}[{r['low']:g}, {r['high']:g}] ({r['source']})"
      if r.get("assumed"):
        lines.insert(warned, "WARNING: " + line + ": pass input_range={name: (lo, hi)} if "
                     "the model takes other inputs.\n")
        warned += 1
      else:
        lines.append(line)
  elif in_range.get("assumed"):
    why = (in_range["source"] if str(in_range.get("source", "")).startswith("estimated")
           else "no Rescaling/Normalization input layer, no --input_range")
    lines.insert(0, f"WARNING: input range ASSUMED [{in_range['low']:g}, {in_range['high']:g}]"
                 f" ({why}). Synthetic "
                 "data, the input quantizer and the exported file all follow it: pass "
                 "--input_range=LO,HI if the model takes other inputs (-4,4 for "
                 "standardized inputs, mean 0 and std 1).\n")
  elif in_range:
    lines.append(f"input range [{in_range['low']:g}, {in_range['high']:g}] "
                 f"({in_range['source']})")
  data = report.get("data") or {}
  if data.get("num_samples"):
    copies = int(data.get("shifted_copies") or 0)
    made = ("synthetic" if data.get("source") == "synthetic" else "given")
    lines.append(f"calibration data: {data['num_samples'] - copies} {made} samples"
                 + (f" + {copies} shifted copies" if copies else "")
                 + (f", sensitivity measured on {data['search_samples']}"
                    if data.get("search_samples") else ""))
    check = realism_lib.describe_batchnorm_check(
        ((data.get("realism") or {}).get("batchnorm") or {}).get("summary") or {})
    if check:
      lines.append(check)
  metric = report.get("metric") or "the metric"
  lines.append(f"(sensitivity: the loss increase {metric} measures for the layer at its "
               f"chosen bits, in {unit})")
  negative = [r["layer"] for r in rows if (r.get("sensitivity") or 0) < 0]
  if negative:
    lines.append(f"(negative for {', '.join(negative)}: at these bits the measured loss went "
                 "down, not up; read it as no measurable harm)")
  lines.append("")
  lines.append(f"budget {budget['text']}: achieved "
               + ", ".join(_achieved(k, v) for k, v in achieved.items())
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
  float_bytes = report["float_weight_bytes"]
  predicted = achieved.get("bytes")
  if predicted is not None:
    lines.append(f"weights {human_bytes(float_bytes)} float -> {human_bytes(predicted)} "
                 f"predicted ({float_bytes / max(predicted, 1):.1f}x smaller)")
  if report.get("unsupported_layers"):
    lines.append("left float (no quantizer supports them): "
                 + ", ".join(report["unsupported_layers"]))
  rounds = report.get("search_rounds") or []
  if rounds:
    lines.append("search rounds: " + "; ".join(
        f"#{r.get('round')}: measured loss {_fmt(r.get('measured_loss'))} {unit}"
        for r in rounds))
  sel = report.get("plan_selection")
  if sel and sel.get("candidates"):
    measured = ", ".join(f"{c['name']} {_fmt(c['measured_loss'])}" for c in sel["candidates"])
    tie = sel.get("tie_break")
    if sel["winner"] == "allocated":
      verdict = "allocated kept"
    else:
      verdict = f"{sel['winner']} returned"
      if not tie and sel.get("gain_over_allocated") is not None:  # a tie is not "below"
        verdict += f", {_fmt(sel['gain_over_allocated'])} below the allocated plan"
    if tie:
      verdict += (f" (ties go to more bits: within {tie['noise_z']:g} standard errors of "
                  f"{tie['lowest_loss']}, {_fmt(tie['loss_above_lowest'])} above it)")
    lines.append(f"plan check ({sel['objective']} on {sel['measured_on']}): {measured}"
                 f" -> {verdict}")
  tuning = report.get("tuning") or {}
  if tuning.get("steps"):
    lines.append(f"scale tuning ({tuning['steps']} steps, temperature "
                 f"{tuning.get('temperature', 1):g}): held-out KL {_fmt(tuning['kl_before'])} "
                 f"-> {_fmt(tuning['kl_after'])}"
                 + (", kept" if tuning.get("kept") else ", undone (no gain)"))
  elif tuning.get("reason"):
    lines.append(f"scale tuning skipped: {tuning['reason']}")
  for note in report.get("notes") or []:
    lines.append(f"note: {note}")
  lines.append("timings: " + ", ".join(f"{k} {v:.1f} s"
                                       for k, v in report["timings_s"].items()))
  return "\n".join(lines)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path) -> str:
  with fileio_lib.atomic_path(path) as tmp:
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
  from keras_mpq.plan import allocation as allocation_lib  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  files = {"sensitivity_png": plot_sensitivity(result.sensitivity,
                                               directory / "sensitivity.png"),
           "bits_png": plot_bits(result.report, directory / "bits.png")}
  kind = result.report["budget"]["kind"]
  if not result.costs.has(kind):
    kind = "bytes"
  front = allocation_lib.pareto_front(result.sensitivity, result.costs, kind=kind, points=20)
  chosen = (result.costs.plan_cost(result.plan, kind), result.sensitivity.predicted(result.plan))
  files["pareto_png"] = plot_pareto(front, directory / "pareto.png", chosen, kind)
  return files
