"""Closed-loop YellowFin: measure total momentum, correct by negative feedback.

Asynchrony adds momentum. :func:`total_momentum` measures the momentum the
running system actually has from the history of updates; :func:`closed_loop`
lowers the algorithmic momentum until the measured total matches YellowFin's
target; :func:`closed_loop_yellowfin` chains them with stale gradients.

Memory, with staleness ``tau``: ``tau`` buffers of pending gradients
(:func:`delayed_gradients`) plus YellowFin's two, ``tau + 2`` parameter-size
buffers in all; :func:`total_momentum` keeps the last ``tau + 1`` updates at
its sampled coordinates only (``4096 (tau + 1)`` floats). With
``estimator='least_squares'`` it keeps them whole: ``2 tau + 3``.

References:
  Zhang & Mitliagkas, `YellowFin and the Art of Momentum Tuning
  <https://arxiv.org/abs/1706.03471>`_, Section 4 (SysML 2018).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax

from yellowfin_optax import _alias
from yellowfin_optax import _checks
from yellowfin_optax import _delay
from yellowfin_optax import _hyperparams
from yellowfin_optax import _momentum
from yellowfin_optax import _nonfinite
from yellowfin_optax import _statistics

# Range of the algorithmic momentum (the paper's Figure 3 goes below zero).
MOMENTUM_RANGE = (-0.9, 0.999)
# Measured total momentum is reported within this range.
_ESTIMATE_RANGE = (-2.0, 2.0)
_TINY = float(jnp.finfo(jnp.float32).tiny)
ESTIMATORS = ('median', 'least_squares')


def _sort_float32(x: jax.Array) -> jax.Array:
  """``jnp.sort`` of a float32 vector through order-preserving int32 keys.

  Same result (NaN last); XLA:CPU sorts int32 about 5x faster than float32,
  whose comparator must order NaN (0.10 vs 0.54 ms for 4096 values).
  """
  x = jnp.where(jnp.isnan(x), jnp.nan, x)  # one NaN bit pattern: sorts last
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  flip = jnp.int32(0x7FFFFFFF)  # negative floats: reverse the magnitude bits
  keys = jax.lax.sort(jnp.where(bits < 0, bits ^ flip, bits), is_stable=False)
  return jax.lax.bitcast_convert_type(
      jnp.where(keys < 0, keys ^ flip, keys), jnp.float32
  )


def masked_median(values: Any, mask: Any) -> tuple[jax.Array, jax.Array]:
  """Exact median of the masked entries of a pytree (sorts them).

  Meant for the few thousand sampled coordinates of :func:`total_momentum`;
  the median of an even count is the mean of the two middle values.

  Args:
    values: pytree of arrays.
    mask: pytree of booleans like ``values``: which entries count.

  Returns:
    ``(median, count)``: the median (0 when ``count`` is 0) and the number of
    masked entries.

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> values = {'a': jnp.array([0.1, 0.9, 0.5]),
    ...           'b': jnp.array([0.3, 0.7, 5.0])}
    >>> mask = {'a': jnp.array([True, True, True]),
    ...         'b': jnp.array([True, True, False])}
    >>> median, count = yf.masked_median(values, mask)
    >>> print(f"{float(median):.3f} {int(count)}")
    0.500 5
  """
  v = ravel_pytree(values)[0].astype(jnp.float32)
  m = ravel_pytree(mask)[0].astype(bool)
  count = jnp.sum(m, dtype=jnp.int32)
  ordered = _sort_float32(jnp.where(m, v, jnp.inf))
  if ordered.size == 0:
    return jnp.zeros([], jnp.float32), count
  lower = ordered[jnp.maximum(count - 1, 0) // 2]
  upper = ordered[jnp.minimum(count // 2, ordered.size - 1)]
  return jnp.where(count > 0, (lower + upper) / 2, 0.0), count


def _gather(x: jax.Array, index: tuple[np.ndarray, ...]) -> jax.Array:
  """``x[index]``, replicated; an explicitly sharded ``x`` must be told so."""
  if not _statistics.is_unsharded(x):
    return x.at[index].get(out_sharding=jax.sharding.PartitionSpec())
  return x[index]


def sample_coordinates(
    shapes: list[tuple[int, ...]], samples: int | None, seed: int = 0
) -> list[tuple[np.ndarray, ...]]:
  """Fixed coordinates, uniform over all leaves, for the median estimator.

  Chosen once, at trace time, from the shapes alone (the same on every device
  and every step); ``samples=None`` or at least the total size takes every
  coordinate. Returns, per leaf, a tuple of index arrays (one per axis), so
  that gathering needs no reshape of a sharded array; 0-d leaves count as
  shape ``(1,)``.
  """
  shapes = [shape or (1,) for shape in shapes]  # 0-d leaves as 1-vectors
  sizes = [int(np.prod(shape)) for shape in shapes]
  total = sum(sizes)
  if samples is None or samples >= total:
    flat = np.arange(total)
  else:
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(total, samples, replace=False))
  offsets = np.cumsum([0] + sizes)
  return [
      np.unravel_index(flat[(flat >= lo) & (flat < hi)] - lo, shape)
      for shape, lo, hi in zip(shapes, offsets[:-1], offsets[1:])
  ]


class TotalMomentumState(NamedTuple):
  """State of :func:`total_momentum`.

  Attributes:
    inner: state of the wrapped optimizer.
    total_momentum: last measured total momentum (0 until measurable).
    measured: int32, number of steps measured so far.
    count: int32, number of steps taken (saturating).
    past_updates: ring of the last updates ``x_{s+1} - x_s``, a pytree like
      the params with a leading ``[staleness + 1]`` axis; with the median
      estimator only the sampled coordinates are kept, in one float32 array
      of shape ``[staleness + 1, n]`` (the leaves' samples in leaf order: one
      state buffer however many leaves the params have).
    past_step_sizes: ``[staleness + 1]`` ring of the applied gradient step
      sizes (learning rate times the gradient's clipping factor).
  """

  inner: Any
  total_momentum: jax.Array
  measured: jax.Array
  count: jax.Array
  past_updates: optax.Updates
  past_step_sizes: jax.Array


def total_momentum(
    inner: optax.GradientTransformation,
    *,
    staleness: int = 0,
    learning_rate: jax.typing.ArrayLike | None = None,
    estimator: str = 'median',
    median_samples: int | None = 4096,
    updates_at: Callable[..., optax.Updates] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Measures the total momentum of the system ``inner`` runs in.

  Models the run as :math:`x_{s+1} - x_s = \mu_T (x_s - x_{s-1}) -
  \alpha_s \nabla f(x_s)` and estimates :math:`\mu_T` as the median over
  coordinates of

  .. math::
    \hat\mu_T = \operatorname{median}_i
      \frac{(x_{s+1} - x_s)_i + \alpha_s \nabla f(x_s)_i}{(x_s - x_{s-1})_i},

  where :math:`s = t - \tau` is the iterate at which the gradient arriving now
  was computed. Optax updates are :math:`x_{s+1} - x_s`, so a ring of the last
  :math:`\tau + 1` updates and step sizes suffices. :math:`\alpha_s` is the
  learning rate times the clipping factor applied to that step's gradient:
  with no staleness and heavy-ball momentum the estimate is exactly
  :math:`\mu\,\text{lr}_s / \text{lr}_{s-1}` (the clipping factors cancel).
  Coordinates whose denominator is zero or non-finite are left out; with
  none left (or before :math:`\tau + 2` steps) the previous estimate is
  kept. The median is taken exactly over a
  fixed uniform sample of ``median_samples`` coordinates (all of them in
  smaller models), chosen once from the shapes: its standard error is
  :math:`\approx 1.25\,\sigma/\sqrt{n}` (2% of the ratios' spread at 4096),
  and it costs a gather of that many entries from the update and the
  gradient instead of passes over every parameter, and a ring of past
  updates at those coordinates only; under ``pmap`` every replica samples
  the same coordinates, under sharding XLA gathers them across devices.
  Estimates are reported within [-2, 2].

  Args:
    inner: the optimizer to watch; receives the (stale) gradients unchanged.
    staleness: the gradient delay :math:`\tau` of the system, >= 0.
    learning_rate: the constant learning rate of ``inner``; ``None`` reads the
      ``learning_rate`` (and ``grad_scale``, if any) fields of ``inner``'s
      state after each step, as YellowFin's state has.
    estimator: ``'median'`` (the paper's) or ``'least_squares'``:
      :math:`\langle n, d\rangle / \langle d, d\rangle` over all coordinates
      (numerator ``n`` and denominator ``d`` as above), i.e. the ratios
      weighted by :math:`d_i^2`. Asynchrony destabilises the few
      high-curvature directions, which move most; the median barely sees
      them, the least-squares fit is dominated by them. One pass over the
      buffers (two dot products).
    median_samples: coordinates the median is taken over; ``None`` for all
      of them (exact, but a sort of every coordinate each step).
    updates_at: median estimator only: ``f(take, grads, state, new_state,
      **extra_args)`` giving ``inner``'s new updates at the sampled
      coordinates from its inputs there (``take(tree)`` gathers a pytree
      like the params at them; ``state``/``new_state`` are ``inner``'s).
      Without it they are gathered from ``inner``'s output, which makes XLA
      write the new momentum buffer to a temporary first; with it the
      buffer is written once, in place. :func:`closed_loop_yellowfin`
      passes it.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra keyword arguments are
    passed on to ``inner``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import yellowfin_optax as yf
    >>> tx = yf.total_momentum(optax.sgd(0.1, momentum=0.5), learning_rate=0.1)
    >>> x = jnp.linspace(1.0, 2.0, 5)
    >>> state = tx.init(x)
    >>> for _ in range(5):
    ...   u, state = tx.update(x, state)  # gradient of |x|^2 / 2
    ...   x = x + u
    >>> print(f"{float(state.total_momentum):.3f}")
    0.500
  """
  _checks.check_int('staleness', staleness, 0)
  _checks.check_range('learning_rate', learning_rate, 0.0, low_open=True)
  if median_samples is not None:
    _checks.check_int('median_samples', median_samples, 1)
  if estimator not in ESTIMATORS:
    raise ValueError(
        f'estimator must be one of {ESTIMATORS}, got {estimator!r}.'
    )
  inner = optax.with_extra_args_support(inner)
  size = staleness + 1
  sampled = estimator == 'median'

  def coordinates(tree):
    return sample_coordinates(
        [jnp.shape(x) for x in jax.tree.leaves(tree)], median_samples
    )

  def gather(tree, where):
    """The sampled coordinates of ``tree``, per leaf, in its dtypes."""
    return jax.tree.unflatten(jax.tree.structure(tree), [
        _gather(jnp.atleast_1d(x), idx)
        for x, idx in zip(jax.tree.leaves(tree), where)
    ])

  def flat32(tree):
    """All leaves of ``tree`` in one float32 vector, in leaf order."""
    return ravel_pytree(optax.tree.cast(tree, jnp.float32))[0]

  def take(tree, where):
    """The sampled coordinates of ``tree``, all leaves in one float32
    vector."""
    return flat32(gather(tree, where))

  def init_fn(params):
    if sampled:  # the ratio needs past updates at the sample only
      count = sum(len(idx[0]) for idx in coordinates(params))
      past_updates = jnp.zeros((size, count), jnp.float32)
    else:
      past_updates = jax.tree.map(
          lambda p: jnp.broadcast_to(
              jnp.zeros_like(p)[None], (size,) + jnp.shape(p)
          ),
          params,
      )
    return TotalMomentumState(
        inner=inner.init(params),
        total_momentum=jnp.zeros([], jnp.float32),
        measured=jnp.zeros([], jnp.int32),
        count=jnp.zeros([], jnp.int32),
        past_updates=past_updates,
        past_step_sizes=jnp.zeros([size], jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, inner_state = inner.update(
        updates, state.inner, params, **extra_args
    )
    if learning_rate is None:
      found = _hyperparams.find_scalars(
          inner_state, ('learning_rate', 'grad_scale')
      )
      if 'learning_rate' not in found:
        raise ValueError(
            'total_momentum(learning_rate=None) reads the learning_rate field '
            "of inner's state, and inner's state has none: pass the constant "
            'learning_rate of inner.'
        )
      step_size = found['learning_rate'] * found.get('grad_scale', 1.0)
    else:
      step_size = jnp.asarray(learning_rate, jnp.float32)

    t = state.count
    slot = t % size  # holds x_{t-tau} - x_{t-tau-1}: read, then overwritten.
    # With the median estimator everything below is at the sampled
    # coordinates: gathers of a few thousand entries instead of passes over
    # every parameter, and a ring of samples instead of whole updates.
    where = coordinates(updates) if sampled else None
    here = (lambda tree: take(tree, where)) if sampled else (
        lambda tree: optax.tree.cast(tree, jnp.float32))
    past = lambda i: jax.tree.map(
        lambda b: b[i].astype(jnp.float32), state.past_updates
    )
    previous = past(slot)
    if sampled and updates_at is not None:
      written = flat32(updates_at(
          lambda tree: gather(tree, where), updates, state.inner, inner_state,
          **extra_args))
    else:
      written = here(new_updates)
    if staleness == 0:
      latest, latest_size = written, step_size
    else:
      newer = (t - staleness) % size
      latest = past(newer)
      latest_size = state.past_step_sizes[newer]

    numerator = jax.tree.map(
        lambda u, g: u + latest_size * g, latest, here(updates)
    )
    if sampled:
      n, d = jax.tree.leaves(numerator), jax.tree.leaves(previous)
      usable = [(jnp.abs(b) > _TINY) & jnp.isfinite(a) & jnp.isfinite(b)
                for a, b in zip(n, d)]
      ratios = [jnp.where(ok, a / jnp.where(ok, b, 1.0), 0.0)
                for a, b, ok in zip(n, d, usable)]
      estimate, count = masked_median(ratios, usable)
      estimate = jnp.clip(estimate, *_ESTIMATE_RANGE)
    else:  # least squares: <n, d> / <d, d>
      nd, dd = _statistics.tree_dots(
          (numerator, previous), [(0, 1), (1, 1)])
      ok = (dd > _TINY) & jnp.isfinite(nd) & jnp.isfinite(dd)
      estimate = jnp.clip(nd / jnp.where(ok, dd, 1.0), *_ESTIMATE_RANGE)
      count = ok.astype(jnp.int32)
    measurable = (t >= staleness + 1) & (count > 0)

    return new_updates, TotalMomentumState(
        inner=inner_state,
        total_momentum=jnp.where(measurable, estimate, state.total_momentum),
        measured=state.measured + measurable.astype(jnp.int32),
        count=optax.safe_increment(t),
        past_updates=jax.tree.map(
            lambda b, u: b.at[slot].set(u.astype(b.dtype)),
            state.past_updates, written,
        ),
        past_step_sizes=state.past_step_sizes.at[slot].set(step_size),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ClosedLoopState(NamedTuple):
  """State of :func:`closed_loop`.

  Attributes:
    inner: state of the wrapped (measuring) optimizer.
    momentum_offset: the controller's correction :math:`\\delta`.
    target_momentum: the tuner's momentum :math:`\\mu^*` at the last step.
    algorithmic_momentum: :math:`\\mu^* + \\delta` applied at the last step,
      clipped to ``momentum_range``.
  """

  inner: Any
  momentum_offset: jax.Array
  target_momentum: jax.Array
  algorithmic_momentum: jax.Array


def closed_loop(
    inner: optax.GradientTransformation,
    *,
    gain: jax.typing.ArrayLike = 0.01,
    momentum_range: tuple[float, float] = MOMENTUM_RANGE,
) -> optax.GradientTransformationExtraArgs:
  r"""Negative feedback on momentum: match measured total momentum to target.

  ``inner`` is a :func:`total_momentum` around :func:`tuned_momentum`: its
  state holds the tuner's ``momentum`` (the target :math:`\mu^*`) and the
  measured ``total_momentum`` :math:`\hat\mu_T`. Each step it is called with
  ``momentum_offset=delta``, so the applied algorithmic momentum is
  :math:`\mu = \mathrm{clip}(\mu^* + \delta)`, and then

  .. math::
    \delta \leftarrow \delta + \gamma (\mu^* - \hat\mu_T),

  applied from the next step. This has the fixed point of the paper's
  :math:`\mu \leftarrow \mu + \gamma(\mu^* - \hat\mu_T)` but follows changes of
  :math:`\mu^*` at once; :math:`\delta` is clipped so that
  :math:`\mu^* + \delta` stays in ``momentum_range`` (no wind-up), and it
  moves only on steps where :math:`\hat\mu_T` was measured. ``gain=0`` is
  open-loop YellowFin with the measurement on.

  Args:
    inner: the measuring optimizer (see above).
    gain: :math:`\gamma \ge 0`.
    momentum_range: bounds of the algorithmic momentum.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> tx = yf.closed_loop_yellowfin(staleness=1)
    >>> state = tx.init(jnp.zeros(2))
    >>> for t in range(4):
    ...   _, state = tx.update(jnp.array([1.0, -1.0]) / (t + 1), state)
    >>> sorted(k for k in yf.hyperparams(state) if 'momentum' in k)
    ['algorithmic_momentum', 'momentum', 'target_momentum', 'total_momentum']
  """
  _checks.check_range('gain', gain, 0.0)
  low, high = momentum_range
  if not -1.0 <= low < high <= 1.0:
    raise ValueError(
        'momentum_range must be (low, high) with -1 <= low < high <= 1, '
        f'got {momentum_range!r}.'
    )
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    zero = lambda: jnp.zeros([], jnp.float32)  # fresh arrays: donatable
    return ClosedLoopState(
        inner=inner.init(params), momentum_offset=zero(),
        target_momentum=zero(), algorithmic_momentum=zero(),
    )

  def update_fn(updates, state, params=None, **extra_args):
    delta = state.momentum_offset
    new_updates, inner_state = inner.update(
        updates, state.inner, params, momentum_offset=delta,
        momentum_range=momentum_range, **extra_args
    )
    found = _hyperparams.find_scalars(
        inner_state, ('momentum', 'total_momentum', 'measured'))
    before = _hyperparams.find_scalars(state.inner, ('measured',))
    target = found['momentum']
    measured_now = found['measured'] > before['measured']
    corrected = jnp.clip(
        delta + gain * (target - found['total_momentum']),
        low - target, high - target,
    )
    return new_updates, ClosedLoopState(
        inner=inner_state,
        momentum_offset=jnp.where(measured_now, corrected, delta),
        target_momentum=target,
        algorithmic_momentum=_momentum.offset_momentum(
            target, delta, momentum_range
        ),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _tuned_updates_at(
    take: Callable[[optax.Updates], optax.Updates],
    grads: optax.Updates,
    state: _momentum.TunedMomentumState,
    new_state: _momentum.TunedMomentumState,
    *,
    nesterov: bool,
    momentum_offset: jax.Array | None = None,
    momentum_range: tuple[float, float] | None = None,
    **extra_args: Any,
) -> optax.Updates:
  """``tuned_momentum``'s new updates at the sampled coordinates, from its
  inputs there: the gradient, clipped as the statistics clipped it, and the
  old trace (``total_momentum``'s ``updates_at``)."""
  del extra_args  # tuned_momentum ignores them too
  tuner = new_state.tuner
  momentum = _momentum.applied_momentum(tuner, momentum_offset, momentum_range)
  clipped = _statistics.scale_gradients(
      take(grads), tuner.statistics.grad_scale)
  trace = _momentum.momentum_trace(clipped, take(state.trace), momentum)
  return _momentum.momentum_updates(
      clipped, trace, tuner.learning_rate, momentum, nesterov=nesterov)


def closed_loop_yellowfin(
    staleness: int = 0,
    gain: jax.typing.ArrayLike = 0.01,
    *,
    nesterov: bool = False,
    on_nonfinite: str = 'skip',
    estimator: str = 'median',
    **yellowfin_options: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Closed-loop YellowFin on gradients that arrive ``staleness`` steps late.

  The chain, outermost first: the mean over ``axis_name`` (if given),
  :func:`delayed_gradients` (simulated
  asynchrony) -> :func:`skip_nonfinite` -> :func:`closed_loop` ->
  :func:`total_momentum` -> :func:`tuned_momentum` -> :func:`yellowfin_tuner`
  -> :func:`gradient_statistics`. The tuner, fed the stale gradients, gives
  the target momentum; the loop lowers the algorithmic momentum until the
  measured total momentum matches it.

  Args:
    staleness: gradient delay :math:`\tau` (``M`` round-robin workers:
      ``M - 1``); 0 for a synchronous run (the loop then only measures
      heavy-ball momentum itself).
    gain: feedback gain :math:`\gamma`; 0 is open loop with measurement.
    nesterov: use Nesterov momentum.
    on_nonfinite: see :func:`skip_nonfinite`.
    estimator: total-momentum estimator, ``'median'`` (the paper's) or
      ``'least_squares'``; see :func:`total_momentum`.
    **yellowfin_options: any option of :func:`yellowfin` (``learning_rate``,
      ``beta``, ``curvature_window``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; :func:`hyperparams` also
    reports ``total_momentum``, ``target_momentum`` and
    ``algorithmic_momentum``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import yellowfin_optax as yf
    >>> tx = yf.closed_loop_yellowfin(staleness=2)
    >>> params = jnp.ones(2)
    >>> state = tx.init(params)
    >>> step = jax.jit(tx.update)
    >>> for t in range(4):  # nothing is applied while the delay ring fills
    ...   updates, state = step(params, state, params)  # gradient of |x|^2 / 2
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
  # Averaged over the pmap/shard_map axis before anything sees the gradient:
  # the delay ring, the measurement and the non-finite check too.
  axis_name = yellowfin_options.pop('axis_name', None)
  tuner = _alias.yellowfin_tuner_from_options(**yellowfin_options)
  measured = total_momentum(
      _momentum.tuned_momentum(tuner, nesterov=nesterov),
      staleness=staleness,
      estimator=estimator,
      updates_at=functools.partial(_tuned_updates_at, nesterov=nesterov),
  )
  return _alias.cross_replica_mean(
      _delay.delayed_gradients(
          staleness,
          _nonfinite.skip_nonfinite(
              closed_loop(measured, gain=gain), on_nonfinite=on_nonfinite,
              check_gradients=False,  # ||g||^2 in the statistics covers them
              check_updates='narrow',  # float32 momentum SGD: finite
              # ClosedLoopState -> TotalMomentumState -> TunedMomentumState.
              updates_from_state=lambda g, s: _alias.tuned_updates(
                  g, s.inner.inner, s.algorithmic_momentum, nesterov=nesterov
              ),
          ),
      ),
      axis_name,
  )
