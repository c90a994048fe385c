"""The sensitivity metrics and their registry: how much harm ``b`` bits in a layer do.

A `SensitivityTable` holds, for each quantizable layer ``i`` and candidate
weight bit-width ``b``, how much harm ``b`` bits in layer ``i`` do. The metrics
sit behind a small registry (`register_metric`, `get_metric`; the names are
`keras_mpq.sensitivity.job.Metric`):

``task_interaction`` (default, the paper's)
    ``Omega_i(b | c) = L(c[i<-b]) - L(c)``: increase of the mean task loss
    (cross-entropy against the labels) when layer ``i`` goes to ``b`` bits
    while every other layer stays as in the context ``c`` (by default: every
    other layer at the highest candidate bit-width, activations quantized).
``task_float_context``
    ``Omega_i(b | float)``: the same with every other layer float and the
    activations float (the ablation without the interaction term).
``zeroq_kl``
    ``mean_j KL(M_float(x_j) || M_float[i<-b](x_j))`` (ZeroQ).
``hessian_trace``
    ``Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2`` with the trace estimated by
    Hutchinson's method on the task loss (HAWQ-V2).
``weight_mse``
    ``||Q_b(W_i) - W_i||^2 / ||W_i||^2`` (needs no data).

The task-loss metrics are measured by `keras_mpq.sensitivity.evaluator`
without rebuilding the model or retracing (``table.info["traces"]`` counts the
traces); `keras_mpq.sensitivity.measure` makes one table, and the budget
search that iterates it is `keras_mpq.plan.search`.

Example:

>>> import keras_mpq
>>> table = keras_mpq.measure_sensitivity(model, (x, y))  # doctest: +SKIP
>>> table.score("conv2", 2) > table.score("conv2", 8)  # doctest: +SKIP
True
>>> found = keras_mpq.search(model, (x, y), "4bit")  # doctest: +SKIP
>>> found.plan.weight_bits  # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from keras_mpq.base import layers as layers_lib
from keras_mpq.base.batching import batch_slices, map_inputs, num_samples, take
from keras_mpq.base.compat import keras, tf
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.base.types import FLOAT_BITS
from keras_mpq.model.outputs import to_log_probs
from keras_mpq.sensitivity.evaluator import evaluator_for
from keras_mpq.sensitivity.job import DISTORTION, HUTCHINSON_PROBES, Job, Metric, MetricSpec

_METRICS: Dict[str, MetricSpec] = {}


def register_metric(name: str, *, needs_data: bool = True, needs_labels: bool = True,
                    uses_context: bool = False):
  """Decorator registering ``fn(job) -> (scores, info)`` as metric ``name``."""
  def decorator(fn):
    _METRICS[str(name)] = MetricSpec(str(name), fn, needs_data, needs_labels,
                                     uses_context)
    return fn
  return decorator


def available_metrics() -> List[str]:
  """Names of the registered metrics, default first."""
  return sorted(_METRICS, key=lambda n: (n != Metric.TASK_INTERACTION.value, n))


def get_metric(name) -> MetricSpec:
  """The registered `MetricSpec` for ``name`` (a string or `Metric`).

  >>> get_metric("weight_mse").needs_data
  False
  """
  key = name.value if isinstance(name, Metric) else name
  if not isinstance(key, str) or key not in _METRICS:
    raise InvalidInputError(
        f"Expected a sensitivity metric in {available_metrics()}. "
        f"Received: metric={name!r}")
  return _METRICS[key]


def _task_metric(job: Job, context: Mapping[str, int], activations: bool,
                 objective: str) -> Tuple[np.ndarray, Dict[str, Any]]:
  ev = evaluator_for(job)
  traces_before = dict(ev.traces)
  evals_before = ev.evaluations
  t0 = time.perf_counter()
  ev.set_context(context, activations)
  t_calib = time.perf_counter() - t0
  scores, context_value, reuse, cuts = ev.layer_scores(job.bits, objective,
                                                       job.reuse_prefix, job.progress)
  stderr = ev.last_stderr
  is_float = not activations and all(b == FLOAT_BITS for b in context.values())
  context_loss = float_loss = None
  if objective in ("cross_entropy", "loss"):
    context_loss = context_value
  elif job.y is not None:
    context_loss = ev.loss(job.reuse_prefix)
  if job.y is not None and objective != "loss":
    float_loss = context_loss if is_float else ev.float_loss(job.reuse_prefix)
  info = {
      "context": dict(context),
      "activations_quantized": activations,
      "objective": objective,
      "context_objective": context_value,
      "stderr": stderr,
      "context_loss": context_loss,
      "float_loss": float_loss,
      "evaluations": ev.evaluations - evals_before,
      "pair_evaluations": sum(1 for n in job.layers for b in job.bits if b != context[n]),
      "prefix_reuse": reuse,
      "prefix_cut": cuts,
      "calibration_seconds": round(t_calib, 4),
      "traces": dict(ev.traces),
      "new_traces": {k: v - traces_before.get(k, 0) for k, v in ev.traces.items()
                     if v - traces_before.get(k, 0)},
      "concrete_functions": ev.concrete_function_counts(),
  }
  return scores, info


# --------------------------------------------------------------------------- metrics


@register_metric(Metric.TASK_INTERACTION.value, uses_context=True)
def _task_interaction(job: Job):
  context = job.context or {n: max(job.bits) for n in job.layers}
  return _task_metric(job, context, True, job.objective)


@register_metric(Metric.TASK_FLOAT_CONTEXT.value)
def _task_float_context(job: Job):
  return _task_metric(job, {n: FLOAT_BITS for n in job.layers}, False, job.objective)


@register_metric(Metric.ZEROQ_KL.value, needs_labels=False)
def _zeroq_kl(job: Job):
  classifier = job.heads is None or job.heads.classifier
  return _task_metric(job, {n: FLOAT_BITS for n in job.layers}, False,
                      "kl" if classifier else DISTORTION)


def _kernels(folded, name: str) -> List[Tuple[Any, Tuple[int, ...]]]:
  layer = folded.get_layer(name)
  return [(getattr(layer, attr), axes) for attr, axes in layers_lib.weight_spec(layer)]


def _quantization_error(folded, name: str, bits: int) -> Tuple[float, float, int]:
  """(||Q_b(W) - W||^2, ||W||^2, n) summed over the layer's kernels."""
  return layers_lib.quantization_error(
      [(var.numpy(), axes) for var, axes in _kernels(folded, name)], bits)


@register_metric(Metric.WEIGHT_MSE.value, needs_data=False, needs_labels=False)
def _weight_mse(job: Job):
  scores = np.zeros((len(job.layers), len(job.bits)))
  for i, name in enumerate(job.layers):
    for j, b in enumerate(job.bits):
      err, norm, _ = _quantization_error(job.folded, name, b)
      scores[i, j] = err / norm if norm > 0 else 0.0
  return scores, {}


def hessian_traces(folded, x: np.ndarray, y: np.ndarray, layers: Sequence[str],
                   from_logits: bool = True, probes: int = HUTCHINSON_PROBES,
                   batch_size: int = 128, seed: int = 0) -> Dict[str, float]:
  """Hutchinson estimates of each layer's Hessian trace of the mean task loss.

  ``Tr(H_ii) = E[v_i^T (H v)_i]`` for Rademacher ``v`` over all layers'
  kernels at once, so one Hessian-vector product per probe (nested
  ``GradientTape``s, compiled once) serves every layer.

  >>> hessian_traces(model, x, y, ["conv1"], probes=4)  # doctest: +SKIP
  {'conv1': 12.3}
  """
  variables, owner = [], []
  for name in layers:
    for var, _ in _kernels(folded, name):
      variables.append(var)
      owner.append(name)
  rng = np.random.default_rng(seed)
  n = num_samples(x)

  def body(xb, yb, *vs):
    with tf.GradientTape() as outer:
      outer.watch(variables)
      with tf.GradientTape() as inner:
        inner.watch(variables)
        out = folded(xb, training=False)
        if out.shape[-1] == 1:  # binary: two-column log-probabilities
          log_probs = to_log_probs(out, from_logits)
          loss = -tf.reduce_sum(tf.gather(log_probs, yb, axis=1, batch_dims=1))
        else:
          loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
              yb, out, from_logits=from_logits))
      grads = inner.gradient(loss, variables)
      gv = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, vs)])
    hv = outer.gradient(gv, variables)
    return [tf.reduce_sum(v * h) for v, h in zip(vs, hv)]

  signature = ([map_inputs(lambda a: tf.TensorSpec((None,) + tuple(a.shape[1:]), tf.float32), x),
                tf.TensorSpec((None,), tf.int64)]
               + [tf.TensorSpec(v.shape, tf.float32) for v in variables])
  hvp = tf.function(body, input_signature=signature)
  traces = {name: 0.0 for name in layers}
  for _ in range(int(probes)):
    vs = [tf.constant(rng.choice(np.array([-1.0, 1.0], np.float32), size=v.shape))
          for v in variables]
    for s in batch_slices(n, batch_size):
      parts = hvp(tf.nest.map_structure(tf.constant, take(x, s)), tf.constant(y[s]), *vs)
      for name, part in zip(owner, parts):
        traces[name] += float(part.numpy()) / n / probes
  return traces


@register_metric(Metric.HESSIAN_TRACE.value)
def _hessian_trace(job: Job):
  traces = hessian_traces(job.folded, job.x_all, job.y_all, job.layers, job.from_logits,
                          HUTCHINSON_PROBES, job.batch_size, job.seed)
  scores = np.zeros((len(job.layers), len(job.bits)))
  for i, name in enumerate(job.layers):
    for j, b in enumerate(job.bits):
      err, _, count = _quantization_error(job.folded, name, b)
      scores[i, j] = traces[name] / count * err
  return scores, {"hessian_trace": traces, "probes": HUTCHINSON_PROBES,
                  "evaluations": HUTCHINSON_PROBES}
