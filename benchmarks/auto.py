"""Issue 11: measure the levers of ``yellowfin_auto`` one by one and combined.

Usage::

    nice -n 10 python -m benchmarks.auto            # round 1: levers alone
    nice -n 10 python -m benchmarks.auto --profile round2   # guard combos
    nice -n 10 python -m benchmarks.auto --profile round3   # guard settings
    python -m benchmarks.auto --profile retune  # Adam/SGD re-tuned at these lengths
    python -m benchmarks.auto --merge DIR ... --out results/auto
    python -m benchmarks.auto --quick               # ~25 s smoke

(BUILD_NOTES.md section 11 has the exact commands and timings: ~16 min wall in all with
each round split over two concurrent processes by ``--tasks``.)

Long runs (1500-2000 steps; the late-training step growth needs them) of
YellowFin, each lever of ``yellowfin_auto`` alone, their combinations, and
Adam / momentum SGD at their grid-tuned learning rates (read from the
synchronous suite's ``results/benchmarks/full_final/results.json`` when it
exists, else the values in :data:`TUNED_LR`), on the same seeds (same init
and batches per seed). Reuses the suite's tasks, scan engine and analysis.

Per task and variant: iterations to tuned Adam's lowest smoothed loss,
speedup vs tuned Adam and vs tuned SGD (paper protocol,
``benchmarks._analysis.speedup``), final smoothed loss, held-out metric and
divergences, as median [min, max] over seeds. Writes ``results.json``,
``results.md`` and per-task PNGs to ``--out`` (default ``results/auto``).

The step-growth guard (lever d) is the library's ``max_step_growth`` option
(first measured here as a wrapper, then moved into ``yellowfin_tuner``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import optax

import yellowfin_optax as yf
from yellowfin_optax import _alias  # AUTO_DEFAULTS, tuner-from-options
from benchmarks import _analysis
from benchmarks import _engine
from benchmarks import _optimizers
from benchmarks import run as suite
from benchmarks import tasks as tasks_lib

# Fallback tuned learning rates (seed-0 grid of the synchronous suite).
TUNED_LR: dict[str, dict[str, float]] = {
    'digits_cnn': {'adam': 0.01, 'momentum_sgd': 0.1},
    'mnist1d_cnn': {'adam': 0.01, 'momentum_sgd': 0.1},
    'mnist1d_resnet': {'adam': 0.01, 'momentum_sgd': 0.316},
    'shakespeare_lstm': {'adam': 0.0316, 'momentum_sgd': 1.0},
    'ptb_lstm': {'adam': 0.0316, 'momentum_sgd': 3.16},
    'digits_linear': {'adam': 0.01, 'momentum_sgd': 0.1},
}
SUITE_RESULTS = pathlib.Path('results/benchmarks/full_final/results.json')

FULL = ('yellowfin', 'q0.1', 'q0.25', 'q0.5', 'debias', 'cosine', 'guard',
        'prov_auto_None', 'prov_auto_T', 'adam', 'momentum_sgd')
ROUND2 = ('guard_cosine', 'guard_debias', 'guard_debias_cosine',
          'guard_q0.25_cosine', 'adam', 'momentum_sgd')

PROFILES: dict[str, dict[str, Any]] = {
    'full': dict(tasks={'digits_cnn': 1200, 'mnist1d_cnn': 2000,
                        'shakespeare_lstm': 1500}, seeds=3, variants=FULL),
    'round2': dict(tasks={'digits_cnn': 1200, 'mnist1d_cnn': 2000,
                          'shakespeare_lstm': 1500}, seeds=3, variants=ROUND2),
    'round3': dict(tasks={'digits_cnn': 1200, 'mnist1d_cnn': 2000,
                          'shakespeare_lstm': 1500}, seeds=3,
                   variants=('guard_g1.5', 'guard_g4', 'guard_a400', 'adam',
                             'momentum_sgd')),
    'round4': dict(tasks={'digits_cnn': 1200, 'mnist1d_cnn': 2000,
                          'shakespeare_lstm': 1500}, seeds=3,
                   variants=('beta0.99', 'beta0.995', 'guard_beta0.99',
                             'adam', 'momentum_sgd')),
    'round5': dict(tasks={'digits_cnn': 1200, 'mnist1d_cnn': 2000,
                          'shakespeare_lstm': 1500}, seeds=3,
                   variants=('lr_x2', 'lr_x4', 'guard_lr_x2', 'adam',
                             'momentum_sgd')),
    # Third session: Adam and SGD re-tuned at these run lengths (the suite's
    # grid and protocol) instead of reusing the suite's 400-600-step choice.
    'retune': dict(tasks={'digits_cnn': 1200, 'mnist1d_cnn': 2000,
                          'shakespeare_lstm': 1500}, seeds=3, retune=True,
                   variants=('yellowfin', 'auto_None', 'auto_T', 'cosine',
                             'debias', 'guard_lr_x2', 'adam',
                             'momentum_sgd')),
    'quick': dict(tasks={'digits_linear': 300}, seeds=2,
                  variants=('yellowfin', 'q0.25', 'debias', 'cosine', 'guard',
                            'guard_cosine', 'adam', 'momentum_sgd')),
    # For tests/test_auto.py: the same code path, tiny.
    'smoke': dict(tasks={'digits_linear': 40}, seeds=2,
                  variants=('yellowfin', 'guard', 'adam')),
}

DEBIAS = dict(smoothed_hyperparams=True, debias_smoothed=True)
PROVISIONAL = dict(h_min_quantile=0.25, **DEBIAS)  # the lead's first guess
GUARD_GROWTH = 2.0
GUARD_ANCHOR_STEP = 200


def guarded_yellowfin(
    total_steps: int | None = None, *, growth: float = GUARD_GROWTH,
    anchor_step: int = GUARD_ANCHOR_STEP, **options: Any
) -> optax.GradientTransformation:
  """``yellowfin(**options)`` with the effective-step guard (lever d) and, if
  ``total_steps`` is given, a cosine ``lr_factor`` over it."""
  if total_steps is not None:
    options['lr_factor'] = optax.cosine_decay_schedule(1.0, total_steps)
  return yf.yellowfin(max_step_growth=growth, step_growth_anchor=anchor_step,
                      **options)


def variants(steps: int) -> dict[str, tuple[str, _optimizers.OptimizerSpec]]:
  """Variant name -> (description, spec). ``lr`` is used by tuned ones only."""
  cosine = optax.cosine_decay_schedule(1.0, steps)
  auto_q = _alias.AUTO_DEFAULTS.get('h_min_quantile')  # pylint: disable=protected-access
  yfs = lambda f, label: (label, _optimizers.OptimizerSpec(
      lambda lr: f(), None, 'yellowfin', label, log_hyperparams=True))
  return {
      'yellowfin': yfs(yf.yellowfin, 'yellowfin() (reference)'),
      'q0.1': yfs(lambda: yf.yellowfin(h_min_quantile=0.1),
                  '(c) h_min_quantile=0.1 alone'),
      'q0.25': yfs(lambda: yf.yellowfin(h_min_quantile=0.25),
                   '(c) h_min_quantile=0.25 alone'),
      'q0.5': yfs(lambda: yf.yellowfin(h_min_quantile=0.5),
                  '(c) h_min_quantile=0.5 alone'),
      'debias': yfs(lambda: yf.yellowfin(smoothed_hyperparams=True,
                                         debias_smoothed=True),
                    '(b) debiased smoothed lr, mu alone'),
      'cosine': yfs(lambda: yf.yellowfin(lr_factor=cosine),
                    '(a) cosine lr_factor over total_steps alone'),
      'guard': yfs(lambda: guarded_yellowfin(),
                   f'(d) effective-step guard alone (<= {GUARD_GROWTH:g}x '
                   f'its step-{GUARD_ANCHOR_STEP} value)'),
      'auto_None': yfs(lambda: yf.yellowfin_auto(),
                       f'yellowfin_auto(total_steps=None) (q={auto_q})'),
      'auto_T': yfs(lambda: yf.yellowfin_auto(total_steps=steps),
                    f'yellowfin_auto(total_steps=T) (q={auto_q})'),
      'auto_T_q0.1': yfs(
          lambda: yf.yellowfin_auto(total_steps=steps, h_min_quantile=0.1),
          'yellowfin_auto(T, h_min_quantile=0.1)'),
      'auto_T_q0.5': yfs(
          lambda: yf.yellowfin_auto(total_steps=steps, h_min_quantile=0.5),
          'yellowfin_auto(T, h_min_quantile=0.5)'),
      'prov_auto_None': yfs(
          lambda: yf.yellowfin(**PROVISIONAL),
          'provisional auto, total_steps=None: q=0.25 + debiased smoothing'),
      'prov_auto_T': yfs(
          lambda: yf.yellowfin(lr_factor=cosine, **PROVISIONAL),
          'provisional auto with T: q=0.25 + debiased smoothing + cosine'),
      'guard_g1.5': yfs(lambda: guarded_yellowfin(growth=1.5),
                        'guard (d) with growth 1.5'),
      'guard_g4': yfs(lambda: guarded_yellowfin(growth=4.0),
                      'guard (d) with growth 4'),
      'guard_a400': yfs(lambda: guarded_yellowfin(anchor_step=400),
                        'guard (d) anchored at step 400'),
      'beta0.99': yfs(lambda: yf.yellowfin(beta=0.99),
                      '(e) statistics EMA beta=0.99 (reference 0.999)'),
      'beta0.995': yfs(lambda: yf.yellowfin(beta=0.995),
                       '(e) statistics EMA beta=0.995'),
      'guard_beta0.99': yfs(lambda: guarded_yellowfin(beta=0.99),
                            'guard (d) + beta=0.99 (e)'),
      'lr_x2': yfs(lambda: yf.yellowfin(lr_factor=2.0),
                   '(f) lr_factor=2: twice the tuned learning rate'),
      'lr_x4': yfs(lambda: yf.yellowfin(lr_factor=4.0),
                   '(f) lr_factor=4'),
      'guard_lr_x2': yfs(lambda: guarded_yellowfin(lr_factor=2.0),
                         'guard (d) + lr_factor=2 (f)'),
      'guard_cosine': yfs(lambda: guarded_yellowfin(steps),
                          'guard (d) + cosine (a)'),
      'guard_debias': yfs(lambda: guarded_yellowfin(None, **DEBIAS),
                          'guard (d) + debiased smoothing (b)'),
      'guard_debias_cosine': yfs(
          lambda: guarded_yellowfin(steps, **DEBIAS),
          'guard (d) + debiased smoothing (b) + cosine (a)'),
      'guard_q0.25_cosine': yfs(
          lambda: guarded_yellowfin(steps, h_min_quantile=0.25),
          'guard (d) + q=0.25 (c) + cosine (a)'),
      'adam': ('Adam at tuned lr', _optimizers.OptimizerSpec(
          lambda lr: optax.adam(lr), None, 'tuned', 'adam')),
      'momentum_sgd': ('SGD momentum 0.9 at tuned lr',
                       _optimizers.OptimizerSpec(
                           lambda lr: optax.sgd(lr, momentum=0.9), None,
                           'tuned', 'momentum_sgd')),
  }


def tuned_lrs(task: str) -> dict[str, float]:
  """Tuned lrs from the synchronous suite's results if present."""
  lrs = dict(TUNED_LR.get(task, {'adam': 0.01, 'momentum_sgd': 0.1}))
  if SUITE_RESULTS.exists():
    rec = json.loads(SUITE_RESULTS.read_text())['tasks'].get(task)
    if rec:
      for name in lrs:
        lr = rec['optimizers'].get(name, {}).get('chosen_lr')
        if lr is not None:
          lrs[name] = float(lr)
  return lrs


def window_for(steps: int) -> int:
  return max(5, steps // 25)


def diverged(loss: np.ndarray) -> bool:
  """Non-finite loss, or a final smoothed loss above the first one."""
  return bool((~np.isfinite(loss)).any() or
              np.mean(loss[-max(5, len(loss) // 25):]) > loss[0])


def analyse(task: tasks_lib.Task, runs: dict[str, list[Any]],
            window: int) -> dict[str, Any]:
  """Per-variant summaries; ``runs[name]`` is a list over seeds of
  ``(logs, metrics)`` with the same seeds for every variant."""
  out = {}
  adam = [r[0]['loss'] for r in runs['adam']]
  sgd = [r[0]['loss'] for r in runs.get('momentum_sgd', [])]
  for name, seeds in runs.items():
    losses = [r[0]['loss'] for r in seeds]
    sm = [_analysis.smooth(l, window) for l in losses]
    its = [_analysis.iterations_to(s, float(_analysis.smooth(a, window).min()),
                                   window) for s, a in zip(sm, adam)]
    rec = dict(
        iters_to_adam_min=_analysis.summary(its),
        iters_to_adam_min_per_seed=its,
        speedup_vs_adam=_analysis.summary(
            [_analysis.speedup(l, a, window) for l, a in zip(losses, adam)]),
        final_smoothed_loss=_analysis.summary([float(s[-1]) for s in sm]),
        min_smoothed_loss=_analysis.summary([float(s.min()) for s in sm]),
        metric=_analysis.summary([r[1][task.metric] for r in seeds]),
        diverged=int(sum(diverged(l) for l in losses)),
    )
    if sgd:
      rec['speedup_vs_sgd'] = _analysis.summary(
          [_analysis.speedup(l, b, window) for l, b in zip(losses, sgd)])
    out[name] = rec
  return out


def _series(logs: list[dict[str, np.ndarray]], key: str,
            every: int) -> list[float]:
  """Median over seeds of a logged series, subsampled."""
  arr = np.median(np.stack([l[key] for l in logs]), axis=0)
  return [float(f'{v:.5g}') for v in arr[::every]]


def run_task(name: str, steps: int, seeds: int, names: tuple[str, ...] | None,
             progress: Any, retune: bool = False) -> dict[str, Any]:
  """Trains every variant on one task; returns its JSON-able record.

  With ``retune``, Adam and SGD search the suite's lr grid at this run length
  (:func:`benchmarks.run.tune_lr`) instead of reusing the suite's choice.
  """
  task = tasks_lib.TASKS[name]()
  window = window_for(steps)
  every = max(1, steps // 300)
  lrs = tuned_lrs(name)
  grids = {k: v.grid for k, v in _optimizers.registry().items() if v.grid}
  specs = variants(steps)
  if names is not None:
    specs = {k: v for k, v in specs.items() if k in names}
  runs: dict[str, list[Any]] = {}
  seconds, tuning = {}, {}
  for vname, (_, spec) in specs.items():
    progress.set_postfix_str(f'{name}/{vname}')
    t0 = time.time()
    runner = _engine.make_runner(task, spec, steps)
    if retune and vname in grids:
      progress.total += len(grids[vname]) - 1
      runs[vname], tuning[vname] = suite.tune_lr(
          runner, grids[vname], window, seeds, progress)
      lrs[vname] = tuning[vname]['chosen_lr']
    else:
      lr = lrs.get(vname, 0.0)
      runs[vname] = _engine.run_many(runner, [(lr, s) for s in range(seeds)],
                                     progress)
    seconds[vname] = round(time.time() - t0, 1)
  summary = analyse(task, runs, window)
  logs = {}
  for vname, seeds_runs in runs.items():
    per = [r[0] for r in seeds_runs]
    logs[vname] = {k: _series(per, k, every) for k in per[0]}
    logs[vname]['smoothed_loss_median'] = [
        float(f'{v:.5g}') for v in np.median(np.stack(
            [_analysis.smooth(p['loss'], window) for p in per]), 0)[::every]]
  return dict(
      description=task.description, steps=steps, seeds=seeds,
      smoothing_window=window, log_every=every, metric=task.metric,
      higher_is_better=task.higher_is_better, tuned_lr=lrs, tuning=tuning,
      labels={k: v[0] for k, v in specs.items()}, seconds=seconds,
      summary=summary, logs=logs)


# Variants whose statistics are plotted (those present).
STAT_VARIANTS = ('yellowfin', 'prov_auto_T', 'guard', 'guard_cosine',
                 'auto_None', 'auto_T')

DIAG_FROM = 100  # the "after ~100 steps"


def diagnosis(rec: dict[str, Any]) -> dict[str, dict[str, float]]:
  """Issue 11's diagnosis on the median-over-seeds logged series, per
  YellowFin variant, from step :data:`DIAG_FROM` to the end.

  ``cubic_binds``: fraction of steps whose applied momentum is above the
  robust-region bound ``((sqrt(h_max/h_min)-1)/(sqrt(h_max/h_min)+1))^2`` (so
  it came from the cubic; exact for unsmoothed variants). ``h_min_drop`` and
  ``p_drop``: value at DIAG_FROM / value at the end, with
  ``p = D^2 h_min^2 / (2 C)``. ``eff_growth``: largest effective step after
  DIAG_FROM / the one at DIAG_FROM; ``eff_max``: the largest.
  """
  out = {}
  i0 = min(DIAG_FROM, rec['steps'] // 2) // rec['log_every']
  for v, lg in rec['logs'].items():
    if 'h_min' not in lg:
      continue
    g = {k: np.asarray(lg[k], np.float64)[i0:] for k in
         ('h_min', 'h_max', 'grad_var', 'dist_to_opt', 'momentum',
          'effective_lr')}
    root = np.sqrt(g['h_max'] / g['h_min'])
    robust = ((root - 1) / (root + 1)) ** 2
    p = g['dist_to_opt'] ** 2 * g['h_min'] ** 2 / (2 * g['grad_var'])
    out[v] = dict(
        cubic_binds=float(np.mean(g['momentum'] > robust + 1e-6)),
        h_min_drop=float(g['h_min'][0] / g['h_min'][-1]),
        p_drop=float(p[0] / p[-1]),
        eff_growth=float(g['effective_lr'].max() / g['effective_lr'][0]),
        eff_max=float(g['effective_lr'].max()),
        eff_final=float(g['effective_lr'][-1]),
        mu_final=float(g['momentum'][-1]))
  return out


def markdown(results: dict[str, Any]) -> str:
  """The results table, one block per task."""
  lines = [f'Command: `{results["command"]}`; wall {results["wall_seconds"]} s',
           '']
  for tname, rec in results['tasks'].items():
    lines += [f'### {tname} ({rec["steps"]} steps, {rec["seeds"]} seeds, '
              f'window {rec["smoothing_window"]}; tuned lr {rec["tuned_lr"]})',
              '', f'| variant | iters to Adam min | speedup vs Adam | '
              f'speedup vs SGD | final smoothed loss | {rec["metric"]} | '
              'diverged |', '|---|---|---|---|---|---|---|']
    for v, t in rec.get('tuning', {}).items():
      grid = ', '.join(f'{k}: {x:.4f}' for k, x in t['grid'].items())
      edge = ' (grid edge!)' if t['chosen_at_grid_edge'] else ''
      lines.insert(-3, f'{v} re-tuned at this length, seed 0 (lr: lowest '
                   f'smoothed loss): {grid}; chosen {t["chosen_lr"]:g}{edge}\n')
    for v, s in rec['summary'].items():
      its = _analysis.fmt(s['iters_to_adam_min'], 0)
      lines.append(
          f'| {v} | {its} | {_analysis.fmt(s["speedup_vs_adam"])} | '
          f'{_analysis.fmt(s.get("speedup_vs_sgd", {"n": 0}))} | '
          f'{_analysis.fmt(s["final_smoothed_loss"], 3)} | '
          f'{_analysis.fmt(s["metric"], 3)} | {s["diverged"]} |')
    lines += ['', f'Diagnosis (median-over-seeds series, steps >= {DIAG_FROM}):',
              '', '| variant | cubic binds | h_min drop | p drop | '
              'eff. step growth | max eff. step | final eff. step | final mu |',
              '|---|---|---|---|---|---|---|---|']
    for v, d in diagnosis(rec).items():
      lines.append(
          f'| {v} | {d["cubic_binds"]:.2f} | {d["h_min_drop"]:.3g}x | '
          f'{d["p_drop"]:.3g}x | {d["eff_growth"]:.3g}x | {d["eff_max"]:.3g} '
          f'| {d["eff_final"]:.3g} | {d["mu_final"]:.3f} |')
    lines.append('')
  lines.append('Variants: ' + '; '.join(
      f'`{k}`: {v}' for k, v in next(iter(results['tasks'].values()))[
          'labels'].items()))
  return '\n'.join(lines) + '\n'


def plot(results: dict[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
  """Per task: smoothed loss of all variants, and the statistics of
  yellowfin vs yellowfin_auto (median over seeds)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  for tname, rec in results['tasks'].items():
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    every = rec['log_every']
    ax = axes[0, 0]
    colors = plt.cm.tab20(np.linspace(0, 1, max(len(rec['logs']), 2)))
    for (v, lg), color in zip(rec['logs'].items(), colors):
      sm = np.asarray(lg['smoothed_loss_median'])
      style = '-' if v in STAT_VARIANTS + ('adam', 'momentum_sgd') else ':'
      ax.plot(np.arange(len(sm)) * every, sm, style, label=v, lw=1.2,
              color=color)
    ax.set_yscale('log')
    ax.set_title(f'{tname}: smoothed train loss (median of seeds)')
    ax.set_xlabel('step')
    ax.legend(fontsize=6, ncol=2)
    panels = [('effective_lr', 'effective step lr/(1-mu)'),
              ('h_min', 'h_min'), ('h_max', 'h_max'),
              ('grad_var', 'C (grad_var)'), ('dist_to_opt', 'D (dist_to_opt)')]
    for ax, (key, title) in zip(axes.flat[1:], panels):
      for v in STAT_VARIANTS:
        lg = rec['logs'].get(v)
        if lg and key in lg:
          y = np.asarray(lg[key])
          ax.plot(np.arange(len(y)) * every, y, label=v, lw=1.2)
      ax.set_yscale('log')
      ax.set_title(title)
      ax.set_xlabel('step')
      ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f'{tname}.png'
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
  return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='1-minute smoke')
  parser.add_argument('--profile', default=None, choices=sorted(PROFILES))
  parser.add_argument('--tasks', nargs='*', default=None)
  parser.add_argument('--out', default=None)
  parser.add_argument('--merge', nargs='*', default=None,
                      help='merge the results.json of these --out dirs')
  parser.add_argument('--docs-figure', default=None,
                      help='copy this task\'s PNG to docs/auto_effective_step.png')
  args = parser.parse_args(argv)
  profile = args.profile or ('quick' if args.quick else 'full')
  cfg = PROFILES[profile]
  task_steps = cfg['tasks']
  if args.tasks:
    task_steps = {t: task_steps.get(t, 1500) for t in args.tasks}
  out = pathlib.Path(args.out or ('results/auto' if profile == 'full'
                                  else f'results/auto/{profile}'))
  out.mkdir(parents=True, exist_ok=True)
  if args.merge:
    parts = [json.loads((pathlib.Path(d) / 'results.json').read_text())
             for d in args.merge]
    results = dict(parts[0], tasks={}, wall_seconds=max(
        p['wall_seconds'] for p in parts), command=' + '.join(
            p['command'] for p in parts) + ' (run concurrently, merged)')
    for p in parts:  # same task in several parts: union of the variants
      for tname, rec in p['tasks'].items():
        if tname not in results['tasks']:
          results['tasks'][tname] = json.loads(json.dumps(rec))
          continue
        have = results['tasks'][tname]
        assert have['steps'] == rec['steps'] and have['seeds'] == rec['seeds']
        for sec in ('labels', 'seconds', 'logs'):
          have[sec].update(rec[sec])
        # Re-analysis needs per-seed losses, which are not saved: keep the
        # summaries (Adam/SGD reruns are deterministic per seed).
        have['summary'].update(rec['summary'])
    return _write(results, out, args.docs_figure, True)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  n_var = len(cfg['variants'] or variants(10))
  t0 = time.time()
  results: dict[str, Any] = dict(
      profile=profile, command='python -m benchmarks.auto ' + ' '.join(
          argv if argv is not None else sys.argv[1:]),
      jax_version=jax.__version__, tasks={})
  with tqdm(total=len(task_steps) * n_var * cfg['seeds'], desc='auto',
            disable=profile == 'smoke') as progress:
    for tname, steps in task_steps.items():
      results['tasks'][tname] = run_task(tname, steps, cfg['seeds'],
                                         cfg['variants'], progress,
                                         cfg.get('retune', False))
  results['wall_seconds'] = round(time.time() - t0, 1)
  return _write(results, out, args.docs_figure, profile != 'smoke')


def _write(results: dict[str, Any], out: pathlib.Path, docs_figure: str | None,
           verbose: bool) -> dict[str, Any]:
  """Saves JSON, markdown and PNGs (and the docs figure); prints the table."""
  for rec in results['tasks'].values():
    rec['diagnosis'] = diagnosis(rec)
  (out / 'results.json').write_text(json.dumps(results, indent=1))
  md = markdown(results)
  (out / 'results.md').write_text(md)
  paths = plot(results, out)
  if docs_figure:
    src = out / f'{docs_figure}.png'
    pathlib.Path('docs').mkdir(exist_ok=True)
    shutil.copy(src, 'docs/auto_effective_step.png')
  if verbose:
    print(md)
    print('wrote', out / 'results.json', *[str(p) for p in paths])
  return results


if __name__ == '__main__':
  main()
