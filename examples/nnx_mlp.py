"""Flax NNX: an MLP on sklearn digits with ``nnx.Optimizer`` and YellowFin.

Shows the three things an NNX user needs:

1. ``nnx.Optimizer(model, yellowfin_optax.yellowfin(), wrt=nnx.Param)`` and
   ``optimizer.update(model, grads)`` inside ``@nnx.jit``;
2. how to read the tuned learning rate and momentum:
   ``yellowfin_optax.hyperparams(optimizer.opt_state)`` (NNX wraps every
   state leaf in an ``nnx.Variable``; ``hyperparams`` looks through it). This
   works inside ``nnx.jit``;
3. logging those values every step without a host sync.

Run::

  python examples/nnx_mlp.py --steps 300 --out results
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
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import yellowfin_optax
from yellowfin_optax import plotting


class MLP(nnx.Module):
  """64 -> hidden -> hidden -> 10, ReLU."""

  def __init__(self, hidden: int, *, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(64, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.l1(x))
    x = nnx.relu(self.l2(x))
    return self.out(x)


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss, yellowfin_optax.hyperparams(optimizer.opt_state)


@nnx.jit
def accuracy(model: MLP, x, y):
  return jnp.mean(jnp.argmax(model(x), -1) == y)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--hidden', type=int, default=128)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='results')
  args = parser.parse_args(argv)

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=0.2, random_state=args.seed, stratify=y)

  model = MLP(args.hidden, rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, yellowfin_optax.yellowfin(), wrt=nnx.Param)

  rng = np.random.default_rng(args.seed)
  start = time.perf_counter()
  losses, history = [], []
  for _ in tqdm(range(args.steps), desc='nnx mlp', mininterval=0.5):
    idx = rng.integers(0, len(x_train), args.batch_size)
    loss, hp = train_step(model, optimizer, x_train[idx], y_train[idx])
    losses.append(loss)
    history.append(hp)
  losses = np.asarray(jax.device_get(jnp.stack(losses)), np.float64)
  history = jax.device_get(jax.tree.map(lambda *v: jnp.stack(v), *history))
  test_acc = float(accuracy(model, x_test, y_test))
  wall = time.perf_counter() - start

  # Outside jit, the same reader works on the live optimizer.
  final = {k: float(v) for k, v in
           yellowfin_optax.hyperparams(optimizer.opt_state).items()}
  print(f"{'steps':>6}{'train loss':>12}{'test acc':>10}{'lr':>10}"
        f"{'momentum':>10}{'wall s':>8}")
  print(f'{args.steps:>6}{np.mean(losses[-50:]):>12.4f}{test_acc:>10.3f}'
        f"{final['learning_rate']:>10.3g}{final['momentum']:>10.3f}"
        f'{wall:>8.1f}')

  os.makedirs(args.out, exist_ok=True)
  png = os.path.join(args.out, 'nnx_mlp.png')
  plotting.plot_training(history, losses, labels=['YellowFin (NNX)'],
                         path=png, title='Flax NNX MLP on sklearn digits')
  summary = {'config': vars(args), 'final_hyperparams': final,
             'test_accuracy': test_acc, 'wall_time_s': wall,
             'losses': losses.tolist()}
  with open(os.path.join(args.out, 'nnx_mlp.json'), 'w') as f:
    json.dump(summary, f)
  print(f'wrote {png}')
  return summary


if __name__ == '__main__':
  main(sys.argv[1:])
