"""Tests of yellowfin_auto's levers and of the benchmarks.auto study (issue 11)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import yellowfin_optax as yf
from benchmarks import auto

_EPS = 1e-6


def _stream(n, dim=4, seed=0):
  """Gradients whose norms spread over ~3 decades, in a fixed order."""
  rng = np.random.default_rng(seed)
  scales = np.exp(rng.uniform(-3.5, 3.5, size=n))
  return [jnp.asarray(rng.normal(size=dim) * s, jnp.float32) for s in scales]


def _run(tx, grads, params=None):
  """Feeds ``grads`` to ``tx``; returns hyperparams after each update."""
  params = jnp.zeros_like(grads[0]) if params is None else params
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    _, state = update(g, state, params)
    out.append({k: float(v) for k, v in yf.hyperparams(state).items()})
  return out


def _expected_h_min(grads, window, beta, quantile):
  """EMA (zero-debiased, log space) of the window's min or q-quantile."""
  sq = [float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads]
  ema, out = 0.0, []
  for t in range(len(sq)):
    logs = np.log(np.asarray(sq[max(0, t - window + 1): t + 1]) + _EPS)
    low = logs.min() if quantile is None else np.quantile(logs, quantile)
    ema = beta * ema + (1 - beta) * low
    out.append(np.exp(ema / (1 - beta ** (t + 1))))
  return np.asarray(out)


@pytest.mark.parametrize('quantile', [None, 0.1, 0.25, 0.5])
def test_h_min_is_ema_of_window_quantile(quantile):
  grads = _stream(14)
  tx = yf.yellowfin(h_min_quantile=quantile, adaptive_clipping=False,
                    beta=0.9, curvature_window=5)
  got = np.asarray([h['h_min'] for h in _run(tx, grads)])
  want = _expected_h_min(grads, 5, 0.9, quantile)
  np.testing.assert_allclose(got, want, rtol=2e-4)
  if quantile is not None:  # and it is not the reference's minimum
    assert np.all(got[6:] > 1.05 * _expected_h_min(grads, 5, 0.9, None)[6:])


def test_debias_smoothed_first_tuned_step_equals_instantaneous():
  grads = _stream(3)
  for debias in (True, False):
    hp = _run(yf.yellowfin(smoothed_hyperparams=True, debias_smoothed=debias,
                           adaptive_clipping=False), grads)
    first_tuned = hp[1]  # step 0 keeps the initial values
    if debias:
      assert first_tuned['lr'] == pytest.approx(first_tuned['lr_t'], rel=1e-5)
      assert first_tuned['mu'] == pytest.approx(first_tuned['mu_t'], abs=1e-6)
      assert first_tuned['learning_rate'] == pytest.approx(
          first_tuned['lr'], rel=1e-6)
    else:  # the reference lags: 0.1 % of the way from the initial 1e-4
      assert first_tuned['lr'] == pytest.approx(
          1e-4 + 1e-3 * (first_tuned['lr_t'] - 1e-4), rel=1e-4)


def _quadratic_grads(tx, steps):
  """Runs ``tx`` on a small quadratic; returns hyperparams per step."""
  curv = jnp.array([1.0, 3.0, 10.0])
  params = jnp.array([1.0, -1.0, 0.5])
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    g = curv * params + 0.05 * jax.random.normal(key, params.shape)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  out = []
  for key in jax.random.split(jax.random.key(0), steps):
    params, state = step(params, state, key)
    out.append({k: float(v) for k, v in yf.hyperparams(state).items()})
  return out


def _base_lr(h, smoothed):
  """The tuned learning rate before ``lr_factor``: smoothed or instantaneous."""
  return h['lr'] if smoothed else h['lr_t']


_AUTO_SMOOTHED = yf._alias.AUTO_DEFAULTS.get(  # pylint: disable=protected-access
    'smoothed_hyperparams', False)


def test_auto_total_steps_applies_cosine_of_step():
  total = 30
  hp = _quadratic_grads(yf.yellowfin_auto(total_steps=total), total + 5)
  cosine = optax.cosine_decay_schedule(1.0, total)
  for h in hp[1:]:
    t = int(h['step']) - 1  # the step the update was made at
    assert h['learning_rate'] == pytest.approx(
        _base_lr(h, _AUTO_SMOOTHED) * float(cosine(t)), rel=1e-5, abs=1e-12)
  assert hp[-1]['learning_rate'] == 0.0  # past total_steps
  mid = hp[total // 2]
  assert mid['learning_rate'] < 0.7 * _base_lr(mid, _AUTO_SMOOTHED)


def test_auto_without_total_steps_has_no_decay():
  hp = _quadratic_grads(yf.yellowfin_auto(), 40)
  for h in hp[1:]:
    assert h['learning_rate'] == pytest.approx(_base_lr(h, _AUTO_SMOOTHED),
                                               rel=1e-6)
  assert hp[-1]['learning_rate'] > 0.0


def test_auto_is_yellowfin_with_auto_defaults_and_options_override():
  defaults = yf._alias.AUTO_DEFAULTS  # pylint: disable=protected-access
  a = _quadratic_grads(yf.yellowfin_auto(), 25)
  b = _quadratic_grads(yf.yellowfin(**defaults), 25)
  assert a == b  # same trajectory, bit for bit
  # Options override the defaults: smoothing on applies the smoothed lr.
  hp = _quadratic_grads(yf.yellowfin_auto(smoothed_hyperparams=True,
                                          debias_smoothed=True), 25)
  assert hp[-1]['learning_rate'] == pytest.approx(hp[-1]['lr'], rel=1e-6)
  assert hp[-1]['learning_rate'] != pytest.approx(hp[-1]['lr_t'], rel=1e-3)


def test_yellowfin_is_unchanged_by_the_auto_options():
  grads = _stream(12)
  hp = _run(yf.yellowfin(adaptive_clipping=False, beta=0.9,
                         curvature_window=5), grads)
  np.testing.assert_allclose([h['h_min'] for h in hp],
                             _expected_h_min(grads, 5, 0.9, None), rtol=2e-4)
  for h in hp:  # instantaneous values applied, no decay
    assert h['learning_rate'] == pytest.approx(h['lr_t'], rel=1e-6)
    assert h['momentum'] == pytest.approx(h['mu_t'], abs=1e-7)


def test_step_growth_guard_caps_effective_step_after_anchor():
  tx = yf.tuned_momentum(yf.yellowfin_tuner(
      yf.gradient_statistics(curvature_window=3), curvature_window=3,
      max_step_growth=1.0, step_growth_anchor=4))
  free = yf.tuned_momentum(yf.yellowfin_tuner(
      yf.gradient_statistics(curvature_window=3), curvature_window=3))
  # Shrinking gradients: the free effective step grows, the guarded one
  # stays at its step-4 value.
  grads = [jnp.full((3,), 10.0 * 0.7 ** i) for i in range(14)]
  eff = lambda h: h['learning_rate'] / (1 - h['momentum'])
  guarded, reference = _run(tx, grads), _run(free, grads)
  for h, r in zip(guarded[:5], reference[:5]):
    assert eff(h) == pytest.approx(eff(r), rel=1e-6)
  anchor = eff(guarded[4])
  assert eff(reference[-1]) > 1.5 * anchor  # the case the guard is for
  for h in guarded[5:]:
    assert eff(h) <= anchor * (1 + 1e-5)


def test_auto_benchmark_smoke(tmp_path):
  results = auto.main(['--profile', 'smoke', '--out', str(tmp_path)])
  rec = results['tasks']['digits_linear']
  assert set(rec['summary']) == {'yellowfin', 'guard', 'adam'}
  assert rec['summary']['adam']['speedup_vs_adam']['median'] == 1.0
  for name, s in rec['summary'].items():
    assert s['diverged'] == 0, name
    assert np.isfinite(s['final_smoothed_loss']['median'])
    assert 0.5 < s['metric']['median'] <= 1.0
  # Before its anchor step the guard is exactly yellowfin().
  np.testing.assert_array_equal(rec['logs']['guard']['loss'],
                                rec['logs']['yellowfin']['loss'])
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['tasks']['digits_linear']['steps'] == rec['steps']
  md = (tmp_path / 'results.md').read_text()
  assert md.count('| yellowfin |') == 2  # results row and diagnosis row
  assert set(rec['diagnosis']) == {'yellowfin', 'guard'}
  assert 0.0 <= rec['diagnosis']['yellowfin']['cubic_binds'] <= 1.0
  assert (tmp_path / 'digits_linear.png').stat().st_size > 1000


def test_auto_benchmark_retunes_baselines_at_the_run_length(
    tmp_path, monkeypatch):
  smoke = dict(auto.PROFILES['smoke'], retune=True,
               variants=('yellowfin', 'adam'))
  monkeypatch.setitem(auto.PROFILES, 'smoke', smoke)
  rec = auto.main(['--profile', 'smoke', '--out', str(tmp_path)])[
      'tasks']['digits_linear']
  tuning = rec['tuning']['adam']
  grid = {float(k): v for k, v in tuning['grid'].items()}
  # The grid of the suite (possibly extended), best lr chosen and then used.
  assert set(auto._optimizers.registry()['adam'].grid) <= set(grid)
  assert tuning['chosen_lr'] == min(grid, key=grid.get)
  assert rec['tuned_lr']['adam'] == tuning['chosen_lr']
  assert rec['summary']['adam']['min_smoothed_loss']['min'] <= grid[
      tuning['chosen_lr']] + 1e-6
  assert 'adam re-tuned at this length' in (tmp_path / 'results.md').read_text()
