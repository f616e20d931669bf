"""Pure JAX: logistic regression with YellowFin in a ``lax.scan`` loop.

No neural-network library: a linear classifier on a synthetic, ill-conditioned
two-class problem (features scaled over two orders of magnitude), trained
with ``yellowfin_optax.yellowfin()`` for ``--steps`` steps inside one
``jax.lax.scan``. The scan returns the loss and
``yellowfin_optax.hyperparams(state)`` of every step as stacked arrays,
which go straight to ``yellowfin_optax.plotting.plot_training``.

Run::

  python examples/pure_jax.py --steps 2000 --out results
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import yellowfin_optax
from yellowfin_optax import plotting


def make_data(key: jax.Array, n: int, dim: int):
  """Linearly separable-ish data with feature scales from 0.1 to 10."""
  k1, k2, k3 = jax.random.split(key, 3)
  scales = jnp.logspace(-1, 1, dim)
  x = jax.random.normal(k1, (n, dim)) * scales
  w_true = jax.random.normal(k2, (dim,)) / scales
  logits = x @ w_true + 0.5 * jax.random.normal(k3, (n,))
  return x, (logits > 0).astype(jnp.float32)


def loss_fn(params, x, y):
  logits = x @ params['w'] + params['b']
  return optax.sigmoid_binary_cross_entropy(logits, y).mean()


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--chunk', type=int, default=250,
                      help='steps per jitted lax.scan call (progress bar tick)')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--dim', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='results')
  args = parser.parse_args(argv)

  key = jax.random.key(args.seed)
  data_key, batch_key = jax.random.split(key)
  x, y = make_data(data_key, 4096, args.dim)
  params = {'w': jnp.zeros(args.dim), 'b': jnp.zeros([])}
  tx = yellowfin_optax.yellowfin()
  opt_state = tx.init(params)

  def step(carry, key):
    params, opt_state = carry
    idx = jax.random.randint(key, (args.batch_size,), 0, x.shape[0])
    loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), (loss, yellowfin_optax.hyperparams(opt_state))

  @jax.jit
  def run_chunk(params, opt_state, keys):
    return jax.lax.scan(step, (params, opt_state), keys)

  start = time.perf_counter()
  keys = jax.random.split(batch_key, args.steps)
  losses, history = [], []
  with tqdm(total=args.steps, desc='pure jax') as bar:
    for i in range(0, args.steps, args.chunk):
      chunk = keys[i:i + args.chunk]
      (params, opt_state), (loss, hp) = run_chunk(params, opt_state, chunk)
      losses.append(loss)
      history.append(hp)
      bar.update(len(chunk))
  losses = np.concatenate(jax.device_get(losses)).astype(np.float64)
  history = {k: np.concatenate([h[k] for h in jax.device_get(history)])
             for k in history[0]}
  full_loss = float(loss_fn(params, x, y))
  accuracy = float(jnp.mean(((x @ params['w'] + params['b']) > 0) == y))
  wall = time.perf_counter() - start
  final = {k: float(v[-1]) for k, v in history.items()}

  print(f"{'steps':>6}{'full loss':>11}{'accuracy':>10}{'lr':>10}"
        f"{'momentum':>10}{'h_min':>10}{'h_max':>10}{'wall s':>8}")
  print(f'{args.steps:>6}{full_loss:>11.4f}{accuracy:>10.3f}'
        f"{final['learning_rate']:>10.3g}{final['momentum']:>10.3f}"
        f"{final['h_min']:>10.3g}{final['h_max']:>10.3g}{wall:>8.1f}")

  os.makedirs(args.out, exist_ok=True)
  png = os.path.join(args.out, 'pure_jax.png')
  plotting.plot_training(history, losses, path=png,
                         title='pure JAX logistic regression')
  summary = {'config': vars(args), 'final_hyperparams': final,
             'full_loss': full_loss, 'accuracy': accuracy,
             'wall_time_s': wall, 'losses': losses.tolist()}
  with open(os.path.join(args.out, 'pure_jax.json'), 'w') as f:
    json.dump(summary, f)
  print(f'wrote {png}')
  return summary


if __name__ == '__main__':
  main(sys.argv[1:])
