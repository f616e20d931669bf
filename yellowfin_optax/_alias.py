"""The public aliases :func:`yellowfin` and :func:`yellowfin_auto`.

``yellowfin()`` nests its pieces in the order the paper reads:
measure (:func:`gradient_statistics`) -> tune (:func:`yellowfin_tuner`) ->
momentum SGD (:func:`tuned_momentum`), guarded by :func:`skip_nonfinite`.

Memory: two parameter-size buffers (gradient EMA and momentum), like Adam,
plus ``curvature_window + 22`` scalars.

References:
  Zhang & Mitliagkas, `YellowFin and the Art of Momentum Tuning
  <https://arxiv.org/abs/1706.03471>`_, 2018.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from yellowfin_optax import _checks
from yellowfin_optax import _momentum
from yellowfin_optax import _nonfinite
from yellowfin_optax import _statistics
from yellowfin_optax import _tuner

def yellowfin(
    learning_rate: jax.typing.ArrayLike = 1e-4,
    momentum: jax.typing.ArrayLike = 0.0,
    *,
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
    lr_factor: optax.ScalarOrSchedule = 1.0,
    smoothed_hyperparams: bool = False,
    nesterov: bool = False,
    eps: float = 1e-6,
    axis_name: str | None = None,
    on_nonfinite: str = 'skip',
    h_min_quantile: float | None = None,
    debias_smoothed: bool = False,
    max_step_growth: float | None = None,
    step_growth_anchor: int = 200,
) -> optax.GradientTransformationExtraArgs:
  r"""YellowFin: momentum SGD that tunes its own learning rate and momentum.

  Each step measures the curvature range :math:`[h_{\min}, h_{\max}]`, the
  gradient variance :math:`C` and the distance to the optimum :math:`D` from
  the gradients alone, then picks the momentum and learning rate that minimise
  the expected squared distance after one step on a noisy quadratic while
  keeping every curvature in momentum's robust region:

  .. math::
    \mu_t = \max\left(x^{*2}, \left(\tfrac{\sqrt{h_{\max}/h_{\min}} - 1}
      {\sqrt{h_{\max}/h_{\min}} + 1}\right)^2\right), \quad
    \alpha_t = \frac{(1 - \sqrt{\mu_t})^2}{h_{\min}},

  with :math:`x^*` the root of :math:`x^2 D^2 + (1-x)^4 C / h_{\min}^2`, and
  applies heavy-ball momentum SGD with them. Defaults reproduce the authors'
  PyTorch reference step for step.

  Args:
    learning_rate: initial learning rate (applied at step 0 only).
    momentum: initial momentum (applied at step 0 only), in [0, 1).
    beta: EMA rate of all statistics and of the smoothed values, in (0, 1).
    curvature_window: number of recent ``||g||^2`` whose extremes give the
      curvature range, >= 1.
    zero_debias: debias the EMAs.
    sparsity_debias: correct the statistics for sparse gradients.
    h_min_log_smooth: smooth ``h_min`` in log space.
    h_max_log_smooth: smooth ``h_max`` in log space.
    adaptive_clipping: the reference's statistics-protection,
      exploding-gradient and catastrophic-move clips.
    stat_protect_factor: statistics protection clips ``||g||`` to
      ``sqrt(stat_protect_factor * h_max)``, >= 0.
    catastrophic_move_threshold: cap on ``learning_rate * ||g||``, > 0.
    clip_norm: fixed global-norm clip before everything; ``None`` for none.
    lr_factor: multiplier of the tuned learning rate, a scalar or an optax
      schedule of the step (for decay recipes).
    smoothed_hyperparams: apply the ``beta``-smoothed learning rate and momentum
      (the paper's Algorithm 1) instead of the instantaneous ones (the
      references).
    nesterov: use Nesterov momentum.
    eps: numerical floor.
    axis_name: ``pmap``/``shard_map`` axis to average gradients over before
      measuring; ``None`` for a single replica or sharded ``jit``.
    on_nonfinite: ``'skip'``, ``'raise_in_debug'`` or ``'propagate'``; see
      :func:`skip_nonfinite`.
    h_min_quantile: ``None`` (reference) or a quantile of the curvature
      window to take ``h_min`` from; see :func:`gradient_statistics`.
    debias_smoothed: zero-debias the smoothed values; see
      :func:`yellowfin_tuner`.
    max_step_growth: cap on the growth of the effective step
      ``lr / (1 - mu)`` after ``step_growth_anchor``; ``None`` (reference)
      for none. See :func:`yellowfin_tuner`.
    step_growth_anchor: the step whose effective step anchors the cap.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; read the tuned values with
    :func:`hyperparams`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
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
  tuner = yellowfin_tuner_from_options(
      learning_rate=learning_rate,
      momentum=momentum,
      beta=beta,
      curvature_window=curvature_window,
      zero_debias=zero_debias,
      sparsity_debias=sparsity_debias,
      h_min_log_smooth=h_min_log_smooth,
      h_max_log_smooth=h_max_log_smooth,
      adaptive_clipping=adaptive_clipping,
      stat_protect_factor=stat_protect_factor,
      catastrophic_move_threshold=catastrophic_move_threshold,
      clip_norm=clip_norm,
      lr_factor=lr_factor,
      smoothed_hyperparams=smoothed_hyperparams,
      eps=eps,
      h_min_quantile=h_min_quantile,
      debias_smoothed=debias_smoothed,
      max_step_growth=max_step_growth,
      step_growth_anchor=step_growth_anchor,
  )
  return cross_replica_mean(
      _nonfinite.skip_nonfinite(
          _momentum.tuned_momentum(tuner, nesterov=nesterov),
          on_nonfinite=on_nonfinite,
          check_gradients=False,  # ||g||^2 in the statistics covers them
          check_updates='narrow',  # float32 momentum SGD: finite
          updates_from_state=lambda g, s: tuned_updates(
              g, s, s.tuner.momentum, nesterov=nesterov
          ),
      ),
      axis_name,
  )


def tuned_updates(
    grads: optax.Updates,
    state: _momentum.TunedMomentumState,
    momentum: jax.Array,
    *,
    nesterov: bool,
) -> optax.Updates:
  """YellowFin's update from the raw gradients and its new momentum state.

  For ``skip_nonfinite(updates_from_state=...)``. The statistics clipped the
  gradients by ``grad_scale`` before the trace saw them; the same function
  gives the same values. ``momentum`` is the one applied this step.
  """
  clipped = _statistics.scale_gradients(
      grads, state.tuner.statistics.grad_scale)
  return _momentum.momentum_updates(
      clipped, state.trace, state.tuner.learning_rate, momentum,
      nesterov=nesterov,
  )


def cross_replica_mean(
    inner: optax.GradientTransformation, axis_name: str | None
) -> optax.GradientTransformationExtraArgs:
  """Feeds ``inner`` the gradient averaged over the ``axis_name`` replicas.

  Every statistic YellowFin measures is global, so under ``pmap`` or
  ``shard_map`` data parallelism it must see the all-reduced gradient, and so
  must the non-finite check, the delay ring and the total-momentum
  measurement: the mean comes first. ``axis_name=None`` returns ``inner``.
  """
  inner = optax.with_extra_args_support(inner)
  if axis_name is None:
    return inner

  def update_fn(updates, state, params=None, **extra_args):
    updates = jax.lax.pmean(updates, axis_name)
    return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


_STATISTICS_OPTIONS = (
    'beta', 'curvature_window', 'zero_debias', 'sparsity_debias',
    'h_min_log_smooth', 'h_max_log_smooth', 'adaptive_clipping',
    'stat_protect_factor', 'clip_norm', 'eps', 'h_min_quantile',
)
_TUNER_OPTIONS = (
    'learning_rate', 'momentum', 'beta', 'curvature_window', 'lr_factor',
    'smoothed_hyperparams', 'adaptive_clipping', 'catastrophic_move_threshold',
    'eps', 'debias_smoothed', 'max_step_growth', 'step_growth_anchor',
)


def yellowfin_tuner_from_options(**options: Any) -> optax.GradientTransformation:
  """``yellowfin_tuner(gradient_statistics(...))`` from :func:`yellowfin`'s options.

  Each option goes to the piece(s) that take it; unset ones keep the pieces'
  defaults (the same as :func:`yellowfin`'s).

  Raises:
    TypeError: for an option :func:`yellowfin` does not have.
  """
  unknown = set(options) - set(_STATISTICS_OPTIONS) - set(_TUNER_OPTIONS)
  if unknown:
    raise TypeError(f'Unknown YellowFin option(s): {sorted(unknown)}.')
  pick = lambda names: {k: options[k] for k in names if k in options}
  statistics = _statistics.gradient_statistics(**pick(_STATISTICS_OPTIONS))
  return _tuner.yellowfin_tuner(statistics, **pick(_TUNER_OPTIONS))


# yellowfin_auto's departures from the reference; BUILD_NOTES.md has the
# measurements that chose them.
AUTO_DEFAULTS: dict[str, Any] = dict(max_step_growth=2.0)


def yellowfin_auto(
    total_steps: int | None = None, **options: Any
) -> optax.GradientTransformationExtraArgs:
  r"""YellowFin with the changes that stop its late-training step growth.

  The reference tuner takes :math:`h_{\min}` from the smallest
  :math:`\|g\|^2` of its window. Late in training some minibatches carry
  almost no gradient, :math:`h_{\min}` follows them down, and the effective
  step :math:`\alpha/(1-\mu)` grows like :math:`h_{\min}^{-1/3}` until the
  loss plateaus or bounces. This alias changes, relative to :func:`yellowfin`
  (each is an option there too):

  * ``max_step_growth=2.0``: from step 200 on, the effective step
    :math:`\alpha/(1-\mu)` may not grow past twice its step-200 value (the
    learning rate is lowered to meet it); it never binds where the step does
    not grow;
  * with ``total_steps``: ``lr_factor`` decays along a cosine to 0 at
    ``total_steps`` (``None``: no decay, for runs of unknown length);
  * not by default, measured to cost speed on the benchmark tasks when
    combined with the cosine: ``h_min_quantile`` (a quantile
    of the window for :math:`h_{\min}`) and ``smoothed_hyperparams=True,
    debias_smoothed=True`` (debiased smoothed learning rate and momentum);
    pass them to opt in.

  Args:
    total_steps: run length for the cosine decay of ``lr_factor``, or
      ``None``.
    **options: any option of :func:`yellowfin`; overrides the above.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import yellowfin_optax as yf
    >>> tx = yf.yellowfin_auto(total_steps=1000)
    >>> state = tx.init(jnp.zeros(2))
    >>> step = jax.jit(tx.update)
    >>> for _ in range(300):
    ...   _, state = step(jnp.array([1.0, -2.0]), state)
    >>> hp = yf.hyperparams(state)
    >>> schedule = optax.cosine_decay_schedule(1.0, 1000)
    >>> print(bool(jnp.isclose(hp['learning_rate'], hp['lr_t'] * schedule(299))))
    True
  """
  if total_steps is not None:
    _checks.check_int('total_steps', total_steps, 1)
    options.setdefault(
        'lr_factor', optax.cosine_decay_schedule(1.0, total_steps)
    )
  return yellowfin(**{**AUTO_DEFAULTS, **options})
