"""`Recipe`: every setting of a `keras_mpq.quantize` run, resolved once.

`quantize` turns its arguments into one frozen `Recipe` (defaults filled in
for the model and the budget: sample sizes, weight method, range policy,
tuning, bias correction), hands each stage the fields it needs as explicit
arguments, writes it to ``report["settings"]`` and reads it back in
`keras_mpq.QuantizationResult.export`. The sample-size rules live here too.

>>> recipe = Recipe.from_dict(result.report["settings"])  # doctest: +SKIP
>>> recipe.weight_method, recipe.num_samples  # doctest: +SKIP
('adaround', 256)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from keras_mpq.base import act_ranges as act_ranges_lib
from keras_mpq.base.types import Budget, CostTable, QuantizationPlan
from keras_mpq.synthesis import augment as augment_lib

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
(`default_calibration_sizes`, `keras_mpq.synthesis.augment`)."""
LOW_BITS = 3
SYNTHESIS_STEP_WORK = 4e11
"""Multiply-accumulates per sample x synthesized samples x optimization steps up
to which synthesis runs its generator's default steps (150 for the labeled and
diverse generators); beyond it, fewer (`default_synthesis_steps`), at least
`MIN_SYNTHESIS_STEPS`. Every model measured before this rule stays under it (the
MNIST CNNs at 256 samples, EfficientNetB0 at 96x96 with 32); a 224x224
MobileNetV2 (3e8 multiply-accumulates, 32 samples) would take 1.4e12 and gets 50
steps. Its price, from a one-off run forcing 50 steps on small zoo models (not
a benchmark in BENCHMARKS.md, one run each): about a point of data-free 8-bit
agreement with float on real inputs, in a third of the synthesis time; paid
only by models too large to synthesize in minutes otherwise."""
MIN_SYNTHESIS_STEPS = 50


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


def default_synthesis_steps(cost_table: CostTable, samples: int, default: int) -> int:
  """Optimization steps per batch for ``samples`` synthesized samples (see `SYNTHESIS_STEP_WORK`).

  >>> default_synthesis_steps(table, 32, 150)  # doctest: +SKIP
  50
  """
  macs = sum(float(c.macs or 0) for c in cost_table.layer_costs)
  work = macs * max(int(samples), 1) * default
  if work <= SYNTHESIS_STEP_WORK or default <= MIN_SYNTHESIS_STEPS:
    return int(default)
  steps = int(default * SYNTHESIS_STEP_WORK / work) // 10 * 10
  return int(max(steps, MIN_SYNTHESIS_STEPS))


def default_calibration_sizes(cost_table: CostTable, budget: Optional[Budget],
                              input_shape) -> Tuple[int, int]:
  """(samples to synthesize, calibration samples in all) when ``num_samples`` is None.

  In all: `default_num_samples`. Where that is more than the search measures
  on (`default_search_samples`) and the input is an image (`keras_mpq.synthesis.augment.can_shift`),
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

  `keras_mpq.base.act_ranges.subset_indices`, the rule activation ranges use too.
  """
  return act_ranges_lib.subset_indices(n, limit, seed)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Every resolved setting of one `keras_mpq.quantize` run (see its arguments).

  ``num_samples`` calibration samples in all, of which ``synthesized`` were
  made by the generator (the rest are shifted copies); ``tune_temperature``
  is `keras_mpq.quantization.distill.DATA_FREE_TEMPERATURE` data-free, else 1.
  """

  budget: Budget
  target: str
  bits: Tuple[int, ...]
  activation_bits: int
  metric: str
  synthesis: str
  num_samples: int
  synthesized: int
  seed: int
  rounds: int
  pinned: Mapping[str, int]
  input_range: Tuple[Any, ...]  # (low, high); with several inputs, one (low, high) per input
  objective: Optional[str]
  context: str
  weight_method: str
  bias_correction: Union[bool, str]
  range_policy: str
  ram: Optional[float]
  strip: Any
  tune_steps: Optional[int]
  tune_temperature: float
  output_kinds: Mapping[str, str] = dataclasses.field(default_factory=dict)
  output_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
  loss: Optional[str] = None  # the name of the user's loss= (the function travels apart)
  synthesis_steps: Optional[int] = None  # per batch; None: the generator's default

  def to_dict(self) -> Dict[str, Any]:
    """The JSON-able settings, as ``report["settings"]`` holds them."""
    return {"range_policy": self.range_policy, "bits": tuple(self.bits),
            "activation_bits": self.activation_bits, "metric": self.metric,
            "weight_method": self.weight_method, "bias_correction": self.bias_correction,
            "synthesis": self.synthesis, "num_samples": self.num_samples,
            "synthesized": self.synthesized, "seed": self.seed,
            "rounds": self.rounds, "pinned": dict(self.pinned),
            "budget": self.budget.to_dict(),
            "input_range": _range_list(self.input_range),
            "objective": self.objective, "context": self.context,
            "target": self.target, "ram": self.ram, "strip": self.strip,
            "tune_steps": self.tune_steps, "tune_temperature": self.tune_temperature,
            "output_kinds": dict(self.output_kinds),
            "output_weights": dict(self.output_weights), "loss": self.loss,
            "synthesis_steps": self.synthesis_steps}

  @classmethod
  def from_dict(cls, settings: Mapping[str, Any]) -> "Recipe":
    """The `Recipe` of ``report["settings"]`` (as written by `to_dict`)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in settings.items() if k in fields}
    values["budget"] = Budget.from_dict(settings["budget"])
    values["bits"] = tuple(int(b) for b in settings["bits"])
    given = settings["input_range"]
    values["input_range"] = (tuple(tuple(r) for r in given) if given and isinstance(
        given[0], (list, tuple)) else tuple(given))
    values["pinned"] = dict(settings.get("pinned") or {})
    values["output_kinds"] = dict(settings.get("output_kinds") or {})
    values["output_weights"] = dict(settings.get("output_weights") or {})
    return cls(**values)

  def apply_settings(self) -> Dict[str, Any]:
    """The keyword arguments `keras_mpq.apply_plan` takes from the recipe."""
    return {"weight_method": self.weight_method, "bias_correction": self.bias_correction,
            "range_policy": self.range_policy, "tune_steps": self.tune_steps,
            "tune_temperature": self.tune_temperature, "seed": self.seed}

  def quantizer_settings(self) -> Dict[str, Any]:
    """The keyword arguments the sensitivity search takes from the recipe."""
    return {"weight_method": self.weight_method, "bias_correction": self.bias_correction,
            "range_policy": self.range_policy}


def _range_list(input_range) -> List[Any]:
  """``[low, high]``, or ``[[low, high], ...]`` per input for several, as JSON lists."""
  if input_range and isinstance(input_range[0], (list, tuple)):
    return [[r[0], r[1]] for r in input_range]
  return [input_range[0], input_range[1]]
