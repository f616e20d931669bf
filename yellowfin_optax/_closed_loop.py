"""Closed-loop YellowFin: measure the total momentum, correct it by feedback.

Asynchrony adds momentum. :func:`closed_loop_yellowfin` measures the
momentum the running system really has from its recent updates (the paper's
median estimator, or least squares), and lowers the algorithmic momentum
until the measured total matches YellowFin's target. :func:`delayed_gradients`
simulates the staleness of round-robin asynchronous workers; with gradients
that are really stale, pass ``simulate_staleness=False``.

Memory, staleness ``tau``: YellowFin's two parameter-size buffers, ``tau``
pending gradients when simulating, and the last ``tau + 1`` updates at 4096
sampled coordinates (median; the whole updates, ``tau + 1`` buffers, for
least squares).

References:
  Zhang & Mitliagkas, `YellowFin and the Art of Momentum Tuning
  <https://arxiv.org/abs/1706.03471>`_, Section 4 (SysML 2018).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax

from yellowfin_optax import _yellowfin

MOMENTUM_RANGE = (-0.9, 0.999)  # the paper's Figure 3 goes below zero
_ESTIMATE_RANGE = (-2.0, 2.0)  # reported total momentum
_TINY = _yellowfin._TINY
MEDIAN_SAMPLES = 4096  # standard error ~1.25 sigma / sqrt(n): 2% of the spread
ESTIMATORS = ('median', 'least_squares')


# --------------------------------------------------------------------------
# Simulated staleness.


class DelayedGradientsState(NamedTuple):
  """State of :func:`delayed_gradients`.

  Attributes:
    received: int32, gradients received (saturating).
    pending: pytree like the params with a leading ``[staleness]`` axis: the
      ring of gradients not yet applied; slot ``received % staleness`` holds
      the oldest.
    pending_values: ``[staleness]`` float32, the losses passed with them as
      ``value=`` (0 when none was passed).
    inner: state of the wrapped transformation.
  """

  received: jax.Array
  pending: optax.Updates
  pending_values: jax.Array
  inner: Any


def _ring(params, size: int):
  """Zeros like ``params`` with a leading ``[size]`` axis; broadcast from
  ``zeros_like`` so the ring inherits the params' sharding."""
  return jax.tree.map(
      lambda p: jnp.broadcast_to(jnp.zeros_like(p)[None], (size,) + p.shape),
      params)


def delayed_gradients(
    staleness: int,
    inner: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Feeds ``inner`` the gradient (and ``value``) received ``staleness``
  steps earlier, as ``M = staleness + 1`` round-robin workers would.

  While the ring fills (the first :math:`\tau` steps) the update is zero and
  ``inner`` is not called, so its statistics never see placeholder zeros
  (feeding zeros to YellowFin collapses its curvature estimate).
  ``staleness=0`` returns ``inner``.

  Args:
    staleness: the delay :math:`\tau \ge 0` (a Python int: a buffer shape).
    inner: the transformation fed the stale gradients; ``None`` emits them.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> tx = yf.delayed_gradients(2)
    >>> state = tx.init(jnp.zeros(1))
    >>> for t in range(4):
    ...   out, state = tx.update(jnp.array([t + 1.0]), state)
    ...   print(out)
    [0.]
    [0.]
    [1.]
    [2.]
  """
  staleness = _yellowfin.static_int('staleness', staleness, 0)
  inner = optax.with_extra_args_support(
      optax.identity() if inner is None else inner)
  if staleness == 0:
    return inner

  def init_fn(params):
    return DelayedGradientsState(
        received=jnp.zeros([], jnp.int32), pending=_ring(params, staleness),
        pending_values=jnp.zeros([staleness], jnp.float32),
        inner=inner.init(params))

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    slot = state.received % staleness
    stale = jax.tree.map(lambda b: b[slot], state.pending)
    stale_value = state.pending_values[slot]
    if value is not None:
      extra_args['value'] = stale_value

    # Selected, not a lax.cond: a cond over closures made anew each call
    # recompiles every eager step. While the ring fills the inner step runs
    # on a placeholder and is thrown away: its state never sees it.
    ready = state.received >= staleness
    new_updates, inner_state = inner.update(stale, state.inner, params,
                                            **extra_args)
    new_updates = jax.tree.map(lambda u: jnp.where(ready, u, 0).astype(u.dtype),
                               new_updates)
    inner_state = optax.tree.where(ready, inner_state, state.inner)
    values = state.pending_values
    if value is not None:
      values = values.at[slot].set(jnp.asarray(value, jnp.float32))
    return new_updates, DelayedGradientsState(
        received=optax.safe_increment(state.received),
        pending=jax.tree.map(lambda b, g: b.at[slot].set(g.astype(b.dtype)),
                             state.pending, updates),
        pending_values=values, inner=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# The total-momentum estimators (pure functions).


def _sort_float32(x: jax.Array) -> jax.Array:
  """``jnp.sort`` of a float32 vector through order-preserving int32 keys
  (NaN last); XLA:CPU sorts int32 about 5x faster than float32."""
  x = jnp.where(jnp.isnan(x), jnp.nan, x)  # one NaN bit pattern: sorts last
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  flip = jnp.int32(0x7FFFFFFF)  # negative floats: reverse the magnitude bits
  keys = jax.lax.sort(jnp.where(bits < 0, bits ^ flip, bits), is_stable=False)
  return jax.lax.bitcast_convert_type(
      jnp.where(keys < 0, keys ^ flip, keys), jnp.float32)


def masked_median(values: jax.Array, mask: jax.Array):
  """Exact median of ``values[mask]`` (1-d): ``(median, count)``; 0 when
  ``count`` is 0; the mean of the two middle values for an even count."""
  count = jnp.sum(mask, dtype=jnp.int32)
  ordered = _sort_float32(jnp.where(mask, values, jnp.inf))
  if ordered.size == 0:
    return jnp.zeros([], jnp.float32), count
  lower = ordered[jnp.maximum(count - 1, 0) // 2]
  upper = ordered[jnp.minimum(count // 2, ordered.size - 1)]
  return jnp.where(count > 0, (lower + upper) / 2, 0.0), count


def median_momentum(numerator, denominator):
  r"""The paper's estimate :math:`\operatorname{median}_i n_i / d_i` over
  coordinates whose :math:`d_i` is usable (non-zero, finite):
  ``(estimate, count)``."""
  usable = (jnp.abs(denominator) > _TINY) & jnp.isfinite(numerator) & (
      jnp.isfinite(denominator))
  ratios = jnp.where(usable, numerator / jnp.where(usable, denominator, 1.0),
                     0.0)
  return masked_median(ratios, usable)


def least_squares_momentum(numerator, denominator):
  r""":math:`\langle n, d\rangle / \langle d, d\rangle`: the ratios weighted by
  :math:`d_i^2`, dominated by the directions that move most (those that
  asynchrony destabilises): ``(estimate, count)``, count 1 or 0."""
  nd, dd = _yellowfin.tree_dots((numerator, denominator), [(0, 1), (1, 1)])
  ok = (dd > _TINY) & jnp.isfinite(nd) & jnp.isfinite(dd)
  return nd / jnp.where(ok, dd, 1.0), ok.astype(jnp.int32)


def sample_coordinates(shapes, samples: int, seed: int = 0):
  """Fixed coordinates, uniform over all leaves, chosen at trace time from the
  shapes alone (the same on every device and step); all of them when
  ``samples`` is at least the total size. Per leaf, a tuple of index arrays
  (one per axis: gathering needs no reshape of a sharded array)."""
  shapes = [shape or (1,) for shape in shapes]  # 0-d leaves as 1-vectors
  sizes = [int(np.prod(shape)) for shape in shapes]
  total = sum(sizes)
  if samples >= total:
    flat = np.arange(total)
  else:
    flat = np.sort(np.random.default_rng(seed).choice(total, samples,
                                                      replace=False))
  offsets = np.cumsum([0] + sizes)
  return [np.unravel_index(flat[(flat >= lo) & (flat < hi)] - lo, shape)
          for shape, lo, hi in zip(shapes, offsets[:-1], offsets[1:])]


def _take(tree, where) -> jax.Array:
  """``tree`` at the sampled coordinates, all leaves in one float32 vector."""
  def gather(x, index):
    x = jnp.atleast_1d(x)
    if not _yellowfin.is_unsharded(x):  # an explicitly sharded x: say so
      return x.at[index].get(out_sharding=jax.sharding.PartitionSpec())
    return x[index]
  parts = [gather(x, i).astype(jnp.float32)
           for x, i in zip(jax.tree.leaves(tree), where)]
  return ravel_pytree(parts)[0]


# --------------------------------------------------------------------------
# The closed loop.


class ClosedLoopState(NamedTuple):
  """State of the closed loop (inside :func:`closed_loop_yellowfin`).

  Attributes:
    yellowfin: the tuner's :class:`YellowFinState` (its ``momentum`` is the
      algorithmic momentum applied).
    momentum_offset: the controller's correction :math:`\\delta`.
    target_momentum: the tuner's momentum :math:`\\mu^*` at the last step.
    total_momentum: the last measured total momentum (0 until measurable).
    measured: int32, steps on which it was measured.
    past_updates: ring of the last ``staleness + 1`` updates: ``[tau + 1, n]``
      float32 at the sampled coordinates (median) or a pytree like the params
      with a leading ``[tau + 1]`` axis (least squares).
    past_step_sizes: ``[tau + 1]``, the applied gradient step sizes (learning
      rate times the gradient's clip factor).
  """

  yellowfin: _yellowfin.YellowFinState
  momentum_offset: jax.Array
  target_momentum: jax.Array
  total_momentum: jax.Array
  measured: jax.Array
  past_updates: Any
  past_step_sizes: jax.Array
  REPORTED = ('target_momentum', 'total_momentum')


def closed_loop_yellowfin(
    *,
    staleness: int = 0,
    gain: jax.typing.ArrayLike = 0.01,
    estimator: str = 'median',
    simulate_staleness: bool = True,
    momentum_range: tuple[float, float] = MOMENTUM_RANGE,
    curvature: str = 'gradient',
    lr_factor: optax.ScalarOrSchedule = 1.0,
    nesterov: bool = False,
    axis_name: str | None = None,
    on_nonfinite: str = 'skip',
) -> optax.GradientTransformationExtraArgs:
  r"""Closed-loop YellowFin for gradients that arrive ``staleness`` steps late.

  The tuner, fed the stale gradients, gives the target momentum
  :math:`\mu^*`. Each step the total momentum is measured as (the paper's
  median over coordinates, or least squares)

  .. math::
    \hat\mu_T = \operatorname{median}_i
      \frac{(x_{s+1} - x_s)_i + \alpha_s \nabla f(x_s)_i}{(x_s - x_{s-1})_i},
    \quad s = t - \tau,

  from a ring of the last :math:`\tau + 1` updates (Optax updates are
  :math:`x_{s+1} - x_s`), and the applied algorithmic momentum is
  :math:`\mathrm{clip}(\mu^* + \delta)` with
  :math:`\delta \leftarrow \delta + \gamma(\mu^* - \hat\mu_T)`: the fixed point
  of the paper's :math:`\mu \leftarrow \mu + \gamma(\mu^* - \hat\mu_T)`, but
  following changes of :math:`\mu^*` at once; ``gain=0`` is open-loop
  YellowFin bit for bit. :math:`\alpha_s` is the learning rate times the
  gradient's clip factor; with no staleness the estimate is
  :math:`\mu\,\alpha_s/\alpha_{s-1}`.

  Args:
    staleness: the gradient delay :math:`\tau` (``M`` round-robin workers:
      ``M - 1``), an int >= 0.
    gain: feedback gain :math:`\gamma \ge 0`.
    estimator: ``'median'`` (the paper's; exact over 4096 fixed sampled
      coordinates) or ``'least_squares'`` (one pass over ``tau + 1`` whole
      buffers; it sees the few unstable directions the median misses).
    simulate_staleness: delay the gradients by ``staleness`` steps
      (:func:`delayed_gradients`); ``False`` when they are already stale
      (a real asynchronous system): the loop then only needs to know
      :math:`\tau`.
    momentum_range: bounds of the algorithmic momentum, within [-1, 1].
    curvature: ``'gradient'`` (the reference) or ``'loss'`` (needs
      ``value=``; see :func:`yellowfin_auto`).
    lr_factor: multiplier of the tuned learning rate (number or schedule).
    nesterov: Nesterov momentum.
    axis_name: ``pmap``/``shard_map`` axis to average gradients over first.
    on_nonfinite: ``'skip'``, ``'raise_in_debug'`` or ``'propagate'``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; :func:`hyperparams` also
    reports ``target_momentum`` and ``total_momentum``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import yellowfin_optax as yf
    >>> tx = yf.closed_loop_yellowfin(staleness=2)
    >>> params = jnp.ones(2)
    >>> state = tx.init(params)
    >>> step = jax.jit(tx.update)
    >>> for t in range(4):  # nothing is applied while the delay ring fills
    ...   updates, state = step(params, state, params)  # gradient of |x|^2/2
    ...   params = optax.apply_updates(params, updates)
    ...   print(bool(jnp.any(updates != 0)))
    False
    False
    True
    True

  References:
    Zhang & Mitliagkas, `YellowFin and the Art of Momentum Tuning
    <https://arxiv.org/abs/1706.03471>`_, Section 4, 2018.
  """
  _yellowfin.check_range('gain', gain, 0.0)
  _yellowfin.check_choice('estimator', estimator, ESTIMATORS)
  low, high = momentum_range
  if not -1.0 <= low < high <= 1.0:
    raise ValueError('momentum_range must be (low, high) with -1 <= low < '
                     f'high <= 1, got {momentum_range!r}.')
  config = _yellowfin.make_config(  # axis_name: averaged before the delay
      curvature=curvature, lr_factor=lr_factor, nesterov=nesterov,
      on_nonfinite=on_nonfinite)
  sampled = estimator == 'median'
  if not isinstance(staleness, jax.core.Tracer):  # traced: read from state
    staleness = _yellowfin.static_int('staleness', staleness, 0)

  def coordinates(tree):
    return sample_coordinates([jnp.shape(x) for x in jax.tree.leaves(tree)],
                              MEDIAN_SAMPLES)

  def init_fn(params):
    size = staleness + 1
    if sampled:
      count = sum(len(i[0]) for i in coordinates(params))
      past = jnp.zeros((size, count), jnp.float32)
    else:
      past = _ring(params, size)
    zero = lambda: jnp.zeros([], jnp.float32)  # fresh arrays: donatable
    return ClosedLoopState(
        yellowfin=_yellowfin.init_state(config, params),
        momentum_offset=zero(), target_momentum=zero(), total_momentum=zero(),
        measured=jnp.zeros([], jnp.int32), past_updates=past,
        past_step_sizes=jnp.zeros([size], jnp.float32))

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del params, extra_args
    grads, value = _yellowfin.replica_mean(config, updates, value)
    delta = state.momentum_offset
    new_yf, step = _yellowfin.measure_and_tune(
        config, grads, state.yellowfin, value, delta, momentum_range)
    lr, mu = new_yf.learning_rate, new_yf.momentum
    step_size = lr * step.scale
    size = state.past_step_sizes.shape[0]  # tau + 1, static
    tau = size - 1
    t = state.yellowfin.count
    slot = t % size  # holds x_{t-tau} - x_{t-tau-1}: read, then overwritten

    # The new update at the measured coordinates, from the inputs there (so
    # the trace is written once, in place, and nothing parameter-sized is
    # gathered from an output).
    if sampled:
      where = coordinates(grads)
      here = lambda tree: _take(tree, where)
      g_c, v_old = here(step.grads), here(state.yellowfin.trace)
      trace = jnp.where(mu != 0.0, mu * v_old + g_c, v_old)
      written = _yellowfin.momentum_updates(g_c, trace, lr, mu, config.nesterov)
      past = lambda i: state.past_updates[i]
    else:
      here = lambda tree: optax.tree.cast(tree, jnp.float32)
      written = here(_yellowfin.momentum_updates(
          step.grads, new_yf.trace, lr, mu, config.nesterov))
      past = lambda i: jax.tree.map(lambda b: b[i], state.past_updates)
    if tau == 0:
      latest, latest_size = written, step_size
    else:
      latest = past((t - tau) % size)
      latest_size = state.past_step_sizes[(t - tau) % size]
    numerator = jax.tree.map(lambda u, g: u + latest_size * g, latest,
                             here(grads))
    estimate, count = (median_momentum if sampled else least_squares_momentum)(
        numerator, past(slot))
    measurable = (t >= tau + 1) & (count > 0)
    total = jnp.where(measurable, jnp.clip(estimate, *_ESTIMATE_RANGE),
                      state.total_momentum).astype(jnp.float32)
    target = step.target_momentum
    corrected = jnp.clip(delta + gain * (target - total), low - target,
                         high - target)
    new = ClosedLoopState(
        yellowfin=new_yf,
        momentum_offset=jnp.where(measurable, corrected, delta).astype(
            jnp.float32),
        target_momentum=target, total_momentum=total,
        measured=state.measured + measurable.astype(jnp.int32),
        past_updates=jax.tree.map(lambda b, u: b.at[slot].set(u.astype(b.dtype)),
                                  state.past_updates, written),
        past_step_sizes=state.past_step_sizes.at[slot].set(step_size))
    ok = step.ok & _yellowfin.all_finite(
        [new.momentum_offset, total] + _yellowfin._narrow(new_yf.trace))
    if config.on_nonfinite == 'propagate':
      ok = jnp.array(True)
    selected = _yellowfin.skip_bad_step(ok, new, state, config)
    selected = selected._replace(
        yellowfin=_yellowfin.count_skip(ok, selected.yellowfin))
    new_updates = _yellowfin.momentum_updates(
        step.grads, selected.yellowfin.trace, lr, mu, config.nesterov, ok)
    return new_updates, selected

  loop = optax.GradientTransformationExtraArgs(init_fn, update_fn)

  def outer_init(params):
    if simulate_staleness and staleness > 0:
      return delayed_gradients(staleness, loop).init(params)
    return loop.init(params)

  def outer_update(updates, state, params=None, *, value=None, **extra_args):
    if axis_name is not None:
      # The delay ring, the skip and the measurement see the averaged
      # gradient (and loss).
      updates = jax.lax.pmean(updates, axis_name)
      value = None if value is None else jax.lax.pmean(value, axis_name)
    inner = loop
    if isinstance(state, DelayedGradientsState):
      # The ring's shape, not the argument: optax.inject_hyperparams traces
      # int arguments.
      inner = delayed_gradients(state.pending_values.shape[0], loop)
    return inner.update(updates, state, params, value=value, **extra_args)

  return optax.GradientTransformationExtraArgs(outer_init, outer_update)
