"""Smoke and behaviour tests of benchmarks/async_closed_loop.py (tiny sizes)."""

import json

import jax
import numpy as np
import optax
import pytest

import yellowfin_optax as yf
from benchmarks import async_closed_loop as bench


def test_smooth_and_speedup_protocol():
  loss = np.array([4.0, 2.0, 1.0, 1.0, np.nan, 0.0])
  sm = bench.smooth(loss, 2)
  np.testing.assert_allclose(sm[:3], [3.0, 1.5, 1.0])
  assert np.all(np.isinf(sm[3:]))  # a NaN poisons every later window
  # Both reach 1.0 (B's best is lower): A after 3 steps, B after 7.
  a = np.array([3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
  b = np.array([3.0, 3.0, 3.0, 3.0, 3.0, 1.0, 1.0, 0.5])
  assert bench.iterations_to(bench.smooth(a, 2), 1.0, 2) == 3.0
  assert bench.speedup(a, b, 2) == pytest.approx(7.0 / 3.0)
  assert bench.speedup(a, a, 2) == 1.0
  assert np.isnan(bench.speedup(a, np.full(8, np.nan), 2))


STALENESS = 7
STEPS = 500


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  """One short run of the script (n=1 noisy quadratic, staleness 7, open
  and closed loop, one seed), shared by the tests below: ``(payload, out)``."""
  out = tmp_path_factory.mktemp('async_closed_loop')
  payload = bench.main([
      '--problems', 'quadratic', '--quad-steps', str(STEPS), '--seeds', '1',
      '--staleness', str(STALENESS), '--sweep-dims', '', '--out', str(out),
      '--methods', 'yf_open,yf_closed',
  ])
  return payload, out


def test_gain_zero_is_open_loop_yellowfin(quick):
  """The benchmark's open loop applies exactly delayed_gradients(yellowfin())
  (same problem, seed and noise, stepped here one jitted call at a time)."""
  payload, _ = quick
  logs = payload['results'][0]['runs']['yf_open'][0]
  problem = bench.noisy_quadratic(dim=1, noise=0.01)
  tx = yf.delayed_gradients(STALENESS, yf.yellowfin())
  k_init, k_data = jax.random.split(jax.random.key(0))
  x = problem.init(k_init)
  state = tx.init(x)
  update, grad = jax.jit(tx.update), jax.jit(problem.grad)
  losses, lrs = [], []
  for key in jax.random.split(k_data, STEPS):
    loss, g = grad(x, problem.sample(key))
    u, state = update(g, state, x, value=loss)
    x = optax.apply_updates(x, u)
    losses.append(loss)
    lrs.append(yf.hyperparams(state)['learning_rate'])
  np.testing.assert_allclose(logs['loss'], losses, rtol=1e-4)
  np.testing.assert_allclose(logs['learning_rate'], lrs, rtol=1e-4)
  assert len(set(np.asarray(lrs).tolist())) > 100  # it was tuned
  # Open loop: the applied momentum is the target, every step.
  np.testing.assert_array_equal(logs['algorithmic_momentum'],
                                logs['target_momentum'])


def test_quick_pipeline_writes_outputs_and_closed_loop_stabilises(quick):
  """n=1 noisy quadratic, staleness 7: open loop oscillates, closed loop not.

  Also exercises the script's path (runs, tables, JSON, figure); the Adam
  grid and the other methods are left to the full run to keep this fast.
  """
  payload, tmp_path = quick
  (r,) = payload['results']
  s = r['summary']
  assert set(s) == {'yf_open', 'yf_closed'}
  # Open loop: measured total momentum above the target (asynchrony adds
  # momentum); closed loop pushes the algorithmic momentum below the target.
  assert (s['yf_open']['total_momentum_last10pct'][0] >
          s['yf_open']['target_momentum_last10pct'][0])
  assert (s['yf_closed']['algorithmic_momentum_last10pct'][0] <
          s['yf_closed']['target_momentum_last10pct'][0])
  assert (s['yf_closed']['final_smoothed_loss'][0] <
          1e-3 * s['yf_open']['final_smoothed_loss'][0])
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert len(saved['results'][0]['runs']['yf_closed'][0]['loss']) == STEPS
  assert (tmp_path / 'momentum.png').stat().st_size > 10_000
  assert '| closed-loop YF |' in (tmp_path / 'results.md').read_text()


@pytest.mark.slow
def test_mnist1d_cnn_runs():
  problem = bench.mnist1d_cnn(batch_size=16)
  logs, metrics = bench.make_runner(problem, 'yf', 0, 200)(0.0, 0)
  assert np.all(np.isfinite(logs['loss']))
  assert logs['loss'][-50:].mean() < logs['loss'][:20].mean()
  assert 0.0 <= metrics['test_accuracy'] <= 1.0
