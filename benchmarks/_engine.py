"""One compiled training run per (task, optimizer): ``lax.scan`` over steps.

The learning rate and the seed are traced arguments, so a whole grid and all
seeds reuse one compilation. (Measured on the shared 2-core CPU, ``vmap`` over
seeds gave no throughput gain over a loop and compiled 2-3x slower, so runs
are looped, which also gives a per-run progress bar.)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import yellowfin_optax as yf
from benchmarks import _optimizers
from benchmarks import tasks as tasks_lib

# Logged every step for optimizers with ``log_hyperparams`` (YellowFin).
HYPERPARAM_LOG = ('learning_rate', 'momentum', 'lr_smoothed', 'mu_smoothed',
                  'h_min', 'h_max', 'grad_var', 'dist_to_opt', 'skipped_steps')


def make_runner(
    task: tasks_lib.Task, spec: _optimizers.OptimizerSpec, steps: int,
    loss_scale: float = 1.0, before: Any = None,
) -> Callable[[jax.Array, jax.Array], tuple[dict[str, Any], dict[str, Any]]]:
  """Returns ``jit(run)(learning_rate, seed) -> (per-step logs, metrics)``.

  ``seed`` fixes the initialisation and the batch sequence, so every optimizer
  sees the same data order for a given seed. The per-step logs hold ``loss``
  and, for YellowFin, the :data:`HYPERPARAM_LOG` values plus
  ``effective_lr = learning_rate / (1 - momentum)``.

  The optimizer trains on ``loss_scale * loss`` (its gradient and the
  ``value=`` it is passed); the logged loss is the unscaled one. ``before``
  (an optax transformation, e.g. a clip or a preconditioner) is chained in
  front of the optimizer.
  """

  def run(learning_rate, seed):
    k_init, k_data = jax.random.split(jax.random.key(seed))
    params = task.init(k_init)
    tx = spec.factory(learning_rate, steps)
    if before is not None:
      tx = optax.chain(before, tx)
    state = tx.init(params)
    scaled = lambda p, batch: loss_scale * task.loss(p, batch)

    def body(carry, key):
      params, state = carry
      value, grads = jax.value_and_grad(scaled)(params, task.sample(key))
      updates, state = tx.update(grads, state, params, value=value)
      params = optax.apply_updates(params, updates)
      logs = {'loss': value / loss_scale}
      if spec.log_hyperparams:
        hp = yf.hyperparams(state)
        logs.update({k: hp[k] for k in HYPERPARAM_LOG if k in hp})
        logs['effective_lr'] = hp['learning_rate'] / (1.0 - hp['momentum'])
      return (params, state), logs

    (params, state), logs = jax.lax.scan(
        body, (params, state), jax.random.split(k_data, steps))
    if spec.eval_params is not None:
      params = spec.eval_params(state, params)
    return logs, task.evaluate(params)

  return jax.jit(run)


def run_many(
    runner: Callable[..., Any], configs: list[tuple[float, int]],
    progress: Any = None,
) -> list[tuple[dict[str, np.ndarray], dict[str, float]]]:
  """Runs ``runner(lr, seed)`` for each config; returns host numpy results."""
  out = []
  for lr, seed in configs:
    logs, metrics = runner(jnp.float32(lr), jnp.int32(seed))
    logs = {k: np.asarray(v, np.float64) for k, v in logs.items()}
    metrics = {k: float(v) for k, v in metrics.items()}
    out.append((logs, metrics))
    if progress is not None:
      progress.update(1)
  return out
