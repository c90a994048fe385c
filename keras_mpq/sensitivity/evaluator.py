"""`Evaluator`: measures the task loss of many (layer, bits) settings without retracing.

The float model is wrapped with tfmot once and calibrated once per context;
each (layer, bits) pair is evaluated by assigning the layer's bits variable.
The output of the layers before a layer does not depend on its bits, so it
is computed once per batch, and only the rest of the model runs for each
bit-width, in compiled functions traced once.

>>> table_rows = evaluator_for(job).scores(job.bits)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from keras_mpq.base.batching import batch_slices, num_samples, take
from keras_mpq.base.compat import keras, tf, tfmot
from keras_mpq.base.progress import Bar
from keras_mpq.base.types import FLOAT_BITS, QuantizationPlan
from keras_mpq.model.outputs import to_log_probs
from keras_mpq.quantization import access as access_lib
from keras_mpq.quantization import calibrate as calibrate_lib
from keras_mpq.quantization import optimize as optimize_lib
from keras_mpq.sensitivity.job import DISTORTION, LOSS, OBJECTIVE_FNS, Job, loss_per_sample


class Evaluator:
  """One tfmot-quantized model, two compiled functions, and the (layer, bits) loop.

  The model is quantized once; contexts and (layer, bits) pairs are variable
  assignments. The graph is split at tensors that cut it (``c_1 .. c_K``,
  each the input of a weight layer, in model order) into segments
  ``input -> c_1 -> ... -> c_K -> output``. Two compiled functions serve every
  evaluation:

  * ``prefix(x) -> [c_1, ..., c_K]``: the cut tensors at the context, once
    per batch;
  * ``evaluate(start, [h_0, ..., h_K]) -> features``: runs the
    segments from ``start`` on (``h_start`` injected; the earlier segments
    sit in ``tf.cond`` branches that are not taken, so they cost nothing).

  A layer after cut ``c_k`` is evaluated with ``start = k`` for each of its
  bit-widths. Both functions have fixed input signatures and count their
  traces in ``traces`` (each must stay at 1: bits are variables, ``start`` a
  tensor).

  The features are a classifier's log-probabilities, or for any other model
  `keras_mpq.model.outputs.Heads.features` of all its outputs, which the
  ``distortion`` objective compares with the float model's.
  """

  def __init__(self, folded, layers: Sequence[str], x: np.ndarray, y: Optional[np.ndarray],
               from_logits: bool, batch_size: int, layer_activation_bits: Mapping[str, int],
               default_activation_bits: int = 8, x_calib: Optional[np.ndarray] = None, *,
               weight_method: Optional[str] = None,
               bias_correction: Optional[Union[bool, str]] = None,
               range_policy: Optional[str] = None, heads=None, loss=None):
    self.layers = tuple(layers)
    self.loss_fn = loss  # the user's loss=: features are the raw outputs
    self.heads = None if heads is None or (heads.classifier and loss is None) else heads
    self._scales: Optional[np.ndarray] = None
    self.x, self.y = x, y  # what losses are measured on (the held-out part)
    self.x_calib = x if x_calib is None else x_calib  # what activation ranges see
    self._float_ref: Optional[List[np.ndarray]] = None
    self.last_stderr: Optional[np.ndarray] = None
    self.from_logits = from_logits
    self.batch_size = batch_size
    self.range_policy = range_policy
    build_plan = QuantizationPlan({n: FLOAT_BITS for n in self.layers},
                                  dict(layer_activation_bits), default_activation_bits)
    self.qmodel = access_lib.quantize_model(folded, build_plan)
    wrapper_type = tfmot.quantization.keras.QuantizeWrapper
    self.wrappers = {l.layer.name: l for l in self.qmodel.layers
                     if isinstance(l, wrapper_type)}
    self.traces: Dict[str, int] = collections.Counter()
    self.context: Dict[str, int] = {n: FLOAT_BITS for n in self.layers}
    self.activations = False
    self.evaluations = 0  # passes over the data (the part after a cut counts as one)
    self.batch_calls = 0
    self._layer_start: Dict[str, int] = {}
    self._cut_names: List[str] = []  # layer whose input is c_k, k = 1..K
    self._segments: List[Any] = []
    self._cuts_for_reuse: Optional[bool] = None
    self._prefix_fn = None
    self._evaluate_fn = None
    self._dummies: List[tf.Tensor] = []
    access_lib.set_activation_quantization(self.qmodel, False)
    # Each (layer, bits) is measured with the weights apply_plan would give it
    # (the same weight method): kernel and bias swapped in, no retrace.
    self.bank = optimize_lib.WeightBank(self.qmodel, self.x_calib, weight_method,
                                        bias_correction, batch_size=batch_size) \
        if x is not None else None

  def _set_bits(self, bits: Mapping[str, int]) -> None:
    if self.bank is not None:
      self.bank.set_weight_bits(bits)
    else:
      access_lib.set_weight_bits(self.qmodel, bits)

  # --- graph cuts and segments

  def _split(self, reuse_prefix: bool) -> None:
    """Finds the cut tensors and builds the segments and both compiled functions."""
    if self._cuts_for_reuse is not None:
      if self._cuts_for_reuse != reuse_prefix:
        raise ValueError("An evaluator is split once; make a new one to change reuse.")
      return
    qmodel = self.qmodel
    model_input_ids = {id(t) for t in qmodel.inputs}
    cut_tensors: List[Any] = []
    suffix_layers: List[set] = []
    start: Dict[str, int] = {}
    for name in self.layers:
      wrapper = self.wrappers[name]
      t = wrapper.input
      k = len(cut_tensors)
      if (reuse_prefix and not isinstance(t, (list, tuple)) and id(t) not in model_input_ids):
        known = [j for j, c in enumerate(cut_tensors, start=1) if c is t]
        if known:  # several layers read the same cut tensor
          start[name] = known[0]
          continue
        after = _layers_after(qmodel, t)  # None: not a cut
        if after is not None and id(wrapper) in after:
          cut_tensors.append(t)
          suffix_layers.append(after)
          self._cut_names.append(name)
          start[name] = k + 1
          continue
      # Not a cut: the latest cut before it, if the layer lies after it.
      start[name] = k if k and id(wrapper) in suffix_layers[-1] else 0
    # Segments between consecutive cuts; a cut that does not follow from the
    # previous one (not expected for true cuts) is dropped.
    # Several inputs: the first segment takes them all (a cut lies after every
    # input has joined the graph: `_layers_after`), the later ones one tensor each.
    bounds = [qmodel.inputs[0] if len(qmodel.inputs) == 1 else list(qmodel.inputs)]
    segments = []
    kept = [0]
    for k, t in enumerate(cut_tensors, start=1):
      try:
        seg = keras.Model(bounds[-1], t)
      except (ValueError, TypeError, KeyError):
        continue
      segments.append(seg)
      bounds.append(t)
      kept.append(k)
    outputs = qmodel.outputs if self.heads is not None else qmodel.outputs[0]
    segments.append(keras.Model(bounds[-1], outputs))
    renumber = {old: new for new, old in enumerate(kept)}
    self._layer_start = {n: renumber.get(s, 0) for n, s in start.items()}
    self._cut_names = [self._cut_names[k - 1] for k in kept[1:]]
    self._segments = segments
    self._cuts_for_reuse = reuse_prefix
    self._compile(bounds)

  def _compile(self, bounds) -> None:
    traces, segments = self.traces, self._segments
    shapes = [tf.nest.map_structure(lambda t: tuple(t.shape[1:]), b) for b in bounds]
    dummy = lambda s: tf.zeros((0,) + tuple(1 if d is None else d for d in s))
    self._dummies = [[dummy(v) for v in s] if isinstance(s, list) else dummy(s)
                     for s in shapes]
    out_shapes = shapes[1:]
    to_log_probs = self._log_probs

    def evaluate(start, hs):
      traces["evaluate"] += 1  # Python side: runs once per trace, never per call
      h = hs[0]
      for k, seg in enumerate(segments):
        if k:
          h = tf.cond(tf.equal(start, k), lambda k=k: hs[k], lambda h=h: h)
        if k < len(out_shapes):
          dummy = self._dummies[k + 1]
          h = tf.cond(start <= k, lambda seg=seg, h=h: seg(h, training=False),
                      lambda dummy=dummy: dummy)
        else:
          h = seg(h, training=False)
      return to_log_probs(h)

    spec = lambda s: tf.TensorSpec((None,) + s, tf.float32)
    specs = [[spec(v) for v in s] if isinstance(s, list) else spec(s) for s in shapes]
    self._evaluate_fn = tf.function(
        evaluate, input_signature=[tf.TensorSpec((), tf.int32), specs])
    prefix_model = keras.Model(self.qmodel.inputs, list(bounds[1:]) + list(self.qmodel.outputs))

    def prefix(x):
      traces["prefix"] += 1
      outs = prefix_model(x, training=False)
      outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
      n_out = len(self.qmodel.outputs)
      return outs[:-n_out], to_log_probs(outs[-n_out:] if n_out > 1 else outs[-1])

    self._prefix_fn = tf.function(prefix, input_signature=[specs[0]])

  def _log_probs(self, out):
    if self.loss_fn is not None:
      return self.heads.raw(out)
    if self.heads is not None:
      return self.heads.features(out)
    return to_log_probs(out, self.from_logits)

  def objective_fn(self, objective: str, reuse_prefix: bool = True):
    """``fn(features, y, ref) -> per-sample values`` of ``objective`` (see `OBJECTIVES`)."""
    if objective == LOSS:
      heads, loss = self.heads, self.loss_fn
      return lambda out, y, ref: loss_per_sample(loss, y, heads.split(out), heads.names)
    if objective != DISTORTION:
      return OBJECTIVE_FNS[objective]
    if self.heads is None:  # a classifier: its one head's KL
      return OBJECTIVE_FNS["kl"]
    if self._scales is None:
      self._scales = self.heads.scales(np.concatenate(self.float_reference(reuse_prefix)))
    heads, scales = self.heads, self._scales
    return lambda out, y, ref: heads.distortion(out, ref, scales)

  def prefix(self, xb) -> Tuple[List[Any], np.ndarray]:
    """The cut tensors and the output log-probabilities of one batch, at the context."""
    self.batch_calls += 1
    cuts, log_probs = self._prefix_fn(xb)
    return cuts, log_probs.numpy()

  def _inputs(self, start: int, xb, cut_values) -> List[Any]:
    hs = list(self._dummies)
    if start == 0:
      hs[0] = xb
    else:
      hs[start] = cut_values[start - 1]
    return hs

  def run(self, start: int, hs) -> np.ndarray:
    self.batch_calls += 1
    return self._evaluate_fn(tf.constant(start, tf.int32), hs).numpy()

  def concrete_function_counts(self) -> Dict[str, int]:
    fns = {"evaluate": self._evaluate_fn, "prefix": self._prefix_fn}
    return {k: int(f.experimental_get_tracing_count()) for k, f in fns.items()
            if f is not None}

  # --- contexts

  def set_context(self, bits: Mapping[str, int], activations: bool) -> None:
    """Sets every layer's bits; calibrates activation ranges when they are quantized."""
    self._set_bits(bits)
    self.context = {n: int(bits[n]) for n in self.layers}
    if activations:
      calibrate_lib.calibrate(self.qmodel, self.x_calib, batch_size=self.batch_size,
                              range_policy=self.range_policy)
    else:
      access_lib.set_activation_quantization(self.qmodel, False)
    self.activations = activations

  def loss(self, reuse_prefix: bool = True) -> float:
    """Mean cross-entropy of the model as it stands, over the data."""
    self._split(reuse_prefix)
    return self.mean_objective("cross_entropy", reuse_prefix)

  def mean_objective(self, objective: str, reuse_prefix: bool = True) -> float:
    """Mean of ``objective`` (see `OBJECTIVES`) of the model as it stands, over the data."""
    return float(np.mean(self.sample_objective(objective, reuse_prefix)))

  def sample_objective(self, objective: str, reuse_prefix: bool = True) -> np.ndarray:
    """``objective`` of the model as it stands, one value per sample (float64)."""
    self._split(reuse_prefix)
    objective_fn = self.objective_fn(objective, reuse_prefix)
    refs = self.float_reference(reuse_prefix) if objective in ("kl", DISTORTION) else None
    rows = []
    for k, s in enumerate(batch_slices(num_samples(self.x), self.batch_size)):
      out = self.prefix(_constant(take(self.x, s)))[1]
      rows.append(np.asarray(objective_fn(out, None if self.y is None else self.y[s],
                                          None if refs is None else refs[k]),
                             dtype=np.float64))
    self.evaluations += 1
    return np.concatenate(rows)

  def float_reference(self, reuse_prefix: bool = True) -> List[np.ndarray]:
    """The float model's log-probabilities per batch (computed once; the context is kept)."""
    if self._float_ref is None:
      self._split(reuse_prefix)
      saved, acts = dict(self.context), self.activations
      self._set_bits({n: FLOAT_BITS for n in self.layers})
      access_lib.set_activation_quantization(self.qmodel, False)
      try:
        self._float_ref = [self.prefix(_constant(take(self.x, s)))[1]
                           for s in batch_slices(num_samples(self.x), self.batch_size)]
      finally:
        self._set_bits(saved)
        access_lib.set_activation_quantization(self.qmodel, acts)
      self.evaluations += 1
    return self._float_ref

  def float_loss(self, reuse_prefix: bool = True) -> float:
    """Loss with every layer float and activations float; the context is restored."""
    saved, acts = dict(self.context), self.activations
    self._set_bits({n: FLOAT_BITS for n in self.layers})
    access_lib.set_activation_quantization(self.qmodel, False)
    try:
      return self.loss(reuse_prefix)
    finally:
      self._set_bits(saved)
      access_lib.set_activation_quantization(self.qmodel, acts)

  # --- the (layer, bits) loop

  def layer_scores(self, bits: Sequence[int], objective: str, reuse_prefix: bool = True,
                   progress: bool = False) -> Tuple[np.ndarray, float, Dict[str, bool],
                                                    Dict[str, Optional[str]]]:
    """Per (layer, b): (sum over data of objective at c[i<-b] - same at c) / N.

    Returns ``(scores, context_value, prefix_reuse, prefix_cut)``;
    ``context_value`` is the objective's mean at the context itself (the
    context loss for cross-entropy). A bit-width equal to the layer's context
    bits is not evaluated: its score is 0.
    The standard error of each score (from the per-sample
    differences, which pair every sample with itself at the context) is left
    in ``self.last_stderr``.
    """
    self._split(reuse_prefix)
    objective_fn = self.objective_fn(objective, reuse_prefix)
    groups: Dict[int, List[int]] = collections.OrderedDict()
    for i, name in enumerate(self.layers):
      groups.setdefault(self._layer_start[name], []).append(i)
    n = num_samples(self.x)
    pairs = [(i, j) for i, name in enumerate(self.layers) for j, b in enumerate(bits)
             if b != self.context[name]]
    bar = Bar(len(pairs) * len(range(0, n, self.batch_size)), f"sensitivity ({objective})",
              progress)
    refs = self.float_reference(reuse_prefix) if objective in ("kl", DISTORTION) else None
    base = 0.0
    totals = np.zeros((len(self.layers), len(bits)))
    squares = np.zeros((len(self.layers), len(bits)))
    try:
      for k, s in enumerate(batch_slices(n, self.batch_size)):
        xb = _constant(take(self.x, s))
        yb = self.y[s] if self.y is not None else None
        cut_values, out = self.prefix(xb)  # cuts and output at the context
        ref = out if refs is None else refs[k]
        ref_rows = objective_fn(out, yb, ref)
        base += float(np.sum(ref_rows))
        for start, idxs in groups.items():
          hs = self._inputs(start, xb, cut_values)
          for i in idxs:
            name, ctx_bits = self.layers[i], self.context[self.layers[i]]
            try:
              for j, b in enumerate(bits):
                if b == ctx_bits:
                  continue
                self._set_bits({name: b})
                diff = objective_fn(self.run(start, hs), yb, ref) - ref_rows
                totals[i, j] += float(np.sum(diff))
                squares[i, j] += float(np.sum(diff * diff))
                bar.update(1)
            finally:
              self._set_bits({name: ctx_bits})
    finally:
      bar.close()
    self.evaluations += 1 + len(pairs)
    cut_of = {name: (self._cut_names[self._layer_start[name] - 1]
                     if self._layer_start[name] else None) for name in self.layers}
    reuse = {name: cut is not None for name, cut in cut_of.items()}
    mean = totals / n
    with np.errstate(invalid="ignore", over="ignore"):
      var = np.maximum(squares / n - mean * mean, 0.0) * n / max(n - 1, 1)
      self.last_stderr = np.sqrt(var / n)
    return mean, base / n, reuse, cut_of


def _constant(xb):
  """A batch of inputs as tensors: one, or a list for several inputs."""
  return tf.nest.map_structure(tf.constant, xb)


def _layers_after(qmodel, t) -> Optional[set]:
  """Ids of the layers between tensor ``t`` and the outputs if ``t`` cuts the graph, else None.

  What ``keras.Model(t, qmodel.outputs).layers`` holds (and the 'Graph
  disconnected' error for a tensor that does not cut), found by walking the
  graph back from the outputs, stopping at ``t``: a walk of the node graph,
  where building that Model for each of a large model's layers took minutes.
  """
  try:
    inputs = {id(x) for x in qmodel.inputs}
    seen, layers, stack = set(), set(), list(qmodel.outputs)
    while stack:
      tensor = stack.pop()
      if tensor is t or id(tensor) in seen:
        continue
      seen.add(id(tensor))
      if id(tensor) in inputs:
        return None  # the input reaches the outputs around t: not a cut
      history = tensor._keras_history  # pylint: disable=protected-access
      layers.add(id(history.layer))
      stack.extend(history.layer._inbound_nodes[history.node_index].keras_inputs)  # pylint: disable=protected-access
    return layers
  except (AttributeError, IndexError, TypeError):  # not a tf_keras graph: build the Model
    try:
      return {id(l) for l in keras.Model(t, qmodel.outputs).layers}
    except (ValueError, TypeError, KeyError):  # 'Graph disconnected': not a cut
      return None


def evaluator_for(job: Job) -> Evaluator:
  if job.evaluator is None:
    job.evaluator = Evaluator(job.folded, job.layers, job.x, job.y, job.from_logits,
                               job.batch_size, job.layer_activation_bits,
                               job.default_activation_bits, x_calib=job.x_calib,
                               weight_method=job.weight_method,
                               bias_correction=job.bias_correction,
                               range_policy=job.range_policy, heads=job.heads,
                               loss=job.loss)
  return job.evaluator
