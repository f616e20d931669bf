r"""Asynchronous training: open-loop vs closed-loop YellowFin vs Adam.

Reproduces, at the scale of a shared 2-core CPU, the experiment of Section 4
of Zhang & Mitliagkas, "YellowFin and the Art of Momentum Tuning" (SysML 2018,
https://arxiv.org/abs/1706.03471): 16 round-robin asynchronous workers, i.e.
every gradient is applied ``staleness = 15`` steps after it was computed
(simulated with :func:`yellowfin_optax.delayed_gradients`). Compared, on the
same seeds, initialisations and batches:

* ``yf_open``: open-loop YellowFin on the stale gradients, run as
  ``closed_loop_yellowfin(staleness=15, gain=0.0)`` so that the total momentum
  is measured too (``gain=0`` applies exactly the tuner's momentum);
* ``yf_closed``: closed-loop YellowFin,
  ``closed_loop_yellowfin(staleness=15, gain=0.01)``;
* ``yf_closed_ls``: the same loop with the least-squares estimator of the
  total momentum (``estimator='least_squares'``: a fit over all coordinates
  instead of the paper's median);
* ``adam``: ``delayed_gradients(15, optax.adam(lr))``, ``lr`` grid-tuned in the
  *synchronous* setting (staleness 0), as the paper does;
* ``yf_sync``: synchronous YellowFin (staleness 0), the reference asynchrony
  is paid against.

Tasks: a noisy quadratic (``f(x) = 0.5 sum_i h_i x_i^2``, ``h_i`` log-uniform
in ``[1, 10]``, ``x_0 = 3``, gradient noise ``N(0, sigma^2)``; ``n = 1`` by
default, and a sweep over ``n``) and a small 1-D CNN on MNIST-1D (generated
locally with ``mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())``).

Protocol (paper Section 3): the per-step training loss is smoothed with a
uniform window; "iterations to open-loop YF's best" counts the steps until a
run's smoothed loss first reaches the lowest smoothed loss open-loop YF
reaches (same seed); a speedup of A over B is the ratio of iterations to reach
the lowest smoothed loss that both reach.

Usage::

  python -m benchmarks.async_closed_loop --quick   # smoke run, ~2-4 minutes
  python -m benchmarks.async_closed_loop           # full run (3 seeds)

Outputs under ``--out`` (default ``results/async_closed_loop/``):
``results.json``, ``results.md`` (the tables printed), ``momentum.png``
(Figure 3 of the paper: measured total momentum, target and algorithmic
momentum, open vs closed loop) and, with ``--docs``, a copy of the figure at
``docs/async_closed_loop.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import yellowfin_optax as yf
from benchmarks._analysis import iterations_to, smooth, speedup

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHODS = ('yf_open', 'yf_closed', 'yf_closed_ls', 'adam', 'yf_sync')
LABELS = {
    'yf_open': 'open-loop YF',
    'yf_closed': 'closed-loop YF',
    'yf_closed_ls': 'closed-loop YF, least-squares estimate',
    'adam': 'Adam (sync-tuned lr)',
    'yf_sync': 'YF, synchronous',
}
# Logged every step for the YellowFin runs: log name -> hyperparams() key
# (``momentum`` is the algorithmic momentum the closed loop applies).
MOMENTUM_LOG = {'total_momentum': 'total_momentum',
                'target_momentum': 'target_momentum',
                'algorithmic_momentum': 'momentum',
                'learning_rate': 'learning_rate'}


# ----------------------------------------------------------------- problems


@dataclasses.dataclass(frozen=True)
class Problem:
  """A training problem whose whole run is one ``lax.scan``.

  Attributes:
    name: short name.
    description: one line: data, model, sizes.
    init: ``key -> params``.
    loss: ``(params, batch) -> scalar`` training (minibatch) loss.
    sample: ``key -> batch``: a random minibatch, or gradient noise.
    grad: ``(params, batch) -> (loss, gradient)``.
    evaluate: ``params -> dict`` of held-out metrics.
  """

  name: str
  description: str
  init: Callable[[jax.Array], Any]
  sample: Callable[[jax.Array], Any]
  grad: Callable[[Any, Any], tuple[jax.Array, Any]]
  evaluate: Callable[[Any], dict[str, jax.Array]]


def noisy_quadratic(dim: int = 1, noise: float = 0.01,
                    seed: int = 0) -> Problem:
  """``f(x) = 0.5 sum h_i x_i^2``, ``h_i`` log-uniform in [1, 10], x0 = 3.

  The stochastic gradient is ``h * x + noise * N(0, I)``; the logged loss is
  the exact ``f(x)``. The curvatures are fixed by ``seed`` (not the run seed),
  so every run seed solves the same problem with different noise.
  """
  h = jnp.asarray(np.exp(np.random.default_rng(seed).uniform(
      0.0, np.log(10.0), dim)), jnp.float32)

  def grad(x, eps):
    return 0.5 * jnp.sum(h * x * x), h * x + noise * eps

  return Problem(
      name=f'quadratic_n{dim}',
      description=(f'noisy quadratic, n={dim}, h log-uniform in [1, 10], '
                   f'x0=3, gradient noise sigma={noise}'),
      init=lambda key: jnp.full([dim], 3.0, jnp.float32),
      sample=lambda key: jax.random.normal(key, [dim]),
      grad=grad,
      evaluate=lambda x: {'loss': 0.5 * jnp.sum(h * x * x)},
  )


def _conv(x, w, b, stride):
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(stride,), padding='SAME',
      dimension_numbers=('NWC', 'WIO', 'NWC')) + b


def mnist1d_cnn(batch_size: int = 32, channels: int = 16,
                hidden: int = 32, activation: str = 'relu') -> Problem:
  """A small 1-D CNN on MNIST-1D (4000 train / 1000 test), pure JAX.

  conv(5, ``channels``, stride 2) -> conv(5, ``channels``, stride 2) ->
  dense ``hidden`` -> dense 10, He initialisation; ``activation`` is
  ``'relu'`` or ``'tanh'``.
  """
  act = {'relu': jax.nn.relu, 'tanh': jnp.tanh}[activation]
  import mnist1d  # pylint: disable=g-import-not-at-top

  data = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
  x_train = jnp.asarray(data['x'], jnp.float32)[..., None]
  y_train = jnp.asarray(data['y'], jnp.int32)
  x_test = jnp.asarray(data['x_test'], jnp.float32)[..., None]
  y_test = jnp.asarray(data['y_test'], jnp.int32)
  length = x_train.shape[1]
  flat = ((length + 3) // 4) * channels

  def init(key):
    k = jax.random.split(key, 4)
    he = lambda key, shape, fan_in: (
        jax.random.normal(key, shape) * np.sqrt(2.0 / fan_in))
    return {
        'conv1': {'w': he(k[0], (5, 1, channels), 5),
                  'b': jnp.zeros([channels])},
        'conv2': {'w': he(k[1], (5, channels, channels), 5 * channels),
                  'b': jnp.zeros([channels])},
        'dense1': {'w': he(k[2], (flat, hidden), flat),
                   'b': jnp.zeros([hidden])},
        'dense2': {'w': he(k[3], (hidden, 10), hidden) / 4,
                   'b': jnp.zeros([10])},
    }

  def logits(p, x):
    x = act(_conv(x, p['conv1']['w'], p['conv1']['b'], 2))
    x = act(_conv(x, p['conv2']['w'], p['conv2']['b'], 2))
    x = act(x.reshape(x.shape[0], -1) @ p['dense1']['w'] + p['dense1']['b'])
    return x @ p['dense2']['w'] + p['dense2']['b']

  def loss(p, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        logits(p, x), y).mean()

  def sample(key):
    idx = jax.random.randint(key, [batch_size], 0, x_train.shape[0])
    return x_train[idx], y_train[idx]

  def evaluate(p):
    out = logits(p, x_test)
    return {
        'test_accuracy': jnp.mean(jnp.argmax(out, -1) == y_test),
        'test_loss': optax.softmax_cross_entropy_with_integer_labels(
            out, y_test).mean(),
        'train_loss': loss(p, (x_train, y_train)),
    }

  n_params = sum(int(np.prod(v.shape)) for v in
                 jax.tree.leaves(jax.eval_shape(init, jax.random.key(0))))
  return Problem(
      name='mnist1d_cnn',
      description=(f'MNIST-1D (4000 train / 1000 test), 1-D CNN '
                   f'{channels}-{channels} ch + dense {hidden}, {activation}, '
                   f'{n_params} params, batch {batch_size}'),
      init=init, sample=sample, grad=jax.value_and_grad(loss),
      evaluate=evaluate,
  )


# ------------------------------------------------------------------ running


def make_optimizer(family: str, staleness: int, hyper: jax.Array
                   ) -> optax.GradientTransformation:
  """``family`` 'yf' / 'yf_ls': ``hyper`` is the loop gain; 'adam': the lr."""
  if family == 'yf':
    return yf.closed_loop_yellowfin(staleness=staleness, gain=hyper)
  if family == 'yf_ls':
    return yf.closed_loop_yellowfin(staleness=staleness, gain=hyper,
                                    estimator='least_squares')
  if family == 'adam':
    return yf.delayed_gradients(staleness, optax.adam(hyper))
  raise ValueError(f'unknown optimizer family {family!r}')


def make_runner(problem: Problem, family: str, staleness: int, steps: int
                ) -> Callable[[float, int], tuple[dict, dict]]:
  """Returns ``run(hyper, seed) -> (per-step logs, final metrics)`` (numpy).

  One compilation per (problem, family, staleness): the gain / learning rate
  and the seed are traced, so grids and seeds reuse it. The seed fixes the
  initialisation and the batch (noise) sequence: for a given seed every
  optimizer sees the same data.
  """

  def run(hyper, seed):
    k_init, k_data = jax.random.split(jax.random.key(seed))
    params = problem.init(k_init)
    tx = make_optimizer(family, staleness, hyper)

    def body(carry, key):
      params, state = carry
      loss, grads = problem.grad(params, problem.sample(key))
      updates, state = tx.update(grads, state, params, value=loss)
      logs = {'loss': loss}
      if family.startswith('yf'):
        hp = yf.hyperparams(state)
        logs.update({k: hp[key] for k, key in MOMENTUM_LOG.items()})
      return (optax.apply_updates(params, updates), state), logs

    (params, _), logs = jax.lax.scan(
        body, (params, tx.init(params)), jax.random.split(k_data, steps))
    return logs, problem.evaluate(params)

  compiled = jax.jit(run)

  def call(hyper: float, seed: int):
    logs, metrics = compiled(jnp.float32(hyper), jnp.int32(seed))
    return ({k: np.asarray(v, np.float64) for k, v in logs.items()},
            {k: float(v) for k, v in metrics.items()})

  return call


# ----------------------------------------------------------------- analysis


def geomean(values) -> float:
  v = np.asarray([x for x in values if np.isfinite(x) and x > 0], np.float64)
  return float(np.exp(np.mean(np.log(v)))) if v.size else float('nan')


def _fmt_spread(values, fmt='{:.2f}') -> str:
  v = [x for x in values if not np.isnan(x)]
  if not v:
    return 'n/a'
  med = fmt.format(float(np.median(v)))
  if len(v) == 1:
    return med
  return f'{med} [{fmt.format(min(v))}, {fmt.format(max(v))}]'


def analyse(runs: dict[str, list[tuple[dict, dict]]], window: int
            ) -> dict[str, dict[str, Any]]:
  """Per-method summaries against open loop (paper protocol), per seed."""
  seeds = len(runs['yf_open'])
  out = {}
  for method, seed_runs in runs.items():
    best, final, iters, vs_closed, vs_open = [], [], [], [], []
    for s in range(seeds):
      loss = seed_runs[s][0]['loss']
      sm = smooth(loss, window)
      open_best = smooth(runs['yf_open'][s][0]['loss'], window).min()
      best.append(float(sm.min()))
      final.append(float(sm[-1]))
      iters.append(iterations_to(sm, open_best, window))
      vs_closed.append(speedup(runs['yf_closed'][s][0]['loss'], loss, window))
      vs_open.append(speedup(loss, runs['yf_open'][s][0]['loss'], window))
    metrics = {k: [r[1][k] for r in seed_runs] for k in seed_runs[0][1]}
    entry = {
        'best_smoothed_loss': best,
        'final_smoothed_loss': final,
        'iterations_to_open_loop_best': iters,
        'closed_loop_speedup_over_this': vs_closed,
        'speedup_over_open_loop': vs_open,
        'metrics': metrics,
    }
    if method.startswith('yf'):
      tail = slice(-max(1, len(seed_runs[0][0]['loss']) // 10), None)
      for k in ('total_momentum', 'target_momentum', 'algorithmic_momentum'):
        entry[f'{k}_last10pct'] = [float(np.mean(r[0][k][tail]))
                                   for r in seed_runs]
    out[method] = entry
  return out


def table(problem: Problem, summary: dict[str, dict[str, Any]],
          lrs: dict[str, float], steps: int, window: int) -> str:
  """Markdown table for one problem."""
  lines = [
      f'### {problem.name}: {problem.description}',
      '',
      f'{steps} steps, smoothing window {window}; per-seed values as median '
      '[min, max]; "inf" = never reached.',
      '',
      '| method | best / final smoothed loss | iters to open-loop YF best | '
      'closed-loop speedup over it | speedup over open loop | '
      'total / target / algorithmic momentum (last 10%) | held-out |',
      '|---|---|---|---|---|---|---|',
  ]
  for method in METHODS:
    if method not in summary:
      continue
    e = summary[method]
    label = LABELS[method]
    if method == 'adam':
      label += f', lr={lrs["adam"]:.0e}'
    if 'total_momentum_last10pct' in e:
      mom = ' / '.join(
          f'{np.median(e[k + "_last10pct"]):.3f}'
          for k in ('total_momentum', 'target_momentum',
                    'algorithmic_momentum'))
    else:
      mom = '-'
    held = ', '.join(f'{k} {np.median(v):.3g}'
                     for k, v in e['metrics'].items())
    closed = ('-' if method == 'yf_closed' else
              _fmt_spread(e['closed_loop_speedup_over_this']) +
              f' (geo {geomean(e["closed_loop_speedup_over_this"]):.2f})')
    lines.append(
        f'| {label} | {_fmt_spread(e["best_smoothed_loss"], "{:.3g}")} / '
        f'{_fmt_spread(e["final_smoothed_loss"], "{:.3g}")} | '
        f'{_fmt_spread(e["iterations_to_open_loop_best"], "{:.0f}")} | '
        f'{closed} | {_fmt_spread(e["speedup_over_open_loop"])} | {mom} | '
        f'{held} |')
  return '\n'.join(lines)


# -------------------------------------------------------------- experiments


def run_problem(problem: Problem, *, steps: int, staleness: int, gain: float,
                seeds: int, adam_grid: list[float], window: int,
                methods: tuple[str, ...] = METHODS, progress: Any = None
                ) -> dict[str, Any]:
  """Runs every method on ``problem``; returns logs, tuned lr and summary."""
  tick = (lambda: progress.update(1)) if progress is not None else (
      lambda: None)
  seed_list = list(range(seeds))
  runs: dict[str, list] = {}
  lrs: dict[str, float] = {}
  grid_scores: dict[str, float] = {}
  yf_async = make_runner(problem, 'yf', staleness, steps)
  if 'yf_open' in methods or 'yf_closed' in methods:
    runs['yf_open'] = []
    runs['yf_closed'] = []
    for s in seed_list:
      runs['yf_open'].append(yf_async(0.0, s))
      tick()
      runs['yf_closed'].append(yf_async(gain, s))
      tick()
  if 'yf_closed_ls' in methods:
    yf_ls = make_runner(problem, 'yf_ls', staleness, steps)
    runs['yf_closed_ls'] = []
    for s in seed_list:
      runs['yf_closed_ls'].append(yf_ls(gain, s))
      tick()
  if 'adam' in methods:
    # Tune the learning rate synchronously (all seeds), as the paper does.
    adam_sync = make_runner(problem, 'adam', 0, steps)
    for lr in adam_grid:
      scores = []
      for s in seed_list:
        scores.append(smooth(adam_sync(lr, s)[0]['loss'], window).min())
        tick()
      score = float(np.mean(scores))
      grid_scores[f'{lr:g}'] = score if np.isfinite(score) else float('inf')
    lrs['adam'] = min(adam_grid, key=lambda lr: grid_scores[f'{lr:g}'])
    adam_async = make_runner(problem, 'adam', staleness, steps)
    runs['adam'] = []
    for s in seed_list:
      runs['adam'].append(adam_async(lrs['adam'], s))
      tick()
  if 'yf_sync' in methods:
    yf_sync = make_runner(problem, 'yf', 0, steps)
    runs['yf_sync'] = []
    for s in seed_list:
      runs['yf_sync'].append(yf_sync(0.0, s))
      tick()
  summary = analyse(runs, window)
  edge = ('adam' in lrs and lrs['adam'] in (adam_grid[0], adam_grid[-1]))
  return {
      'problem': problem.name,
      'description': problem.description,
      'steps': steps, 'staleness': staleness, 'gain': gain, 'seeds': seeds,
      'window': window, 'adam_grid_mean_best_smoothed_loss': grid_scores,
      'adam_lr': lrs.get('adam'), 'adam_lr_at_grid_edge': bool(edge),
      'summary': summary, 'runs': runs,
      'table': table(problem, summary, lrs, steps, window),
  }


def sweep_table(results: list[dict[str, Any]]) -> str:
  """One line per quadratic dimension: open vs closed loop."""
  lines = [
      '| problem | open-loop YF best / final smoothed loss | '
      'closed-loop YF best / final | closed-loop (least squares) best / '
      'final | sync YF best / final | closed-loop speedup over open | '
      'least-squares closed-loop speedup over open | total momentum open / '
      'closed (target open / closed) |',
      '|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    s = r['summary']
    bf = lambda m: (f'{np.median(s[m]["best_smoothed_loss"]):.2g} / '
                    f'{np.median(s[m]["final_smoothed_loss"]):.2g}')
    mom = lambda m, k: f'{np.median(s[m][k + "_last10pct"]):.3f}'
    lines.append(
        f'| {r["problem"]} | {bf("yf_open")} | {bf("yf_closed")} | '
        f'{bf("yf_closed_ls")} | {bf("yf_sync")} | '
        f'{_fmt_spread(s["yf_open"]["closed_loop_speedup_over_this"])} | '
        f'{_fmt_spread(s["yf_closed_ls"]["speedup_over_open_loop"])} | '
        f'{mom("yf_open", "total_momentum")} / '
        f'{mom("yf_closed", "total_momentum")} '
        f'({mom("yf_open", "target_momentum")} / '
        f'{mom("yf_closed", "target_momentum")}) |')
  return '\n'.join(lines)


# ------------------------------------------------------------------- figure


def running_mean(x: np.ndarray, window: int) -> np.ndarray:
  """Trailing mean over up to ``window`` past values."""
  c = np.concatenate([[0.0], np.cumsum(x)])
  idx = np.arange(1, len(x) + 1)
  lo = np.maximum(idx - window, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def plot(results: list[dict[str, Any]], path: pathlib.Path) -> None:
  """Figure 3 of the paper, one row per problem (seed 0).

  Columns: open loop, closed loop, closed loop with the least-squares
  estimate (measured total momentum: dots and running average; target and
  algorithmic momentum: lines), smoothed training loss of every method.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = [m for m in ('yf_open', 'yf_closed', 'yf_closed_ls')
            if m in results[0]['runs']]
  fig, axes = plt.subplots(len(results), len(panels) + 1,
                           figsize=(5 * (len(panels) + 1),
                                    3.8 * len(results)), squeeze=False)
  for row, r in zip(axes, results):
    runs = r['runs']
    for ax, method in zip(row[:-1], panels):
      logs = runs[method][0][0]
      t = np.arange(len(logs['loss']))
      start = r['staleness'] + 2  # first measurable step
      tot = logs['total_momentum']
      ax.plot(t[start:], tot[start:], '.', ms=1.5, alpha=0.25, color='C0',
              label='measured total momentum')
      ax.plot(t[start:], running_mean(tot[start:], 100), color='C0', lw=1.5,
              label='total (running avg 100)')
      ax.plot(t, logs['target_momentum'], color='C3', lw=1.2,
              label='target momentum')
      ax.plot(t, logs['algorithmic_momentum'], color='C2', lw=1.2, ls='--',
              label='algorithmic momentum')
      ax.set_ylim(-1.0, 1.5)
      ax.set_title(f'{r["problem"]}: {LABELS[method]}, staleness '
                   f'{r["staleness"]}', fontsize=9)
      ax.set_xlabel('iteration')
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7, loc='lower right')
    ax = row[-1]
    window = r['window']
    for i, method in enumerate(METHODS):
      if method not in runs:
        continue
      sm = smooth(runs[method][0][0]['loss'], window)
      ax.plot(np.arange(len(sm)) + window, sm, color=f'C{i}',
              label=LABELS[method])
    ax.set_yscale('log')
    ax.set_title(f'{r["problem"]}: training loss, smoothed (window '
                 f'{window}), seed 0', fontsize=9)
    ax.set_xlabel('iteration')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------- main


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (float, np.floating)):
    x = float(x)
    return x if np.isfinite(x) else str(x)
  return x


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark; returns everything that is saved to JSON."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='smoke run: fewer steps, 2 seeds, short grid')
  parser.add_argument('--out', default=str(ROOT / 'results' /
                                           'async_closed_loop'))
  parser.add_argument('--seeds', type=int, default=None)
  parser.add_argument('--staleness', type=int, default=15)
  parser.add_argument('--gain', type=float, default=0.01)
  parser.add_argument('--quad-steps', type=int, default=None)
  parser.add_argument('--cnn-steps', type=int, default=None)
  parser.add_argument('--quad-dim', type=int, default=1)
  parser.add_argument('--quad-noise', type=float, default=0.01)
  parser.add_argument('--sweep-dims', default=None,
                      help='comma-separated quadratic sizes for the sweep '
                           '("" for none)')
  parser.add_argument('--problems', default='quadratic,mnist1d_cnn')
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--cnn-batch', type=int, default=32)
  parser.add_argument('--cnn-activation', default='relu',
                      choices=('relu', 'tanh'))
  parser.add_argument('--docs', action='store_true',
                      help='copy the figure to docs/async_closed_loop.png')
  args = parser.parse_args(argv)

  quick = args.quick
  seeds = args.seeds or (2 if quick else 3)
  quad_steps = args.quad_steps or (1000 if quick else 2000)
  cnn_steps = args.cnn_steps or (600 if quick else 3000)
  sweep = args.sweep_dims if args.sweep_dims is not None else (
      '' if quick else '1,4,16,64')
  sweep_dims = [int(d) for d in sweep.split(',') if d]
  adam_grid = ([1e-3, 1e-2, 1e-1] if quick else
               [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1])
  problems = [p for p in args.problems.split(',') if p]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  methods = tuple(m for m in args.methods.split(',') if m)
  plan = []  # (problem factory, steps, methods)
  if 'quadratic' in problems:
    plan.append((lambda: noisy_quadratic(args.quad_dim, args.quad_noise),
                 quad_steps, methods))
  if 'mnist1d_cnn' in problems:
    plan.append((lambda: mnist1d_cnn(args.cnn_batch,
                                     activation=args.cnn_activation),
                 cnn_steps, methods))
  for d in sweep_dims:
    plan.append((lambda d=d: noisy_quadratic(d, args.quad_noise), quad_steps,
                 ('yf_open', 'yf_closed', 'yf_closed_ls', 'yf_sync')))
  n_runs = sum(seeds * (2 + (len(adam_grid) + 1) * ('adam' in m) +
                        ('yf_sync' in m) + ('yf_closed_ls' in m))
               for _, _, m in plan)

  results, sweep_results = [], []
  start = time.time()
  with tqdm(total=n_runs, desc='runs', unit='run') as bar:
    for i, (factory, steps, methods) in enumerate(plan):
      problem = factory()
      bar.set_postfix_str(problem.name)
      window = max(10, steps // 20)
      r = run_problem(problem, steps=steps, staleness=args.staleness,
                      gain=args.gain, seeds=seeds, adam_grid=adam_grid,
                      window=window, methods=methods, progress=bar)
      (results if i < len(plan) - len(sweep_dims) else
       sweep_results).append(r)

  md = [f'## Asynchronous training, staleness {args.staleness} '
        f'({args.staleness + 1} round-robin workers), gain {args.gain}, '
        f'{seeds} seeds', '']
  for r in results:
    md += [r['table'], '']
    if r['adam_lr'] is not None:
      grid = ', '.join(f'{k}: {v:.3g}' for k, v in
                       r['adam_grid_mean_best_smoothed_loss'].items())
      md += [f'Adam lr grid (synchronous, mean best smoothed loss): {grid}'
             + (' **(best lr at the grid edge)**'
                if r['adam_lr_at_grid_edge'] else ''), '']
  if sweep_results:
    md += [f'### Quadratic sweep over n (sigma={args.quad_noise}, '
           f'{quad_steps} steps)', '', sweep_table(sweep_results), '']
  md.append(f'Wall time: {time.time() - start:.0f} s.')
  text = '\n'.join(md)
  print(text)
  (out / 'results.md').write_text(text + '\n')

  payload = {
      'args': vars(args), 'seeds': seeds, 'adam_grid': adam_grid,
      'results': [{k: v for k, v in r.items() if k != 'runs'} |
                  {'runs': {m: [logs for logs, _ in rs]
                            for m, rs in r['runs'].items()}}
                  for r in results],
      'sweep': [{k: v for k, v in r.items() if k != 'runs'}
                for r in sweep_results],
  }
  (out / 'results.json').write_text(json.dumps(_jsonable(payload)))
  if results:
    plot(results, out / 'momentum.png')
    if args.docs:
      (ROOT / 'docs').mkdir(exist_ok=True)
      shutil.copy(out / 'momentum.png', ROOT / 'docs' / 'async_closed_loop.png')
  print(f'Saved {out / "results.json"}, {out / "results.md"}, '
        f'{out / "momentum.png"}')
  return payload


if __name__ == '__main__':
  main()
