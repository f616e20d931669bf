"""Untuned YellowFin vs a grid-tuned Adam on a small Flax CNN, sklearn digits.

The main job of the README. A small Flax (linen) CNN is trained on the 8x8
handwritten digits that ship inside scikit-learn (1,797 images, 80/20
train/test split) with three optimizers, from the same initial parameters on
the same sequence of mini-batches:

* ``yellowfin_optax.yellowfin_auto(total_steps=steps)``: the recommended
  optimizer, untuned (heavy-ball momentum along the RMS-preconditioned
  gradient, its curvature measured in loss units, so its ``update`` takes
  ``value=loss``; ``total_steps`` adds a cosine decay);
* ``yellowfin_optax.yellowfin()``: the authors' reference, untuned;
* ``optax.adam`` with its learning rate tuned for this run length: a small
  grid (``--adam-grid``, by default 1e-3 to 3e-2, whose best point is inside
  it at the default length) is trained and the learning rate with the lowest
  final smoothed training loss is reported, so the baseline is a *tuned*
  Adam (picked on the training loss of this very run: a setup that favours
  Adam).

Each optimizer's training step is jitted once (Adam's learning rate is an
argument of it, so the grid reuses one compilation) and returns
``yellowfin_optax.hyperparams(state)``'s learning rate and momentum with the
loss, with no host sync, for the figure.

Run::

  python examples/digits.py                       # 600 steps per optimizer
  python examples/digits.py --steps 200 --out /tmp/digits.png

Prints a table and writes the figure (loss of each optimizer; tuned learning
rate and momentum of the YellowFins) to ``--out``.
"""

from __future__ import annotations

import argparse
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

import plotting  # examples/plotting.py, next to this file
import yellowfin_optax

SMOOTHING = 50  # the final smoothed train loss is the mean of the last 50


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
  """The shuffled mini-batch sequence (epoch by epoch), ``[steps, batch]``."""
  rng = np.random.default_rng(seed)
  per_epoch = num_train // batch_size
  epochs = -(-steps // per_epoch)
  idx = [rng.permutation(num_train)[:per_epoch * batch_size].reshape(
      per_epoch, batch_size) for _ in range(epochs)]
  return np.concatenate(idx)[:steps]


def make_step(model, make_tx, log_hyperparams: bool):
  """The jitted training step, ``step(params, state, x, y, *tx_args)``.

  ``tx_args`` (Adam's learning rate) are traced arguments, so one compiled
  step serves the whole grid. (A Python loop over a jitted step, not a
  ``lax.scan``: on XLA:CPU this CNN's step runs several times slower inside a
  while loop, whose convolution gradients miss the fast layout.)
  """

  def loss_fn(p, x, y):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, state, x, y, *tx_args):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    # value=loss: yellowfin_auto needs it; the others ignore it.
    updates, state = make_tx(*tx_args).update(grads, state, p, value=loss)
    p = optax.apply_updates(p, updates)
    if log_hyperparams:  # no host sync: returned with the loss
      hp = yellowfin_optax.hyperparams(state)
      tuned = (hp['learning_rate'], hp['momentum'])
    else:
      tuned = (jnp.nan, jnp.nan)
    return p, state, loss, tuned

  return step


def train(step, tx, params, batches, x_train, y_train, tx_args, desc):
  """Runs ``step`` over the mini-batches; returns the final params and the
  per-step losses, learning rates and momenta (one transfer at the end)."""
  state = tx.init(params)
  history = []
  for idx in tqdm(batches, desc=desc, leave=False, mininterval=0.5):
    params, state, loss, (lr, mu) = step(params, state, x_train[idx],
                                         y_train[idx], *tx_args)
    history.append((loss, lr, mu))
  losses, lr, mu = jax.device_get(jax.tree.map(lambda *v: jnp.stack(v),
                                               *history))
  return params, losses, lr, mu


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=600,
                      help='training steps per optimizer')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--adam-grid', type=float, nargs='+',
                      default=[1e-3, 3e-3, 1e-2, 3e-2],
                      help="Adam's learning rates to try")
  parser.add_argument('--out', default='digits.png', help='figure path')
  args = parser.parse_args(argv)

  x_train, x_test, y_train, y_test = load_data(args.seed)
  model = CNN()
  params = jax.jit(model.init)(jax.random.key(args.seed),
                               x_train[:1])['params']
  batches = batch_indices(len(x_train), args.batch_size, args.steps,
                          args.seed)
  accuracy = jax.jit(lambda p, x, y: jnp.mean(
      jnp.argmax(model.apply({'params': p}, x), -1) == y))

  # name: (make_tx, its argument lists: one run each, log hyperparams)
  runs = {
      'yellowfin_auto': (
          lambda: yellowfin_optax.yellowfin_auto(total_steps=args.steps),
          [()], True),
      'yellowfin': (yellowfin_optax.yellowfin, [()], True),
      'adam': (optax.adam, [(jnp.float32(lr),) for lr in args.adam_grid],
               False),
  }
  results = {}
  for name, (make_tx, arg_lists, log_hp) in runs.items():
    step = make_step(model, make_tx, log_hp)  # compiled once per optimizer
    start = time.perf_counter()
    finals, outs = [], []
    for tx_args in arg_lists:
      desc = name + ''.join(f' {float(a):g}' for a in tx_args)
      out = train(step, make_tx(*tx_args), params, batches, x_train, y_train,
                  tx_args, desc)
      outs.append(out)
      finals.append(float(np.mean(out[1][-SMOOTHING:])))
    wall = time.perf_counter() - start
    # Adam: the grid point with the lowest final smoothed training loss.
    best = int(np.nanargmin(finals)) if len(finals) > 1 else 0
    p, losses, lr, mu = outs[best]
    result = {'wall_s': wall}
    if name == 'adam':
      result['grid'] = dict(zip(args.adam_grid, finals))
      result['picked_lr'] = args.adam_grid[best]
      lr, mu = np.full_like(losses, args.adam_grid[best]), None
    result.update(
        losses=np.asarray(losses, np.float64),
        final_loss=finals[best],
        test_accuracy=float(accuracy(p, x_test, y_test)),
        learning_rate=np.asarray(lr, np.float64),
        momentum=None if mu is None else np.asarray(mu, np.float64))
    results[name] = result

  label = lambda name: (
      f"adam (lr {results['adam']['picked_lr']:g}, tuned)" if name == 'adam'
      else f'{name} (untuned)')
  header = (f"{'optimizer':<26}{'train loss':>11}{'test acc':>10}"
            f"{'final lr':>10}{'final mom':>11}{'wall s':>8}")
  print(f'sklearn digits, small CNN, {args.steps} steps, batch '
        f'{args.batch_size}, seed {args.seed}')
  print(header)
  print('-' * len(header))
  for name, r in results.items():
    mom = '-' if r['momentum'] is None else f"{r['momentum'][-1]:.3f}"
    print(f"{label(name):<26}{r['final_loss']:>11.4f}"
          f"{r['test_accuracy']:>10.3f}{r['learning_rate'][-1]:>10.3g}"
          f"{mom:>11}{r['wall_s']:>8.1f}")
  grid_text = ', '.join(f'{lr:g}: {loss:.4f}'
                        for lr, loss in results['adam']['grid'].items())
  print(f'(train loss: mean of the last {SMOOTHING} steps; final lr and '
        'momentum: applied at the last step, where yellowfin_auto\'s cosine '
        'ends near 0; wall s includes compilation, for adam of the whole '
        f'grid, whose final losses are {grid_text})')
  if results['adam']['picked_lr'] in (min(args.adam_grid),
                                      max(args.adam_grid)):
    print('(the best Adam learning rate is at the edge of the grid: widen '
          '--adam-grid for a fair baseline)')

  plotting.plot_runs(
      {label(name): {'loss': r['losses']} if r['momentum'] is None else {
          'loss': r['losses'], 'learning_rate': r['learning_rate'],
          'momentum': r['momentum']} for name, r in results.items()},
      path=args.out, smoothing_window=SMOOTHING,
      title=f'sklearn digits CNN, {args.steps} steps: untuned YellowFin vs '
            'tuned Adam')
  print(f'wrote {args.out}')
  return {'config': vars(args), 'results': results}


if __name__ == '__main__':
  main(sys.argv[1:])
