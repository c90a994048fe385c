"""The loss terms and the optimizer that the synthetic-data generators share.

* `smoothness`: the total-variation prior (mean squared neighbour difference);
* `BatchNormStatistics`: the BatchNorm-statistics term (DeepInversion/ZeroQ),
  read off the model's BN layers before folding;
* `Augment`: DeepInversion-style random jitter and flips, in the graph;
* `Blur`: a fixed Gaussian blur of the optimized inputs (the sample is the
  blurred ``u``), so no detail finer than it can be made;
* `BatchOptimizer`: Adam on one fixed-shape batch in the [-1, 1] space, with
  optional per-sample stopping, compiled once for every batch;
* `initial_u`: the Gaussian start.

All work on ``u`` in [-1, 1], the input range mapped linearly; nothing here
depends on one layer type except the optional BatchNorm term.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List

import numpy as np

from keras_mpq.base.compat import keras, tf
from keras_mpq.model import batchnorm as batchnorm_lib

# Optimization steps run per call of the compiled step function; the progress
# bar and the "all samples done" check update between calls.
STEPS_PER_CALL = 10

class BatchOptimizer:
  """Adam on one fixed-shape batch of ``u`` in [-1, 1], with per-sample stopping.

  ``loss_fn(u, y) -> (scalar loss, score (batch,))``. A sample stops for good
  the first step its ``score`` reaches its threshold ``tau`` (that step's
  update is not applied, so the kept input is the one that reached it); a
  sample with ``tau = inf`` runs all steps. One `tf.function` runs a chunk of
  steps and is reused for every batch (``traces`` counts its tracings).
  """

  def __init__(self, batch_shape, loss_fn, learning_rate):
    self.loss_fn = loss_fn
    batch = batch_shape[0]
    self.u = tf.Variable(tf.zeros(batch_shape, tf.float32), name="synthetic_u")
    self.y = tf.Variable(tf.zeros((batch,), tf.int32), trainable=False)
    self.tau = tf.Variable(tf.zeros((batch,), tf.float32), trainable=False)
    self.active = tf.Variable(tf.zeros((batch,), tf.bool), trainable=False)
    self.steps = tf.Variable(tf.zeros((batch,), tf.int32), trainable=False)
    self.optimizer = keras.optimizers.Adam(learning_rate)
    self.optimizer.build([self.u])
    self.traces = 0
    self.losses = []
    self.batch_steps = []  # steps run per batch (whole calls of the step function)
    self.calls = []  # (steps, seconds) per call; the first one includes tracing
    self.midway = None
    self._mask_shape = [batch] + [1] * (len(batch_shape) - 1)
    self._run = tf.function(self._run_steps)

  def _run_steps(self, n_steps):
    self.traces += 1  # Python side effect: runs only while tracing
    first_loss = last_loss = tf.constant(-1.0)
    for i in tf.range(n_steps):
      with tf.GradientTape() as tape:
        loss, score = self.loss_fn(self.u, self.y)
      grad = tape.gradient(loss, self.u)
      keep = self.active & (score < self.tau)
      before = tf.identity(self.u)
      self.optimizer.apply_gradients([(grad, self.u)])
      moved = tf.clip_by_value(self.u, -1.0, 1.0)
      self.u.assign(tf.where(tf.reshape(keep, self._mask_shape), moved, before))
      self.steps.assign_add(tf.cast(keep, tf.int32))
      self.active.assign(keep)
      last_loss = tf.cast(loss, tf.float32)
      if i == 0:
        first_loss = last_loss
    return tf.reduce_sum(tf.cast(self.active, tf.int32)), first_loss, last_loss

  def timing(self) -> Dict[str, Any]:
    """Seconds of the first call (tracing included) and per step after it."""
    rest = self.calls[1:]
    steps = sum(n for n, _ in rest)
    return {"first_call_seconds": self.calls[0][1] if self.calls else None,
            "seconds_per_step": sum(t for _, t in rest) / steps if steps else None}

  def run(self, u0, y, tau, active, max_steps, on_chunk=None):
    """Optimizes one batch; returns (u, steps, still_active) as numpy.

    ``self.losses`` gets this batch's (first step's, last step's) loss;
    ``self.midway`` the batch as it was halfway (at the first call boundary
    at or after ``max_steps / 2``), to tell whether it was still moving.
    """
    self.u.assign(u0)
    self.y.assign(y)
    self.tau.assign(tau)
    self.active.assign(active)
    self.steps.assign(tf.zeros_like(self.steps))
    for var in self.optimizer.variables:
      var.assign(tf.zeros_like(var))
    done, losses = 0, []
    self.midway = None
    while done < max_steps:
      chunk = min(STEPS_PER_CALL, max_steps - done)
      # Always the same chunk tensor shape and dtype: no retracing.
      tick = time.perf_counter()
      n_active, first, last = self._run(tf.constant(chunk, tf.int32))
      n_active = int(n_active)
      self.calls.append((chunk, time.perf_counter() - tick))
      losses.append((float(first), float(last)))
      done += chunk
      if self.midway is None and done * 2 >= max_steps:
        self.midway = self.u.numpy()
      if on_chunk is not None:
        on_chunk(self.active.numpy())
      if n_active == 0:
        break
    self.losses.append((losses[0][0], losses[-1][1]))
    self.batch_steps.append(done)
    return self.u.numpy(), self.steps.numpy(), self.active.numpy()


def smoothness(u, spatial_axes):
  """Per-sample mean squared difference of neighbours along each spatial axis.

  Uses ``tf.roll`` with the wrapped-around pair masked out: on CPU its gradient
  is several times cheaper than that of a strided slice.
  """
  rank = len(u.shape)
  sample_axes = list(range(1, rank))
  size = float(np.prod(u.shape[1:]))
  total = tf.zeros([tf.shape(u)[0]], tf.float32)
  for axis in spatial_axes:
    n = u.shape[axis]
    if n is None or n < 2:
      continue
    mask = tf.reshape(tf.cast(tf.range(n) > 0, u.dtype),
                      [n if a == axis else 1 for a in range(rank)])
    diff = u - tf.roll(u, shift=1, axis=axis)
    total += tf.reduce_sum(tf.square(diff) * mask, axis=sample_axes) / (size * (n - 1) / n)
  return total


def initial_u(rng, shape):
  """``N(0, 1)`` mapped linearly so +-3 std spans [-1, 1], then clipped."""
  return np.clip(rng.standard_normal(shape) / 3.0, -1.0, 1.0).astype(np.float32)



def augment_seed(rng) -> int:
  """A seed for the in-graph augmentation, drawn from the run's generator."""
  return int(rng.integers(0, 2 ** 31 - 1))


class Blur:
  """A fixed, separable Gaussian blur along the spatial axes (edges mirrored).

  The labeled generator optimizes ``u`` but feeds (and returns) ``Blur(u)``:
  gradients cannot build detail finer than ``sigma`` positions, the
  high-frequency texture that a classifier's gradient otherwise paints all
  over the frame and that real inputs lack. A weighted mean of values in
  [-1, 1], so the result stays in range. ``sigma=0`` is the identity.

  >>> import numpy as np
  >>> blur = Blur((1, 2), 0.5)
  >>> out = blur(np.eye(5, dtype=np.float32)[None, :, :, None]).numpy()
  >>> out.shape, bool(np.allclose(out.sum(), 5.0, atol=1e-5))
  ((1, 5, 5, 1), True)
  """

  def __init__(self, spatial_axes, sigma: float):
    self.axes = tuple(spatial_axes)
    self.sigma = float(sigma)
    radius = int(np.ceil(2.0 * self.sigma)) if self.sigma > 0 else 0
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / self.sigma) ** 2) if radius else np.ones(1)
    self.taps = (taps / taps.sum()).astype(np.float32)
    self.radius = radius

  def __call__(self, u):
    u = tf.convert_to_tensor(u, tf.float32)
    if not self.radius:
      return u
    rank = len(u.shape)
    for axis in self.axes:
      n = u.shape[axis]
      r = min(self.radius, n - 1)
      if r < 1:
        continue
      taps = self.taps[self.radius - r:self.radius + r + 1]
      taps = taps / taps.sum()
      pad = [[0, 0]] * rank
      pad[axis] = [r, r]
      padded = tf.pad(u, pad, mode="SYMMETRIC")
      u = _convolve_axis(padded, axis, taps, u.shape)
    return u


def _convolve_axis(padded, axis: int, taps: np.ndarray, shape) -> tf.Tensor:
  """``padded`` (edge-padded by ``len(taps) // 2`` along ``axis``) convolved with ``taps`` there.

  One depthwise convolution: the axes before ``axis`` fold into the batch and
  those after it into the channels, so any rank takes the same path. On CPU
  this is several times faster, forward and backward, than summing shifted
  slices (BENCHMARKS.md: a 224x224 MobileNetV2's synthesis 134 -> 70 s).
  """
  after = int(np.prod([int(d) for d in shape[axis + 1:]], dtype=np.int64))
  n = int(shape[axis])
  x = tf.reshape(padded, [-1, n + len(taps) - 1, 1, after])
  kernel = tf.tile(tf.reshape(tf.constant(taps, tf.float32), [-1, 1, 1, 1]), [1, 1, after, 1])
  out = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding="VALID")
  return tf.reshape(out, [-1] + [int(d) for d in shape[1:]])


class Augment:
  """DeepInversion-style random jitter (and optional horizontal flip) of a batch.

  One random shift of up to ``jitter`` positions along each spatial axis per
  step (wrapping around, as ``tf.roll`` does), the same for the whole batch;
  drawn from a stateless generator keyed on a step counter, so runs repeat.
  """

  def __init__(self, classifier, jitter: int, flip: bool, seed: int):
    self.axes = classifier.spatial_axes
    self.jitter = int(jitter) if self.axes else 0
    self.flip = bool(flip) and len(self.axes) == 2
    self.seed = int(seed)
    self.step = tf.Variable(0, dtype=tf.int64, trainable=False)

  @tf.autograph.experimental.do_not_convert  # plain Python branches only
  def __call__(self, x):
    if not self.jitter and not self.flip:
      return x
    self.step.assign_add(1)
    key = tf.stack([tf.constant(self.seed, tf.int64), self.step])
    if self.jitter:
      shifts = tf.random.stateless_uniform([len(self.axes)], key, -self.jitter,
                                           self.jitter + 1, dtype=tf.int32)
      x = tf.roll(x, shift=shifts, axis=list(self.axes))
    if self.flip:
      coin = tf.random.stateless_uniform([], key + 7, 0, 2, dtype=tf.int32)
      x = tf.cond(coin > 0, lambda: tf.reverse(x, axis=[self.axes[1]]), lambda: x)
    return x


def spread_loss(tensors) -> tf.Tensor:
  """Minus the mean log spread of each value of ``tensors`` over the batch, summed over them.

  Each tensor's values are flattened per sample; a value's spread is its
  standard deviation over the batch relative to the mean magnitude of the
  tensor (not differentiated), so tensors of any scale count alike. The
  standard deviation is ``sqrt(var + 1e-12)``: a value constant over the
  batch (a dead ReLU) would make ``reduce_std``'s gradient NaN.

  >>> x = tf.constant([[0.0, 1.0], [2.0, 1.0]])
  >>> round(float(spread_loss([x])), 3)  # one value varies, the other is constant
  3.453
  """
  total = 0.0
  for out in tensors:
    flat = tf.reshape(tf.cast(out, tf.float32), [tf.shape(out)[0], -1])
    std = tf.sqrt(tf.math.reduce_variance(flat, axis=0) + 1e-12)
    scale = tf.stop_gradient(tf.reduce_mean(tf.abs(flat))) + 1e-6
    total += -tf.reduce_mean(tf.math.log(std / scale + 1e-3))
  return total


def batchnorm_terms(classifier, bn_weight):
  """BatchNorm terms and a network returning (BN inputs, head output) in one pass.

  ``bn_weight=0`` (or a model without top-level BatchNorm) gives no terms and
  the plain forward. Each term is ``(layer, reduce_axes, moving mean,
  moving std)``.
  """
  model = classifier.model
  bns = [] if bn_weight == 0 else [l for l in batchnorm_layers(model)
                                   if batchnorm_lib.state(l) != batchnorm_lib.DEGENERATE]
  head = classifier.forward
  if not bns:
    return [], lambda x: ([], head(x, training=False))
  try:
    out = head.outputs[0] if isinstance(head, keras.Model) else model.outputs[0]
    both = keras.Model(model.inputs, [l.input for l in bns] + [out])
  except Exception:  # pylint: disable=broad-except  # shared or nested BN: no BN term
    return [], lambda x: ([], head(x, training=False))
  terms = []
  for layer in bns:
    axes = [a % len(layer.input.shape) for a in tf.nest.flatten(layer.axis)]
    reduce_axes = [a for a in range(len(layer.input.shape)) if a not in axes]
    dead = np.asarray(layer.moving_variance.numpy()) <= 0
    live = tf.constant(~dead, tf.float32) if np.any(dead) else None  # dead channels: no target
    terms.append((layer, reduce_axes, tf.cast(layer.moving_mean, tf.float32),
                  tf.cast(tf.sqrt(layer.moving_variance + layer.epsilon), tf.float32), live))

  def network(x):
    outs = both(x, training=False)
    return outs[:-1], outs[-1]

  return terms, network


def batchnorm_loss(feats, terms):
  """Mean over BN layers of the squared batch-statistics error, relative to the moving std."""
  loss = 0.0
  for h, (_, axes, mean, std, live) in zip(feats, terms):
    m, v = tf.nn.moments(tf.cast(h, tf.float32), axes=axes)
    if live is None:
      loss += tf.reduce_mean(tf.square((m - mean) / std))
      loss += tf.reduce_mean(tf.square((tf.sqrt(v + 1e-5) - std) / std))
    else:
      count = tf.maximum(tf.reduce_sum(live), 1.0)
      loss += tf.reduce_sum(live * tf.square((m - mean) / std)) / count
      loss += tf.reduce_sum(live * tf.square((tf.sqrt(v + 1e-5) - std) / std)) / count
  return loss / float(len(terms))



def batchnorm_layers(model) -> List[Any]:
  """The BatchNormalization layers at the top level of ``model``, in order."""
  return [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
