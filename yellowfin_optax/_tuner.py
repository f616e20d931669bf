"""The YellowFin tuner: one learning rate and one momentum from statistics.

Pure functions hold the formulas (each tested alone); the
transformation :func:`yellowfin_tuner` wraps :func:`gradient_statistics` and
keeps the tuned values in its state for :func:`tuned_momentum` to apply.

Memory: the wrapped statistics plus 7 scalars.

References:
  Zhang & Mitliagkas, `YellowFin and the Art of Momentum Tuning
  <https://arxiv.org/abs/1706.03471>`_, Section 3 (SysML 2018).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from yellowfin_optax import _checks
from yellowfin_optax import _statistics

def cubic_root(p: jax.Array, eps: float = 1e-6) -> jax.Array:
  r"""Root :math:`x = \sqrt{\mu}` of the one-step noisy-quadratic objective.

  Minimising :math:`x^2 D^2 + (1-x)^4 C / h_{\min}^2` over :math:`x \in [0, 1)`
  gives, with :math:`y = x - 1`, the depressed cubic :math:`y^3 + p y + p = 0`,
  :math:`p = D^2 h_{\min}^2 / (2C)`, solved by Vieta's substitution. We write
  :math:`\sqrt{p^2 + 4p^3/27}` as :math:`p\sqrt{1 + 4p/27}` (equal for
  :math:`p \ge 0`) so that float32 does not overflow for large ``p``, and
  polish the root with Newton's method on :math:`p x = (1 - x)^3`, worked
  in :math:`x` for a root below 1/2 and in :math:`z = 1 - x` above it, so
  that neither a root near 0 (large ``p``) nor one near 1 (tiny ``p``) loses
  its precision to the subtraction.

  Args:
    p: the cubic's coefficient, ``>= 0``.
    eps: the reference's guard of the Vieta substitution against division
      by zero.

  Returns:
    ``x`` in ``[0, 1]``: 1 only where ``p`` is so small (below ~1e-23) that
    :math:`1 - p^{1/3}` rounds to 1 in float32, and at ``p = 0``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> p = jnp.array(2.0)
    >>> x = yf.cubic_root(p)
    >>> print(f"x = {float(x):.4f}, residual {float((1 - x)**3 - p * x):.0e}")
    x = 0.2291, residual ...
  """
  w3 = (-p * jnp.sqrt(1.0 + 4.0 / 27.0 * p) - p) / 2.0
  w = jnp.cbrt(w3)
  y = w - p / 3.0 / (w + eps)  # x - 1
  # y cancels catastrophically in float32 once p > ~1e4 (the reference has
  # float64). Two Newton steps on the equivalent p x = (1-x)^3 (monotone on
  # [0, 1]) restore full precision; from x = 0 the first step already gives
  # 1/(p + 3). Newton's iterates in z = 1 - x are the same, shifted; they
  # keep a root near 1 exact, where 1 - x would round to 0.
  x, z = jnp.clip(y + 1.0, 0.0, 1.0), jnp.clip(-y, 0.0, 1.0)
  for _ in range(2):
    x = jnp.clip(x + ((1.0 - x) ** 3 - p * x) / (3.0 * (1.0 - x) ** 2 + p),
                 0.0, 1.0)
    slope = 3.0 * z**2 + p  # 0 only at z = p = 0, the exact root x = 1
    z = jnp.clip(z - (z**3 + p * z - p) / jnp.where(slope > 0, slope, 1.0),
                 0.0, 1.0)
  return jnp.where(y + 1.0 < 0.5, x, 1.0 - z)


def robust_momentum(h_min: jax.Array, h_max: jax.Array, eps: float) -> jax.Array:
  r"""Smallest momentum whose robust region holds every curvature.

  :math:`\mu \ge ((\sqrt{\kappa} - 1)/(\sqrt{\kappa} + 1))^2` with
  :math:`\kappa = \max((h_{\max}+\epsilon)/(h_{\min}+\epsilon), 1+\epsilon)`.
  :math:`\sqrt\kappa - 1` is computed as :math:`(\kappa - 1)/(\sqrt\kappa + 1)`,
  with :math:`\kappa - 1 = (h_{\max} - h_{\min})/(h_{\min}+\epsilon)`, which
  avoids the float32 cancellation when the range is narrow.

  Args:
    h_min: curvature lower estimate.
    h_max: curvature upper estimate.
    eps: numerical floor.

  Returns:
    The lower bound on the momentum.

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> # Condition number 100: ((sqrt(100) - 1) / (sqrt(100) + 1))**2.
    >>> mu = yf.robust_momentum(jnp.array(1.0), jnp.array(100.0), 1e-6)
    >>> print(f"{float(mu):.4f} {(9 / 11) ** 2:.4f}")
    0.6694 0.6694
  """
  kappa_minus_1 = jnp.maximum((h_max - h_min) / (h_min + eps), eps)
  sqrt_kappa = jnp.sqrt(1.0 + kappa_minus_1)
  return (kappa_minus_1 / (sqrt_kappa + 1.0) / (sqrt_kappa + 1.0)) ** 2


def tune(
    h_min: jax.Array,
    h_max: jax.Array,
    grad_var: jax.Array,
    dist_to_opt: jax.Array,
    step: jax.Array,
    curvature_window: int,
    eps: float = 1e-6,
) -> tuple[jax.Array, jax.Array]:
  r"""YellowFin's instantaneous learning rate and momentum.

  .. math::
    \mu_t &= \max\left(x^2, \left(\tfrac{\sqrt\kappa - 1}{\sqrt\kappa + 1}
      \right)^2\right), \quad
    \alpha_t = \frac{(1 - \sqrt{\mu_t})^2}{h_{\min}} \cdot
      \min\left(1, \frac{t + 1}{10 w}\right).

  Args:
    h_min: curvature lower estimate.
    h_max: curvature upper estimate.
    grad_var: gradient variance ``C``.
    dist_to_opt: distance to the optimum ``D``.
    step: the step ``t`` (0-based) being tuned, for the slow start.
    curvature_window: ``w``.
    eps: numerical floor.

  Returns:
    ``(lr_t, mu_t)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> lr, mu = yf.tune(h_min=jnp.array(1.0), h_max=jnp.array(100.0),
    ...                  grad_var=jnp.array(1e-3), dist_to_opt=jnp.array(1.0),
    ...                  step=jnp.array(1000), curvature_window=20)
    >>> print(f"lr {float(lr):.4f}, momentum {float(mu):.4f}")
    lr 0.0331, momentum 0.6694
  """
  # p = (D h_min)^2 / 2C, squared last: (h_min + eps)**2 alone overflows
  # float32 once gradient norms pass ~1e9.
  q = (dist_to_opt + eps) * (h_min + eps) / jnp.sqrt(2.0 * (grad_var + eps))
  p = q * q
  mu_t = jnp.maximum(
      cubic_root(p, eps) ** 2, robust_momentum(h_min, h_max, eps))
  lr_t = (1.0 - jnp.sqrt(mu_t)) ** 2 / (h_min + eps)
  slow_start = (step.astype(jnp.float32) + 1.0) / (10.0 * curvature_window)
  lr_t = jnp.minimum(lr_t, lr_t * slow_start)
  return lr_t, mu_t


class YellowFinTunerState(NamedTuple):
  """State of :func:`yellowfin_tuner`.

  Attributes:
    statistics: state of the wrapped statistics transformation.
    lr_t: instantaneous tuned learning rate (before ``lr_factor``).
    mu_t: instantaneous tuned momentum.
    lr: ``beta``-smoothed ``lr_t``, starting from the initial learning rate.
    mu: ``beta``-smoothed ``mu_t``, starting from the initial momentum.
    learning_rate: learning rate to apply at this step (after ``lr_factor`` and
      the catastrophic-move cap).
    momentum: momentum to apply at this step.
    effective_step_anchor: the effective step ``lr / (1 - mu)`` at step
      ``step_growth_anchor`` (0 before it; only with ``max_step_growth``).
  """

  statistics: _statistics.GradientStatisticsState
  lr_t: jax.Array
  mu_t: jax.Array
  lr: jax.Array
  mu: jax.Array
  learning_rate: jax.Array
  momentum: jax.Array
  effective_step_anchor: jax.Array


def yellowfin_tuner(
    statistics: optax.GradientTransformation,
    *,
    learning_rate: jax.typing.ArrayLike = 1e-4,
    momentum: jax.typing.ArrayLike = 0.0,
    beta: jax.typing.ArrayLike = 0.999,
    curvature_window: int = 20,
    lr_factor: optax.ScalarOrSchedule = 1.0,
    smoothed_hyperparams: bool = False,
    adaptive_clipping: bool = True,
    catastrophic_move_threshold: jax.typing.ArrayLike = 100.0,
    eps: float = 1e-6,
    debias_smoothed: bool = False,
    max_step_growth: float | None = None,
    step_growth_anchor: int = 200,
) -> optax.GradientTransformation:
  r"""Tunes YellowFin's learning rate and momentum from measured statistics.

  Wraps ``statistics`` (normally :func:`gradient_statistics`, whose state
  fields it reads), tunes ``(lr_t, mu_t)`` with :func:`tune` from step 1 on
  (step 0 keeps the initial values), smooths them with ``beta``, and stores
  the values to apply:

  .. math::
    \text{learning\_rate} = \alpha \cdot \text{lr\_factor}(t), \quad
    \text{momentum} = \mu,

  with :math:`(\alpha, \mu) = (\alpha_t, \mu_t)` (the references) or the
  smoothed values if ``smoothed_hyperparams`` (the paper's Algorithm 1). With
  ``adaptive_clipping``, a step longer than ``catastrophic_move_threshold``
  (:math:`\text{lr} \cdot \|g\| \ge` threshold) is shortened to it.

  The gradient passes through as ``statistics`` emits it.

  Args:
    statistics: the wrapped measurement transformation.
    learning_rate: initial learning rate, applied at step 0.
    momentum: initial momentum, applied at step 0.
    beta: smoothing rate of ``lr`` and ``mu``.
    curvature_window: the statistics' window width (for the slow start).
    lr_factor: multiplier of the tuned learning rate: a scalar or an optax
      schedule of the step (the reference's ``set_lr_factor``).
    smoothed_hyperparams: apply the smoothed rather than instantaneous values.
    adaptive_clipping: apply the catastrophic-move cap.
    catastrophic_move_threshold: the cap on ``lr * ||g||``, > 0.
    eps: numerical floor, > 0.
    debias_smoothed: zero-debias the smoothed values: the ``k``-th tuning step
      moves them by ``(1 - beta) / (1 - beta**k)`` of the way to
      ``(lr_t, mu_t)`` (so the first tuned values replace the initial ones at
      once). The reference's smoothing starts from the initial ``1e-4`` and
      never debiases, which lags for ~``1/(1-beta)`` steps (beyond the
      reference).
    max_step_growth: ``None`` (the reference) or a cap ``g``: from step
      ``step_growth_anchor`` on, the effective step ``lr / (1 - mu)`` (before
      ``lr_factor``) may not exceed ``g`` times its value at that step; the
      learning rate is lowered to meet it. Late in training ``h_min`` follows
      near-empty minibatches down and the effective step grows like
      ``h_min^(-1/3)``; this stops that growth (beyond the reference).
    step_growth_anchor: the step (an int >= 1) whose effective step anchors
      the cap.

  Returns:
    An ``optax.GradientTransformation`` with :class:`YellowFinTunerState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> tx = yf.yellowfin_tuner(yf.gradient_statistics())
    >>> grads = {'w': jnp.ones(3)}
    >>> state = tx.init(grads)
    >>> for _ in range(3):
    ...   _, state = tx.update(grads, state)
    >>> print(f"{float(state.learning_rate):.4f}")
    0.0050

  References:
    Zhang & Mitliagkas, `YellowFin and the Art of Momentum Tuning
    <https://arxiv.org/abs/1706.03471>`_, 2018.
  """
  _checks.check_range('learning_rate', learning_rate, 0.0)
  _checks.check_range('momentum', momentum, 0.0, 1.0, high_open=True)
  _checks.check_range('beta', beta, 0.0, 1.0, low_open=True, high_open=True)
  _checks.check_int('curvature_window', curvature_window, 1)
  _checks.check_range('lr_factor', lr_factor, 0.0)
  _checks.check_range(
      'catastrophic_move_threshold', catastrophic_move_threshold, 0.0,
      low_open=True,
  )
  _checks.check_range('max_step_growth', max_step_growth, 1.0)
  _checks.check_whole('step_growth_anchor', step_growth_anchor, 1)
  _checks.check_range('eps', eps, 0.0, 1.0, low_open=True, high_open=True)

  def init_fn(params):
    # Fresh arrays per field: a shared one could not be donated.
    lr0 = lambda: jnp.array(learning_rate, jnp.float32)
    mu0 = lambda: jnp.array(momentum, jnp.float32)
    return YellowFinTunerState(
        statistics=statistics.init(params),
        lr_t=lr0(), mu_t=mu0(), lr=lr0(), mu=mu0(), learning_rate=lr0(),
        momentum=mu0(),
        effective_step_anchor=jnp.zeros([], jnp.float32),
    )

  def update_fn(updates, state, params=None):
    updates, stats = statistics.update(updates, state.statistics, params)
    t = state.statistics.step
    b, one_minus_b, log_b = _statistics.ema_constants(beta)
    lr_t, mu_t = tune(
        stats.h_min, stats.h_max, stats.grad_var, stats.dist_to_opt, t,
        curvature_window, eps,
    )
    tuning = t > 0
    lr_t = jnp.where(tuning, lr_t, state.lr_t)
    mu_t = jnp.where(tuning, mu_t, state.mu_t)
    rate = one_minus_b
    if debias_smoothed:  # the k-th tuning step is step t = k
      rate = rate / _statistics.debias_factor(jnp.maximum(t - 1, 0), log_b)
    lr = jnp.where(tuning, state.lr + rate * (lr_t - state.lr), state.lr)
    mu = jnp.where(tuning, state.mu + rate * (mu_t - state.mu), state.mu)

    lr_applied, mu_applied = (lr, mu) if smoothed_hyperparams else (lr_t, mu_t)
    anchor = state.effective_step_anchor
    if max_step_growth is not None:
      effective = lr_applied / (1.0 - mu_applied)
      anchor = jnp.where(t == step_growth_anchor, effective, anchor)
      cap = jnp.where(anchor > 0, max_step_growth * anchor, jnp.inf)
      lr_applied = jnp.where(
          effective > cap, cap * (1.0 - mu_applied), lr_applied
      )
    factor = lr_factor(t) if callable(lr_factor) else lr_factor
    lr_applied = lr_applied * factor
    if adaptive_clipping:
      move = lr_applied * jnp.sqrt(stats.grad_sq_norm)
      capped = catastrophic_move_threshold / jnp.sqrt(stats.grad_sq_norm + eps)
      lr_applied = jnp.where(
          move >= catastrophic_move_threshold, capped, lr_applied
      )
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return updates, YellowFinTunerState(
        statistics=stats, lr_t=f32(lr_t), mu_t=f32(mu_t), lr=f32(lr),
        mu=f32(mu), learning_rate=f32(lr_applied), momentum=f32(mu_applied),
        effective_step_anchor=f32(anchor),
    )

  return optax.GradientTransformation(init_fn, update_fn)
