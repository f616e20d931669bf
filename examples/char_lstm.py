"""Char-level LSTM on Tiny Shakespeare with YellowFin; samples text at the end.

A Flax linen LSTM (embedding -> ``OptimizedLSTMCell`` -> dense) learns to
predict the next character of Tiny Shakespeare (the corpus the YellowFin
TensorFlow reference ships) with
``yellowfin_optax.yellowfin_auto(total_steps=steps)``, untuned (its update
takes the minibatch loss: ``value=loss``). The jitted step returns the tuned
learning rate and momentum from ``yellowfin_optax.hyperparams(state)``; the
progress bar shows them. The last 10% of the text is held out for a
validation loss. At the end it samples text from the trained model.

The data is read from ``../shared/data/tinyshakespeare/input.txt`` relative to
the repository root (or ``--data``); nothing is downloaded.

Run::

  python examples/char_lstm.py --steps 500 --out char_lstm.png
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import plotting  # examples/plotting.py, next to this file
import yellowfin_optax

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO_ROOT, '..', 'shared', 'data',
                            'tinyshakespeare', 'input.txt')


class CharLSTM(nn.Module):
  """Embedding, one LSTM layer, and a linear read-out over the vocabulary."""

  vocab_size: int
  hidden: int = 128

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab_size, 32)(tokens)
    x = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(x)
    return nn.Dense(self.vocab_size)(x)


def load_text(path: str) -> str:
  path = os.path.normpath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'Tiny Shakespeare not found at {path}. This example reads the copy '
        'under ../shared/data/tinyshakespeare/input.txt (relative to the '
        'repository root); pass --data PATH to use another copy of '
        'input.txt. It never downloads anything.')
  with open(path, encoding='utf-8') as f:
    return f.read()


def sample(model, params, prompt_ids, steps, seq_len, key, temperature=0.8):
  """Samples ``steps`` characters, conditioning on a sliding window."""

  @jax.jit
  def next_logits(window):
    return model.apply({'params': params}, window[None])[0, -1]

  ids = list(prompt_ids)
  for _ in range(steps):
    window = ids[-seq_len:]
    window = [window[0]] * (seq_len - len(window)) + window  # left pad
    key, sub = jax.random.split(key)
    logits = next_logits(jnp.asarray(window, jnp.int32))
    ids.append(int(jax.random.categorical(sub, logits / temperature)))
  return ids


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=500)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--seq-len', type=int, default=64)
  parser.add_argument('--hidden', type=int, default=128)
  parser.add_argument('--sample-chars', type=int, default=300)
  parser.add_argument('--data', default=DEFAULT_DATA)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='char_lstm.png', help='figure path')
  args = parser.parse_args(argv)

  text = load_text(args.data)
  chars = sorted(set(text))
  to_id = {c: i for i, c in enumerate(chars)}
  data = np.asarray([to_id[c] for c in text], np.int32)
  split = int(0.9 * len(data))
  train_data, valid_data = data[:split], data[split:]

  model = CharLSTM(len(chars), args.hidden)
  init_tokens = jnp.zeros((1, args.seq_len), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(args.seed),
                               init_tokens)['params']
  tx = yellowfin_optax.yellowfin_auto(total_steps=args.steps)
  opt_state = tx.init(params)

  def loss_fn(p, batch):
    logits = model.apply({'params': p}, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[:, 1:]).mean()

  @jax.jit
  def train_step(p, s, batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, s = tx.update(grads, s, p, value=loss)
    hp = yellowfin_optax.hyperparams(s)
    return (optax.apply_updates(p, updates), s, loss, hp['learning_rate'],
            hp['momentum'])

  eval_loss = jax.jit(loss_fn)
  rng = np.random.default_rng(args.seed)

  def batch_from(source, n):
    starts = rng.integers(0, len(source) - args.seq_len - 1, n)
    return np.stack([source[s:s + args.seq_len + 1] for s in starts])

  start = time.perf_counter()
  history = []
  bar = tqdm(range(args.steps), desc='char lstm', mininterval=0.5)
  for i in bar:
    params, opt_state, loss, lr, mu = train_step(
        params, opt_state, batch_from(train_data, args.batch_size))
    history.append((loss, lr, mu))
    if i % 50 == 0 or i == args.steps - 1:  # display only: one sync / 50 steps
      bar.set_postfix(loss=f'{float(loss):.3f}', lr=f'{float(lr):.3g}',
                      mom=f'{float(mu):.3f}')
  losses, lr, mu = (np.asarray(v, np.float64) for v in jax.device_get(
      jax.tree.map(lambda *v: jnp.stack(v), *history)))
  valid_loss = float(np.mean([
      eval_loss(params, batch_from(valid_data, 64)) for _ in range(4)]))
  wall = time.perf_counter() - start
  final = {k: float(v) for k, v in
           yellowfin_optax.hyperparams(opt_state).items()}

  print(f"{'steps':>6}{'train loss':>12}{'valid loss':>12}{'lr':>10}"
        f"{'momentum':>10}{'wall s':>8}")
  print(f'{args.steps:>6}{np.mean(losses[-50:]):>12.4f}{valid_loss:>12.4f}'
        f"{final['learning_rate']:>10.3g}{final['momentum']:>10.3f}"
        f'{wall:>8.1f}')
  print('(losses in nats per character; uniform guessing is '
        f'{np.log(len(chars)):.2f})')

  prompt = 'ROMEO:\n'
  ids = sample(model, params, [to_id[c] for c in prompt], args.sample_chars,
               args.seq_len, jax.random.key(args.seed + 1))
  text_out = ''.join(chars[i] for i in ids)
  print('--- sample ---')
  print(text_out)
  print('--------------')

  plotting.plot_runs(
      {'yellowfin_auto (LSTM)': {'loss': losses, 'learning_rate': lr,
                                 'momentum': mu}},
      path=args.out, smoothing_window=25,
      title='char-level LSTM, Tiny Shakespeare')
  print(f'wrote {args.out}')
  return {'config': vars(args), 'final_hyperparams': final,
          'valid_loss': valid_loss, 'wall_s': wall, 'losses': losses,
          'learning_rate': lr, 'momentum': mu, 'sample': text_out}


if __name__ == '__main__':
  main(sys.argv[1:])
