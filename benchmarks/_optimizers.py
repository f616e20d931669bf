"""The optimizer registry: name -> how to build it, and its tuning grid.

A benchmark optimizer is an :class:`OptimizerSpec`. ``factory`` receives the
learning rate as a (possibly traced) scalar, so that one compiled training
run serves a whole grid, and the run length (for schedules); optimizers that
are not tuned ignore the learning rate. Adding an optimizer is one entry in
:func:`registry`, e.g.::

    'yellowfin_auto': OptimizerSpec(
        lambda lr, steps: yf.yellowfin_auto(), group='yellowfin',
        log_hyperparams=True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib

import yellowfin_optax as yf


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """How the benchmark builds and tunes one optimizer.

  Attributes:
    factory: ``(learning_rate, steps) -> optax.GradientTransformation``.
    grid: learning rates to search (seed 0), ``None`` for untuned.
    group: ``'yellowfin'``, ``'tuned'`` or ``'peer'`` (for the tables).
    label: short description for the tables.
    log_hyperparams: log ``yellowfin_optax.hyperparams(state)`` every step.
    eval_params: ``(state, params) -> params`` to evaluate (schedule-free
      evaluates at its averaged point); ``None`` evaluates ``params``.
  """

  factory: Callable[[jax.Array, int], optax.GradientTransformation]
  grid: tuple[float, ...] | None = None
  group: str = 'peer'
  label: str = ''
  log_hyperparams: bool = False
  eval_params: Callable[[Any, Any], Any] | None = None


# Tiny Shakespeare: ~1M training characters / (16 x 32) per batch.
EPOCH_STEPS = 1960
# The clip of the clipping benchmark (active on most steps of both tasks).
CLIP = 0.1


def log_grid(low_exp: float, high_exp: float, num: int) -> tuple[float, ...]:
  """``num`` log-spaced learning rates from ``10**low_exp`` to ``10**high_exp``."""
  return tuple(float(f'{v:.3g}') for v in np.logspace(low_exp, high_exp, num))


def _sf_eval(state: Any, params: Any) -> Any:
  return contrib.schedule_free_eval_params(state, params)


class _FloorState(NamedTuple):
  inner: Any
  loss_ema: jax.Array
  count: jax.Array
  best: jax.Array


def running_floor(make: Callable[..., optax.GradientTransformation],
                  fraction: float, beta: float = 0.98
                  ) -> optax.GradientTransformationExtraArgs:
  """The loss-floor route of issue 18, as a benchmark prototype:
  ``loss_floor = fraction * min(min_t EMA(loss), loss)`` (the EMA debiased,
  rate ``beta``),
  fed to ``make`` through ``optax.inject_hyperparams``."""
  inner = optax.inject_hyperparams(make)(loss_floor=0.0)

  def init_fn(params):
    zero = jnp.zeros([], jnp.float32)
    return _FloorState(inner.init(params), zero, jnp.zeros([], jnp.int32),
                       jnp.full([], jnp.finfo(jnp.float32).max))

  def update_fn(updates, state, params=None, *, value, **extra):
    ema = beta * state.loss_ema + (1.0 - beta) * value
    count = state.count + 1
    best = jnp.minimum(state.best, ema / (1.0 - beta ** count))
    # Below this step's loss too: f - f* >= (1 - fraction) f > 0.
    hp = dict(state.inner.hyperparams,
              loss_floor=fraction * jnp.minimum(best, value))
    out, inner_state = inner.update(
        updates, state.inner._replace(hyperparams=hp), params, value=value,
        **extra)
    return out, _FloorState(inner_state, ema, count, best)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def registry(grid_points: int = 5) -> dict[str, OptimizerSpec]:
  """The optimizers compared, with ``grid_points`` learning rates per grid.

  Grids are half-decade spaced for 5 points (Adam 3e-4..3e-2, momentum SGD
  3e-3..3e-1) and centred on the same ranges for other sizes.
  """
  adam_grid = log_grid(-3.5, -1.5, grid_points)
  sgd_grid = log_grid(-2.5, -0.5, grid_points)
  cosine = lambda lr, steps: optax.cosine_decay_schedule(lr, steps)
  return {
      'yellowfin': OptimizerSpec(
          lambda lr, steps: yf.yellowfin(), None, 'yellowfin',
          'yellowfin(): the reference, no tuning', log_hyperparams=True),
      'yellowfin_auto': OptimizerSpec(
          lambda lr, steps: yf.yellowfin_auto(), None, 'yellowfin',
          'yellowfin_auto(): loss-unit curvature, no schedule',
          log_hyperparams=True),
      'yellowfin_auto_T': OptimizerSpec(
          lambda lr, steps: yf.yellowfin_auto(total_steps=steps), None,
          'yellowfin', 'yellowfin_auto(total_steps=run length): + cosine',
          log_hyperparams=True),
      'yellowfin_auto_rms': OptimizerSpec(
          lambda lr, steps: yf.yellowfin_auto(direction=yf.rms_direction()),
          None, 'yellowfin',
          'yellowfin_auto(direction=rms_direction()): along RMSprop',
          log_hyperparams=True),
      'yellowfin_auto_rms_T': OptimizerSpec(
          lambda lr, steps: yf.yellowfin_auto(
              total_steps=steps, direction=yf.rms_direction()), None,
          'yellowfin', 'yellowfin_auto_rms with total_steps=run length',
          log_hyperparams=True),
      'yellowfin_auto_rms_T_warm10': OptimizerSpec(
          lambda lr, steps: yf.scale_by_yellowfin(
              curvature='loss', direction=yf.rms_direction(),
              total_steps=steps, warmup_steps=max(1, steps // 10)), None,
          'yellowfin', 'yellowfin_auto_rms_T with a slow start over 10% of '
          'the run (not 10 w = 200 steps)', log_hyperparams=True),
      'yellowfin_auto_T_clip_inside': OptimizerSpec(
          lambda lr, steps: yf.yellowfin_auto(
              total_steps=steps, direction=optax.clip_by_global_norm(CLIP)),
          None, 'yellowfin',
          f'yellowfin_auto_T with clip_by_global_norm({CLIP}) as its '
          'direction', log_hyperparams=True),
      'yellowfin_auto_rms_T_clip_inside': OptimizerSpec(
          lambda lr, steps: yf.yellowfin_auto(
              total_steps=steps, direction=optax.chain(
                  optax.clip_by_global_norm(CLIP), yf.rms_direction())),
          None, 'yellowfin',
          f'yellowfin_auto_rms_T with clip_by_global_norm({CLIP}) inside '
          'its direction', log_hyperparams=True),
      'yellowfin_auto_floor50': OptimizerSpec(
          lambda lr, steps: running_floor(yf.yellowfin_auto, 0.5), None,
          'yellowfin', 'yellowfin_auto with loss_floor = 0.5 x the lowest '
          'smoothed loss so far', log_hyperparams=True),
      'yellowfin_auto_floor90': OptimizerSpec(
          lambda lr, steps: running_floor(yf.yellowfin_auto, 0.9), None,
          'yellowfin', 'yellowfin_auto with loss_floor = 0.9 x the lowest '
          'smoothed loss so far', log_hyperparams=True),
      'yellowfin_auto_rms_T_floor90': OptimizerSpec(
          lambda lr, steps: running_floor(
              lambda loss_floor: yf.yellowfin_auto(
                  total_steps=steps, direction=yf.rms_direction(),
                  loss_floor=loss_floor), 0.9), None,
          'yellowfin', 'yellowfin_auto_rms_T with loss_floor = 0.9 x the '
          'lowest smoothed loss so far', log_hyperparams=True),
      'yellowfin_cosine': OptimizerSpec(
          lambda lr, steps: yf.yellowfin(
              lr_factor=optax.cosine_decay_schedule(1.0, steps)), None,
          'yellowfin', 'yellowfin() with the same cosine lr_factor',
          log_hyperparams=True),
      'yellowfin_recipe': OptimizerSpec(
          lambda lr, steps: yf.yellowfin(
              clip_norm=5.0, lr_factor=optax.exponential_decay(
                  1.0, EPOCH_STEPS, 0.97, staircase=True)), None, 'yellowfin',
          "yellowfin() with the authors' Tiny Shakespeare recipe: clip 5, "
          'lr_factor 0.97^epoch', log_hyperparams=True),
      'adam': OptimizerSpec(
          lambda lr, steps: optax.adam(lr), adam_grid, 'tuned',
          'Adam, lr grid-searched'),
      'adam_cosine': OptimizerSpec(
          lambda lr, steps: optax.adam(cosine(lr, steps)), adam_grid, 'tuned',
          'Adam with a cosine decay to 0 at the run length, lr grid-searched'),
      'momentum_sgd': OptimizerSpec(
          lambda lr, steps: optax.sgd(lr, momentum=0.9), sgd_grid, 'tuned',
          'SGD momentum 0.9, lr grid-searched'),
      'prodigy': OptimizerSpec(
          lambda lr, steps: contrib.prodigy(), None, 'peer',
          'contrib.prodigy()'),
      'dadapt_adamw': OptimizerSpec(
          lambda lr, steps: contrib.dadapt_adamw(), None, 'peer',
          'contrib.dadapt_adamw()'),
      'dog': OptimizerSpec(
          lambda lr, steps: contrib.dog(), None, 'peer', 'contrib.dog()'),
      'mechanic_adam': OptimizerSpec(
          lambda lr, steps: contrib.mechanize(optax.adam(1.0)), None, 'peer',
          'contrib.mechanize(adam(1.0)) (base lr 1 as its docs say)'),
      'schedule_free_adamw': OptimizerSpec(
          lambda lr, steps: contrib.schedule_free_adamw(), None, 'peer',
          'contrib.schedule_free_adamw() (eval at averaged point)',
          eval_params=_sf_eval),
      'schedule_free_sgd': OptimizerSpec(
          lambda lr, steps: contrib.schedule_free_sgd(), None, 'peer',
          'contrib.schedule_free_sgd() (eval at averaged point)',
          eval_params=_sf_eval),
  }
