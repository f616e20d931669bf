"""Synchronous benchmark suite: untuned YellowFin vs tuned Adam / momentum SGD
and untuned optax.contrib peers, on real data (paper Section 3 protocol).

Usage::

    python -m benchmarks.run --profile quick   # ~10 min on 2 shared cores
    python -m benchmarks.run --profile full    # the reported result

Protocol: Adam and momentum SGD (0.9) search a log-spaced learning-rate grid
on seed 0; the config with the lowest smoothed training loss is then rerun on
the other seeds. YellowFin and the peers run with their defaults, untuned.
Training loss is smoothed with a uniform window; the speedup of A over B is
B's iterations / A's iterations to reach the lowest smoothed loss both reach,
computed per seed (same init and batches for both) and reported as median
[min, max]. Writes ``results.json``, ``results.md`` and PNGs to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
import optax

from benchmarks import _analysis
from benchmarks import _engine
from benchmarks import _optimizers
from benchmarks import tasks as tasks_lib

PROFILES: dict[str, dict[str, Any]] = {
    # Through the same code path as the others; for tests/test_benchmarks.py.
    'smoke': dict(tasks={'digits_linear': 40}, grid_points=2, seeds=2,
                  optimizers=('yellowfin', 'yellowfin_auto', 'adam')),
    'quick': dict(tasks={'digits_cnn': 300, 'shakespeare_lstm': 300},
                  grid_points=3, seeds=2, optimizers=None),
    'full': dict(tasks={'digits_cnn': 400, 'mnist1d_cnn': 600,
                        'mnist1d_resnet': 400, 'shakespeare_lstm': 600,
                        'ptb_lstm': 400},
                 grid_points=5, seeds=3, optimizers=None),
    # Loss-scale invariance (run with --loss-scale 0.1 / 1 / 10).
    'scale': dict(tasks={'digits_cnn': 400, 'shakespeare_lstm': 600},
                  grid_points=5, seeds=3,
                  optimizers=('yellowfin', 'yellowfin_auto',
                              'yellowfin_auto_T', 'adam', 'adam_cosine',
                              'momentum_sgd')),
    # The paper's own regime: the authors' task, 10^4 steps (~5 epochs).
    'long': dict(tasks={'shakespeare_lstm': 10000}, grid_points=3, seeds=1,
                 optimizers=('yellowfin', 'yellowfin_recipe', 'yellowfin_auto',
                             'yellowfin_auto_T', 'adam', 'adam_cosine',
                             'momentum_sgd')),
}

# Grid points added per side while the best learning rate is at an edge.
MAX_GRID_EXTENSIONS = 3

# (A, B): the speedup of A over B is reported.
BASE_COMPARISONS = (
    ('yellowfin', 'adam'), ('yellowfin', 'momentum_sgd'),
    ('momentum_sgd', 'adam'),
    ('yellowfin_auto', 'adam'), ('yellowfin_auto', 'momentum_sgd'),
    ('yellowfin_auto', 'yellowfin'),
    ('yellowfin_auto_T', 'adam'), ('yellowfin_auto_T', 'momentum_sgd'),
    ('yellowfin_auto_T', 'adam_cosine'), ('yellowfin_auto_T', 'yellowfin_cosine'),
    ('yellowfin_recipe', 'adam'),
    ('yellowfin_auto_rms', 'adam'), ('yellowfin_auto_rms', 'momentum_sgd'),
    ('yellowfin_auto_rms_T', 'adam'), ('yellowfin_auto_rms_T', 'momentum_sgd'),
    ('yellowfin_auto_rms_T', 'adam_cosine'),
    ('yellowfin_auto_rms_T', 'yellowfin_auto_T'),
    ('yellowfin_auto_rms_T_warm10', 'adam'),
    ('yellowfin_auto_rms_T_warm10', 'momentum_sgd'),
    ('yellowfin_auto_floor50', 'adam'), ('yellowfin_auto_floor90', 'adam'),
    ('yellowfin_auto_floor90', 'momentum_sgd'),
    ('yellowfin_auto_rms_T_floor90', 'adam'),
    ('yellowfin_auto_rms_T_floor90', 'momentum_sgd'))

# What --before chains in front of every optimizer (issue 18: does the tuner
# survive a clip or a diagonal preconditioner?).
BEFORE = {
    'none': lambda: None,
    'adam_precond': lambda: optax.scale_by_adam(b1=0.0),
    'rms_precond': lambda: optax.scale_by_rms(),
}


def before_transform(name: str):
  """``'clip:C'`` -> ``clip_by_global_norm(C)``; else :data:`BEFORE`."""
  if name.startswith('clip:'):
    return optax.clip_by_global_norm(float(name.split(':', 1)[1]))
  return BEFORE[name]()


def _window(steps: int) -> int:
  return max(5, steps // 25)


def _subsample(x: np.ndarray, every: int) -> list[float]:
  return [float(f'{v:.5g}') for v in np.asarray(x)[::every]]


def run_task(
    name: str, steps: int, specs: dict[str, _optimizers.OptimizerSpec],
    seeds: int, progress: Any, loss_scale: float = 1.0,
    before: str = 'none',
) -> dict[str, Any]:
  """Trains every optimizer on one task; returns its JSON-able record."""
  task = tasks_lib.TASKS[name]()
  window = _window(steps)
  every = max(1, steps // 200)
  record: dict[str, Any] = dict(
      description=task.description, num_params=task.num_params,
      batch_size=task.batch_size, steps=steps, smoothing_window=window,
      metric=task.metric, higher_is_better=task.higher_is_better,
      log_every=every, optimizers={})
  losses: dict[str, list[np.ndarray]] = {}
  for opt_name, spec in specs.items():
    progress.set_postfix_str(f'{name}/{opt_name}')
    t0 = time.time()
    runner = _engine.make_runner(task, spec, steps, loss_scale,
                                 before_transform(before))
    entry: dict[str, Any] = dict(label=spec.label, group=spec.group)
    if spec.grid:
      runs, tuning = tune_lr(runner, spec.grid, window, seeds, progress)
      entry.update(tuning)
    else:
      runs = _engine.run_many(runner, [(0.0, s) for s in range(seeds)],
                              progress)
    losses[opt_name] = [r[0]['loss'] for r in runs]
    smoothed = [_analysis.smooth(l, window) for l in losses[opt_name]]
    entry.update(
        seconds=round(time.time() - t0, 1),
        min_smoothed_loss=[float(s.min()) for s in smoothed],
        final_smoothed_loss=[float(s[-1]) for s in smoothed],
        metrics=[r[1] for r in runs],
        metric_summary=_analysis.summary([r[1][task.metric] for r in runs]),
        loss=[_subsample(l, 1) for l in losses[opt_name]],
    )
    if spec.log_hyperparams:
      keys = [k for k in runs[0][0] if k != 'loss']
      entry['hyperparams'] = {
          k: [_subsample(r[0][k], every) for r in runs] for k in keys}
    record['optimizers'][opt_name] = entry

  record['speedups'] = speedups(record, {k: s.group for k, s in specs.items()})
  return record


def tune_lr(
    runner: Any, grid: tuple[float, ...], window: int, seeds: int,
    progress: Any,
) -> tuple[list[Any], dict[str, Any]]:
  """The protocol's tuning: grid on seed 0, best lr rerun on the others.

  Returns the runs at the chosen lr (seed 0 first) and a JSON-able record:
  ``grid`` (lr -> lowest smoothed loss), ``chosen_lr``, ``grid_extended``,
  ``chosen_at_grid_edge``.
  """
  full, grid_runs = _grid_search(runner, grid, window, progress)
  scores = [float(_analysis.smooth(r[0]['loss'], window).min())
            for r in grid_runs]
  best = int(np.argmin(scores))
  lr = full[best]
  runs = [grid_runs[best]] + _engine.run_many(
      runner, [(lr, s) for s in range(1, seeds)], progress)
  return runs, dict(grid={f'{g:g}': s for g, s in zip(full, scores)},
                    chosen_lr=lr, grid_extended=len(full) > len(grid),
                    chosen_at_grid_edge=best in (0, len(full) - 1))


def _grid_search(
    runner: Any, grid: tuple[float, ...], window: int, progress: Any,
) -> tuple[list[float], list[Any]]:
  """Runs the grid on seed 0, extending it while the best lr is at an edge.

  Up to :data:`MAX_GRID_EXTENSIONS` extra points per side, each one grid step
  (the ratio of the first two points) beyond the current edge.
  """
  grid = list(grid)
  runs = _engine.run_many(runner, [(lr, 0) for lr in grid], progress)
  ratio = grid[1] / grid[0]
  score = lambda r: float(_analysis.smooth(r[0]['loss'], window).min())
  for _ in range(MAX_GRID_EXTENSIONS):
    best = int(np.argmin([score(r) for r in runs]))
    if best in (0, len(grid) - 1) and progress is not None:
      progress.total += 1
    if best == len(grid) - 1:
      lr = float(f'{grid[-1] * ratio:.3g}')
      grid.append(lr)
      runs += _engine.run_many(runner, [(lr, 0)], progress)
    elif best == 0:
      lr = float(f'{grid[0] / ratio:.3g}')
      grid.insert(0, lr)
      runs = _engine.run_many(runner, [(lr, 0)], progress) + runs
    else:
      break
  return grid, runs


def speedups(record: dict[str, Any], groups: dict[str, str]) -> dict[str, Any]:
  """Per-seed speedups (median, spread) from a task record's loss curves.

  Args:
    record: one task's record (its optimizers' ``loss`` lists per seed).
    groups: optimizer name -> group; ``yellowfin``, ``yellowfin_auto`` and
      ``yellowfin_auto_T`` are compared with every ``peer``, besides
      :data:`BASE_COMPARISONS`.

  Returns:
    ``{'A_vs_B': {'per_seed': [...], 'median', 'min', 'max', 'n'}}``.
  """
  opts = record['optimizers']
  comparisons = [c for c in BASE_COMPARISONS if set(c) <= set(opts)]
  for mine in ('yellowfin', 'yellowfin_auto', 'yellowfin_auto_T'):
    if mine in opts:
      comparisons += [(mine, n) for n in opts if groups.get(n) == 'peer']
  out = {}
  for a, b in comparisons:
    per_seed = [
        _analysis.speedup(np.array(la), np.array(lb),
                          record['smoothing_window'])
        for la, lb in zip(opts[a]['loss'], opts[b]['loss'])]
    out[f'{a}_vs_{b}'] = dict(per_seed=per_seed, **_analysis.summary(per_seed))
  return out


def markdown(results: dict[str, Any]) -> str:
  """The result tables: a row per comparison or optimizer, a column per task."""
  tasks = results['tasks']
  names = list(tasks)
  header = ['| {} | ' + ' | '.join(names) + ' |',
            '|---' * (len(names) + 1) + '|']

  def table(title, first, rows):
    """rows: (label, {task: cell})."""
    out = ['', f'### {title}', '', header[0].format(first), header[1]]
    for label, cells in rows:
      out.append(f'| {label} | ' + ' | '.join(cells.get(n, '') for n in names)
                 + ' |')
    return out

  lines = [f'## Benchmark results (profile `{results["profile"]}`)', '',
           f'Seeds: {results["seeds"]}; grid points: '
           f'{results["grid_points"]}; values are median [min, max] over '
           'seeds.']
  cols = list(dict.fromkeys(k for r in tasks.values() for k in r['speedups']))
  lines += table(
      'Speedup (iterations of B / iterations of A to the lowest smoothed '
      'training loss both reach; > 1: A faster)', 'A vs B',
      [(c.replace('_vs_', ' vs '),
        {n: _analysis.fmt(r['speedups'][c]) for n, r in tasks.items()
         if c in r['speedups']}) for c in cols])
  opts = list(dict.fromkeys(o for r in tasks.values() for o in r['optimizers']))
  metrics = ', '.join(f'{n}: {r["metric"]}' for n, r in tasks.items())
  for title, key in (
      (f'Held-out metric ({metrics}; perplexity: lower is better, accuracy: '
       'higher)', 'metric'),
      ('Minimum smoothed training loss', 'min_smoothed_loss'),
      ('Final smoothed training loss', 'final_smoothed_loss'),
      ("Final smoothed training loss / tuned Adam's (per seed; <= 1: ends as "
       'low as Adam)', 'ratio')):
    rows = []
    for o in opts:
      cells = {}
      for n, r in tasks.items():
        e, adam = r['optimizers'].get(o), r['optimizers'].get('adam')
        if e is None:
          continue
        if key == 'metric':
          cells[n] = _analysis.fmt(e['metric_summary'], 3)
        elif key == 'ratio':
          if adam is not None:
            cells[n] = _analysis.fmt(_analysis.summary([a / b for a, b in zip(
                e['final_smoothed_loss'], adam['final_smoothed_loss'])]))
        else:
          cells[n] = _analysis.fmt(_analysis.summary(e[key]), 3)
      rows.append((o, cells))
    lines += table(title, 'optimizer', rows)
  lines += ['', '### Tuned learning rates (grid on seed 0)', '',
            '| task | optimizer | grid: min smoothed loss | chosen |',
            '|---|---|---|---|']
  for name, r in tasks.items():
    for o, e in r['optimizers'].items():
      if 'grid' in e:
        grid = ', '.join(f'{k}: {v:.3f}' for k, v in e['grid'].items())
        edge = ' (grid edge!)' if e['chosen_at_grid_edge'] else ''
        lines.append(f'| {name} | {o} | {grid} | {e["chosen_lr"]:g}{edge} |')
  lines += ['', '### Tasks', '', '| task | description | params | steps | '
            'smoothing window |', '|---|---|---|---|---|']
  for name, r in tasks.items():
    lines.append(f'| {name} | {r["description"]} | {r["num_params"]} | '
                 f'{r["steps"]} | {r["smoothing_window"]} |')
  return '\n'.join(lines) + '\n'


def plot(results: dict[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
  """One figure, a column per task: the smoothed training loss of every
  optimizer (median over seeds), then the applied learning rate, momentum and
  effective step ``lr / (1 - mu)`` of each YellowFin variant (seed 0).

  Writes ``results.png`` into ``out`` and returns its path.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  tasks = results['tasks']
  rows = (('smoothed training loss', None), ('learning rate', 'learning_rate'),
          ('momentum', 'momentum'), ('effective step lr/(1-mu)', 'effective_lr'))
  fig, axes = plt.subplots(len(rows), len(tasks),
                           figsize=(4.2 * len(tasks), 2.6 * len(rows)),
                           squeeze=False, sharex='col')
  names = list(dict.fromkeys(o for r in tasks.values() for o in r['optimizers']))
  colors = {o: f'C{i % 10}' for i, o in enumerate(names)}
  for j, (name, r) in enumerate(tasks.items()):
    for o, e in r['optimizers'].items():
      curves = np.array([_analysis.smooth(np.array(l), r['smoothing_window'])
                         for l in e['loss']])
      med = np.median(curves, axis=0)
      style = dict(lw=2.2) if e['group'] == 'yellowfin' else dict(lw=1.0)
      axes[0][j].plot(np.arange(med.size) + r['smoothing_window'], med,
                      label=o, color=colors[o], **style)
      for i, (_, key) in enumerate(rows[1:], start=1):
        series = e.get('hyperparams', {}).get(key)
        if series:
          axes[i][j].plot(np.arange(len(series[0])) * r['log_every'],
                          series[0], color=colors[o], lw=1.2, label=o)
    finite = [v for e in r['optimizers'].values()
              for v in e['min_smoothed_loss'] if np.isfinite(v)]
    if finite:
      axes[0][j].set_ylim(min(finite) * 0.9, max(finite) * 3)
    axes[0][j].set_title(name)
    for i, (label, key) in enumerate(rows):
      if key != 'momentum':
        axes[i][j].set_yscale('log')
      if j == 0:
        axes[i][j].set_ylabel(label)
    axes[-1][j].set_xlabel('iteration')
  axes[0][-1].legend(fontsize=7, loc='upper right', framealpha=0.6)
  fig.tight_layout()
  path = out / 'results.png'
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return [path]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--profile', choices=sorted(PROFILES), default='quick')
  parser.add_argument('--tasks', nargs='*', help='override the task list')
  parser.add_argument('--optimizers', nargs='*', help='override optimizers')
  parser.add_argument('--steps', type=int, help='override steps per task')
  parser.add_argument('--seeds', type=int, help='override number of seeds')
  parser.add_argument('--out', help='output dir (results/benchmarks/PROFILE)')
  parser.add_argument('--loss-scale', type=float, default=1.0,
                      help='train on this multiple of the loss')
  parser.add_argument('--before', default='none',
                      help="chained before every optimizer: 'none', "
                      "'clip:C', " + ', '.join(repr(k) for k in BEFORE))
  parser.add_argument('--jax-cache', default='results/.jax_cache',
                      help="persistent compilation cache dir ('' for none)")
  parser.add_argument('--no-plots', action='store_true')
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--from-json', help='only re-render results.md and the '
                      'PNGs from an existing results.json (into --out or its '
                      'folder)')
  parser.add_argument('--merge', nargs=2, metavar=('BASE', 'UPDATE'),
                      help='merge two results.json: UPDATE\'s optimizer '
                      'entries replace BASE\'s, speedups are recomputed; '
                      'writes --out/results.json, .md and PNGs')
  args = parser.parse_args(argv)
  if args.merge:
    base, update = (json.loads(pathlib.Path(p).read_text())
                    for p in args.merge)
    groups = {**{k: s.group for k, s in _optimizers.registry().items()}}
    base['optimizers'].update(update['optimizers'])
    for name, r in update['tasks'].items():
      b = base['tasks'].setdefault(name, r)
      b['optimizers'].update(r['optimizers'])
      b['speedups'] = speedups(b, groups)
    base['command'] = (f'{base["command"]}; then {update["command"]}; '
                       f'merged with --merge')
    out = pathlib.Path(args.out or pathlib.Path(args.merge[0]).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'results.json').write_text(json.dumps(base))
    args.from_json = str(out / 'results.json')
  if args.from_json:
    src = pathlib.Path(args.from_json)
    results = json.loads(src.read_text())
    out = pathlib.Path(args.out) if args.out else src.parent
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    (out / 'results.md').write_text(table)
    if not args.no_plots:
      plot(results, out)
    print(table)
    return results

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  if args.jax_cache:
    jax.config.update('jax_compilation_cache_dir', args.jax_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 2.0)
  profile = PROFILES[args.profile]
  task_steps = dict(profile['tasks'])
  if args.tasks:
    unknown = set(args.tasks) - set(tasks_lib.TASKS)
    if unknown:
      parser.error(f'unknown tasks {sorted(unknown)}; '
                   f'known: {sorted(tasks_lib.TASKS)}')
    task_steps = {t: task_steps.get(t, 400) for t in args.tasks}
  if args.steps:
    task_steps = {t: args.steps for t in task_steps}
  seeds = args.seeds or profile['seeds']
  specs = _optimizers.registry(profile['grid_points'])
  chosen = args.optimizers or profile['optimizers'] or list(specs)
  unknown = set(chosen) - set(specs)
  if unknown:
    parser.error(f'unknown optimizers {sorted(unknown)}; known: '
                 f'{sorted(specs)}')
  specs = {k: specs[k] for k in chosen}
  out = pathlib.Path(args.out or f'results/benchmarks/{args.profile}')
  out.mkdir(parents=True, exist_ok=True)

  total = len(task_steps) * sum(
      (len(s.grid) + seeds - 1) if s.grid else seeds for s in specs.values())
  results: dict[str, Any] = dict(
      profile=args.profile, command='python -m benchmarks.run ' + ' '.join(
          argv if argv is not None else sys.argv[1:]),
      seeds=seeds, grid_points=profile['grid_points'],
      loss_scale=args.loss_scale, before=args.before,
      optimizers={k: s.label for k, s in specs.items()},
      jax_version=jax.__version__, tasks={})
  t0 = time.time()
  with tqdm(total=total, desc='runs', unit='run', disable=args.no_progress,
            file=sys.stderr) as progress:
    for name, steps in task_steps.items():
      results['tasks'][name] = run_task(name, steps, specs, seeds, progress,
                                        args.loss_scale, args.before)
      results['wall_seconds'] = round(time.time() - t0, 1)
      # Write after every task so a long run can be inspected while it goes.
      (out / 'results.json').write_text(json.dumps(results))
  table = markdown(results)
  (out / 'results.md').write_text(table)
  if not args.no_plots:
    plot(results, out)
  print(table)
  print(f'wall time {results["wall_seconds"]:.0f} s; wrote {out}/results.json,'
        f' results.md' + ('' if args.no_plots else ', *.png'))
  return results


if __name__ == '__main__':
  main()
