"""Gradient statistics for YellowFin: curvature range, variance, distance.

Memory: one parameter-size float32 buffer (the gradient EMA) and
``curvature_window + 14`` scalars.

References:
  Zhang & Mitliagkas, `YellowFin and the Art of Momentum Tuning
  <https://arxiv.org/abs/1706.03471>`_, Sections 3.1-3.2 (SysML 2018).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from yellowfin_optax import _checks

# torch.nn.utils.clip_grad_norm_ divides by ``norm + 1e-6``; so do we.
_TORCH_CLIP_EPS = 1e-6


class GradientStatisticsState(NamedTuple):
  """State of :func:`gradient_statistics`.

  All scalars are float32 0-d arrays unless noted.

  Attributes:
    step: int32, number of measured steps.
    grad_ema: pytree like the params, float32: EMA of the gradient (``m``).
    sq_norm_ema: EMA of ``||g||^2``.
    norm_ema: EMA of ``||g||``.
    dist_ema: EMA of ``EMA(||g||) / EMA(||g||^2)``.
    sq_norm_window: ``[curvature_window]`` ring buffer of ``||g||^2``.
    h_min_ema: EMA of the window minimum (of its log when log-smoothed).
    h_max_ema: EMA of the window maximum (of its log when log-smoothed).
    sparsity_ema: EMA of the fraction of non-zero gradient entries (zero when
      ``sparsity_debias`` is off).
    grad_sq_norm: ``||g||^2`` of the last measured (clipped) gradient.
    h_min: curvature lower estimate, debiased and sparsity-corrected.
    h_max: curvature upper estimate, debiased and sparsity-corrected.
    grad_var: gradient variance estimate ``C``.
    dist_to_opt: distance-to-optimum estimate ``D``.
    sparsity: debiased ``sparsity_ema`` (1 when ``sparsity_debias`` is off).
    grad_scale: product of the clipping factors applied to the last gradient
      (``clip_norm``, statistics protection, exploding-gradient clip).
  """

  step: jax.Array
  grad_ema: optax.Updates
  sq_norm_ema: jax.Array
  norm_ema: jax.Array
  dist_ema: jax.Array
  sq_norm_window: jax.Array
  h_min_ema: jax.Array
  h_max_ema: jax.Array
  sparsity_ema: jax.Array
  grad_sq_norm: jax.Array
  h_min: jax.Array
  h_max: jax.Array
  grad_var: jax.Array
  dist_to_opt: jax.Array
  sparsity: jax.Array
  grad_scale: jax.Array


def ema_constants(beta: jax.typing.ArrayLike):
  """Returns ``(beta, 1 - beta, log(beta))`` without rounding a Python beta.

  ``1 - beta`` and the debias factor must come from the exact ``beta`` the
  user passed (the reference computes them in float64 from a Python float;
  rounding ``beta`` to float32 first moves ``1 - beta`` by 1.3e-5
  relative at 0.999). A Python float stays a Python float
  (a weakly typed constant in the jaxpr); a traced beta (from
  ``optax.inject_hyperparams``) is used in float32.
  """
  if isinstance(beta, numbers.Real):
    return beta, 1.0 - beta, math.log(beta)
  beta = jnp.asarray(beta, jnp.float32)
  return beta, 1.0 - beta, jnp.log(beta)


def debias_factor(step: jax.Array, log_beta) -> jax.Array:
  """``1 - beta**(step + 1)`` as ``-expm1((step + 1) log beta)``, in float32."""
  return -jnp.expm1((step.astype(jnp.float32) + 1.0) * log_beta)


# XLA:CPU reduces an array of fewer than 4096 entries with 3-4 kernels (the
# product, a reduce-window tree, a reduce) and a larger one with one, and it
# splits a reduction of a concatenation back into one per operand. So small
# leaves are concatenated behind an optimization barrier and reduced
# together: at 200 leaves, half of them small, 5x less compile time for the
# reductions (BUILD_NOTES.md section 9).
_SMALL_LEAF = 4096


def is_unsharded(x: jax.Array) -> bool:
  """Whether ``x``'s type names no mesh axis (sharding in types): then it
  can be raveled and gathered without an explicit output sharding."""
  return not any(getattr(jax.typeof(x).sharding, 'spec', None) or ())


def tree_dots(
    trees: tuple[optax.Updates, ...], pairs: list[tuple[int, int]]
) -> list[jax.Array]:
  """``sum(trees[i] * trees[j])`` over the pytree, for each ``(i, j)``.

  Elementwise products and sums: unlike ``optax.tree.vdot`` (a ``dot``) they
  need no output sharding when the summed axes are sharded (sharding in
  types, Explicit meshes). Unsharded leaves of fewer than 4096 entries are
  reduced together (see ``_SMALL_LEAF``).
  """
  leaves = [jax.tree.leaves(t) for t in trees]
  count = len(leaves[0])
  small = [k for k in range(count)
           if jnp.size(leaves[0][k]) < _SMALL_LEAF
           and all(is_unsharded(l[k]) for l in leaves)]
  if len(small) < 2:
    small = []
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


def clip_factor(sq_norm: jax.Array, max_norm: jax.Array) -> jax.Array:
  """Scale that torch's ``clip_grad_norm_`` applies: ``min(1, c/(|g|+1e-6))``."""
  return jnp.minimum(1.0, max_norm / (jnp.sqrt(sq_norm) + _TORCH_CLIP_EPS))


def scale_gradients(grads: optax.Updates, scale: jax.Array) -> optax.Updates:
  """The gradients times the clip factor, in their own dtypes.

  What :func:`gradient_statistics` emits; :func:`yellowfin` recomputes its
  update from it, so both must use this one function.
  """
  return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)


def window_quantile(window: jax.Array, step: jax.Array, q: float) -> jax.Array:
  """``q``-quantile (linear interpolation) of the filled part of a ring buffer.

  Slots ``0 .. min(step, w - 1)`` are filled; the window is ``w`` long.
  """
  w = window.shape[0]
  filled = jnp.minimum(step + 1, w)
  ordered = jnp.sort(jnp.where(jnp.arange(w) < filled, window, jnp.inf))
  position = q * (filled - 1).astype(jnp.float32)
  below = jnp.floor(position).astype(jnp.int32)
  above = jnp.minimum(below + 1, filled - 1)
  frac = position - below
  return ordered[below] + frac * (ordered[above] - ordered[below])


def gradient_statistics(
    beta: jax.typing.ArrayLike = 0.999,
    curvature_window: int = 20,
    *,
    zero_debias: bool = True,
    sparsity_debias: bool = False,
    h_min_log_smooth: bool = True,
    h_max_log_smooth: bool = True,
    adaptive_clipping: bool = True,
    stat_protect_factor: jax.typing.ArrayLike = 100.0,
    clip_norm: jax.typing.ArrayLike | None = None,
    eps: float = 1e-6,
    h_min_quantile: float | None = None,
) -> optax.GradientTransformation:
  r"""Measures the statistics YellowFin tunes from, and clips adaptively.

  Per step, with :math:`s = \|g\|^2` over the whole pytree and EMAs of rate
  ``beta`` debiased by :math:`d = 1 - \beta^{t+1}`:

  .. math::
    h_{\min}, h_{\max} &= \text{EMA of min/max of } \log(s + \epsilon)
      \text{ over the last } w \text{ steps}, \\
    C &= \max\left(\mathrm{EMA}(s)/d - \|\mathrm{EMA}(g)\|^2/d^2,
      \epsilon\right), \\
    D &= \mathrm{EMA}\left(\mathrm{EMA}(\|g\|)/(\mathrm{EMA}(s) +
      \epsilon)\right)/d.

  The gradient passes through, clipped as the reference clips it: to
  ``clip_norm`` first (if set); then, with ``adaptive_clipping``, to
  :math:`\sqrt{f h_{\max}}` (``f = stat_protect_factor``, from step 2: this
  protects the statistics) and, if :math:`s \ge h_{\max}` (exploding
  gradient, from step 1), to :math:`\sqrt{h_{\max}}` for the update only,
  with the previous step's :math:`h_{\max}`. The statistics see the gradient
  after the first two clips. All clipping factors come from one global norm.

  Args:
    beta: EMA rate of every statistic, in (0, 1).
    curvature_window: width ``w`` of the window of ``||g||^2`` whose min and max
      give the curvature range.
    zero_debias: divide EMAs by ``1 - beta**(t+1)``.
    sparsity_debias: correct ``h_min, h_max, C, D`` by the fraction of non-zero
      gradient entries (for embeddings and other sparse gradients).
    h_min_log_smooth: smooth ``h_min`` in log space (else linearly).
    h_max_log_smooth: smooth ``h_max`` in log space (else linearly).
    adaptive_clipping: apply the statistics-protection and exploding-gradient
      clips.
    stat_protect_factor: ``f`` above, >= 0.
    clip_norm: fixed global-norm clip applied before everything; ``None`` for
      none.
    eps: numerical floor used throughout, > 0 (the reference's ``1e-6``).
    h_min_quantile: ``None`` (the reference) takes ``h_min`` from the window's
      minimum; a value ``q`` in [0, 1) takes the ``q``-quantile of the window
      instead (linear interpolation), so that a few minibatches that carry
      almost no gradient late in training do not drag ``h_min`` (and with it
      the learning rate) along (beyond the reference).

  Returns:
    An ``optax.GradientTransformation`` emitting the clipped gradient.

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> tx = yf.gradient_statistics()
    >>> grads = {'w': jnp.ones(3)}
    >>> state = tx.init(grads)
    >>> _, state = tx.update(grads, state)
    >>> print(f"{float(state.h_max):.2f}")
    3.00

  References:
    Zhang & Mitliagkas, `YellowFin and the Art of Momentum Tuning
    <https://arxiv.org/abs/1706.03471>`_, 2018.
  """
  _checks.check_range('beta', beta, 0.0, 1.0, low_open=True, high_open=True)
  _checks.check_int('curvature_window', curvature_window, 1)
  _checks.check_range('stat_protect_factor', stat_protect_factor, 0.0)
  _checks.check_range('clip_norm', clip_norm, 0.0, low_open=True)
  _checks.check_range('eps', eps, 0.0, 1.0, low_open=True, high_open=True)
  _checks.check_range('h_min_quantile', h_min_quantile, 0.0, 1.0, high_open=True)

  def init_fn(params: optax.Params) -> GradientStatisticsState:
    # A fresh array per field: one array shared by several leaves cannot be
    # donated (jit(..., donate_argnums) of the state fails on the first call).
    zero = lambda: jnp.zeros([], jnp.float32)
    return GradientStatisticsState(
        step=jnp.zeros([], jnp.int32),
        grad_ema=optax.tree.zeros_like(params, dtype=jnp.float32),
        sq_norm_ema=zero(),
        norm_ema=zero(),
        dist_ema=zero(),
        sq_norm_window=jnp.zeros([curvature_window], jnp.float32),
        h_min_ema=zero(),
        h_max_ema=zero(),
        sparsity_ema=zero(),
        grad_sq_norm=zero(),
        h_min=zero(),
        h_max=zero(),
        grad_var=zero(),
        dist_to_opt=zero(),
        sparsity=jnp.ones([], jnp.float32),
        grad_scale=jnp.ones([], jnp.float32),
    )

  def update_fn(updates, state, params=None):
    del params
    if jax.tree.structure(updates) != jax.tree.structure(state.grad_ema):
      raise ValueError(
          'The gradient pytree does not match the optimizer state: gradients '
          f'{jax.tree.structure(updates)}, state (from init) '
          f'{jax.tree.structure(state.grad_ema)}.'
      )
    b, one_minus_b, log_b = ema_constants(beta)
    t = state.step
    g32 = optax.tree.cast(updates, jnp.float32)

    # One global norm gives every clipping factor. The reductions over the
    # old EMA go with it: from them ||EMA(g)||^2 after the update follows
    # without a reduction over the new EMA, so every scalar is known before
    # any parameter-size output is written, and XLA writes the new EMA once,
    # in its final form (after skip_nonfinite's select), instead of writing
    # it, reducing it, and rewriting it (BUILD_NOTES.md section 9).
    s, ema_sq, ema_dot_g = tree_dots(
        (g32, state.grad_ema), [(0, 0), (1, 1), (1, 0)])
    scale = jnp.ones([], jnp.float32)
    if clip_norm is not None:
      scale = clip_factor(s, clip_norm)
    if adaptive_clipping:
      protect = jnp.sqrt(stat_protect_factor * state.h_max) + eps
      scale *= jnp.where(t > 1, clip_factor(s * scale**2, protect), 1.0)
    s = s * scale**2
    measured = optax.tree.scale(scale, g32)

    d = debias_factor(t, log_b)
    dz = d if zero_debias else 1.0
    ema = lambda old, new: b * old + one_minus_b * new

    sq_norm_ema = ema(state.sq_norm_ema, s)
    if sparsity_debias:
      nonzero = sum(jnp.count_nonzero(x) for x in jax.tree.leaves(updates))
      total = max(optax.tree.size(updates), 1)
      sparsity_ema = ema(state.sparsity_ema, nonzero / total)
      sparsity = sparsity_ema / d  # always debiased, as in the reference
    else:
      sparsity_ema, sparsity = state.sparsity_ema, state.sparsity

    # Curvature range over the filled part of the window.
    window = state.sq_norm_window.at[t % curvature_window].set(s)
    filled = jnp.arange(curvature_window) <= t
    log_window = jnp.log(window + eps)
    lo = log_window if h_min_log_smooth else window
    hi = log_window if h_max_log_smooth else window
    if h_min_quantile is None:
      window_low = jnp.min(jnp.where(filled, lo, jnp.inf))
    else:
      window_low = window_quantile(lo, t, h_min_quantile)
    h_min_ema = ema(state.h_min_ema, window_low)
    h_max_ema = ema(state.h_max_ema, jnp.max(jnp.where(filled, hi, -jnp.inf)))
    h_min = h_min_ema / dz
    h_max = h_max_ema / dz
    h_min = jnp.exp(h_min) if h_min_log_smooth else h_min
    h_max = jnp.exp(h_max) if h_max_log_smooth else h_max

    # Variance and distance to the optimum.
    grad_ema = optax.tree.update_moment(measured, state.grad_ema, b, 1)
    # ||b m + (1 - b) c g||^2 expanded; s is already ||c g||^2.
    new_ema_sq = jnp.maximum(
        b * b * ema_sq + 2.0 * b * one_minus_b * scale * ema_dot_g
        + one_minus_b * one_minus_b * s,
        0.0,
    )
    grad_var = sq_norm_ema / dz - new_ema_sq / (dz * dz)
    grad_var = jnp.maximum(grad_var, eps)
    norm_ema = ema(state.norm_ema, jnp.sqrt(s))
    dist_ema = ema(state.dist_ema, norm_ema / (sq_norm_ema + eps))
    dist_to_opt = dist_ema / dz

    if sparsity_debias:
      # Into new values: the reference rescales its EMAs in place here.
      h_min, h_max = h_min * sparsity, h_max * sparsity
      grad_var = grad_var * sparsity
      dist_to_opt = dist_to_opt / (jnp.sqrt(sparsity) + eps)

    if adaptive_clipping:
      exploding = (t >= 1) & (s >= state.h_max)
      explode_norm = jnp.sqrt(state.h_max) + eps
      scale *= jnp.where(exploding, clip_factor(s, explode_norm), 1.0)

    new_state = GradientStatisticsState(
        step=optax.safe_increment(t),
        grad_ema=grad_ema,
        sq_norm_ema=sq_norm_ema,
        norm_ema=norm_ema,
        dist_ema=dist_ema,
        sq_norm_window=window,
        h_min_ema=h_min_ema,
        h_max_ema=h_max_ema,
        sparsity_ema=sparsity_ema,
        grad_sq_norm=s,
        h_min=h_min,
        h_max=h_max,
        grad_var=grad_var,
        dist_to_opt=dist_to_opt,
        sparsity=jnp.asarray(sparsity, jnp.float32),
        grad_scale=scale,
    )
    return scale_gradients(updates, scale), new_state

  return optax.GradientTransformation(init_fn, update_fn)
