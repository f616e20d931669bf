"""The optimizer registry: name -> how to build it, and its tuning grid.

A benchmark optimizer is an :class:`OptimizerSpec`. ``factory`` receives the
learning rate as a (possibly traced) scalar so that one compiled training run
serves a whole grid; optimizers that are not tuned ignore it. Adding an
optimizer is one line in :data:`OPTIMIZERS`, e.g.::

    OPTIMIZERS['yellowfin_auto'] = OptimizerSpec(
        lambda lr: yf.yellowfin_auto(), group='yellowfin', log_hyperparams=True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import optax
from optax import contrib

import yellowfin_optax as yf


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """How the benchmark builds and tunes one optimizer.

  Attributes:
    factory: ``learning_rate -> optax.GradientTransformation``.
    grid: learning rates to search (seed 0), ``None`` for untuned.
    group: ``'yellowfin'``, ``'tuned'`` or ``'peer'`` (for the tables).
    label: short description for the tables.
    log_hyperparams: log ``yellowfin_optax.hyperparams(state)`` every step.
    eval_params: ``(state, params) -> params`` to evaluate (schedule-free
      evaluates at its averaged point); ``None`` evaluates ``params``.
  """

  factory: Callable[[jax.Array], optax.GradientTransformation]
  grid: tuple[float, ...] | None = None
  group: str = 'peer'
  label: str = ''
  log_hyperparams: bool = False
  eval_params: Callable[[Any, Any], Any] | None = None


def log_grid(low_exp: float, high_exp: float, num: int) -> tuple[float, ...]:
  """``num`` log-spaced learning rates from ``10**low_exp`` to ``10**high_exp``."""
  return tuple(float(f'{v:.3g}') for v in np.logspace(low_exp, high_exp, num))


def _sf_eval(state: Any, params: Any) -> Any:
  return contrib.schedule_free_eval_params(state, params)


def registry(grid_points: int = 5) -> dict[str, OptimizerSpec]:
  """The optimizers compared, with ``grid_points`` learning rates per grid.

  Grids are half-decade spaced for 5 points (Adam 3e-4..3e-2, momentum SGD
  3e-3..3e-1) and centred on the same ranges for other sizes.
  """
  adam_grid = log_grid(-3.5, -1.5, grid_points)
  sgd_grid = log_grid(-2.5, -0.5, grid_points)
  return {
      'yellowfin': OptimizerSpec(
          lambda lr: yf.yellowfin(), None, 'yellowfin',
          'YellowFin, library defaults, no tuning', log_hyperparams=True),
      'yellowfin_auto': OptimizerSpec(
          lambda lr: yf.yellowfin_auto(), None, 'yellowfin',
          'yellowfin_auto() (total_steps=None: the effective-step guard)',
          log_hyperparams=True),
      'adam': OptimizerSpec(
          lambda lr: optax.adam(lr), adam_grid, 'tuned',
          'Adam, lr grid-searched'),
      'momentum_sgd': OptimizerSpec(
          lambda lr: optax.sgd(lr, momentum=0.9), sgd_grid, 'tuned',
          'SGD momentum 0.9, lr grid-searched'),
      'prodigy': OptimizerSpec(
          lambda lr: contrib.prodigy(), None, 'peer', 'contrib.prodigy()'),
      'dadapt_adamw': OptimizerSpec(
          lambda lr: contrib.dadapt_adamw(), None, 'peer',
          'contrib.dadapt_adamw()'),
      'dog': OptimizerSpec(
          lambda lr: contrib.dog(), None, 'peer', 'contrib.dog()'),
      'mechanic_adam': OptimizerSpec(
          lambda lr: contrib.mechanize(optax.adam(1.0)), None, 'peer',
          'contrib.mechanize(adam(1.0)) (base lr 1 as its docs say)'),
      'schedule_free_adamw': OptimizerSpec(
          lambda lr: contrib.schedule_free_adamw(), None, 'peer',
          'contrib.schedule_free_adamw() (eval at averaged point)',
          eval_params=_sf_eval),
      'schedule_free_sgd': OptimizerSpec(
          lambda lr: contrib.schedule_free_sgd(), None, 'peer',
          'contrib.schedule_free_sgd() (eval at averaged point)',
          eval_params=_sf_eval),
  }
