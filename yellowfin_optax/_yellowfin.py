"""YellowFin: momentum SGD that tunes its own learning rate and momentum.

One transformation, :func:`scale_by_yellowfin`, with one flat state
(:class:`YellowFinState`). Its update reads like the paper: measure the
curvature range, the gradient variance and the distance to the optimum
(:func:`curvature_range`, :func:`gradient_variance`), solve the cubic
(:func:`cubic_root`), respect the robust region (:func:`robust_momentum`),
tune (:func:`tune`) and take a heavy-ball step. The aliases :func:`yellowfin`
(the authors' reference, step for step) and :func:`yellowfin_auto` (the
curvature in loss units, for which the tuned step does not depend on the loss
or gradient scale) configure it.

Memory: two parameter-size buffers (the gradient EMA in float32 and the
momentum trace in the params' dtypes), like Adam, plus ``curvature_window +
19`` scalars and the state of a ``direction`` if one is given.

References:
  Zhang & Mitliagkas, `YellowFin and the Art of Momentum Tuning
  <https://arxiv.org/abs/1706.03471>`_, SysML 2018.
"""

from __future__ import annotations

import collections
import inspect
import math
import numbers
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# torch.nn.utils.clip_grad_norm_ divides by ``norm + 1e-6``; so do we.
_TORCH_CLIP_EPS = 1e-6
_TINY = float(np.finfo(np.float32).tiny)
# A step whose ||g||^2 exceeds this many times the largest curvature of the
# window (the previous h_max, in ||g||^2 units) is left out of the statistics
# and skipped like a non-finite one: a gradient 1e5x larger than any recent
# one carries no information about the curvature and would poison the
# variance EMA for ~1/(1 - beta) steps (BUILD_NOTES.md, fault table). The
# reference's own burst (1000x gradients, 1e6 in ||g||^2) stays below it.
# After curvature_window such steps in a row they are taken again.
ABSURD_RATIO = 1e10
CURVATURES = ('gradient', 'loss')
NONFINITE_MODES = ('skip', 'raise_in_debug', 'propagate')


class YellowFinState(NamedTuple):
  """State of :func:`scale_by_yellowfin`: one flat tuple of arrays.

  Scalars are float32 0-d arrays unless noted.

  Attributes:
    count: int32, number of steps applied (skipped steps do not count).
    skipped_steps: int32, steps skipped for a non-finite or absurd input.
    skipped_before: int32, ``skipped_steps`` at the last step that was not
      absurd: the difference is the current run of skipped steps.
    grad_ema: pytree like the params, float32: EMA of the gradient ``m``.
    trace: pytree like the params, in their dtypes: the heavy-ball buffer.
    sq_norm_ema: EMA of ``||g||^2``.
    norm_ema: EMA of ``||g||``.
    curvature_ema: EMA of the curvature sample (``||g||^2`` for the
      reference, ``||g||^2 / 2(f - f*)`` in loss units).
    dist_ema: EMA of ``norm_ema / curvature_ema``.
    window: ``[curvature_window]`` ring of the last curvature samples.
    h_min_ema: EMA of the window minimum (of its log when log-smoothed).
    h_max_ema: EMA of the window maximum (of its log when log-smoothed).
    sparsity_ema: EMA of the fraction of non-zero gradient entries.
    h_min: measured curvature lower bound.
    h_max: measured curvature upper bound.
    grad_var: measured gradient variance ``C``.
    dist_to_opt: measured distance to the optimum ``D``.
    lr_t: the tuner's instantaneous learning rate (before ``lr_factor``).
    mu_t: the tuner's instantaneous momentum.
    lr_smoothed: ``beta``-smoothed ``lr_t``.
    mu_smoothed: ``beta``-smoothed ``mu_t``.
    learning_rate: the learning rate applied at the last step.
    momentum: the momentum applied at the last step.
    direction_state: the state of ``direction`` (``optax.EmptyState()``
      without one).
  """

  count: jax.Array
  skipped_steps: jax.Array
  skipped_before: jax.Array
  grad_ema: optax.Updates
  trace: optax.Updates
  sq_norm_ema: jax.Array
  norm_ema: jax.Array
  curvature_ema: jax.Array
  dist_ema: jax.Array
  window: jax.Array
  h_min_ema: jax.Array
  h_max_ema: jax.Array
  sparsity_ema: jax.Array
  h_min: jax.Array
  h_max: jax.Array
  grad_var: jax.Array
  dist_to_opt: jax.Array
  lr_t: jax.Array
  mu_t: jax.Array
  lr_smoothed: jax.Array
  mu_smoothed: jax.Array
  learning_rate: jax.Array
  momentum: jax.Array
  direction_state: optax.OptState = optax.EmptyState()


# --------------------------------------------------------------------------
# Argument checks (at construction; traced values cannot be checked).


def _concrete(name: str, value: Any) -> Any:
  """A concrete 0-d array as a Python number; tracers and the rest as they are."""
  if callable(value) and not isinstance(value, jax.Array):
    raise TypeError(
        f'{name} must be a number, got the callable {value!r}. A schedule '
        'of the tuned learning rate goes in lr_factor=...')
  if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(
      value, jax.core.Tracer):
    if np.ndim(value) != 0:
      raise ValueError(f'{name} must be a scalar, got shape {np.shape(value)}.')
    return value.tolist()
  return value


def check_range(name, value, low=None, high=None, *, low_open=False,
                high_open=False) -> None:
  """Raises ``ValueError`` naming ``name`` if a concrete ``value`` is out of
  range (Python numbers and concrete arrays; tracers are not checked)."""
  value = _concrete(name, value)
  if value is None or isinstance(value, jax.core.Tracer):
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f'{name} must be a real number, got {value!r}.')
  below = low is not None and (value <= low if low_open else value < low)
  above = high is not None and (value >= high if high_open else value > high)
  if below or above or value != value:  # value != value: NaN
    interval = (('(' if low_open else '[') + ('-inf' if low is None else repr(low))
                + ', ' + ('inf' if high is None else repr(high))
                + (')' if high_open else ']'))
    raise ValueError(f'{name} must be in {interval}, got {value!r}.')


def static_int(name: str, value: Any, low: int) -> int:
  """A shape-setting integer as a Python int ``>= low``.

  ``optax.inject_hyperparams`` turns every int argument into an array; an
  eager (concrete) one is read back here, so no ``static_args`` are needed.
  The update never reads it: it takes the shapes from the state.
  """
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f'{name} sets a buffer shape and cannot be traced: call init outside '
        f'jit, or pass static_args=({name!r},) to optax.inject_hyperparams.')
  value = _concrete(name, value)
  try:
    whole = operator.index(value)
  except TypeError:
    whole = None
  if whole is None or isinstance(value, bool) or whole < low:
    raise ValueError(f'{name} must be an int >= {low}, got {value!r}.')
  return whole


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f'{name} must be one of {choices}, got {value!r}.')


# --------------------------------------------------------------------------
# The math, as pure functions (each tested alone against the spec).


def ema_constants(beta: jax.typing.ArrayLike):
  """``(beta, 1 - beta, log(beta))`` without rounding a Python ``beta``.

  The spec's precision rule: ``1 - beta`` and the debias factor come from the
  exact ``beta`` (rounding 0.999 to float32 moves ``1 - beta`` by 1.3e-5
  relative). A traced ``beta`` (``optax.inject_hyperparams``) is float32.
  """
  if isinstance(beta, numbers.Real):
    return beta, 1.0 - beta, math.log(beta)
  beta = jnp.asarray(beta, jnp.float32)
  return beta, 1.0 - beta, jnp.log(beta)


def debias_factor(count: jax.Array, log_beta) -> jax.Array:
  """``1 - beta**(count + 1)`` as ``-expm1((count + 1) log beta)``."""
  return -jnp.expm1((count.astype(jnp.float32) + 1.0) * log_beta)


def clip_factor(sq_norm, max_norm, eps=_TORCH_CLIP_EPS) -> jax.Array:
  """The scale torch's ``clip_grad_norm_`` applies: ``min(1, c/(|g| + eps))``."""
  return jnp.minimum(1.0, max_norm / (jnp.sqrt(sq_norm) + eps))


def curvature_range(window, count, log_min: bool, log_max: bool, eps):
  """Extremes of the filled part of the curvature ring (slots ``<= count``),
  of ``log(sample + eps)`` where log-smoothed: ``(low, high)``."""
  filled = jnp.arange(window.shape[0]) <= count
  logs = jnp.log(window + eps)
  # Empty slots repeat slot 0 (always filled): no inf sentinel, which
  # jax_debug_infs would flag.
  pick = lambda x: jnp.where(filled, x, x[0])
  low = jnp.min(pick(logs if log_min else window))
  high = jnp.max(pick(logs if log_max else window))
  return low, high


def gradient_variance(sq_norm_ema, ema_sq_norm, debias, eps) -> jax.Array:
  r"""``C = max(EMA(||g||^2)/d - ||EMA(g)||^2/d^2, eps)`` (``d`` the debias)."""
  return jnp.maximum(sq_norm_ema / debias - ema_sq_norm / (debias * debias),
                     eps)


def cubic_root(p: jax.Array, eps: float = 1e-6) -> jax.Array:
  r"""Root :math:`x = \sqrt{\mu}` of the one-step noisy-quadratic objective.

  Minimising :math:`x^2 D^2 + (1-x)^4 C / h_{\min}^2` over :math:`x \in [0, 1)`
  gives, with :math:`y = x - 1`, the depressed cubic :math:`y^3 + p y + p = 0`,
  :math:`p = D^2 h_{\min}^2 / (2C)`, solved by Vieta's substitution. We write
  :math:`\sqrt{p^2 + 4p^3/27}` as :math:`p\sqrt{1 + 4p/27}` so that float32
  does not overflow for large ``p``, and polish the root with two Newton steps
  on :math:`p x = (1 - x)^3`, in :math:`x` for a root below 1/2 and in
  :math:`z = 1 - x` above it, so that neither a root near 0 (large ``p``,
  where the reference's float32 ``y + 1`` cancels) nor one near 1 (tiny
  ``p``) loses its precision.

  Args:
    p: the cubic's coefficient, ``>= 0``.
    eps: the reference's guard of the Vieta substitution.

  Returns:
    ``x`` in ``[0, 1]`` (1 only at ``p = 0`` and below ~1e-23).

  Examples:
    >>> import jax.numpy as jnp
    >>> from yellowfin_optax import _yellowfin
    >>> x = _yellowfin.cubic_root(jnp.array(2.0))
    >>> print(f"x = {float(x):.4f}, residual {float((1 - x)**3 - 2 * x):.0e}")
    x = 0.2291, residual ...
  """
  w = jnp.cbrt((-p * jnp.sqrt(1.0 + 4.0 / 27.0 * p) - p) / 2.0)
  y = w - p / 3.0 / (w + eps)  # x - 1
  x, z = jnp.clip(y + 1.0, 0.0, 1.0), jnp.clip(-y, 0.0, 1.0)
  for _ in range(2):
    x = jnp.clip(x + ((1.0 - x) ** 3 - p * x) / (3.0 * (1.0 - x) ** 2 + p),
                 0.0, 1.0)
    slope = 3.0 * z**2 + p  # 0 only at z = p = 0, the exact root x = 1
    z = jnp.clip(z - (z**3 + p * z - p) / jnp.where(slope > 0, slope, 1.0),
                 0.0, 1.0)
  return jnp.where(y + 1.0 < 0.5, x, 1.0 - z)


def robust_momentum(h_min, h_max, eps, eps_curv=None) -> jax.Array:
  r"""Smallest momentum whose robust region holds every curvature:
  :math:`((\sqrt\kappa - 1)/(\sqrt\kappa + 1))^2`,
  :math:`\kappa = \max((h_{\max}+\epsilon)/(h_{\min}+\epsilon), 1+\epsilon)`,
  with :math:`\sqrt\kappa - 1` as :math:`(\kappa - 1)/(\sqrt\kappa + 1)` and
  :math:`\kappa - 1 = (h_{\max} - h_{\min})/(h_{\min}+\epsilon)` (no float32
  cancellation for a narrow range). ``eps_curv`` (default ``eps``) is the
  floor of the curvatures, which has their units in loss units."""
  eps_curv = eps if eps_curv is None else eps_curv
  kappa_minus_1 = jnp.maximum((h_max - h_min) / (h_min + eps_curv), eps)
  sqrt_kappa = jnp.sqrt(1.0 + kappa_minus_1)
  return (kappa_minus_1 / (sqrt_kappa + 1.0) / (sqrt_kappa + 1.0)) ** 2


def tune(h_min, h_max, grad_var, dist_to_opt, count, curvature_window,
         eps=1e-6, *, eps_var=None, eps_dist=None, eps_curv=None,
         warmup_steps=None):
  r"""YellowFin's instantaneous learning rate and momentum.

  .. math::
    \mu_t = \max\left(x^2, \left(\tfrac{\sqrt\kappa - 1}{\sqrt\kappa + 1}
      \right)^2\right), \quad
    \alpha_t = \frac{(1 - \sqrt{\mu_t})^2}{h_{\min}} \cdot
      \min\left(1, \frac{t + 1}{10 w}\right),

  ``x`` the :func:`cubic_root` of :math:`p = (D h_{\min})^2 / 2C`. The
  reference adds ``eps`` to ``C``, ``D`` and the curvatures; in loss units
  they have units, and ``eps_var``, ``eps_dist``, ``eps_curv`` (default
  ``eps``) give each its own. ``warmup_steps`` replaces the slow start's
  ``10 w``.

  Returns:
    ``(lr_t, mu_t)``.
  """
  eps_var = eps if eps_var is None else eps_var
  eps_dist = eps if eps_dist is None else eps_dist
  eps_curv = eps if eps_curv is None else eps_curv
  # p = q^2, squared last: (h_min + eps)**2 alone overflows float32 once
  # gradient norms pass ~1e9.
  q = ((dist_to_opt + eps_dist) * (h_min + eps_curv)
       / jnp.sqrt(2.0 * (grad_var + eps_var)))
  mu_t = jnp.maximum(cubic_root(q * q, eps) ** 2,
                     robust_momentum(h_min, h_max, eps, eps_curv))
  lr_t = (1.0 - jnp.sqrt(mu_t)) ** 2 / (h_min + eps_curv)
  warmup = 10.0 * curvature_window if warmup_steps is None else warmup_steps
  ramp = (count.astype(jnp.float32) + 1.0) / warmup
  return jnp.minimum(lr_t, lr_t * ramp), mu_t


def offset_momentum(momentum, offset, momentum_range):
  """``momentum + offset`` clipped to ``momentum_range``; exactly ``momentum``
  while ``offset`` is 0 (a closed loop with gain 0 is open loop, bit for bit)."""
  moved = jnp.clip(momentum + offset, *momentum_range)
  return jnp.where(offset == 0.0, momentum, moved)


def cosine_factor(count, total_steps) -> jax.Array:
  """``(1 + cos(pi min(t/T, 1))) / 2``; a traced ``total_steps`` works too."""
  frac = jnp.minimum(count.astype(jnp.float32) / total_steps, 1.0)
  return 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


# XLA:CPU reduces an array of fewer than 4096 entries with a reduce-window
# tree (3-4 kernels) and splits a reduction of a concatenation back into one
# per operand; so small leaves are concatenated behind an optimization
# barrier and reduced together (5x less compile time at 200 leaves).
_SMALL_LEAF = 4096


def is_unsharded(x: jax.Array) -> bool:
  """Whether ``x``'s type names no mesh axis (sharding in types)."""
  return not any(getattr(jax.typeof(x).sharding, 'spec', None) or ())


def tree_dots(trees, pairs) -> list[jax.Array]:
  """``sum(trees[i] * trees[j])`` over the pytree for each pair ``(i, j)``.

  Elementwise products and sums: unlike ``optax.tree.vdot`` (a ``dot``) they
  need no output sharding when the summed axes are sharded.
  """
  leaves = [jax.tree.leaves(t) for t in trees]
  count = len(leaves[0])
  small = [k for k in range(count)
           if jnp.size(leaves[0][k]) < _SMALL_LEAF
           and all(is_unsharded(l[k]) for l in leaves)]
  small = small if len(small) >= 2 else []
  big = [k for k in range(count) if k not in small]
  used = sorted({t for pair in pairs for t in pair})
  grouped = {}
  if small:
    grouped = dict(zip(used, jax.lax.optimization_barrier(tuple(
        jnp.concatenate([jnp.ravel(leaves[t][k]) for k in small])
        for t in used))))
  sums = []
  for i, j in pairs:
    total = sum((jnp.sum(leaves[i][k] * leaves[j][k]) for k in big),
                jnp.zeros([], jnp.float32))
    if small:
      total = total + jnp.sum(grouped[i] * grouped[j])
    sums.append(total)
  return sums


def all_finite(leaves) -> jax.Array:
  """Whether every float entry of the arrays ``leaves`` is finite.

  ``x - x`` is 0 where ``x`` is finite and NaN where not: one float sum per
  array (one vectorized reduction on XLA:CPU, where ``all(isfinite(x))``
  writes a boolean array and reduces it in four reduce-windows).
  """
  leaves = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.array(True)
  total = sum(jnp.sum(x - x, dtype=jnp.float32) for x in leaves)
  return jnp.isfinite(total)


# --------------------------------------------------------------------------
# The transformation.


def scale_by_yellowfin(
    *,
    curvature: str = 'gradient',
    loss_floor: jax.typing.ArrayLike = 0.0,
    direction: optax.GradientTransformation | None = None,
    beta: jax.typing.ArrayLike = 0.999,
    curvature_window: int = 20,
    zero_debias: bool = True,
    sparsity_debias: bool = False,
    h_min_log_smooth: bool = True,
    h_max_log_smooth: bool = True,
    adaptive_clipping: bool = True,
    stat_protect_factor: jax.typing.ArrayLike = 100.0,
    catastrophic_move_threshold: jax.typing.ArrayLike = 100.0,
    clip_norm: jax.typing.ArrayLike | None = None,
    initial_learning_rate: jax.typing.ArrayLike = 1e-4,
    initial_momentum: jax.typing.ArrayLike = 0.0,
    lr_factor: optax.ScalarOrSchedule = 1.0,
    total_steps: int | None = None,
    warmup_steps: jax.typing.ArrayLike | None = None,
    smoothed_hyperparams: bool = False,
    nesterov: bool = False,
    eps: jax.typing.ArrayLike = 1e-6,
    axis_name: str | None = None,
    on_nonfinite: str = 'skip',
) -> optax.GradientTransformationExtraArgs:
  r"""YellowFin with every option: measure, tune and take a momentum step.

  Each step, with :math:`s = \|g\|^2` over the whole pytree:

  1. clip (``clip_norm``; with ``adaptive_clipping`` the reference's
     statistics protection to :math:`\sqrt{f h_{\max}}`), then take the
     curvature sample :math:`h = s` (``curvature='gradient'``, the reference)
     or :math:`h = s / 2(f - f^*)` (``curvature='loss'``, with the minibatch
     loss :math:`f` passed as ``update(..., value=loss)`` and
     :math:`f^*` = ``loss_floor``); with a ``direction`` transform, every
     statistic is of its output :math:`d` and the sample is
     :math:`h = \langle g, d\rangle / 2(f - f^*)`, the curvature along
     :math:`d`;
  2. :math:`h_{\min}, h_{\max}` = debiased EMAs of the extremes of the last
     ``curvature_window`` samples (:func:`curvature_range`), the variance
     :math:`C` (:func:`gradient_variance`) and the distance
     :math:`D = \mathrm{EMA}(\mathrm{EMA}(\|g\|)/\mathrm{EMA}(h))`;
  3. :math:`(\alpha_t, \mu_t)` = :func:`tune` (from step 1 on; step 0
     applies the initial values in gradient units, and is tuned in loss
     units); the applied learning rate is :math:`\alpha_t \cdot`
     ``lr_factor``, times a cosine to 0 at ``total_steps`` if given;
  4. heavy-ball momentum as ``torch.optim.SGD``:
     :math:`v \leftarrow \mu v + g`, update :math:`-\alpha v` (a step with
     :math:`\mu = 0` exactly leaves :math:`v` and applies :math:`-\alpha g`).

  In gradient units the tuned step scales like ``1/k`` when the gradient is
  multiplied by ``k``; in loss units :math:`h` has the units of a curvature
  (loss per parameter squared), every floor is relative, and training on
  ``k * loss`` gives the same parameters for any ``k``.

  A step with a non-finite gradient, loss or tuner output, or a gradient so
  large that :math:`s > 10^{10} h_{\max}` (``adaptive_clipping``), emits a
  zero update and leaves the state bit-identical but for ``skipped_steps``.

  Args:
    curvature: ``'gradient'`` (the reference's :math:`\|g\|^2`) or
      ``'loss'`` (needs ``value=``).
    loss_floor: :math:`f^*`, the loss's lower bound, in loss units.
    direction: an ``optax.GradientTransformation`` turning the gradient into
      the direction of descent (a clip, a diagonal preconditioner), applied
      first; loss units only. A step where :math:`\langle g, d\rangle \le 0`
      is skipped.
    beta: EMA rate of every statistic and of the smoothed values, in (0, 1).
    curvature_window: width of the curvature window, an int >= 1.
    zero_debias: debias the EMAs.
    sparsity_debias: correct the statistics for sparse gradients.
    h_min_log_smooth: smooth :math:`h_{\min}` in log space.
    h_max_log_smooth: smooth :math:`h_{\max}` in log space.
    adaptive_clipping: the reference's statistics-protection,
      exploding-gradient and catastrophic-move clips, and the absurd-step
      skip.
    stat_protect_factor: :math:`f` above, >= 0.
    catastrophic_move_threshold: cap on ``learning_rate * ||g||``, > 0.
    clip_norm: fixed global-norm clip before the statistics; ``None``: none.
    initial_learning_rate: learning rate applied at step 0 (gradient units).
    initial_momentum: momentum applied at step 0 (gradient units), in [0, 1).
    lr_factor: multiplier of the tuned learning rate: a number or an optax
      schedule of the step (the reference's ``set_lr_factor``).
    total_steps: if given, the learning rate also decays along a cosine to 0
      at this step.
    warmup_steps: length of the linear slow start of the tuned learning
      rate, > 0; ``None``: ``10 * curvature_window``, the reference's.
    smoothed_hyperparams: apply the smoothed values (the paper's Algorithm 1)
      instead of the instantaneous ones (the references).
    nesterov: Nesterov momentum.
    eps: the reference's floor, > 0 (relative to each quantity's scale in
      loss units).
    axis_name: ``pmap``/``shard_map`` axis to average the gradient (and loss)
      over first; ``None`` for one replica or sharded ``jit``.
    on_nonfinite: ``'skip'``; ``'raise_in_debug'`` (skip, and raise while
      ``jax_debug_nans``/``jax_debug_infs`` is on: one host callback per
      step); ``'propagate'`` (no check, no cost).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`YellowFinState`;
    read the tuned values with :func:`hyperparams`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import yellowfin_optax as yf
    >>> loss = lambda x: jnp.sum(jnp.array([1.0, 10.0]) * x**2)
    >>> tx = yf.scale_by_yellowfin(curvature='loss')
    >>> params = jnp.array([1.0, 1.0])
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda p, s, v, g: tx.update(g, s, p, value=v))
    >>> for _ in range(100):
    ...   value, grad = jax.value_and_grad(loss)(params)
    ...   updates, state = step(params, state, value, grad)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"loss 11 -> below 1e-2: {float(loss(params)) < 1e-2}")
    loss 11 -> below 1e-2: True

  References:
    Zhang & Mitliagkas, `YellowFin and the Art of Momentum Tuning
    <https://arxiv.org/abs/1706.03471>`_, 2018.
  """
  config = make_config(**locals())

  def init_fn(params):
    return init_state(config, params)

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del extra_args
    updates, value = replica_mean(config, updates, value)
    candidate, step = measure_and_tune(config, updates, state, value,
                                       params=params)
    ok = step.ok & all_finite(_narrow(candidate.trace))
    return finish(config, state, candidate, step, ok)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# The validated options of scale_by_yellowfin, one field per argument.
_Config = collections.namedtuple(
    '_Config', inspect.signature(scale_by_yellowfin).parameters)


def make_config(**options) -> _Config:
  """Validated options, with :func:`scale_by_yellowfin`'s defaults."""
  bound = inspect.signature(scale_by_yellowfin).bind(**options)
  bound.apply_defaults()
  c = _Config(**bound.arguments)
  check_choice('curvature', c.curvature, CURVATURES)
  check_choice('on_nonfinite', c.on_nonfinite, NONFINITE_MODES)
  if c.direction is not None:
    if c.curvature != 'loss':
      raise ValueError(
          "direction needs curvature='loss' (yellowfin_auto): the curvature "
          'along it is <g, d> / 2(f - f*).')
    if not isinstance(c.direction, optax.GradientTransformation):
      raise TypeError('direction must be an optax.GradientTransformation, '
                      f'got {c.direction!r}.')
    c = c._replace(direction=optax.with_extra_args_support(c.direction))
  check_range('beta', c.beta, 0.0, 1.0, low_open=True, high_open=True)
  check_range('loss_floor', c.loss_floor)
  check_range('stat_protect_factor', c.stat_protect_factor, 0.0)
  check_range('catastrophic_move_threshold', c.catastrophic_move_threshold,
              0.0, low_open=True)
  check_range('clip_norm', c.clip_norm, 0.0, low_open=True)
  check_range('initial_learning_rate', c.initial_learning_rate, 0.0)
  check_range('initial_momentum', c.initial_momentum, 0.0, 1.0, high_open=True)
  check_range('eps', c.eps, 0.0, 1.0, low_open=True, high_open=True)
  check_range('warmup_steps', c.warmup_steps, 0.0, low_open=True)
  if not callable(c.lr_factor):
    check_range('lr_factor', c.lr_factor, 0.0)
  if c.total_steps is not None and not isinstance(c.total_steps, jax.core.Tracer):
    c = c._replace(total_steps=static_int('total_steps', c.total_steps, 1))
  if not isinstance(c.curvature_window, jax.core.Tracer):
    # In update (inject_hyperparams may trace it) the window's shape is read.
    c = c._replace(curvature_window=static_int(
        'curvature_window', c.curvature_window, 1))
  return c


def init_state(config: _Config, params) -> YellowFinState:
  # A fresh array per field: one array shared by several leaves of a state
  # cannot be donated.
  zero = lambda: jnp.zeros([], jnp.float32)
  lr0 = lambda: jnp.asarray(config.initial_learning_rate, jnp.float32)
  mu0 = lambda: jnp.asarray(config.initial_momentum, jnp.float32)
  return YellowFinState(
      count=jnp.zeros([], jnp.int32),
      skipped_steps=jnp.zeros([], jnp.int32),
      skipped_before=jnp.zeros([], jnp.int32),
      grad_ema=optax.tree.zeros_like(params, dtype=jnp.float32),
      trace=optax.tree.zeros_like(params),
      sq_norm_ema=zero(), norm_ema=zero(), curvature_ema=zero(),
      dist_ema=zero(),
      window=jnp.zeros(
          [static_int('curvature_window', config.curvature_window, 1)],
          jnp.float32),
      h_min_ema=zero(), h_max_ema=zero(), sparsity_ema=zero(),
      h_min=zero(), h_max=zero(), grad_var=zero(), dist_to_opt=zero(),
      lr_t=lr0(), mu_t=mu0(), lr_smoothed=lr0(), mu_smoothed=mu0(),
      learning_rate=lr0(), momentum=mu0(),
      # The direction runs in float32 (a float16 second moment underflows).
      direction_state=(optax.EmptyState() if config.direction is None else
                       config.direction.init(optax.tree.cast(params, jnp.float32))),
  )


def replica_mean(config: _Config, updates, value):
  """The gradient (and loss) averaged over ``axis_name`` first: every
  statistic is global, and so are the skip and the closed loop's ring."""
  if config.curvature == 'loss' and value is None:
    raise ValueError(
        "curvature='loss' (yellowfin_auto) measures the curvature from the "
        'minibatch loss: call update(grads, state, params, value=loss). '
        'Without the loss, use yellowfin().')
  if config.axis_name is not None:
    updates = jax.lax.pmean(updates, config.axis_name)
    if value is not None:
      value = jax.lax.pmean(value, config.axis_name)
  return updates, value


class _Step(NamedTuple):
  """What :func:`measure_and_tune` passes on besides the new state."""
  grads: optax.Updates  # the clipped gradients, in their dtypes
  scale: jax.Array  # product of the clip factors applied to them
  target_momentum: jax.Array  # the tuner's momentum, before any offset
  ok: jax.Array  # finite inputs and outputs, not absurd


def measure_and_tune(config: _Config, updates, state: YellowFinState, value,
                     momentum_offset=None, momentum_range=None, params=None):
  """One YellowFin step: the new state (not yet selected against a bad step)
  and the :class:`_Step` the caller needs to finish it."""
  if jax.tree.structure(updates) != jax.tree.structure(state.grad_ema):
    raise ValueError(
        'The gradient pytree does not match the optimizer state: gradients '
        f'{jax.tree.structure(updates)}, state (from init) '
        f'{jax.tree.structure(state.grad_ema)}.')
  direction_state = state.direction_state
  raw = None
  if config.direction is not None:
    raw = optax.tree.cast(updates, jnp.float32)
    direction, direction_state = config.direction.update(
        raw, direction_state, params, value=value)
    updates = jax.tree.map(lambda d, g: d.astype(g.dtype), direction, updates)
  c = config
  w = state.window.shape[0]  # not c.curvature_window: it may be traced
  b, one_minus_b, log_b = ema_constants(c.beta)
  ema = lambda old, new: b * old + one_minus_b * new
  t = state.count
  d = debias_factor(t, log_b)
  dz = d if c.zero_debias else 1.0
  g32 = optax.tree.cast(updates, jnp.float32)
  loss_units = c.curvature == 'loss'

  # One pass over g and the old EMA gives every reduction: ||g||^2 for the
  # clip factors, and ||EMA(g)||^2 after the update by expansion, so every
  # scalar is known before any parameter-size output is written.
  if raw is None:
    s_raw, ema_sq, ema_dot_g = tree_dots(
        (g32, state.grad_ema), [(0, 0), (1, 1), (1, 0)])
    along = 1.0  # d is g
  else:  # the part of ||d||^2 along the gradient: <g, d> / ||d||^2
    s_raw, ema_sq, ema_dot_g, g_dot_d = tree_dots(
        (g32, state.grad_ema, raw), [(0, 0), (1, 1), (1, 0), (2, 0)])
    along = g_dot_d / jnp.maximum(s_raw, _TINY)

  if loss_units:
    # The curvature sample is s * lam, lam = 1 / 2(f - f*); every floor is
    # eps times the running scale of its quantity (the previous step's
    # debiased EMAs; this step's raw values at step 0).
    lam = along * 0.5 / jnp.maximum(
        jnp.asarray(value, jnp.float32) - c.loss_floor, _TINY)
    d_prev = debias_factor(jnp.maximum(t - 1, 0), log_b)
    unit_s = jnp.where(t == 0, s_raw, state.sq_norm_ema / d_prev)
    unit_h = jnp.where(t == 0, s_raw * lam,
                       state.curvature_ema / d_prev)
    eps_s = jnp.maximum(c.eps * unit_s, _TINY)
    eps_h = jnp.maximum(c.eps * unit_h, _TINY)
    eps_g = eps_norm = jnp.sqrt(eps_s)
    eps_d = jnp.maximum(c.eps * jnp.sqrt(unit_s) / jnp.maximum(unit_h, _TINY),
                        _TINY)
  else:
    lam = 1.0
    eps_s = eps_h = eps_d = eps_norm = c.eps
    eps_g = _TORCH_CLIP_EPS
  # The previous h_max in ||g||^2 units, for the clips.
  h_max_s = state.h_max / lam

  scale = jnp.ones([], jnp.float32)
  if c.clip_norm is not None:
    scale = clip_factor(s_raw, c.clip_norm, eps_g)
  absurd = jnp.array(False)
  if c.adaptive_clipping:
    absurd = (t > 1) & (s_raw * scale**2 > ABSURD_RATIO * h_max_s)
    protect = jnp.sqrt(c.stat_protect_factor * h_max_s) + eps_norm
    scale *= jnp.where(t > 1, clip_factor(s_raw * scale**2, protect, eps_g), 1.0)
  stat_scale = scale  # what the statistics see; the update may clip more
  s = s_raw * scale**2
  h = s * lam

  # Curvature range.
  window = state.window.at[t % w].set(h)
  low, high = curvature_range(window, t, c.h_min_log_smooth,
                              c.h_max_log_smooth, eps_h)
  h_min_ema, h_max_ema = ema(state.h_min_ema, low), ema(state.h_max_ema, high)
  h_min, h_max = h_min_ema / dz, h_max_ema / dz
  h_min = jnp.exp(h_min) if c.h_min_log_smooth else h_min
  h_max = jnp.exp(h_max) if c.h_max_log_smooth else h_max

  # Variance: ||b m + (1 - b) c g||^2 by expansion (s is ||c g||^2).
  sq_norm_ema = ema(state.sq_norm_ema, s)
  new_ema_sq = jnp.maximum(
      b * b * ema_sq + 2.0 * b * one_minus_b * stat_scale * ema_dot_g
      + one_minus_b * one_minus_b * s, 0.0)
  grad_var = gradient_variance(sq_norm_ema, new_ema_sq, dz, eps_s)

  # Distance to the optimum, from the raw (not debiased) EMAs as the
  # reference does.
  norm_ema = ema(state.norm_ema, jnp.sqrt(s))
  curvature_ema = ema(state.curvature_ema, h)
  dist_ema = ema(state.dist_ema, norm_ema / (curvature_ema + eps_h))
  dist_to_opt = dist_ema / dz

  sparsity_ema = state.sparsity_ema
  if c.sparsity_debias:
    nonzero = sum(jnp.count_nonzero(x) for x in jax.tree.leaves(updates))
    sparsity_ema = ema(sparsity_ema, nonzero / max(optax.tree.size(updates), 1))
    sparsity = sparsity_ema / d  # always debiased, as in the reference
    # Into new values: the reference rescales its EMAs in place here (a
    # defect, spec section 2).
    h_min, h_max = h_min * sparsity, h_max * sparsity
    grad_var = grad_var * sparsity
    dist_to_opt = dist_to_opt / (jnp.sqrt(sparsity) + c.eps)

  if c.adaptive_clipping:  # exploding gradient: clip the update only
    exploding = (t >= 1) & (s >= h_max_s)
    scale *= jnp.where(
        exploding, clip_factor(s, jnp.sqrt(h_max_s) + eps_norm, eps_g), 1.0)

  # Tune. The reference keeps its initial values at step 0; in loss units
  # they would have the wrong units, so step 0 is tuned too: under the
  # reference's slow start it moves 2/(10 w) of the Polyak step f/||g||.
  lr_t, mu_t = tune(h_min, h_max, grad_var, dist_to_opt, t, w, c.eps,
                    eps_var=eps_s, eps_dist=eps_d, eps_curv=eps_h,
                    warmup_steps=c.warmup_steps)
  tuning = jnp.array(True) if loss_units else t > 0
  lr_t = jnp.where(tuning, lr_t, state.lr_t)
  mu_t = jnp.where(tuning, mu_t, state.mu_t)
  # Smoothing starts from the first tuned values in loss units.
  rate = jnp.where(t == 0, 1.0, one_minus_b) if loss_units else one_minus_b
  lr_smoothed = jnp.where(
      tuning, state.lr_smoothed + rate * (lr_t - state.lr_smoothed),
      state.lr_smoothed)
  mu_smoothed = jnp.where(
      tuning, state.mu_smoothed + rate * (mu_t - state.mu_smoothed),
      state.mu_smoothed)
  lr, mu = (lr_smoothed, mu_smoothed) if c.smoothed_hyperparams else (lr_t, mu_t)
  lr = lr * (c.lr_factor(t) if callable(c.lr_factor) else c.lr_factor)
  if c.total_steps is not None:
    lr = lr * cosine_factor(t, c.total_steps)
  if c.adaptive_clipping:  # catastrophic move: cap lr * ||g||
    lr = jnp.where(lr * jnp.sqrt(s) >= c.catastrophic_move_threshold,
                   c.catastrophic_move_threshold / jnp.sqrt(s + eps_s), lr)
  target = mu
  if momentum_offset is not None:
    mu = offset_momentum(mu, momentum_offset, momentum_range)

  grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates)
  moving = mu != 0.0
  trace = jax.tree.map(
      lambda g, v: jnp.where(moving, (mu * v + g).astype(v.dtype), v),
      grads, state.trace)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  new = YellowFinState(
      count=optax.safe_increment(t), skipped_steps=state.skipped_steps,
      skipped_before=jnp.where(absurd, state.skipped_before,
                               state.skipped_steps),
      grad_ema=optax.tree.update_moment(
          optax.tree.scale(stat_scale, g32), state.grad_ema, b, 1),
      trace=trace, sq_norm_ema=f32(sq_norm_ema), norm_ema=f32(norm_ema),
      curvature_ema=f32(curvature_ema), dist_ema=f32(dist_ema), window=window,
      h_min_ema=f32(h_min_ema), h_max_ema=f32(h_max_ema),
      sparsity_ema=f32(sparsity_ema), h_min=f32(h_min), h_max=f32(h_max),
      grad_var=f32(grad_var), dist_to_opt=f32(dist_to_opt), lr_t=f32(lr_t),
      mu_t=f32(mu_t), lr_smoothed=f32(lr_smoothed),
      mu_smoothed=f32(mu_smoothed), learning_rate=f32(lr), momentum=f32(mu),
      direction_state=direction_state,
  )
  scalars = [x for x in new if isinstance(x, jax.Array) and x.ndim == 0]
  # After a window of absurd steps in a row the gradient's scale has changed
  # for good: from then on such steps are taken, clipped as the reference
  # clips them, until the statistics catch up.
  run = state.skipped_steps - state.skipped_before
  ok = all_finite(scalars) & ~(absurd & (run < w)) & (along > 0)
  if c.on_nonfinite == 'propagate':
    ok = jnp.array(True)
  return new, _Step(grads=grads, scale=scale, target_momentum=f32(target), ok=ok)


def _narrow(tree) -> list[jax.Array]:
  """Leaves narrower than float32: a float16 trace can overflow."""
  return [x for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32]


def momentum_updates(grads, trace, learning_rate, momentum, nesterov: bool,
                     ok=True):
  r"""Torch's momentum-SGD update from the gradient and the *new* trace:
  :math:`-\alpha v` (:math:`-\alpha g` while :math:`\mu` is exactly 0), or
  :math:`-\alpha (g + \mu v)` with Nesterov; zero where not ``ok``."""
  def one(g, v):
    if nesterov:
      direction = g + momentum * v
    else:
      direction = jnp.where(momentum != 0.0, v, g)
    return jnp.where(ok, -learning_rate * direction, 0.0).astype(g.dtype)
  return jax.tree.map(one, grads, trace)


def skip_bad_step(ok, new, old, config: _Config):
  """``new`` on a good step, ``old`` on a bad one (states of one type);
  :func:`count_skip` then counts the skip. Raises in debug mode if asked."""
  if config.on_nonfinite == 'raise_in_debug':
    jax.debug.callback(_raise_if_bad, ok)
  return optax.tree.where(ok, new, old)


def count_skip(ok, state: YellowFinState) -> YellowFinState:
  return state._replace(skipped_steps=jnp.where(
      ok, state.skipped_steps, optax.safe_increment(state.skipped_steps)))


def finish(config: _Config, state, new, step: _Step, ok):
  """Selects the new state on a good step and derives the update from it.

  The update is computed from the *selected* trace, so that a donated
  momentum buffer is read once and written in place (a select and an update
  that both read the old trace make XLA copy it).
  """
  selected = count_skip(ok, skip_bad_step(ok, new, state, config))
  updates = momentum_updates(step.grads, selected.trace, new.learning_rate,
                             new.momentum, config.nesterov, ok)
  return updates, selected


def _raise_if_bad(ok) -> None:
  debugging = jax.config.jax_debug_nans or jax.config.jax_debug_infs
  if debugging and not np.all(ok):  # np.all: ok is batched under vmap
    raise FloatingPointError(
        'yellowfin_optax: non-finite or absurd gradient, loss or tuner output; '
        'the step was skipped (on_nonfinite="raise_in_debug").')


# --------------------------------------------------------------------------
# The aliases.


def yellowfin(
    *,
    lr_factor: optax.ScalarOrSchedule = 1.0,
    initial_learning_rate: jax.typing.ArrayLike = 1e-4,
    initial_momentum: jax.typing.ArrayLike = 0.0,
    clip_norm: jax.typing.ArrayLike | None = None,
    nesterov: bool = False,
    axis_name: str | None = None,
    on_nonfinite: str = 'skip',
) -> optax.GradientTransformationExtraArgs:
  r"""YellowFin as the authors' PyTorch reference runs it, step for step.

  Measures the curvature range :math:`[h_{\min}, h_{\max}]` (from
  :math:`\|g\|^2`), the gradient variance :math:`C` and the distance to the
  optimum :math:`D`, and applies heavy-ball momentum SGD with

  .. math::
    \mu_t = \max\left(x^{*2}, \left(\tfrac{\sqrt{h_{\max}/h_{\min}} - 1}
      {\sqrt{h_{\max}/h_{\min}} + 1}\right)^2\right), \quad
    \alpha_t = \frac{(1 - \sqrt{\mu_t})^2}{h_{\min}} \cdot \text{lr\_factor},

  :math:`x^*` the minimiser of :math:`x^2 D^2 + (1-x)^4 C / h_{\min}^2`.
  Its curvature has units of gradient squared: multiplying the loss by ``k``
  divides the tuned step by ``k``, and a clip chained before it
  (``optax.clip_by_global_norm(c)``) pins the measured curvature at about
  ``c**2``. :func:`yellowfin_auto` measures it in the loss's units. Every
  option of the reference is an option of :func:`scale_by_yellowfin`.

  Args:
    lr_factor: multiplier of the tuned learning rate, a number or an optax
      schedule of the step (the reference's ``set_lr_factor``).
    initial_learning_rate: the learning rate of step 0 (not a learning rate
      to tune: the tuner takes over at step 1).
    initial_momentum: the momentum of step 0, in [0, 1).
    clip_norm: the reference's global-norm clip before the statistics.
    nesterov: Nesterov momentum.
    axis_name: ``pmap``/``shard_map`` axis to average gradients over.
    on_nonfinite: ``'skip'``, ``'raise_in_debug'`` or ``'propagate'``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; read the tuned values with
    :func:`hyperparams`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import yellowfin_optax as yf
    >>> loss = lambda x: jnp.sum(jnp.array([1.0, 10.0]) * x**2)
    >>> tx = yf.yellowfin()
    >>> params = jnp.array([1.0, 1.0])
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    >>> for _ in range(300):
    ...   updates, state = step(params, state)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"loss 11 -> below 0.01: {float(loss(params)) < 0.01}")
    loss 11 -> below 0.01: True

  References:
    Zhang & Mitliagkas, `YellowFin and the Art of Momentum Tuning
    <https://arxiv.org/abs/1706.03471>`_, 2018.
  """
  return scale_by_yellowfin(**locals())


def yellowfin_auto(
    *,
    total_steps: int | None = None,
    lr_factor: optax.ScalarOrSchedule = 1.0,
    loss_floor: jax.typing.ArrayLike = 0.0,
    direction: optax.GradientTransformation | None = None,
    nesterov: bool = False,
    axis_name: str | None = None,
    on_nonfinite: str = 'skip',
) -> optax.GradientTransformationExtraArgs:
  r"""YellowFin with its curvature in the loss's units: the recommended one.

  The reference's curvature :math:`\|g\|^2` is a curvature only for a
  log-likelihood at its natural scale. This alias measures
  :math:`h = \|g\|^2 / 2(f - f^*)`, the curvature of a quadratic
  :math:`f - f^* = h r^2 / 2` with that gradient, from the minibatch loss
  :math:`f` passed to ``update(grads, state, params, value=loss)``. Then the
  tuned step has parameter units, every floor is relative, step 0 is tuned
  too (a fixed first learning rate would have units), and training on
  ``k * loss`` gives the same parameters for every ``k``, as Adam does. With
  ``total_steps`` the learning rate decays along a cosine to 0 at that step
  (measured to help whenever the run length is known).

  With a ``direction`` transform :math:`d = D(g)` it steps along :math:`d`
  and measures the curvature along it, :math:`\langle g, d\rangle / 2(f -
  f^*)`: a constant rescale of the gradient inside ``direction`` leaves the
  parameters unchanged, a clip inside it leaves the run as unclipped, and a
  preconditioner (:func:`rms_direction`) keeps the step in parameter units.
  Put what rescales the gradient there, not before this transform: chained
  before it, a clip or a preconditioner changes the gradient and not the
  loss, and so the step.

  Args:
    total_steps: run length for the cosine decay, or ``None`` for none.
    lr_factor: extra multiplier of the tuned learning rate (number or
      schedule).
    loss_floor: the loss's lower bound :math:`f^*` if known (0 for
      cross-entropy and squared errors); the loss must stay above it.
    direction: an ``optax.GradientTransformation`` from the gradient to
      the step's direction, e.g. ``optax.clip_by_global_norm(1.0)`` or
      :func:`rms_direction`; ``None``: the gradient (momentum SGD, as the
      paper). A step where :math:`\langle g, d\rangle \le 0` is skipped.
    nesterov: Nesterov momentum.
    axis_name: ``pmap``/``shard_map`` axis to average gradients and loss over.
    on_nonfinite: ``'skip'``, ``'raise_in_debug'`` or ``'propagate'``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``value=loss``.

  Raises:
    ValueError: at ``update``, when ``value`` is not given.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import yellowfin_optax as yf
    >>> loss = lambda x: jnp.sum(jnp.array([1.0, 10.0]) * x**2)
    >>> tx = yf.yellowfin_auto(total_steps=200)
    >>> params = jnp.array([1.0, 1.0])
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   value, grad = jax.value_and_grad(loss)(params)
    ...   updates, state = tx.update(grad, state, params, value=value)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> print(f"loss 11 -> below 1e-3: {float(loss(params)) < 1e-3}")
    loss 11 -> below 1e-3: True
  """
  return scale_by_yellowfin(curvature='loss', **locals())


def rms_direction(decay: float = 0.999) -> optax.GradientTransformation:
  r"""A diagonally preconditioned direction for :func:`yellowfin_auto`.

  The gradient divided by the root of its debiased running second moment
  (Adam's with ``b1 = 0``: one more parameter-size buffer, in float32 inside
  YellowFin), with a floor of 1e-30 under the root so that it is invariant to
  the gradient's scale. YellowFin then tunes the learning rate and the
  momentum of RMSprop. Measured (BUILD_NOTES.md, section 6): faster than the
  gradient direction on 4 of 5 short runs, but on a 10,000-step character
  LSTM its tuned step stays far too long and it ends at 1.45x tuned Adam's
  loss; prefer it for short, known-length runs.

  Args:
    decay: the second moment's EMA rate (Adam's ``b2``), in (0, 1).

  Returns:
    An ``optax.GradientTransformation`` for ``direction=``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> tx = yf.yellowfin_auto(direction=yf.rms_direction())
    >>> state = tx.init(jnp.zeros(3))
    >>> updates, state = tx.update(jnp.array([1.0, -1e-3, 0.0]), state,
    ...                            value=jnp.float32(2.0))
    >>> print(jnp.round(updates / updates[0], 4))  # at step 0: sign(g)
    [ 1. -1.  0.]
  """
  check_range('decay', decay, 0.0, 1.0, low_open=True, high_open=True)
  return optax.scale_by_rms(decay, eps=1e-30, eps_in_sqrt=True,
                            bias_correction=True)


# --------------------------------------------------------------------------
# Reading the tuned values.


def _is_reported(node: Any) -> bool:
  return isinstance(node, tuple) and hasattr(type(node), 'REPORTED')


YellowFinState.REPORTED = (
    'learning_rate', 'momentum', 'lr_t', 'mu_t', 'lr_smoothed', 'mu_smoothed',
    'h_min', 'h_max', 'grad_var', 'dist_to_opt', 'count', 'skipped_steps')


def hyperparams(state: Any) -> dict[str, jax.Array]:
  """Reads YellowFin's tuned values and statistics from an optimizer state.

  Works on the state of every optimizer of this package, inside any optax
  chain or wrapper, Flax ``TrainState`` or ``nnx.Optimizer``
  (``hyperparams(optimizer.opt_state)``), inside or outside ``jit`` (it only
  selects fields: no computation, no host sync), and on ``vmap``/``pmap``
  stacked states (the values keep the leading axes).

  Args:
    state: an optimizer state holding exactly one YellowFin.

  Returns:
    A dict of arrays: ``learning_rate`` and ``momentum`` (applied at the last
    step), ``lr_t``/``mu_t`` (the tuner's instantaneous values),
    ``lr_smoothed``/``mu_smoothed``, ``h_min``, ``h_max``, ``grad_var``,
    ``dist_to_opt``, ``count``, ``skipped_steps`` and, for the closed loop,
    ``target_momentum`` and ``total_momentum``.

  Raises:
    ValueError: if the state holds no YellowFin, or more than one (e.g. under
      ``optax.multi_transform``: call it on each group's state).

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> tx = yf.yellowfin()
    >>> state = tx.init(jnp.zeros(3))
    >>> _, state = tx.update(jnp.ones(3), state)
    >>> print(f"{float(yf.hyperparams(state)['learning_rate']):.0e}")
    1e-04
  """
  found: dict[str, jax.Array] = {}
  tuners = 0
  pending = [n for n in jax.tree.leaves(state, is_leaf=_is_reported)
             if _is_reported(n)]
  while pending:
    node = pending.pop()
    tuners += isinstance(node, YellowFinState)
    for name, value in zip(node._fields, node):
      if _is_reported(value):
        pending.append(value)
      elif name in node.REPORTED:
        found[name] = jax.tree.leaves(value)[0]  # NNX: a Variable around it
  if tuners != 1:
    raise ValueError(
        f'hyperparams() needs a state holding exactly one YellowFin; this one '
        f'holds {tuners}' + ('' if tuners else ' (is it the state of a '
                             'yellowfin_optax optimizer?)') + '.')
  return found
