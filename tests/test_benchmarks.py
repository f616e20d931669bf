"""Smoke test of the benchmark suite (benchmarks/) and its speedup maths."""

import json
import math

import numpy as np
import pytest

from benchmarks import _analysis
from benchmarks import _optimizers
from benchmarks import run as bench_run


def test_smooth_is_a_uniform_window_and_poisons_after_nonfinite():
  loss = np.array([4.0, 2.0, 0.0, 2.0, np.nan, 1.0, 1.0])
  s = _analysis.smooth(loss, 2)
  np.testing.assert_allclose(s[:3], [3.0, 1.0, 1.0])
  # Every window that contains or follows the NaN is inf.
  assert np.all(np.isinf(s[3:]))


def test_speedup_of_a_twice_as_fast_curve_is_two():
  t = np.arange(1, 401, dtype=float)
  slow = 1.0 / np.sqrt(t)
  fast = 1.0 / np.sqrt(2 * t)  # reaches any loss in half the iterations
  sp = _analysis.speedup(fast, slow, window=10)
  assert sp == pytest.approx(2.0, rel=0.05)
  assert _analysis.speedup(slow, fast, window=10) == pytest.approx(
      1 / sp, rel=1e-9)


def test_speedup_target_is_the_lowest_loss_both_reach():
  a = np.linspace(1.0, 0.1, 100)   # goes lower
  b = np.linspace(1.0, 0.5, 100)   # plateaus higher: target is b's minimum
  sp = _analysis.speedup(a, b, window=1)
  it_a = _analysis.iterations_to(_analysis.smooth(a, 1), 0.5, 1)
  assert sp == pytest.approx(100 / it_a)
  assert sp > 1.5
  assert math.isnan(_analysis.speedup(np.full(5, np.nan), a[:5], window=1))


def test_registry_grids_are_log_spaced_with_at_least_five_points():
  reg = _optimizers.registry(5)
  assert reg['yellowfin'].grid is None and reg['yellowfin'].log_hyperparams
  for name in ('adam', 'momentum_sgd'):
    grid = np.array(reg[name].grid)
    assert len(grid) == 5
    np.testing.assert_allclose(np.diff(np.log10(grid)), 0.5, atol=0.01)
  assert {s.group for s in reg.values()} == {'yellowfin', 'tuned', 'peer'}


@pytest.mark.parametrize('loss_scale', [0.01, 100.0])
def test_loss_scale_trains_on_a_multiple_and_logs_the_unscaled_loss(
    loss_scale):
  """--loss-scale k: Adam (invariant to k) logs the same unscaled losses."""
  from benchmarks import _engine
  from benchmarks import tasks as tasks_lib
  task = tasks_lib.TASKS['digits_linear']()
  spec = _optimizers.registry(2)['adam']
  plain = _engine.make_runner(task, spec, 20)(np.float32(1e-2), np.int32(0))
  scaled = _engine.make_runner(task, spec, 20, loss_scale)(
      np.float32(1e-2), np.int32(0))
  np.testing.assert_allclose(scaled[0]['loss'], plain[0]['loss'], rtol=1e-4)


def test_before_chains_a_clip_in_front_of_the_optimizer():
  from benchmarks import _engine
  from benchmarks import tasks as tasks_lib
  task = tasks_lib.TASKS['digits_linear']()
  spec = _optimizers.registry(2)['momentum_sgd']
  run = lambda before: _engine.make_runner(task, spec, 20, 1.0, before)(
      np.float32(0.1), np.int32(0))[0]['loss']
  unclipped = run(None)
  clipped = run(bench_run.before_transform('clip:1e-3'))
  assert clipped[0] == unclipped[0]  # same first batch and params
  assert clipped[-1] > unclipped[-1]  # a 1e-3 clip slows SGD down
  with pytest.raises(KeyError):
    bench_run.before_transform('no_such_transform')


def test_smoke_profile_runs_end_to_end(tmp_path):
  results = bench_run.main(['--profile', 'smoke', '--out', str(tmp_path),
                            '--jax-cache', '', '--no-progress'])
  on_disk = json.loads((tmp_path / 'results.json').read_text())
  assert on_disk['tasks'].keys() == results['tasks'].keys() == {
      'digits_linear'}
  r = on_disk['tasks']['digits_linear']
  steps, seeds = r['steps'], on_disk['seeds']
  yf_entry, adam = r['optimizers']['yellowfin'], r['optimizers']['adam']
  # Per-seed loss curves of full length; training made progress.
  assert len(adam['loss']) == seeds and len(adam['loss'][0]) == steps
  assert adam['chosen_lr'] in _optimizers.registry(2)['adam'].grid
  assert adam['min_smoothed_loss'][0] == pytest.approx(
      min(adam['grid'].values()))
  assert adam['min_smoothed_loss'][0] < math.log(10)
  # YellowFin's hyperparameters are logged per step (subsampled).
  hp = yf_entry['hyperparams']
  for key in ('learning_rate', 'momentum', 'effective_lr', 'h_min', 'h_max',
              'grad_var', 'dist_to_opt'):
    assert len(hp[key]) == seeds
    assert len(hp[key][0]) == math.ceil(steps / r['log_every'])
    assert np.all(np.isfinite(hp[key][0]))
  np.testing.assert_allclose(
      hp['effective_lr'][0],
      np.array(hp['learning_rate'][0]) / (1 - np.array(hp['momentum'][0])),
      rtol=1e-3)
  for m in yf_entry['metrics'] + adam['metrics']:
    assert 0.0 <= m['accuracy'] <= 1.0
  sp = r['speedups']['yellowfin_vs_adam']
  assert len(sp['per_seed']) == seeds and sp['median'] > 0
  assert (tmp_path / 'results.png').stat().st_size > 0
  auto = r['optimizers']['yellowfin_auto']
  assert np.all(np.isfinite(auto['hyperparams']['learning_rate'][0]))
  md = (tmp_path / 'results.md').read_text()
  assert '| digits_linear |' in md and 'yellowfin vs adam' in md


@pytest.mark.parametrize('best_lr, expect_added', [
    (0.05, [0.1]),      # just above the grid: one extension, then inside
    (1e-3, []),         # optimum inside: no extension
    (2e-4, [1e-4]),     # just below: one extension down
    (100.0, None),      # far above: stops after MAX_GRID_EXTENSIONS
])
def test_grid_search_extends_at_an_edge(best_lr, expect_added):
  calls = []

  def fake_runner(lr, seed):
    calls.append(float(lr))
    # A loss curve whose level is lowest at best_lr (in log distance).
    level = 1.0 + abs(np.log10(float(lr)) - np.log10(best_lr))
    return {'loss': np.full(20, level)}, {}

  grid0 = _optimizers.log_grid(-3.5, -1.5, 5)
  grid, runs = bench_run._grid_search(fake_runner, grid0, 5, None)
  added = sorted(g for g in grid if g not in grid0)
  if expect_added is None:
    assert len(added) == bench_run.MAX_GRID_EXTENSIONS
    assert min(added) > max(grid0)
  else:
    np.testing.assert_allclose(added, expect_added, rtol=0.01)
  assert len(runs) == len(grid) == len(calls)
  assert grid == sorted(grid)
