"""Flax linen + ``TrainState``: a 1-d CNN on MNIST-1D trained with YellowFin.

``flax.training.train_state.TrainState`` keeps the optimizer state in
``state.opt_state``; ``yellowfin_optax.hyperparams(state.opt_state)`` reads
the tuned learning rate and momentum from it, inside the jitted step.

``yellowfin_auto`` needs the loss: ``tx.update(grads, opt_state, params,
value=loss)``. Flax's ``TrainState.apply_gradients(grads=..., **kwargs)``
does *not* forward keyword arguments to ``tx.update`` (it ``.replace()``-s
them as dataclass fields, so ``value=loss`` would fail), hence the small
subclass below whose ``apply_gradients(grads=grads, value=loss)`` calls
``tx.update`` itself.

MNIST-1D is generated locally (``mnist1d.data.make_dataset``; nothing is
downloaded).

Run::

  python examples/linen_train_state.py --steps 500 --out linen_train_state.png
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
from flax.training import train_state
from tqdm import tqdm

import plotting  # examples/plotting.py, next to this file
import yellowfin_optax


class TrainState(train_state.TrainState):
  """A ``TrainState`` whose ``apply_gradients`` passes the loss on to
  ``tx.update`` (as ``value=``, the keyword ``yellowfin_auto`` reads)."""

  def apply_gradients(self, *, grads, value, **kwargs):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        value=value)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)


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
def train_step(state: TrainState, x, y):
  def loss_fn(params):
    logits = state.apply_fn({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state = state.apply_gradients(grads=grads, value=loss)
  hp = yellowfin_optax.hyperparams(state.opt_state)
  return state, loss, hp['learning_rate'], hp['momentum']


@jax.jit
def accuracy(state: TrainState, x, y):
  logits = state.apply_fn({'params': state.params}, x)
  return jnp.mean(jnp.argmax(logits, -1) == y)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--num-samples', type=int, default=5000,
                      help='MNIST-1D samples to generate (80%% train)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='linen_train_state.png',
                      help='figure path')
  args = parser.parse_args(argv)

  x_train, y_train, x_test, y_test = load_mnist1d(args.num_samples, args.seed)
  model = CNN1D()
  state = TrainState.create(
      apply_fn=model.apply,
      params=jax.jit(model.init)(jax.random.key(args.seed),
                                x_train[:1])['params'],
      tx=yellowfin_optax.yellowfin_auto(total_steps=args.steps),
  )

  rng = np.random.default_rng(args.seed)
  start = time.perf_counter()
  history = []
  for _ in tqdm(range(args.steps), desc='linen TrainState', mininterval=0.5):
    idx = rng.integers(0, len(x_train), args.batch_size)
    state, *logged = train_step(state, x_train[idx], y_train[idx])
    history.append(logged)
  # One transfer at the end: the loop never waited for the device.
  losses, lr, mu = (np.asarray(v, np.float64) for v in jax.device_get(
      jax.tree.map(lambda *v: jnp.stack(v), *history)))
  test_acc = float(accuracy(state, x_test, y_test))
  wall = time.perf_counter() - start
  final = {k: float(v) for k, v in
           yellowfin_optax.hyperparams(state.opt_state).items()}

  print(f"{'steps':>6}{'train loss':>12}{'test acc':>10}{'lr':>10}"
        f"{'momentum':>10}{'wall s':>8}")
  print(f'{args.steps:>6}{np.mean(losses[-50:]):>12.4f}{test_acc:>10.3f}'
        f"{final['learning_rate']:>10.3g}{final['momentum']:>10.3f}"
        f'{wall:>8.1f}')

  plotting.plot_runs(
      {'yellowfin_auto (linen)': {'loss': losses, 'learning_rate': lr,
                                  'momentum': mu}},
      path=args.out, title='linen TrainState, MNIST-1D 1-d CNN')
  print(f'wrote {args.out}')
  return {'config': vars(args), 'final_hyperparams': final,
          'test_accuracy': test_acc, 'wall_s': wall, 'losses': losses,
          'learning_rate': lr, 'momentum': mu}


if __name__ == '__main__':
  main(sys.argv[1:])
