"""Pure JAX: logistic regression with YellowFin in a ``lax.scan`` loop.

No neural-network library: a linear classifier on a synthetic, ill-conditioned
two-class problem (features scaled over two orders of magnitude), trained
with ``yellowfin_optax.yellowfin_auto(total_steps=steps)`` inside jitted
``jax.lax.scan`` chunks of ``--chunk`` steps (compiled once; the progress
bar ticks per chunk). ``yellowfin_auto`` measures its curvature from the
loss, so the step passes it: ``tx.update(grads, state, params, value=loss)``.
The scan returns the loss and ``yellowfin_optax.hyperparams(state)`` of every
step as stacked arrays, which go straight to the figure
(``examples/plotting.py``).

Run::

  python examples/pure_jax.py --steps 2000 --out pure_jax.png
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import plotting  # examples/plotting.py, next to this file
import yellowfin_optax


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
  parser.add_argument('--out', default='pure_jax.png', help='figure path')
  args = parser.parse_args(argv)

  key = jax.random.key(args.seed)
  data_key, batch_key = jax.random.split(key)
  x, y = make_data(data_key, 4096, args.dim)
  params = {'w': jnp.zeros(args.dim), 'b': jnp.zeros([])}
  tx = yellowfin_optax.yellowfin_auto(total_steps=args.steps)
  opt_state = tx.init(params)

  def step(carry, key):
    params, opt_state = carry
    idx = jax.random.randint(key, (args.batch_size,), 0, x.shape[0])
    loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
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

  plotting.plot_runs(
      {'yellowfin_auto': {'loss': losses,
                          'learning_rate': history['learning_rate'],
                          'momentum': history['momentum']}},
      path=args.out, title='pure JAX logistic regression')
  print(f'wrote {args.out}')
  return {'config': vars(args), 'final_hyperparams': final,
          'full_loss': full_loss, 'accuracy': accuracy, 'wall_s': wall,
          'losses': losses, 'history': history}


if __name__ == '__main__':
  main(sys.argv[1:])
