"""Untuned YellowFin vs Adam(1e-3) on a small Flax CNN, sklearn digits.

The main job of the README. A small Flax (linen) CNN is trained on the 8x8
handwritten digits that ship inside scikit-learn (1,797 images, 80/20
train/test split), once with ``yellowfin_optax.yellowfin()`` at its defaults
(no tuning at all) and once with ``optax.adam(1e-3)``: same model, same
initial parameters, same sequence of mini-batches. The jitted training step
returns ``yellowfin_optax.hyperparams(state)`` every step (no host sync inside
the optimizer), so the figure shows the learning rate and momentum the tuner
picked.

Run::

  python examples/digits.py            # ~1,500 steps per optimizer
  python examples/digits.py --steps 200 --out /tmp/digits

Writes ``<out>/digits.json`` and ``<out>/digits.png`` and prints a table.
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
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import yellowfin_optax
from yellowfin_optax import plotting


class CNN(nn.Module):
  """Two 3x3 convolutions and two dense layers, for 8x8 one-channel images."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def load_data(seed: int):
  """Digits as float32 ``[N, 8, 8, 1]`` in [0, 1], split 80/20 (stratified)."""
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)


def batch_indices(num_train: int, batch_size: int, steps: int, seed: int):
  """The same shuffled mini-batch sequence (epoch by epoch) for every run."""
  rng = np.random.default_rng(seed)
  per_epoch = num_train // batch_size
  epochs = -(-steps // per_epoch)
  idx = [
      rng.permutation(num_train)[: per_epoch * batch_size].reshape(
          per_epoch, batch_size)
      for _ in range(epochs)
  ]
  return np.concatenate(idx)[:steps]


def train(name, tx, params, x_train, y_train, x_test, y_test, batches, model,
          log_hyperparams: bool):
  """Trains with ``tx``; returns losses, hyperparams history, metrics."""

  def loss_fn(p, x, y):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, opt_state = tx.update(grads, opt_state, p)
    p = optax.apply_updates(p, updates)
    hp = yellowfin_optax.hyperparams(opt_state) if log_hyperparams else {}
    return p, opt_state, loss, hp

  @jax.jit
  def accuracy(p, x, y):
    return jnp.mean(jnp.argmax(model.apply({'params': p}, x), -1) == y)

  start = time.perf_counter()
  opt_state = tx.init(params)
  losses, history = [], []
  compile_time = 0.0
  for i, idx in enumerate(tqdm(batches, desc=name, leave=False,
                               mininterval=0.5)):
    params, opt_state, loss, hp = step(params, opt_state, x_train[idx],
                                       y_train[idx])
    if i == 0:  # the first call compiles; time it apart from the loop
      jax.block_until_ready(loss)
      compile_time = time.perf_counter() - start
    losses.append(loss)
    history.append(hp)
  # One transfer at the end: the loop above never waits for the device.
  losses = np.asarray(jax.device_get(jnp.stack(losses)), np.float64)
  if log_hyperparams:  # Stack on the device: one transfer per field.
    history = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history))
  test_acc = float(accuracy(params, x_test, y_test))
  train_loss = float(np.mean(losses[-50:]))
  wall = time.perf_counter() - start
  result = {
      'final_train_loss': train_loss,
      'test_accuracy': test_acc,
      'wall_time_s': wall,
      'first_step_s': compile_time,
      'losses': losses.tolist(),
  }
  if log_hyperparams:
    stacked = plotting.stack_history(history)
    result['final_learning_rate'] = float(stacked['learning_rate'][-1])
    result['final_momentum'] = float(stacked['momentum'][-1])
    result['history'] = {k: v.tolist() for k, v in stacked.items()}
  return result


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=1500,
                      help='training steps per optimizer')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='results', help='output directory')
  args = parser.parse_args(argv)

  x_train, x_test, y_train, y_test = load_data(args.seed)
  model = CNN()
  # jit: one compilation instead of one per initialiser op.
  params = jax.jit(model.init)(jax.random.key(args.seed),
                               x_train[:1])['params']
  batches = batch_indices(len(x_train), args.batch_size, args.steps, args.seed)

  runs = {
      'YellowFin (untuned)': (yellowfin_optax.yellowfin(), True),
      'Adam(1e-3)': (optax.adam(1e-3), False),
  }
  results = {}
  for name, (tx, log_hp) in runs.items():
    results[name] = train(name, tx, params, x_train, y_train, x_test, y_test,
                          batches, model, log_hp)

  header = (f"{'optimizer':<22}{'train loss':>12}{'test acc':>10}"
            f"{'final lr':>11}{'final mom':>11}{'wall s':>8}"
            f"{'1st step s':>11}")
  print(f'sklearn digits, small CNN, {args.steps} steps, batch '
        f'{args.batch_size}, seed {args.seed}')
  print(header)
  print('-' * len(header))
  for name, r in results.items():
    lr = f"{r['final_learning_rate']:.3g}" if 'final_learning_rate' in r else '-'
    mom = f"{r['final_momentum']:.3f}" if 'final_momentum' in r else '-'
    print(f"{name:<22}{r['final_train_loss']:>12.4f}"
          f"{r['test_accuracy']:>10.3f}{lr:>11}{mom:>11}"
          f"{r['wall_time_s']:>8.1f}{r['first_step_s']:>11.1f}")
  print('(train loss: mean of the last 50 steps; wall time includes the '
        'first step, which compiles)')

  os.makedirs(args.out, exist_ok=True)
  yf_name = 'YellowFin (untuned)'
  png = os.path.join(args.out, 'digits.png')
  plotting.plot_training(
      {yf_name: results[yf_name]['history']},
      {name: r['losses'] for name, r in results.items()},
      path=png,
      smoothing_window=50,
      title=f'sklearn digits CNN: untuned YellowFin vs Adam(1e-3), '
            f'{args.steps} steps',
  )
  summary = {
      'config': vars(args),
      'jax_version': jax.__version__,
      'backend': jax.default_backend(),
      'results': results,
  }
  with open(os.path.join(args.out, 'digits.json'), 'w') as f:
    json.dump(summary, f)
  print(f'wrote {png} and {os.path.join(args.out, "digits.json")}')
  return summary


if __name__ == '__main__':
  main(sys.argv[1:])
