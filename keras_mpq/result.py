"""`QuantizationResult`: what `keras_mpq.quantize` returns, and its ``export`` and ``save``.

>>> result = keras_mpq.quantize(model, "4bit")          # doctest: +SKIP
>>> result.export("model.tflite", target="mcu")         # doctest: +SKIP
>>> result.save("out/")                                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

import numpy as np

from keras_mpq.base import fileio as fileio_lib
from keras_mpq.base.errors import KerasMpqError
from keras_mpq.base.types import (
  Budget,
  BudgetKind,
  CostTable,
  QuantizationPlan,
  SensitivityTable,
)
from keras_mpq.quantization import access as access_lib
from keras_mpq.quantization import apply as apply_lib
from keras_mpq.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class QuantizationResult:
  """What `quantize` returns. Frozen; ``save`` and ``export`` write files.

  Attributes:
    model: the quantized tf_keras model (tfmot wrappers, calibrated), compiled
      (cross-entropy, accuracy, Adam): ``evaluate(x, y)`` works as returned,
      and so do ``fit`` and the callbacks in `keras_mpq.callbacks`. Save it
      as ``.keras``, ``.h5`` or SavedModel; load it inside
      `keras_mpq.quantize_scope`.
    plan: the chosen bits per layer (`QuantizationPlan`).
    sensitivity: the last measured `SensitivityTable`.
    report: budget, achieved costs, per-layer table, search rounds, timings.
    float_model: the float model after BatchNorm folding (what was measured).
    calibration_data: the inputs used for calibration (synthetic or given).
    costs: the per-layer `CostTable` the budget was checked against.
    recipe: every resolved setting of the run (`keras_mpq.recipe.Recipe`);
      None: read from ``report["settings"]``.
  """

  model: Any
  plan: QuantizationPlan
  sensitivity: SensitivityTable
  report: Mapping[str, Any]
  float_model: Any
  calibration_data: np.ndarray
  costs: CostTable
  recipe: Optional[Recipe] = None

  def _recipe(self) -> Optional[Recipe]:
    if self.recipe is not None:
      return self.recipe
    settings = self.report.get("settings")
    return Recipe.from_dict(settings) if settings else None

  def export(self, path, target: str = "mobile", **kwargs):
    """Writes a TFLite flatbuffer for ``target`` ('mobile', 'mcu', 'ethos-u').

    Returns the exporter's `ExportResult` (size, per-layer storage, notes).

    >>> result.export("model.tflite", target="mcu")  # doctest: +SKIP
    """
    from keras_mpq.base.errors import FileOverBudgetError  # pylint: disable=g-import-not-at-top
    from keras_mpq.export import exporter as exporter_lib  # pylint: disable=g-import-not-at-top
    from keras_mpq.plan import allocation as allocation_lib  # pylint: disable=g-import-not-at-top
    recipe = self._recipe()
    kwargs.setdefault("ram", recipe.ram if recipe else None)
    kwargs.setdefault("range_policy", recipe.range_policy if recipe else None)
    if recipe is not None and recipe.strip is not None:
      kwargs.setdefault("strip", recipe.strip)
    budget = recipe.budget if recipe is not None else (
        Budget.from_dict(self.report["budget"]) if "budget" in self.report else None)
    file_budget = (budget is not None and budget.kind == BudgetKind.BYTES
                   and self.costs.target == target)
    if file_budget:
      kwargs.setdefault("max_bytes", budget.value)
    model, plan = self.model, access_lib.current_plan(self.model, **dict(self.plan.info))
    notes = []
    for attempt in range(4):
      try:
        result = exporter_lib.export_tflite(access_lib.bake(model), path, plan, target=target,
                                          calibration_data=self.calibration_data, **kwargs)
        break
      except FileOverBudgetError as e:
        if not file_budget or attempt == 3:
          raise
        # Re-plan: tighten the allocator's budget by the overshoot, and allocate again.
        limit = budget.value - (e.size - e.limit) * (attempt + 1) - 16 * (attempt + 1)
        try:
          found = allocation_lib.allocate(self.sensitivity, Budget.bytes(max(limit, 1.0)),
                                      self.costs, (recipe.pinned if recipe else None) or None)
        except KerasMpqError:
          raise e from None
        new_plan = found.plan if hasattr(found, "plan") else found
        notes.append(f"file {e.size} B > budget {e.limit:.0f} B: re-planned with the "
                     f"allocator's budget at {limit:.0f} B")
        plan = QuantizationPlan(new_plan.weight_bits,
                                {n: self.plan.act_bits(n) for n in new_plan.weight_bits},
                                self.plan.default_activation_bits, new_plan.info)
        model = apply_lib.apply_plan(
            self.float_model, plan, self.calibration_data, fold_bn=False,
            **(recipe.apply_settings() if recipe is not None else {}))
    if notes:
      result = dataclasses.replace(result, notes=tuple(notes) + tuple(result.notes) + (
          "re-planned weight bits: " + ", ".join(f"{k}={v}" for k, v in
                                                  plan.weight_bits.items()),))
    return result

  def save(self, directory, plots: bool = True) -> Dict[str, str]:
    """Writes plan.json, sensitivity.json, report.json and PNG plots into ``directory``."""
    from keras_mpq import report as report_lib  # pylint: disable=g-import-not-at-top
    directory = fileio_lib.ensure_dir(directory)
    files = {"plan": directory / "plan.json", "sensitivity": directory / "sensitivity.json",
             "report": directory / "report.json"}
    fileio_lib.write_text(files["plan"], self.plan.to_json())
    fileio_lib.write_text(files["sensitivity"], self.sensitivity.to_json())
    fileio_lib.write_json(files["report"], self.report)
    if plots:
      files.update(report_lib.write_plots(self, directory))
    return {k: str(v) for k, v in files.items()}
