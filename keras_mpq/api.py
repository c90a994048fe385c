"""`quantize`: the whole keras_mpq pipeline in one call, returning an immutable result.

    model -> synthesize -> sensitivity -> allocate -> apply -> (export -> validate)

Each stage is also a public function of its own module; this facade only
wires them together, times them, and caches the expensive ones so a killed
run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import time
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from keras_mpq import act_ranges
from keras_mpq import augment as augment_lib
from keras_mpq import apply as apply_lib
from keras_mpq import fileio
from keras_mpq.compat import keras, set_global_seed
from keras_mpq.types import (InputRangeAssumedWarning, Budget, BudgetInfeasibleError, BudgetKind, CostTable,
                             FLOAT_BITS, InvalidInputError, KerasMpqError,
                             MissingDependencyError,
                             QuantizationPlan, SensitivityTable, check_activation_bits,
                             check_weight_bits, to_jsonable)

TARGETS = ("mobile", "mcu", "ethos-u")

DEFAULT_NUM_SAMPLES = 256
"""Samples the sensitivity search measures on, for models up to `SAMPLE_WORK`."""
MIN_DEFAULT_SAMPLES = 32
SAMPLE_WORK = 2e8
"""Weight layers x multiply-accumulates per sample up to which the sensitivity
search measures on `DEFAULT_NUM_SAMPLES` samples. Its table costs about
layers x bit-widths forward passes over them, so larger models get
proportionally fewer (at least `MIN_DEFAULT_SAMPLES`): the MNIST CNNs keep
256, EfficientNetB0 at 96x96 gets 32."""
MAX_DEFAULT_SAMPLES = 1024
"""Most synthetic samples `quantize` makes when ``num_samples`` is None."""
SYNTHESIS_MACS = 3e9
"""Multiply-accumulates per sample x samples up to which `quantize` synthesizes
more samples than the search measures on (at most `MAX_DEFAULT_SAMPLES`) when
the budget forces some layer below `LOW_BITS`: the weight optimizer (GPTQ's
and AdaRound's Hessians, bias correction) and the scale tuning use all of
them. Data-free 2-bit on the plain MNIST CNN (float 94.7%), 256 against 1024
synthetic samples: 92.1 against 94.05% before tuning (issue 13). At 3 bits and
above, 256 did as well, and synthesis is most of a small model's wall time.
For images the extra samples are shifted copies of the synthesized ones
(`default_calibration_sizes`, `keras_mpq.augment`)."""
LOW_BITS = 3


def default_search_samples(cost_table: CostTable) -> int:
  """Samples the sensitivity search measures on (see `SAMPLE_WORK`)."""
  work = len(cost_table.layers) * sum(float(c.macs or 0) for c in cost_table.layer_costs)
  if work <= SAMPLE_WORK:
    return DEFAULT_NUM_SAMPLES
  n = int(DEFAULT_NUM_SAMPLES * SAMPLE_WORK / work) // 16 * 16
  return int(min(max(n, MIN_DEFAULT_SAMPLES), DEFAULT_NUM_SAMPLES))


def forces_low_bits(cost_table: CostTable, budget: Budget) -> bool:
  """True when no uniform plan at `LOW_BITS` or more fits ``budget`` (some layer must go lower)."""
  if not any(b < LOW_BITS for b in cost_table.bits) or not cost_table.has(budget.kind):
    return False
  for b in sorted(b for b in cost_table.bits if b >= LOW_BITS):
    if cost_table.plan_cost(QuantizationPlan.uniform(cost_table.layers, b),
                            budget.kind) <= budget.value * (1 + 1e-9):
      return False
  return True


def default_num_samples(cost_table: CostTable, budget: Optional[Budget] = None) -> int:
  """Synthetic samples for a model when ``num_samples`` is None.

  `default_search_samples`; when ``budget`` forces some layer below `LOW_BITS`,
  up to `MAX_DEFAULT_SAMPLES` for small models (see `SYNTHESIS_MACS`).
  """
  search = default_search_samples(cost_table)
  if budget is None or not forces_low_bits(cost_table, budget):
    return search
  macs = sum(float(c.macs or 0) for c in cost_table.layer_costs)
  more = int(SYNTHESIS_MACS / macs) // 16 * 16 if macs > 0 else MAX_DEFAULT_SAMPLES
  return int(max(search, min(more, MAX_DEFAULT_SAMPLES)))


def default_calibration_sizes(cost_table: CostTable, budget: Optional[Budget],
                              input_shape) -> Tuple[int, int]:
  """(samples to synthesize, calibration samples in all) when ``num_samples`` is None.

  In all: `default_num_samples`. Where that is more than the search measures
  on (`default_search_samples`) and the input is an image (`keras_mpq.augment.can_shift`),
  only the search's share is synthesized and shifted copies make up the rest,
  which scored as well as synthesizing them all for a quarter of the time.

  >>> default_calibration_sizes(table, Budget.avg_bits(2), (28, 28, 1))  # doctest: +SKIP
  (256, 1024)
  """
  total = default_num_samples(cost_table, budget)
  search = default_search_samples(cost_table)
  if total > search and augment_lib.can_shift(input_shape):
    return search, total
  return total, total


def search_subset(n: int, limit: int, seed: int = 0) -> np.ndarray:
  """Sorted indices of the at most ``limit`` of ``n`` samples the search measures on (seeded).

  `keras_mpq.act_ranges.subset_indices`, the rule activation ranges use too.
  """
  return act_ranges.subset_indices(n, limit, seed)


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
  """

  model: Any
  plan: QuantizationPlan
  sensitivity: SensitivityTable
  report: Mapping[str, Any]
  float_model: Any
  calibration_data: np.ndarray
  costs: CostTable

  def export(self, path, target: str = "mobile", **kwargs):
    """Writes a TFLite flatbuffer for ``target`` ('mobile', 'mcu', 'ethos-u').

    Returns the exporter's `ExportResult` (size, per-layer storage, notes).

    >>> result.export("model.tflite", target="mcu")  # doctest: +SKIP
    """
    from keras_mpq import allocation  # pylint: disable=g-import-not-at-top
    from keras_mpq import export as export_lib  # pylint: disable=g-import-not-at-top
    from keras_mpq.types import FileOverBudgetError  # pylint: disable=g-import-not-at-top
    settings = self.report.get("settings", {})
    kwargs.setdefault("ram", settings.get("ram"))
    kwargs.setdefault("range_policy", settings.get("range_policy"))
    if settings.get("strip") is not None:
      kwargs.setdefault("strip", settings.get("strip"))
    budget = Budget.from_dict(self.report["budget"]) if "budget" in self.report else None
    file_budget = (budget is not None and budget.kind == BudgetKind.BYTES
                   and self.costs.target == target)
    if file_budget:
      kwargs.setdefault("max_bytes", budget.value)
    model, plan = self.model, apply_lib.current_plan(self.model, **dict(self.plan.info))
    notes = []
    for attempt in range(4):
      try:
        result = export_lib.export_tflite(apply_lib.bake(model), path, plan, target=target,
                                          calibration_data=self.calibration_data, **kwargs)
        break
      except FileOverBudgetError as e:
        if not file_budget or attempt == 3:
          raise
        # Re-plan: tighten the allocator's budget by the overshoot, and allocate again.
        limit = budget.value - (e.size - e.limit) * (attempt + 1) - 16 * (attempt + 1)
        try:
          found = allocation.allocate(self.sensitivity, Budget.bytes(max(limit, 1.0)),
                                      self.costs, settings.get("pinned") or None)
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
            weight_method=settings.get("weight_method"),
            bias_correction=settings.get("bias_correction"),
            range_policy=settings.get("range_policy"),
            tune_steps=settings.get("tune_steps"),
            tune_temperature=settings.get("tune_temperature", 1.0),
            seed=settings.get("seed", 0))
    if notes:
      result = dataclasses.replace(result, notes=tuple(notes) + tuple(result.notes) + (
          "re-planned weight bits: " + ", ".join(f"{k}={v}" for k, v in
                                                  plan.weight_bits.items()),))
    return result

  def save(self, directory, plots: bool = True) -> Dict[str, str]:
    """Writes plan.json, sensitivity.json, report.json and PNG plots into ``directory``."""
    from keras_mpq import report as report_lib  # pylint: disable=g-import-not-at-top
    directory = fileio.ensure_dir(directory)
    files = {"plan": directory / "plan.json", "sensitivity": directory / "sensitivity.json",
             "report": directory / "report.json"}
    fileio.write_text(files["plan"], self.plan.to_json())
    fileio.write_text(files["sensitivity"], self.sensitivity.to_json())
    fileio.write_json(files["report"], self.report)
    if plots:
      files.update(report_lib.write_plots(self, directory))
    return {k: str(v) for k, v in files.items()}


class _StageBar:
  """One line per finished pipeline stage and its seconds (stages with their own
  bars, synthesis and sensitivity, show those inside), when progress is shown."""

  STAGES = ("load", "synthesis", "sensitivity+allocation", "apply")

  def __init__(self, progress: Optional[bool]):
    from keras_mpq import sensitivity as sens_lib  # pylint: disable=g-import-not-at-top
    self.bar = None
    if sens_lib._show_progress(progress):  # pylint: disable=protected-access
      from tqdm import auto as tqdm_auto  # pylint: disable=g-import-not-at-top
      self.bar = tqdm_auto.tqdm(total=len(self.STAGES), desc="keras_mpq: load", leave=False,
                                bar_format="{desc} [{n_fmt}/{total_fmt} stages, {elapsed}]")

  def done(self, stage: str, seconds: float) -> None:
    if self.bar is None:
      return
    index = self.STAGES.index(stage) if stage in self.STAGES else len(self.STAGES) - 1
    following = self.STAGES[index + 1] if index + 1 < len(self.STAGES) else "report"
    self.bar.write(f"keras_mpq: {stage} took {seconds:.1f}s")
    self.bar.set_description_str(f"keras_mpq: {following}")
    self.bar.update(1)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _parse_data(model, data) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  if isinstance(data, (tuple, list)) and len(data) == 2:
    x, y = data
  else:
    x, y = data, None
  x = apply_lib.check_data(model, x, "data")
  if y is not None:
    y = np.asarray(y)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
      raise InvalidInputError(
          f"Expected integer class labels in data=(x, y). Received: labels of dtype {y.dtype}")
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
      y = y.argmax(axis=1)
    y = y.reshape(-1)
    if len(y) != len(x):
      raise InvalidInputError(
          f"Expected as many labels as inputs. Received: {len(x)} inputs, {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer):
      if not np.all(np.equal(np.mod(y, 1), 0)):
        raise InvalidInputError("Expected integer class labels in data=(x, y).")
    y = y.astype(np.int64)
  return x, y


def _cache_key(model, settings: Mapping[str, Any], data_x=None) -> str:
  from keras_mpq import model_io  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  h.update(model_io.fingerprint(model).encode())
  h.update(json.dumps(to_jsonable(settings), sort_keys=True).encode())
  if data_x is not None:
    h.update(np.ascontiguousarray(data_x).tobytes())
  return h.hexdigest()[:16]


def _read_cached_data(path: pathlib.Path, model) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """Cached synthetic ``(x, y)``, or None if the file is unreadable or does not fit ``model``."""
  try:
    with np.load(path, allow_pickle=False) as z:
      x, y = np.asarray(z["x"]), np.asarray(z["y"]).reshape(-1)
    x = apply_lib.check_data(model, x, "cached data")
    if len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
      return None
    return x, y.astype(np.int64)
  except Exception:  # pylint: disable=broad-except  # a damaged cache is recomputed
    return None


def _read_cached_search(path: pathlib.Path):
  """Cached ``(plan, table, rounds)``, or None if the file is unreadable."""
  try:
    saved = json.loads(path.read_text())
    return (QuantizationPlan.from_dict(saved["plan"]),
            SensitivityTable.from_dict(saved["sensitivity"]), list(saved["rounds"]))
  except Exception:  # pylint: disable=broad-except  # a damaged cache is recomputed
    return None


def _check_early(cost_table, budget, pinned, metric, synthesis, rounds, data) -> None:
  """Refuses bad settings before the expensive stages (synthesis can take minutes)."""
  from keras_mpq import allocation  # pylint: disable=g-import-not-at-top
  from keras_mpq import sensitivity as sens_lib, synthesis as synth_lib  # pylint: disable=g-import-not-at-top
  if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
    raise InvalidInputError(f"Expected rounds >= 1. Received: rounds={rounds!r}")
  sens_lib.get_metric(metric)
  if data is None:
    synth_lib.get_generator(synthesis)
  # Unknown pins, a budget kind without costs, or a budget below the cheapest
  # plan: the allocator says so now, on a zero table, instead of after synthesis.
  zero = SensitivityTable(cost_table.layers, cost_table.bits,
                          np.zeros((len(cost_table.layers), len(cost_table.bits))))
  allocation.allocate(zero, budget, cost_table, pinned)


def quantize(model, budget, data=None, target: str = "mobile",
             weight_bits: Optional[Sequence[int]] = None, activation_bits: int = 8,
             metric: str = "task_interaction", synthesis: str = "labeled",
             num_samples: Optional[int] = None, rounds: int = 1,
             pinned: Optional[Mapping[str, int]] = None, seed: int = 0,
             cache_dir=None, progress: Optional[bool] = None,
             input_range: Optional[Tuple[float, float]] = None, *,
             weight_method: Optional[str] = None,
             bias_correction: Optional[Union[bool, str]] = None,
             objective: Optional[str] = None,
             context: str = "highest",
             ram: Optional[float] = None, strip=None,
             range_policy: Optional[str] = None,
             tune_steps: Optional[int] = None) -> QuantizationResult:
  """Quantizes ``model`` to mixed precision within ``budget``, without training data.

  Args:
    model: a tf_keras model, a Keras 3 model, or a path to ``.keras``, ``.h5``
      or a SavedModel directory.
    budget: a `Budget`, a size such as ``"48KB"``, an average weight
      bit-width such as ``"4bit"``, BOPs such as ``"2e8bops"``.
    data: None to synthesize labeled data from the model itself (data-free);
      or real inputs ``x`` or ``(x, y)`` (unlabeled inputs are labeled by the
      float model).
    target: 'mobile', 'mcu' or 'ethos-u' (what `QuantizationResult.export`
      writes by default; recorded in the report).
    weight_bits: candidate weight bit-widths per layer (2..8). None: the
      default for the budget's kind (`keras_mpq.allocation.default_weight_bits`).
    activation_bits: 8 or 16.
    metric: sensitivity metric (see `keras_mpq.sensitivity`).
    synthesis: 'labeled' (the paper's), 'zeroq' or 'noise' when data is None.
    num_samples: synthetic samples to generate; None: `default_num_samples`
      (256, fewer for large models: EfficientNetB0 at 96x96 gets 32; for a
      budget that forces layers below 3 bits, up to 1024 for small models:
      the MNIST CNNs get 1024, of which image models synthesize 256 and add
      768 shifted copies, `default_calibration_sizes`). The sensitivity
      search measures on the synthesized ones, or on a seeded subset of at
      most `default_search_samples` (of ``data`` too: 256 for small models,
      32 for EfficientNetB0 at 96x96); the weight optimizer and the tuning
      use them all.
    rounds: rounds of the task-interaction search. 1 (the default) measures
      sensitivity in the default context and allocates once; more rounds
      re-measure in the context of the last plan and keep the plan with the
      lowest measured loss. On synthetic data that refinement did not help
      and once cost 20 points (benchmarks/bench_rounds.py), hence the default.
    pinned: layers fixed to given bits, e.g. ``{"conv1": 8}``.
    seed: makes the whole run repeatable.
    cache_dir: where to cache synthetic data and sensitivity so a killed run
      resumes (None: no cache).
    progress: progress bars (None: only when stderr is a terminal).
    input_range: ``(low, high)`` of the model's valid inputs. Default: read
      off a Rescaling/Normalization layer at the input, else [0, 1], assumed
      (the summary and ``report["input_range"]`` say so). Synthetic data stays
      inside it; real ``data`` outside it is an error naming both ranges.
    weight_method: how each layer's weights are quantized, in the sensitivity
      table and in the returned model alike: 'rtn', 'mse', 'gptq',
      'gptq-damped' or 'adaround' (default with ``data``:
      `keras_mpq.apply.DEFAULT_WEIGHT_METHOD`; data-free:
      `keras_mpq.apply.DATA_FREE_WEIGHT_METHOD`; see `keras_mpq.weight_quant`).
    bias_correction: True (or 'empirical'): bias correction on the calibration
      data; 'analytic': from the BatchNorm statistics where a layer's input
      follows one (DFQ, `keras_mpq.analytic_bias`), empirical elsewhere; False:
      none (default `keras_mpq.apply.DEFAULT_BIAS_CORRECTION` with ``data``,
      `keras_mpq.apply.DATA_FREE_BIAS_CORRECTION` data-free).
    objective: task loss the sensitivity and the plan check measure: ``"kl"``
      (divergence from the float model's outputs; default) or
      ``"cross_entropy"`` (against the labels).
    context: first context of the task-interaction metric, ``"highest"`` or
      ``"budget"`` (see `keras_mpq.sensitivity.search`).
    ram: RAM limit in bytes for the TFLite Micro arena ('mcu', 'ethos-u');
      `QuantizationResult.export` raises `RamLimitError` above it.
    strip: what the export strips (see `keras_mpq.export.export_tflite`);
      None: the target's default (everything TFLite Micro ignores, for mcu).
    range_policy: how each activation's range is set from the calibration
      data: 'minmax' (default), 'percentile' or 'mse' (see
      `keras_mpq.act_ranges`); the sensitivity table, the returned model and
      its exports all use it, and ``report["activation_ranges"]`` says which
      layers it clipped.
    tune_steps: steps of the last stage, `keras_mpq.distill.tune` (each
      quantized layer's per-channel scales and bias tuned so the model's
      outputs match the float model's on the calibration data; the integers
      stay), kept only if a held-out part of the data agrees better. None:
      its default for the model's size (`keras_mpq.distill.default_steps`),
      data-free only where the budget forces layers below 3 bits
      (`forces_low_bits`) and at `keras_mpq.distill.DATA_FREE_TEMPERATURE`;
      0: none. ``report["tuning"]`` says what it did.

  The plan is checked by measurement before it is returned: the allocated
  plan, every uniform plan that fits the budget and a greedy plan are
  measured on a held-out part of the calibration data (half of it, when it
  has at least 64 samples), and the best measured one is kept (within two
  standard errors of the lowest loss, a plan with at least as many bits in
  every layer wins the tie); ``report["plan_selection"]`` says which won and
  by how much.

  A byte budget (``"48KB"``) is the size of the exported file for
  ``target``: one cheap export measures the file's fixed part, the costs come
  from the exporter's storage rules for that target, and
  `QuantizationResult.export` checks the written file against the budget
  (re-planning if it came out larger).

  Returns:
    A `QuantizationResult`.

  Example:

  >>> import keras_mpq
  >>> result = keras_mpq.quantize(model, "4bit", seed=0)  # doctest: +SKIP
  >>> result.plan.weight_bits  # doctest: +SKIP
  {'conv1': 8, 'conv2': 4, 'conv3': 4, 'fc1': 2, 'logits': 8}
  >>> result.export("model.tflite", target="mcu")  # doctest: +SKIP
  """
  from keras_mpq import costs as costs_lib  # pylint: disable=g-import-not-at-top
  from keras_mpq import input_range as input_range_lib, model_io, realism  # pylint: disable=g-import-not-at-top
  from keras_mpq import sensitivity as sens_lib, synthesis as synth_lib  # pylint: disable=g-import-not-at-top

  timings: Dict[str, float] = {}
  clock = time.perf_counter()

  stages = _StageBar(progress)

  def lap(stage):
    nonlocal clock
    now = time.perf_counter()
    timings[stage] = round(now - clock, 3)
    clock = now
    stages.done(stage, timings[stage])

  if target not in TARGETS:
    raise InvalidInputError(f"Expected target in {TARGETS}. Received: target={target!r}")
  budget = Budget.parse(budget)
  if weight_bits is None:
    from keras_mpq import allocation  # pylint: disable=g-import-not-at-top
    weight_bits = allocation.default_weight_bits(budget)
  bits = tuple(sorted({check_weight_bits(b, "weight_bits") for b in weight_bits}))
  if FLOAT_BITS in bits:
    raise InvalidInputError("weight_bits are candidate integer bit-widths (2..8).")
  activation_bits = check_activation_bits(activation_bits)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise InvalidInputError(f"Expected seed to be an integer >= 0. Received: seed={seed!r}")
  set_global_seed(seed)

  model = model_io.load_model(model)
  model_io.check_model(model)
  model_io.check_token_input(model)
  model_io.classifier_head(model)  # refuses regression heads before the slow stages
  low, high, range_source, range_assumed = input_range_lib.resolve_input_range(model, input_range)
  range_info = {"low": low, "high": high, "source": range_source, "assumed": range_assumed}
  if range_assumed and data is None:
    warnings.warn(
        f"keras_mpq assumes the model takes inputs in [{low:g}, {high:g}]: it has no "
        "Rescaling/Normalization input layer and no input_range was given. Synthetic "
        "data, the input quantizer and the exported file all follow this range; pass "
        "input_range=(lo, hi) (--input_range=LO,HI) if the model takes another.",
        InputRangeAssumedWarning, stacklevel=2)
  folded = apply_lib.fold_batchnorm(model)
  if ram is not None and (isinstance(ram, bool) or not isinstance(ram, (int, float))
                          or not np.isfinite(ram) or ram <= 0):
    raise InvalidInputError(f"Expected ram as a positive number of bytes. Received: ram={ram!r}")
  cost_table = None
  if budget.kind == BudgetKind.BYTES:
    try:
      cost_table = _file_costs(folded, target, bits, activation_bits, strip, seed, budget)
    except MissingDependencyError:  # no exporter installed: weight bytes only (report says so)
      cost_table = None
  if cost_table is None:
    cost_table = costs_lib.cost_table(folded, bits=bits, activation_bits=activation_bits)
  _check_early(cost_table, budget, pinned, metric, synthesis, rounds, data)
  synthesized = num_samples
  if num_samples is None:
    synthesized, num_samples = default_calibration_sizes(
        cost_table, budget, tuple(folded.inputs[0].shape)[1:])
  lap("load")

  weight_method, bias_correction = apply_lib.check_weight_method(
      weight_method, bias_correction, data_free=data is None)
  range_policy = act_ranges.check_range_policy(range_policy)
  from keras_mpq import distill  # pylint: disable=g-import-not-at-top
  tune_steps = distill.check_steps(tune_steps)
  tune_note = None
  if tune_steps is None and data is None and not forces_low_bits(cost_table, budget):
    # Data-free at 3 bits and above, tuning on synthetic data moved the MNIST CNNs by
    # -0.4 to +0.85 points (+0.15 on average); below 3 bits, up to +14 (issue 13).
    tune_steps = 0
    tune_note = (f"data-free, and the budget needs no layer below {LOW_BITS} bits: tuning "
                 "on synthetic data gained little there; pass tune_steps to tune anyway")
  settings = {"range_policy": range_policy, "bits": bits, "activation_bits": activation_bits,
              "metric": metric,
              "weight_method": weight_method, "bias_correction": bias_correction,
              "synthesis": synthesis, "num_samples": num_samples,
              "synthesized": synthesized, "seed": seed,
              "rounds": rounds, "pinned": dict(pinned or {}), "budget": budget.to_dict(),
              "input_range": [low, high], "objective": objective, "context": context,
              "target": target, "ram": ram, "strip": strip, "tune_steps": tune_steps,
              "tune_temperature": (distill.DATA_FREE_TEMPERATURE if data is None else 1.0)}
  cache = fileio.ensure_dir(cache_dir) if cache_dir is not None else None

  # 1. Calibration data: synthesized from the model, or the user's.
  data_info: Dict[str, Any]
  if data is None:
    key = _cache_key(model, {k: settings[k] for k in
                             ("synthesis", "num_samples", "synthesized", "seed", "input_range")})
    cached = cache / f"synthetic-{key}.npz" if cache else None
    hit = _read_cached_data(cached, model) if cached is not None and cached.exists() else None
    if hit is not None:
      x, y = hit
      data_info = {"source": "synthetic", "method": synthesis, "cached": str(cached)}
    else:
      made = synth_lib.synthesize_with_info(model, num_samples=synthesized,
                                            method=synthesis, seed=seed, progress=progress,
                                            input_range=input_range)
      x, y = made.x, made.y
      data_info = {"source": "synthetic", **made.summary(),
                   "realism": realism.self_consistency(folded, x, made.x_midway)}
      if cached is not None:
        buffer = io.BytesIO()
        np.savez(buffer, x=x, y=y)
        fileio.write_bytes(cached, buffer.getvalue())
    if num_samples > synthesized:  # cheap and seeded: made again on a cache hit, not stored
      x, source = augment_lib.shifted_copies(x, num_samples, seed=seed)
      y = y[source]
      data_info["shifted_copies"] = int(num_samples - synthesized)
  else:
    x, y = _parse_data(model, data)
    range_info.update(input_range_lib.check_data_range(x, low, high, range_source, range_assumed,
                                                 "data"))
    data_info = {"source": "user", "labeled": y is not None}
    if y is None:
      y = sens_lib.predicted_labels(model, x, not sens_lib._outputs_are_probabilities(  # pylint: disable=protected-access
          model, x), batch_size=256)
  data_info["num_samples"] = int(len(x))
  lap("synthesis")

  # 2-3. Sensitivity and allocation (the iterative task-interaction search), on a subset.
  # Shifted copies sit after the synthesized samples: the search measures on those.
  made_here = len(x) - data_info.get("shifted_copies", 0)
  pick = search_subset(made_here, default_search_samples(cost_table), seed)
  data_info["search_samples"] = int(len(pick))
  search_key = _cache_key(model, {k: v for k, v in settings.items()
                                  if k not in ("tune_steps", "tune_temperature")}, x)
  cached_search = cache / f"search-{search_key}.json" if cache else None
  hit = (_read_cached_search(cached_search)
         if cached_search is not None and cached_search.exists() else None)
  if hit is not None:
    plan, table, rounds_info = hit
  else:
    with apply_lib.weight_defaults(weight_method, bias_correction), \
        act_ranges.policy_default(range_policy):
      found = sens_lib.search(folded, (x[pick], y[pick]), budget, weight_bits=bits, rounds=rounds,
                              metric=metric, pinned=pinned, costs=cost_table, seed=seed,
                              activation_bits=activation_bits, progress=progress,
                              objective=objective, context=context)
    plan, table, rounds_info = found.plan, found.sensitivity, list(found.rounds)
    if cached_search is not None:
      fileio.write_json(cached_search, {"plan": plan.to_dict(),
                                        "sensitivity": table.to_dict(),
                                        "rounds": rounds_info})
  lap("sensitivity+allocation")

  # 4. Apply through tfmot and calibrate.
  plan = QuantizationPlan(plan.weight_bits,
                          {n: activation_bits for n in plan.weight_bits},
                          activation_bits, plan.info)
  qmodel = apply_lib.apply_plan(folded, plan, x, fold_bn=False, weight_method=weight_method,
                                bias_correction=bias_correction, range_policy=range_policy,
                                progress=sens_lib._show_progress(progress),  # pylint: disable=protected-access
                                tune_steps=tune_steps, tune_temperature=settings["tune_temperature"],
                                seed=seed)
  _compile_for_evaluation(qmodel, folded, x)
  lap("apply")

  stages.close()
  report = build_report(folded, qmodel, plan, table, cost_table, budget, target,
                        data_info, rounds_info, timings, settings)
  report["input_range"] = range_info
  report["activation_ranges"] = _range_report(qmodel, folded, x, range_policy)
  report["tuning"] = distill.tune_report(qmodel) or {"steps": 0, "kept": False,
                                                     "reason": tune_note or "tune_steps=0"}
  return QuantizationResult(qmodel, plan, table, report, folded, x, cost_table)


def _range_report(qmodel, folded, x, policy: str) -> Dict[str, Any]:
  """The range policy and, per layer it clipped, the range against the min/max seen."""
  info: Dict[str, Any] = {"policy": policy, "clipped": {}}
  if policy == "minmax":
    return info
  chosen = apply_lib.activation_ranges(qmodel)
  seen = apply_lib.observed_ranges(qmodel, x)
  for name, (lo, hi) in chosen.items():
    if name in seen and (lo, hi) != seen[name]:
      info["clipped"][name] = {"range": [lo, hi], "minmax": list(seen[name])}
  return info


def _compile_for_evaluation(qmodel, folded, x) -> None:
  """Compiles ``qmodel`` so ``evaluate(x, y)`` with integer labels works as returned.

  Loss: sparse categorical cross-entropy (binary for one output unit), from
  logits unless the float model's outputs are probabilities; metric:
  accuracy; optimizer: Adam, for quantization-aware fine-tuning with ``fit``.
  Compile again for another loss. Models whose output is not (batch, units)
  are left uncompiled.
  """
  out = np.asarray(folded(x[:64], training=False), dtype=np.float64)
  if out.ndim != 2:
    return
  probabilities = bool(np.all(out >= 0) and np.all(out <= 1 + 1e-6))
  if out.shape[1] == 1:
    loss = keras.losses.BinaryCrossentropy(from_logits=not probabilities)
  else:
    probabilities = probabilities and bool(np.allclose(out.sum(axis=1), 1.0, atol=1e-3))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities)
  qmodel.compile(optimizer=keras.optimizers.Adam(1e-4), loss=loss, metrics=["accuracy"])


def _file_costs(folded, target, bits, activation_bits, strip, seed, budget) -> CostTable:
  """Byte costs of ``target``'s file; refuses a budget below its fixed part, before synthesis."""
  from keras_mpq import costs as costs_lib, export as export_lib  # pylint: disable=g-import-not-at-top
  profile = export_lib.measure_storage(folded, target, activation_bits=activation_bits,
                                       strip=strip, seed=seed)
  table = costs_lib.file_cost_table(folded, profile, bits=bits, activation_bits=activation_bits)
  smallest = float(table.matrix("bytes").min(axis=1).sum())
  m = table.matrix("bytes")
  fixed_rows = [n for n, row in zip(table.layers, m) if np.ptp(row) == 0]
  flat = (f" On {target}, layers {fixed_rows} cost the same at every bit-width (their "
          "operators run only with int8 weights there)." if fixed_rows else "")
  if budget.value < smallest:
    raise BudgetInfeasibleError(
        f"Expected a byte budget of at least {smallest:.0f} B for target={target!r}: that is "
        f"the smallest file (every layer at {min(bits)} bits), of which {table.fixed_bytes:.0f} B "
        "is the file's fixed part (graph, activation scales, structure), measured by "
        f"exporting this model.{flat} Received: budget={budget.describe()}. Raise the "
        "budget, or add lower candidate bit-widths.", smallest)
  return table


def build_report(folded, qmodel, plan, table, cost_table, budget, target, data_info,
                 rounds_info, timings, settings) -> Dict[str, Any]:
  """The JSON-able report of a run: what was asked, what was chosen, what it costs."""
  by_name = {c.name: c for c in cost_table.layer_costs}
  rows = []
  for row in apply_lib.layer_report(qmodel):
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
      "unsupported_layers": apply_lib.unsupported_layers(folded),
      "timings_s": dict(timings),
      "settings": settings,
  }
