"""Flax linen + ``TrainState``: a 1-d CNN on MNIST-1D trained with YellowFin.

``flax.training.train_state.TrainState`` keeps the optimizer state in
``state.opt_state``; ``yellowfin_optax.hyperparams(state.opt_state)`` reads
the tuned learning rate and momentum from it, inside the jitted step.
MNIST-1D is generated locally (``mnist1d.data.make_dataset``; nothing is
downloaded).

Run::

  python examples/linen_train_state.py --steps 500 --out results
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

import yellowfin_optax
from yellowfin_optax import plotting


class CNN1D(nn.Module):
  """Two 1-d convolutions and a dense head for length-40 signals."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x[..., None]
    x = nn.relu(nn.Conv(16, (5,))(x))
    x = nn.relu(nn.Conv(32, (5,), strides=(2,))(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def load_mnist1d(num_samples: int, seed: int):
  """MNIST-1D, generated locally (the package's defaults, fewer samples)."""
  import mnist1d.data  # pylint: disable=g-import-not-at-top

  config = mnist1d.data.get_dataset_args()
  config.num_samples = num_samples
  config.seed = seed
  data = mnist1d.data.make_dataset(config)
  f32 = lambda a: np.asarray(a, np.float32)
  i32 = lambda a: np.asarray(a, np.int32)
  return f32(data['x']), i32(data['y']), f32(data['x_test']), i32(
      data['y_test'])


@jax.jit
def train_step(state: train_state.TrainState, x, y):
  def loss_fn(params):
    logits = state.apply_fn({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state = state.apply_gradients(grads=grads)
  return state, loss, yellowfin_optax.hyperparams(state.opt_state)


@jax.jit
def accuracy(state: train_state.TrainState, x, y):
  logits = state.apply_fn({'params': state.params}, x)
  return jnp.mean(jnp.argmax(logits, -1) == y)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--num-samples', type=int, default=5000,
                      help='MNIST-1D samples to generate (80%% train)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='results')
  args = parser.parse_args(argv)

  x_train, y_train, x_test, y_test = load_mnist1d(args.num_samples, args.seed)
  model = CNN1D()
  state = train_state.TrainState.create(
      apply_fn=model.apply,
      params=jax.jit(model.init)(jax.random.key(args.seed),
                                x_train[:1])['params'],
      tx=yellowfin_optax.yellowfin(),
  )

  rng = np.random.default_rng(args.seed)
  start = time.perf_counter()
  losses, history = [], []
  for _ in tqdm(range(args.steps), desc='linen TrainState', mininterval=0.5):
    idx = rng.integers(0, len(x_train), args.batch_size)
    state, loss, hp = train_step(state, x_train[idx], y_train[idx])
    losses.append(loss)
    history.append(hp)
  losses = np.asarray(jax.device_get(jnp.stack(losses)), np.float64)
  history = jax.device_get(jax.tree.map(lambda *v: jnp.stack(v), *history))
  test_acc = float(accuracy(state, x_test, y_test))
  wall = time.perf_counter() - start
  final = {k: float(v[-1]) for k, v in history.items()}

  print(f"{'steps':>6}{'train loss':>12}{'test acc':>10}{'lr':>10}"
        f"{'momentum':>10}{'wall s':>8}")
  print(f'{args.steps:>6}{np.mean(losses[-50:]):>12.4f}{test_acc:>10.3f}'
        f"{final['learning_rate']:>10.3g}{final['momentum']:>10.3f}"
        f'{wall:>8.1f}')

  os.makedirs(args.out, exist_ok=True)
  png = os.path.join(args.out, 'linen_train_state.png')
  plotting.plot_training(history, losses, labels=['YellowFin (linen)'],
                         path=png, title='linen TrainState, MNIST-1D 1-d CNN')
  summary = {'config': vars(args), 'final_hyperparams': final,
             'test_accuracy': test_acc, 'wall_time_s': wall,
             'losses': losses.tolist()}
  with open(os.path.join(args.out, 'linen_train_state.json'), 'w') as f:
    json.dump(summary, f)
  print(f'wrote {png}')
  return summary


if __name__ == '__main__':
  main(sys.argv[1:])
