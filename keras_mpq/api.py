"""`quantize`: the whole keras_mpq pipeline in one call, returning an immutable result.

    model -> synthesize -> sensitivity -> allocate -> apply -> (export -> validate)

Each stage is also a public function of its own package; this facade only
resolves the settings into one `keras_mpq.recipe.Recipe`, wires the stages
together, times them, and caches the expensive ones so a killed run resumes
where it stopped.
"""

from __future__ import annotations

import io
import time
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from keras_mpq import recipe as recipe_lib
from keras_mpq.base import act_ranges as act_ranges_lib
from keras_mpq.base import batching
from keras_mpq.base import fileio as fileio_lib
from keras_mpq.base.compat import set_global_seed
from keras_mpq.base.errors import (
  InputRangeAssumedWarning,
  InvalidInputError,
  MissingDependencyError,
)
from keras_mpq.base.progress import StageBar, show_progress
from keras_mpq.base.types import (
  FLOAT_BITS,
  Budget,
  BudgetKind,
  CostTable,
  QuantizationPlan,
  SensitivityTable,
  check_activation_bits,
  check_weight_bits,
)
from keras_mpq.cache import cache_key, read_cached_data, read_cached_search
from keras_mpq.export.targets import TARGETS
from keras_mpq.model import checks as model_checks_lib
from keras_mpq.model import input_range as input_range_lib
from keras_mpq.model import inputs as inputs_lib
from keras_mpq.model import load as load_lib
from keras_mpq.model import outputs as outputs_lib
from keras_mpq.plan import allocation as allocation_lib
from keras_mpq.plan import costs as costs_lib
from keras_mpq.plan import search as search_lib
from keras_mpq.quantization import apply as apply_lib
from keras_mpq.quantization import calibrate as calibrate_lib
from keras_mpq.quantization import distill as distill_lib
from keras_mpq.quantization import fold as fold_lib
from keras_mpq.quantization import optimize as optimize_lib
from keras_mpq.recipe import Recipe
from keras_mpq.report import build_report, range_report
from keras_mpq.result import QuantizationResult
from keras_mpq.sensitivity import job as job_lib
from keras_mpq.sensitivity import metrics as metrics_lib
from keras_mpq.synthesis import augment as augment_lib
from keras_mpq.synthesis import generators as generators_lib
from keras_mpq.synthesis import realism as realism_lib


def quantize(model, budget, data=None, target: str = "mobile",
             weight_bits: Optional[Sequence[int]] = None, activation_bits: int = 8,
             metric: str = "task_interaction", synthesis: Optional[str] = None,
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
             tune_steps: Optional[int] = None,
             output_kinds: Optional[Mapping[str, str]] = None,
             output_weights: Optional[Mapping[str, float]] = None,
             loss=None) -> QuantizationResult:
  """Quantizes ``model`` to mixed precision within ``budget``, without training data.

  Args:
    model: a tf_keras model, a Keras 3 model, or a path to ``.keras``, ``.h5``
      or a SavedModel directory.
    budget: a `Budget`, a size such as ``"48KB"``, an average weight
      bit-width such as ``"4bit"``, BOPs such as ``"2e8bops"``.
    data: None to synthesize labeled data from the model itself (data-free);
      or real inputs ``x`` or ``(x, y)`` (unlabeled inputs are labeled by the
      float model). For a model with several inputs, ``x`` is a list of
      arrays in ``model.inputs`` order or a dict by input name (the Keras
      ``Input`` names), all with the same number of samples
      (`keras_mpq.model.inputs.check_inputs`).
    target: 'mobile', 'mcu' or 'ethos-u' (what `QuantizationResult.export`
      writes by default; recorded in the report).
    weight_bits: candidate weight bit-widths per layer (2..8). None: the
      default for the budget's kind (`keras_mpq.plan.allocation.default_weight_bits`).
    activation_bits: 8 or 16.
    metric: sensitivity metric (see `keras_mpq.sensitivity.metrics`).
    synthesis: how calibration data is made when data is None: 'labeled'
      (the paper's; needs a class head), 'diverse' (BatchNorm statistics, input
      priors and outputs spread over the batch: any model), 'zeroq' or 'noise'.
      None: 'labeled' for a model with a class head (a classifier, or one
      softmax/logits head among several outputs), else 'diverse'.
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
      Several inputs: one ``(low, high)`` for all, a list of one per input, or
      a dict by input name; each input left out gets its own default by the
      same rules, and ``report["input_range"]`` is ``{"inputs": {name:
      {"low", "high", "source", "assumed"}}, "assumed": ...}``.
    weight_method: how each layer's weights are quantized, in the sensitivity
      table and in the returned model alike: 'rtn', 'mse', 'gptq',
      'gptq-damped' or 'adaround' (default with ``data``:
      `keras_mpq.quantization.optimize.DEFAULT_WEIGHT_METHOD`; data-free:
      `keras_mpq.quantization.optimize.DATA_FREE_WEIGHT_METHOD`; see `keras_mpq.quantization.weights`).
    bias_correction: True (or 'empirical'): bias correction on the calibration
      data; 'analytic': from the BatchNorm statistics where a layer's input
      follows one (DFQ, `keras_mpq.quantization.analytic_bias`), empirical elsewhere; False:
      none (default `keras_mpq.quantization.optimize.DEFAULT_BIAS_CORRECTION` with ``data``,
      `keras_mpq.quantization.optimize.DATA_FREE_BIAS_CORRECTION` data-free).
    objective: task loss the sensitivity and the plan check measure: ``"kl"``
      (divergence from the float model's outputs; the default for a
      single-label classifier) or ``"cross_entropy"`` (against the labels);
      ``"distortion"`` (the default, and the only choice, for any other model):
      per output, KL for softmax, per-unit KL for sigmoid, the squared error
      over the float output's variance for linear heads, summed
      (`keras_mpq.model.outputs.Heads`).
    context: first context of the task-interaction metric, ``"highest"`` or
      ``"budget"`` (see `keras_mpq.plan.search.search`).
    ram: RAM limit in bytes for the TFLite Micro arena ('mcu', 'ethos-u');
      `QuantizationResult.export` raises `RamLimitError` above it.
    strip: what the export strips (see `keras_mpq.export.exporter.export_tflite`);
      None: the target's default (everything TFLite Micro ignores, for mcu).
    range_policy: how each activation's range is set from the calibration
      data: 'minmax' (default), 'percentile' or 'mse' (see
      `keras_mpq.base.act_ranges`); the sensitivity table, the returned model and
      its exports all use it, and ``report["activation_ranges"]`` says which
      layers it clipped.
    tune_steps: steps of the last stage, `keras_mpq.quantization.distill.tune` (each
      quantized layer's per-channel scales and bias tuned so the model's
      outputs match the float model's on the calibration data; the integers
      stay), kept only if a held-out part of the data agrees better. None:
      its default for the model's size (`keras_mpq.quantization.distill.default_steps`),
      data-free only where the budget forces layers below 3 bits
      (`forces_low_bits`) and at `keras_mpq.quantization.distill.DATA_FREE_TEMPERATURE`;
      0: none. ``report["tuning"]`` says what it did. Classifiers only.
    output_kinds: what an output is where its layers do not say, by output
      name: 'softmax', 'logits', 'sigmoid' or 'linear', e.g.
      ``{"embedding": "linear"}`` for a model whose one linear output is not
      a classifier's logits (`keras_mpq.model.outputs.heads_of`).
    output_weights: weights of the outputs' distortion terms, by name
      (default 1 each).
    loss: your own task loss, with ``data=(x, y)``: a Keras loss (``"mse"``,
      a ``keras.losses.Loss``) or a callable ``fn(y_true, y_pred)``; ``y`` and
      the outputs are lists (or ``y`` a dict by output name) for several
      outputs. The sensitivity and the plan check measure it instead of the
      default objective (`keras_mpq.measure_sensitivity`).

  Any model with float inputs (one, or several) is taken: a classifier is measured and
  calibrated as one; an autoencoder, a per-pixel network, a regression or a
  model with several outputs by the distortion of its outputs from the float
  model's, on data that needs no labels. ``report["outputs"]`` lists the
  heads as read.

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

  stages = _Stages(progress)
  if target not in TARGETS:
    raise InvalidInputError(f"Expected target in {TARGETS}. Received: target={target!r}")
  budget = Budget.parse(budget)
  bits = _candidate_bits(budget, weight_bits)
  activation_bits = check_activation_bits(activation_bits)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise InvalidInputError(f"Expected seed to be an integer >= 0. Received: seed={seed!r}")
  set_global_seed(seed)

  model = load_lib.load_model(model)
  model_checks_lib.check_model(model)
  model_checks_lib.check_token_input(model)
  heads = outputs_lib.heads_of(model, output_kinds, output_weights)
  if loss is not None and (data is None or not isinstance(data, (tuple, list))
                           or len(data) != 2 or data[1] is None):
    raise InvalidInputError(
        "Expected data=(x, y) with loss=: the loss compares the outputs with your targets "
        "y. Received: " + ("data=None (data-free)" if data is None else "no targets")
        + ". Pass data=(x, y), or leave loss=None.")
  outputs_lib.keep_heads(model, heads)
  if synthesis is None:
    synthesis = (generators_lib.SynthesisMethod.LABELED if heads.class_head() is not None
                 else generators_lib.SynthesisMethod.DIVERSE).value
  range_info = _input_range(model, input_range, data_free=data is None)
  folded = fold_lib.fold_batchnorm(model)
  outputs_lib.keep_heads(folded, heads)
  _check_ram(ram)
  cost_table = _cost_table(folded, budget, target, bits, activation_bits, strip, seed)
  _check_early(cost_table, budget, pinned, metric, synthesis, rounds, data)
  recipe, tune_note = _resolve(
      cost_table, folded, budget, data is None, target=target, bits=bits,
      activation_bits=activation_bits, metric=metric, synthesis=synthesis,
      num_samples=num_samples, seed=seed, rounds=rounds, pinned=pinned,
      input_range=_recipe_range(range_info), objective=objective,
      context=context, weight_method=weight_method, bias_correction=bias_correction,
      range_policy=range_policy, ram=ram, strip=strip, tune_steps=tune_steps,
      output_kinds={h.name: str(h.kind) for h in heads.heads if output_kinds
                    and h.name in output_kinds},
      output_weights=dict(output_weights or {}),
      loss=None if loss is None else str(getattr(loss, "name", None)
                                          or getattr(loss, "__name__", None) or loss))
  cache = fileio_lib.ensure_dir(cache_dir) if cache_dir is not None else None
  stages.lap("load")

  # 1. Calibration data: synthesized from the model, or the user's.
  x, y, data_info = _calibration_data(model, folded, data, recipe, range_info, input_range,
                                      cache, progress, loss)
  stages.lap("synthesis")

  # 2-3. Sensitivity and allocation (the iterative task-interaction search), on a subset.
  plan, table, rounds_info = _search(model, folded, x, y, data_info, recipe, cost_table,
                                     cache, progress, loss)
  stages.lap("sensitivity+allocation")

  # 4. Apply through tfmot and calibrate.
  plan = QuantizationPlan(plan.weight_bits, {n: activation_bits for n in plan.weight_bits},
                          activation_bits, plan.info)
  qmodel = apply_lib.apply_plan(folded, plan, x, fold_bn=False, progress=show_progress(progress),
                                **recipe.apply_settings())
  outputs_lib.keep_heads(qmodel, heads)
  outputs_lib.compile_for_evaluation(qmodel, folded, x)
  stages.lap("apply")
  stages.close()

  report = build_report(folded, qmodel, plan, table, cost_table, budget, target,
                        data_info, rounds_info, stages.timings, recipe.to_dict())
  report["input_range"] = range_info
  report["outputs"] = heads.to_dict()
  report["activation_ranges"] = range_report(qmodel, folded, x, recipe.range_policy)
  report["tuning"] = distill_lib.tune_report(qmodel) or {"steps": 0, "kept": False,
                                                         "reason": tune_note or "tune_steps=0"}
  return QuantizationResult(qmodel, plan, table, report, folded, x, cost_table, recipe)


class _Stages:
  """Times the pipeline's stages (``timings``, seconds) and shows them on a `StageBar`."""

  def __init__(self, progress: Optional[bool]):
    self.timings: Dict[str, float] = {}
    self.clock = time.perf_counter()
    self.bar = StageBar(progress)

  def lap(self, stage: str) -> None:
    now = time.perf_counter()
    self.timings[stage] = round(now - self.clock, 3)
    self.clock = now
    self.bar.done(stage, self.timings[stage])

  def close(self) -> None:
    self.bar.close()


def _candidate_bits(budget: Budget, weight_bits: Optional[Sequence[int]]) -> Tuple[int, ...]:
  if weight_bits is None:
    weight_bits = allocation_lib.default_weight_bits(budget)
  bits = tuple(sorted({check_weight_bits(b, "weight_bits") for b in weight_bits}))
  if FLOAT_BITS in bits:
    raise InvalidInputError("weight_bits are candidate integer bit-widths (2..8).")
  return bits


def _input_range(model, input_range, data_free: bool) -> Dict[str, Any]:
  """The model's input range, with where it came from; warns when it was assumed.

  One input: ``{"low", "high", "source", "assumed"}``. Several: ``{"inputs":
  {name: that dict}, "assumed": any input's}``, each input resolved on its
  own (`keras_mpq.model.input_range.resolve_input_ranges`).
  """
  if len(model.inputs) > 1:
    return _input_ranges(model, input_range, data_free)
  low, high, range_source, range_assumed = input_range_lib.resolve_input_range(model, input_range)
  if range_assumed and data_free:
    why = (range_source if range_source.startswith("estimated") else
           "it has no Rescaling/Normalization input layer, its BatchNorm statistics (if "
           "any) do not indicate another scale, and no input_range was given")
    warnings.warn(
        f"keras_mpq assumes the model takes inputs in [{low:g}, {high:g}] ({why}). Synthetic "
        "data, the input quantizer and the exported file all follow this range; pass "
        "input_range=(lo, hi) (--input_range=LO,HI) if the model takes another: e.g. "
        "(-1, 1), (0, 255), or (-4, 4) for standardized inputs (mean 0, std 1 per "
        "feature or per sample, which nothing in a model without BatchNorm reveals).",
        InputRangeAssumedWarning, stacklevel=3)
  return {"low": low, "high": high, "source": range_source, "assumed": range_assumed}


def _input_ranges(model, input_range, data_free: bool) -> Dict[str, Any]:
  """`_input_range` of a model with several inputs: one entry per input, by name."""
  names = inputs_lib.input_names(model)
  resolved = input_range_lib.resolve_input_ranges(model, input_range)
  per_input = {name: {"low": r[0], "high": r[1], "source": r[2], "assumed": r[3]}
               for name, r in zip(names, resolved)}
  assumed = [f"{name!r} [{r['low']:g}, {r['high']:g}] ({r['source']})"
             for name, r in per_input.items() if r["assumed"]]
  if assumed and data_free:
    warnings.warn(
        f"keras_mpq assumes the ranges of inputs {'; '.join(assumed)}. Synthetic data, the "
        "input quantizers and the exported file all follow them; pass input_range={name: "
        "(lo, hi)} if the model takes others.", InputRangeAssumedWarning, stacklevel=3)
  return {"inputs": per_input, "assumed": bool(assumed)}


def _recipe_range(range_info: Mapping[str, Any]):
  """The recipe's ``input_range``: ``(low, high)``, or one per input for several."""
  if "inputs" in range_info:
    return tuple((r["low"], r["high"]) for r in range_info["inputs"].values())
  return (range_info["low"], range_info["high"])


def _check_ram(ram) -> None:
  if ram is not None and (isinstance(ram, bool) or not isinstance(ram, (int, float))
                          or not np.isfinite(ram) or ram <= 0):
    raise InvalidInputError(f"Expected ram as a positive number of bytes. Received: ram={ram!r}")


def _cost_table(folded, budget: Budget, target: str, bits, activation_bits: int, strip,
                seed: int) -> CostTable:
  """The file's byte costs for a byte budget (when the exporter is installed), else the model's."""
  if budget.kind == BudgetKind.BYTES:
    try:
      return costs_lib.file_costs(folded, target, bits, activation_bits, strip, seed, budget)
    except MissingDependencyError:  # no exporter installed: weight bytes only (report says so)
      pass
  return costs_lib.cost_table(folded, bits=bits, activation_bits=activation_bits)


def _resolve(cost_table: CostTable, folded, budget: Budget, data_free: bool, *,
             num_samples: Optional[int], weight_method, bias_correction, range_policy,
             tune_steps, pinned, **given) -> Tuple[Recipe, Optional[str]]:
  """The run's `Recipe` (every default filled in), and why tuning is off if the default turned it off."""
  synthesized = num_samples
  if num_samples is None:
    synthesized, num_samples = recipe_lib.default_calibration_sizes(
        cost_table, budget,  # several inputs: no shifted copies (images only)
        tuple(folded.inputs[0].shape)[1:] if len(folded.inputs) == 1 else ())
  weight_method, bias_correction = optimize_lib.check_weight_method(
      weight_method, bias_correction, data_free=data_free)
  range_policy = act_ranges_lib.check_range_policy(range_policy)
  tune_steps = distill_lib.check_steps(tune_steps)
  tune_note = None
  if tune_steps is None and data_free and not recipe_lib.forces_low_bits(cost_table, budget):
    # Data-free at 3 bits and above, tuning on synthetic data moved the MNIST CNNs by
    # -0.4 to +0.85 points (+0.15 on average); below 3 bits, up to +14 (issue 13).
    tune_steps = 0
    tune_note = (f"data-free, and the budget needs no layer below {recipe_lib.LOW_BITS} bits: "
                 "tuning on synthetic data gained little there; pass tune_steps to tune anyway")
  steps = None
  if data_free:
    method = given["synthesis"]
    default = generators_lib.DEFAULT_MAX_STEPS.get(method)
    if default is not None:
      steps = recipe_lib.default_synthesis_steps(cost_table, synthesized, default)
  recipe = Recipe(budget=budget, num_samples=num_samples, synthesized=synthesized,
                  synthesis_steps=steps,
                  weight_method=weight_method, bias_correction=bias_correction,
                  range_policy=range_policy, tune_steps=tune_steps,
                  tune_temperature=distill_lib.DATA_FREE_TEMPERATURE if data_free else 1.0,
                  pinned=dict(pinned or {}), **given)
  return recipe, tune_note


def _calibration_data(model, folded, data, recipe: Recipe, range_info: Dict[str, Any],
                      input_range, cache, progress, loss=None
                      ) -> Tuple[np.ndarray, Any, Dict[str, Any]]:
  """``(x, y, data_info)``: synthesized from the model (cached), or the user's checked data."""
  if data is not None:
    x, y = _parse_data(model, data, loss is not None)
    if "inputs" in range_info:  # several inputs: each against its own range
      for (name, info), values in zip(range_info["inputs"].items(), x):
        info.update(input_range_lib.check_data_range(
            values, info["low"], info["high"], info["source"], info["assumed"],
            f"data[{name!r}]"))
    else:
      range_info.update(input_range_lib.check_data_range(
          x, range_info["low"], range_info["high"], range_info["source"],
          range_info["assumed"], "data"))
    data_info: Dict[str, Any] = {"source": "user", "labeled": y is not None}
    if y is None and outputs_lib.heads_of(model).classifier:
      y = outputs_lib.predicted_labels(
          model, x, not outputs_lib.outputs_are_probabilities(model, x), batch_size=256)
  else:
    x, y, data_info = _synthetic_data(model, folded, recipe, input_range, cache, progress)
    if not outputs_lib.heads_of(model).classifier:
      y = None  # measured by the outputs' distortion: no labels
  data_info["num_samples"] = int(batching.num_samples(x))
  data_info.setdefault("realism", {})["batchnorm"] = realism_lib.batchnorm_check(model, x)
  return x, y, data_info


def _synthetic_data(model, folded, recipe: Recipe, input_range, cache, progress
                    ) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
  """Synthetic ``(x, y, data_info)``, read from the cache when there, plus shifted copies."""
  settings = recipe.to_dict()
  key = cache_key(model, {k: settings[k] for k in
                          ("synthesis", "num_samples", "synthesized", "seed", "input_range",
                           "synthesis_steps")})
  cached = cache / f"synthetic-{key}.npz" if cache else None
  hit = read_cached_data(cached, model) if cached is not None and cached.exists() else None
  if hit is not None:
    x, y = hit
    data_info = {"source": "synthetic", "method": recipe.synthesis, "cached": str(cached)}
  else:
    made = generators_lib.synthesize_with_info(model, num_samples=recipe.synthesized,
                                               max_steps=recipe.synthesis_steps,
                                               method=recipe.synthesis, seed=recipe.seed,
                                               progress=progress, input_range=input_range)
    x, y = made.x, made.y
    data_info = {"source": "synthetic", **made.summary(),
                 "realism": realism_lib.self_consistency(folded, x, made.x_midway)}
    if cached is not None:
      buffer = io.BytesIO()
      np.savez(buffer, y=y, **({"x": x} if not batching.several(x) else
                               {f"x_{i}": a for i, a in enumerate(x)}))
      fileio_lib.write_bytes(cached, buffer.getvalue())
  if recipe.num_samples > recipe.synthesized:  # cheap and seeded: made again on a cache hit
    x, source = augment_lib.shifted_copies(x, recipe.num_samples, seed=recipe.seed)
    y = y[source]
    data_info["shifted_copies"] = int(recipe.num_samples - recipe.synthesized)
  return x, y, data_info


def _search(model, folded, x, y, data_info: Dict[str, Any], recipe: Recipe,
            cost_table: CostTable, cache, progress, loss=None):
  """``(plan, table, rounds)`` of the sensitivity search on a seeded subset (cached)."""
  # Shifted copies sit after the synthesized samples: the search measures on those.
  made_here = batching.num_samples(x) - data_info.get("shifted_copies", 0)
  pick = recipe_lib.search_subset(made_here, recipe_lib.default_search_samples(cost_table),
                                  recipe.seed)
  data_info["search_samples"] = int(len(pick))
  search_key = cache_key(model, {k: v for k, v in recipe.to_dict().items()
                                 if k not in ("tune_steps", "tune_temperature")}, x)
  cached_search = cache / f"search-{search_key}.json" if cache else None
  hit = (read_cached_search(cached_search)
         if cached_search is not None and cached_search.exists() else None)
  if hit is not None:
    return hit
  x_pick = batching.take(x, pick)
  found = search_lib.search(folded, x_pick if y is None else (x_pick, y[pick]),
                            recipe.budget, weight_bits=recipe.bits,
                            rounds=recipe.rounds, metric=recipe.metric,
                            pinned=recipe.pinned or None, costs=cost_table, seed=recipe.seed,
                            activation_bits=recipe.activation_bits, progress=progress,
                            objective=recipe.objective, context=recipe.context, loss=loss,
                            **recipe.quantizer_settings())
  plan, table, rounds_info = found.plan, found.sensitivity, list(found.rounds)
  if cached_search is not None:
    fileio_lib.write_json(cached_search, {"plan": plan.to_dict(), "sensitivity": table.to_dict(),
                                          "rounds": rounds_info})
  return plan, table, rounds_info


def _parse_data(model, data, with_loss: bool = False) -> Tuple[Any, Any]:
  if len(model.inputs) > 1:  # x a list or dict of inputs, or (x, y)
    x, y = inputs_lib.split_data(model, data)
  elif isinstance(data, (tuple, list)) and len(data) == 2:
    x, y = data
  else:
    x, y = data, None
  x = calibrate_lib.check_data(model, x, "data")
  n = batching.num_samples(x)
  heads = outputs_lib.heads_of(model)
  if with_loss:  # the user's targets, for their loss
    return x, job_lib.check_targets(y, n, heads.names)
  if y is not None and not heads.classifier:
    raise InvalidInputError(
        "Expected data=x alone for a model that is not a single-label classifier: it "
        "is calibrated and measured by the distortion of its outputs from the float "
        "model's, which needs no labels. Received: data=(x, y) for a model with outputs "
        f"{[(h.name, str(h.kind), tuple(h.shape)) for h in heads.heads]}. Pass data=x.")
  if y is not None:
    y = np.asarray(y)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
      raise InvalidInputError(
          f"Expected integer class labels in data=(x, y). Received: labels of dtype {y.dtype}")
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
      y = y.argmax(axis=1)
    y = y.reshape(-1)
    if len(y) != n:
      raise InvalidInputError(
          f"Expected as many labels as inputs. Received: {n} inputs, {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer):
      if not np.all(np.equal(np.mod(y, 1), 0)):
        raise InvalidInputError("Expected integer class labels in data=(x, y).")
    y = y.astype(np.int64)
  return x, y


def _check_early(cost_table, budget, pinned, metric, synthesis, rounds, data) -> None:
  """Refuses bad settings before the expensive stages (synthesis can take minutes)."""
  if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
    raise InvalidInputError(f"Expected rounds >= 1. Received: rounds={rounds!r}")
  metrics_lib.get_metric(metric)
  if data is None:
    generators_lib.get_generator(synthesis)
  # Unknown pins, a budget kind without costs, or a budget below the cheapest
  # plan: the allocator says so now, on a zero table, instead of after synthesis.
  zero = SensitivityTable(cost_table.layers, cost_table.bits,
                          np.zeros((len(cost_table.layers), len(cost_table.bits))))
  allocation_lib.allocate(zero, budget, cost_table, pinned)
