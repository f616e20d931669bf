"""Char-level LSTM on Tiny Shakespeare with YellowFin; samples text at the end.

A Flax linen LSTM (embedding -> ``OptimizedLSTMCell`` -> dense) learns to
predict the next character of Tiny Shakespeare (the corpus the YellowFin
TensorFlow reference ships) with ``yellowfin_optax.yellowfin()`` at its
defaults. The jitted step returns ``yellowfin_optax.hyperparams(state)``; the
progress bar shows the tuned learning rate and momentum. The last 10% of the
text is held out for a validation loss. At the end it samples text from the
trained model.

The data is read from ``../shared/data/tinyshakespeare/input.txt`` relative to
the repository root (or ``--data``); nothing is downloaded.

Run::

  python examples/char_lstm.py --steps 500 --out results
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
from tqdm import tqdm

import yellowfin_optax
from yellowfin_optax import plotting

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
  parser.add_argument('--out', default='results')
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
  tx = yellowfin_optax.yellowfin()
  opt_state = tx.init(params)

  def loss_fn(p, batch):
    logits = model.apply({'params': p}, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[:, 1:]).mean()

  @jax.jit
  def train_step(p, s, batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss, (
        yellowfin_optax.hyperparams(s))

  eval_loss = jax.jit(loss_fn)
  rng = np.random.default_rng(args.seed)

  def batch_from(source, n):
    starts = rng.integers(0, len(source) - args.seq_len - 1, n)
    return np.stack([source[s:s + args.seq_len + 1] for s in starts])

  start = time.perf_counter()
  losses, history = [], []
  bar = tqdm(range(args.steps), desc='char lstm', mininterval=0.5)
  for i in bar:
    params, opt_state, loss, hp = train_step(
        params, opt_state, batch_from(train_data, args.batch_size))
    losses.append(loss)
    history.append(hp)
    if i % 50 == 0 or i == args.steps - 1:  # display only: one sync / 50 steps
      bar.set_postfix(loss=f'{float(loss):.3f}',
                      lr=f"{float(hp['learning_rate']):.3g}",
                      mom=f"{float(hp['momentum']):.3f}")
  losses = np.asarray(jax.device_get(jnp.stack(losses)), np.float64)
  history = jax.device_get(jax.tree.map(lambda *v: jnp.stack(v), *history))
  valid_loss = float(np.mean([
      eval_loss(params, batch_from(valid_data, 64)) for _ in range(4)]))
  wall = time.perf_counter() - start
  final = {k: float(v[-1]) for k, v in history.items()}

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

  os.makedirs(args.out, exist_ok=True)
  png = os.path.join(args.out, 'char_lstm.png')
  plotting.plot_training(history, losses, labels=['YellowFin (LSTM)'],
                         path=png, smoothing_window=25,
                         title='char-level LSTM, Tiny Shakespeare')
  summary = {'config': vars(args), 'final_hyperparams': final,
             'valid_loss': valid_loss, 'wall_time_s': wall,
             'losses': losses.tolist(), 'sample': text_out}
  with open(os.path.join(args.out, 'char_lstm.json'), 'w') as f:
    json.dump(summary, f)
  print(f'wrote {png}')
  return summary


if __name__ == '__main__':
  main(sys.argv[1:])
