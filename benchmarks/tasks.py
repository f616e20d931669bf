"""Benchmark tasks on real, offline data: models, data, losses and metrics.

Every task is a :class:`Task`: pure, jittable functions that close over the
whole (small) data set held as device arrays, so that a full training run is
one ``jax.lax.scan`` and can be ``vmap``-ed over seeds and grid points.

Tasks (sizes are chosen for a shared 2-core CPU; see benchmarks/README.md):

* ``ptb_lstm``: word-level LSTM language model on Penn Treebank. The PTB
  training split is not available offline: it trains on ``ptb/valid.txt`` and
  reports perplexity on ``ptb/test.txt``. The vocabulary is capped to the most
  frequent words of ``valid.txt`` (rest -> ``<unk>``), so perplexities are not
  comparable to the literature.
* ``shakespeare_lstm``: char-level LSTM on Tiny Shakespeare (first 90 % of
  the text to train, last 10 % to validate).
* ``mnist1d_cnn`` / ``mnist1d_resnet``: 1-D CNN and a small 1-D ResNet on
  MNIST-1D, generated locally with
  ``mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())``.
* ``digits_cnn``: a 2-D CNN on scikit-learn's 8x8 digits (80/20 split);
  ``digits_linear``: softmax regression on the same split (smoke test).

Language models are trained on random windows (truncated BPTT, the hidden
state starts at zero in every window) and evaluated on a fixed set of
consecutive windows of the held-out text.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

DATA_DIR = pathlib.Path(
    os.environ.get(
        'YF_BENCH_DATA',
        pathlib.Path(__file__).resolve().parent.parent.parent / 'shared' / 'data',
    )
)

Params = Any
Batch = Any


@dataclasses.dataclass(frozen=True)
class Task:
  """A benchmark task.

  Attributes:
    name: registry name.
    description: one line: data, model, sizes.
    init: ``key -> params``.
    loss: ``(params, batch) -> scalar`` mean training loss.
    sample: ``key -> batch``, a random training batch (jittable).
    evaluate: ``params -> dict`` of held-out metrics (jittable).
    metric: name of the headline held-out metric in ``evaluate``'s dict.
    higher_is_better: whether a larger ``metric`` is better.
    num_params: parameter count.
    batch_size: examples (sequences) per step.
  """

  name: str
  description: str
  init: Callable[[jax.Array], Params]
  loss: Callable[[Params, Batch], jax.Array]
  sample: Callable[[jax.Array], Batch]
  evaluate: Callable[[Params], dict[str, jax.Array]]
  metric: str
  higher_is_better: bool
  num_params: int
  batch_size: int


def _need(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    raise FileNotFoundError(
        f'Benchmark data {path} is missing. The benchmarks read the shared, '
        'offline data directory ../shared/data (set YF_BENCH_DATA to move it).'
    )
  return path


def _count(params: Params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------- models


class LSTMLM(nn.Module):
  """Embedding -> one LSTM layer -> linear decoder."""

  vocab: int
  embed: int
  hidden: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab, self.embed)(tokens)
    x = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(x)
    return nn.Dense(self.vocab)(x)


class CNN1D(nn.Module):
  """Two strided 1-D convolutions and a dense head (MNIST-1D)."""

  channels: int = 16
  classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x[..., None]
    x = nn.relu(nn.Conv(self.channels, (5,), strides=(2,))(x))
    x = nn.relu(nn.Conv(self.channels, (3,), strides=(2,))(x))
    x = x.reshape(x.shape[:-2] + (-1,))
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(self.classes)(x)


class ResBlock1D(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.Conv(self.channels, (3,))(nn.relu(nn.LayerNorm()(x)))
    y = nn.Conv(self.channels, (3,))(nn.relu(nn.LayerNorm()(y)))
    return x + y


class ResNet1D(nn.Module):
  """Stem conv, residual blocks (pre-activation, LayerNorm), pooled head."""

  channels: int = 16
  blocks: int = 2
  classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.channels, (5,), strides=(2,))(x[..., None])
    for _ in range(self.blocks):
      x = ResBlock1D(self.channels)(x)
    x = nn.relu(nn.LayerNorm()(x)).mean(axis=-2)
    return nn.Dense(self.classes)(x)


class Linear(nn.Module):
  """Softmax regression on flattened inputs (the smoke-test model)."""

  classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.classes)(x.reshape(x.shape[:-2] + (-1,)))


class CNN2D(nn.Module):
  """Two 3x3 convolutions and a dense head (8x8 digits)."""

  channels: int = 8
  classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x[..., None]
    x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
    x = nn.relu(nn.Conv(2 * self.channels, (3, 3), strides=(2, 2))(x))
    x = x.reshape(x.shape[:-3] + (-1,))
    return nn.Dense(self.classes)(x)


# ------------------------------------------------------------- task makers


def _lm_task(
    name: str, description: str, train: np.ndarray, held_out: np.ndarray,
    vocab: int, embed: int, hidden: int, seq_len: int, batch_size: int,
    eval_windows: int,
) -> Task:
  model = LSTMLM(vocab, embed, hidden)
  train = jnp.asarray(train, jnp.int32)
  n_eval = min(eval_windows, (len(held_out) - 1) // seq_len)
  ev = held_out[: n_eval * seq_len + 1]
  ev_x = jnp.asarray(ev[:-1].reshape(n_eval, seq_len), jnp.int32)
  ev_y = jnp.asarray(ev[1:].reshape(n_eval, seq_len), jnp.int32)

  def init(key):
    return model.init(key, jnp.zeros((1, seq_len), jnp.int32))

  def xent(params, x, y):
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def loss(params, batch):
    return xent(params, *batch)

  def sample(key):
    starts = jax.random.randint(key, (batch_size,), 0, len(train) - seq_len - 1)
    idx = starts[:, None] + jnp.arange(seq_len + 1)[None, :]
    win = train[idx]
    return win[:, :-1], win[:, 1:]

  def evaluate(params):
    nll = xent(params, ev_x, ev_y)
    return {'nll': nll, 'perplexity': jnp.exp(nll)}

  return Task(
      name, description + f'; {n_eval}x{seq_len} held-out tokens',
      init, loss, sample, evaluate, 'perplexity', False,
      _count(jax.eval_shape(init, jax.random.key(0))), batch_size)


def ptb_lstm(vocab_cap: int = 2000) -> Task:
  """Word-level PTB LSTM LM: trains on valid.txt, evaluates on test.txt."""
  read = lambda f: _need(DATA_DIR / 'ptb' / f).read_text().replace(
      '\n', ' <eos> ').split()
  train_words, test_words = read('valid.txt'), read('test.txt')
  common = [w for w, _ in collections.Counter(train_words).most_common()
            if w != '<unk>'][: vocab_cap - 1]
  index = {w: i + 1 for i, w in enumerate(common)}  # 0 is <unk>
  enc = lambda ws: np.array([index.get(w, 0) for w in ws], np.int32)
  return _lm_task(
      'ptb_lstm',
      f'PTB words, train valid.txt ({len(train_words)} tok) / eval test.txt, '
      f'vocab {vocab_cap}, LSTM emb 32 hid 64, seq 20, batch 16',
      enc(train_words), enc(test_words), vocab_cap, 32, 64, 20, 16, 64)


def shakespeare_lstm() -> Task:
  """Char-level Tiny Shakespeare LSTM."""
  text = _need(DATA_DIR / 'tinyshakespeare' / 'input.txt').read_text()
  chars = sorted(set(text))
  lookup = {c: i for i, c in enumerate(chars)}
  data = np.array([lookup[c] for c in text], np.int32)
  split = int(0.9 * len(data))
  return _lm_task(
      'shakespeare_lstm',
      f'Tiny Shakespeare chars (vocab {len(chars)}), 90/10 split, '
      'LSTM emb 16 hid 64, seq 32, batch 16',
      data[:split], data[split:], len(chars), 16, 64, 32, 16, 64)


def _classification_task(
    name: str, description: str, model: nn.Module, x: np.ndarray,
    y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, batch_size: int,
) -> Task:
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
  x_test = jnp.asarray(x_test, jnp.float32)
  y_test = jnp.asarray(y_test, jnp.int32)

  def init(key):
    return model.init(key, x[:1])

  def loss(params, batch):
    xb, yb = batch
    logits = model.apply(params, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def sample(key):
    idx = jax.random.randint(key, (batch_size,), 0, x.shape[0])
    return x[idx], y[idx]

  def evaluate(params):
    logits = model.apply(params, x_test)
    return {
        'nll': optax.softmax_cross_entropy_with_integer_labels(
            logits, y_test).mean(),
        'accuracy': (logits.argmax(-1) == y_test).mean(),
    }

  return Task(
      name, description + f', batch {batch_size}', init, loss, sample,
      evaluate, 'accuracy', True,
      _count(jax.eval_shape(init, jax.random.key(0))), batch_size)


_MNIST1D_CACHE: dict[str, np.ndarray] = {}


def _mnist1d() -> dict[str, np.ndarray]:
  if not _MNIST1D_CACHE:
    import mnist1d.data  # pylint: disable=g-import-not-at-top
    ds = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    _MNIST1D_CACHE.update({k: np.asarray(ds[k]) for k in
                           ('x', 'y', 'x_test', 'y_test')})
  return _MNIST1D_CACHE


def mnist1d_cnn() -> Task:
  d = _mnist1d()
  return _classification_task(
      'mnist1d_cnn', 'MNIST-1D (4000/1000, generated locally), 1-D CNN '
      '16-16 ch + dense 64', CNN1D(), d['x'], d['y'], d['x_test'],
      d['y_test'], 64)


def mnist1d_resnet() -> Task:
  d = _mnist1d()
  return _classification_task(
      'mnist1d_resnet', 'MNIST-1D (4000/1000, generated locally), 1-D '
      'ResNet 16 ch x 2 pre-act blocks, LayerNorm', ResNet1D(), d['x'],
      d['y'], d['x_test'], d['y_test'], 64)


def _digits() -> tuple[np.ndarray, ...]:
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  x = digits.images.astype(np.float32) / 16.0
  y = digits.target
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm], y[perm]
  split = int(0.8 * len(x))
  return x[:split], y[:split], x[split:], y[split:]


def digits_cnn() -> Task:
  x, y, x_test, y_test = _digits()
  return _classification_task(
      'digits_cnn', f'sklearn digits 8x8 ({len(x)}/{len(x_test)}), CNN '
      '8-16 ch', CNN2D(), x, y, x_test, y_test, 32)


def digits_linear() -> Task:
  """Softmax regression on digits: cheap to compile, for the smoke test."""
  x, y, x_test, y_test = _digits()
  return _classification_task(
      'digits_linear', f'sklearn digits 8x8 ({len(x)}/{len(x_test)}), '
      'softmax regression', Linear(), x, y, x_test, y_test, 32)


TASKS: dict[str, Callable[[], Task]] = {
    'digits_linear': digits_linear,
    'digits_cnn': digits_cnn,
    'mnist1d_cnn': mnist1d_cnn,
    'mnist1d_resnet': mnist1d_resnet,
    'shakespeare_lstm': shakespeare_lstm,
    'ptb_lstm': ptb_lstm,
}
