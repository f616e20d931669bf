"""Flax NNX: an MLP on sklearn digits with ``nnx.Optimizer`` and YellowFin.

Shows the three things an NNX user needs:

1. ``nnx.Optimizer(model, yellowfin_optax.yellowfin_auto(total_steps=steps),
   wrt=nnx.Param)`` and ``optimizer.update(model, grads, value=loss)`` inside
   ``@nnx.jit`` (``yellowfin_auto`` measures its curvature from the loss;
   ``nnx.Optimizer.update`` forwards keyword arguments to ``tx.update``);
2. how to read the tuned learning rate and momentum:
   ``yellowfin_optax.hyperparams(optimizer.opt_state)['learning_rate']``
   (NNX wraps every state leaf in an ``nnx.Variable``; ``hyperparams`` looks
   through it). This works inside ``nnx.jit`` and outside;
3. logging those values every step without a host sync.

Run::

  python examples/nnx_mlp.py --steps 300 --out nnx_mlp.png
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
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import plotting  # examples/plotting.py, next to this file
import yellowfin_optax


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
  optimizer.update(model, grads, value=loss)  # value=: yellowfin_auto needs it
  hp = yellowfin_optax.hyperparams(optimizer.opt_state)  # inside nnx.jit
  return loss, hp['learning_rate'], hp['momentum']


@nnx.jit
def accuracy(model: MLP, x, y):
  return jnp.mean(jnp.argmax(model(x), -1) == y)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--hidden', type=int, default=128)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='nnx_mlp.png', help='figure path')
  args = parser.parse_args(argv)

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=0.2, random_state=args.seed, stratify=y)

  model = MLP(args.hidden, rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(
      model, yellowfin_optax.yellowfin_auto(total_steps=args.steps),
      wrt=nnx.Param)

  rng = np.random.default_rng(args.seed)
  start = time.perf_counter()
  history = []
  for _ in tqdm(range(args.steps), desc='nnx mlp', mininterval=0.5):
    idx = rng.integers(0, len(x_train), args.batch_size)
    history.append(train_step(model, optimizer, x_train[idx], y_train[idx]))
  # One transfer at the end: the loop never waited for the device.
  losses, lr, mu = (np.asarray(v, np.float64) for v in jax.device_get(
      jax.tree.map(lambda *v: jnp.stack(v), *history)))
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

  plotting.plot_runs(
      {'yellowfin_auto (NNX)': {'loss': losses, 'learning_rate': lr,
                                'momentum': mu}},
      path=args.out, title='Flax NNX MLP on sklearn digits')
  print(f'wrote {args.out}')
  return {'config': vars(args), 'final_hyperparams': final,
          'test_accuracy': test_acc, 'wall_s': wall, 'losses': losses,
          'learning_rate': lr, 'momentum': mu}


if __name__ == '__main__':
  main(sys.argv[1:])
