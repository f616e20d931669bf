"""Delayed gradients, the total-momentum estimator and the closed loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import yellowfin_optax as yf


@pytest.mark.parametrize('staleness', [0, 1, 3])
def test_delay_is_exact(staleness):
  tx = yf.delayed_gradients(staleness)
  state = tx.init({'a': jnp.zeros(2)})
  step = jax.jit(tx.update)
  for t in range(8):
    out, state = step({'a': jnp.full(2, t + 1.0)}, state)
    want = 0.0 if t < staleness else t + 1.0 - staleness
    np.testing.assert_array_equal(out['a'], want)


def test_inner_is_not_fed_while_the_buffer_fills():
  tx = yf.delayed_gradients(3, yf.yellowfin())
  state = tx.init(jnp.zeros(4))
  for t in range(5):
    _, state = tx.update(jnp.full(4, t + 1.0), state)
    assert int(yf.hyperparams(state)['step']) == max(0, t + 1 - 3)
  # the first gradient the tuner saw is the first one received
  stats = state.inner.inner.tuner.statistics
  np.testing.assert_allclose(stats.sq_norm_window[:2], [4.0, 16.0], rtol=1e-6)


def test_masked_median_matches_numpy():
  rng = np.random.default_rng(0)
  for _ in range(5):
    a, b = rng.normal(0.3, 0.5, size=(37, 5)), rng.normal(0.3, 0.5, size=101)
    ma, mb = rng.random(a.shape) < 0.7, rng.random(b.shape) < 0.7
    med, count = yf.masked_median({'a': jnp.asarray(a), 'b': jnp.asarray(b)},
                                  {'a': jnp.asarray(ma), 'b': jnp.asarray(mb)})
    values = np.concatenate([a[ma], b[mb]])
    assert int(count) == values.size
    np.testing.assert_allclose(med, np.median(values), rtol=1e-6)


def test_integer_key_sort_equals_numpy_sort():
  """masked_median's float32 sort (via int32 keys) orders like np.sort.

  Magnitudes 1e-30..1e30 of both signs, infinities, NaN (last) and signed
  zeros.
  """
  from yellowfin_optax import _closed_loop
  rng = np.random.default_rng(0)
  for _ in range(20):
    x = (rng.standard_normal(1000)
         * 10.0 ** rng.integers(-30, 30, 1000)).astype(np.float32)
    x[rng.integers(0, 1000, 20)] = np.inf
    x[rng.integers(0, 1000, 20)] = -np.inf
    x[rng.integers(0, 1000, 10)] = np.nan
    x[:3], x[3:6] = 0.0, -0.0
    np.testing.assert_array_equal(
        np.asarray(_closed_loop._sort_float32(jnp.asarray(x))), np.sort(x))


def test_masked_median_of_nothing_is_zero():
  med, count = yf.masked_median(jnp.ones(5), jnp.zeros(5, bool))
  assert int(count) == 0 and float(med) == 0.0


def test_sampled_coordinates_are_uniform_and_fixed():
  from yellowfin_optax import _closed_loop
  shapes = [(300, 200), (7,), (), (1000,)]
  a = _closed_loop.sample_coordinates(shapes, 5000)
  b = _closed_loop.sample_coordinates(shapes, 5000)
  assert all(all(np.array_equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))
  counts = [len(idx[0]) for idx in a]
  assert sum(counts) == 5000
  # proportional to leaf size: the big leaf holds ~60000/61008 of them
  assert abs(counts[0] / 5000 - 60000 / 61008) < 0.02
  everything = _closed_loop.sample_coordinates(shapes, None)
  assert [len(i[0]) for i in everything] == [60000, 7, 1, 1000]


def test_sampled_median_estimates_the_median_of_a_large_model():
  """100k coordinates, 4096 sampled: the estimate is the known momentum."""
  tx = yf.total_momentum(optax.sgd(0.01, momentum=0.6), learning_rate=0.01)
  h = jnp.linspace(1.0, 20.0, 100_000)
  x = jnp.ones_like(h)
  state = tx.init(x)
  step = jax.jit(tx.update)
  for _ in range(5):
    u, state = step(h * x, state, x)
    x = x + u
  assert abs(float(state.total_momentum) - 0.6) < 1e-4


def quadratic_run(tx, steps, n=8, noise=0.0, measure_lr=None):
  """Runs ``tx`` on 0.5 sum h x^2; returns per-step hyperparams, losses."""
  h = jnp.exp(jax.random.uniform(jax.random.PRNGKey(0), (n,), maxval=np.log(10.0)))
  x0 = 3.0 * jnp.ones(n)

  def step(carry, key):
    x, state = carry
    g = h * x + noise * jax.random.normal(key, (n,))
    u, state = tx.update(g, state, x)
    hp = yf.hyperparams(state)
    if 'total_momentum' not in hp:
      hp['total_momentum'] = optax.tree.get(state, 'total_momentum')
    return (x + u, state), (hp, 0.5 * jnp.sum(h * x**2))

  keys = jax.random.split(jax.random.PRNGKey(1), steps)
  _, (hp, losses) = jax.jit(lambda: jax.lax.scan(step, (x0, tx.init(x0)), keys))()
  return jax.tree.map(np.asarray, hp), np.asarray(losses)


@pytest.mark.parametrize('mu', [0.3, 0.6, 0.9])
def test_estimator_recovers_known_momentum(mu):
  tx = yf.total_momentum(optax.sgd(0.02, momentum=mu), learning_rate=0.02)
  hp, losses = quadratic_run(tx, 200)
  assert abs(hp['total_momentum'][-1] - mu) < 0.02
  assert abs(np.median(hp['total_momentum'][5:]) - mu) < 0.02


def test_synchronous_measurement_matches_yellowfin_momentum():
  """No staleness: heavy ball's total momentum is mu lr_s / lr_{s-1}."""
  hp, _ = quadratic_run(yf.closed_loop_yellowfin(gain=0.0), 600, noise=0.01)
  lr = hp['learning_rate']
  algorithmic = hp['momentum'][300:] * lr[300:] / lr[299:-1]
  np.testing.assert_allclose(hp['total_momentum'][300:], algorithmic, atol=1e-3)


def test_gain_zero_is_open_loop():
  open_loop = yf.delayed_gradients(2, yf.yellowfin())
  measured = yf.closed_loop_yellowfin(staleness=2, gain=0.0)
  a, la = quadratic_run(open_loop, 300, noise=0.01)
  b, lb = quadratic_run(measured, 300, noise=0.01)
  np.testing.assert_array_equal(la, lb)
  np.testing.assert_array_equal(a['momentum'], b['momentum'])


def test_closed_loop_matches_target_under_delay():
  """Staleness 15: open loop's total momentum exceeds the target; closed
  loop brings its running average within 0.05 of the target."""
  open_hp, _ = quadratic_run(yf.closed_loop_yellowfin(staleness=15, gain=0.0), 2000)
  closed_hp, _ = quadratic_run(yf.closed_loop_yellowfin(staleness=15), 2000)
  late = slice(1000, None)
  assert open_hp['total_momentum'][late].mean() > open_hp['target_momentum'][late].mean()
  gap = closed_hp['total_momentum'][late].mean() - closed_hp['target_momentum'][late].mean()
  assert abs(gap) < 0.05
  # and it did so by lowering the algorithmic momentum below the target
  assert closed_hp['algorithmic_momentum'][late].mean() < closed_hp['target_momentum'][late].mean()


def test_closed_loop_stabilises_a_delayed_run():
  """n = 1, staleness 15: open loop is unstable, closed loop converges."""
  _, open_loss = quadratic_run(yf.closed_loop_yellowfin(staleness=15, gain=0.0),
                               2000, n=1, noise=0.01)
  _, closed_loss = quadratic_run(yf.closed_loop_yellowfin(staleness=15),
                                 2000, n=1, noise=0.01)
  assert closed_loss[-200:].mean() < 1e-3 * open_loss[-200:].mean()


@pytest.mark.parametrize('mu', [0.3, 0.9])
def test_least_squares_estimator_recovers_known_momentum(mu):
  tx = yf.total_momentum(optax.sgd(0.02, momentum=mu), learning_rate=0.02,
                         estimator='least_squares')
  hp, _ = quadratic_run(tx, 200)
  np.testing.assert_allclose(hp['total_momentum'][5:], mu, atol=1e-3)


def test_least_squares_loop_sees_the_unstable_direction():
  """n = 4, staleness 15: the median misses the few unstable coordinates and
  the median loop does not help; the least-squares loop does."""
  runs = {
      name: quadratic_run(
          yf.closed_loop_yellowfin(staleness=15, gain=gain, estimator=est),
          2000, n=4, noise=0.01)[1][-200:].mean()
      for name, gain, est in [('open', 0.0, 'median'),
                              ('least_squares', 0.01, 'least_squares')]
  }
  assert runs['least_squares'] < 1e-2 * runs['open']


def test_unknown_estimator_is_rejected():
  with pytest.raises(ValueError, match='estimator must be one of'):
    yf.closed_loop_yellowfin(estimator='mean')


@pytest.mark.parametrize('staleness', [0, 2])
@pytest.mark.parametrize('nesterov', [False, True])
def test_sampled_updates_from_inputs_match_the_gathered_updates(
    staleness, nesterov):
  """closed_loop_yellowfin's ``updates_at`` hook changes nothing.

  The ring of sampled past updates and the measured total momentum agree
  with gathering the updates themselves (to float32 rounding), with the
  controller acting, clipped steps, and a parameter larger than the
  4096-point sample.
  """
  from yellowfin_optax import _closed_loop
  fast = yf.closed_loop_yellowfin(staleness, gain=0.1, nesterov=nesterov)
  original = _closed_loop.total_momentum
  try:  # the same chain, with the samples gathered from the updates
    _closed_loop.total_momentum = lambda inner, **kw: original(
        inner, **{k: v for k, v in kw.items() if k != 'updates_at'})
    plain = yf.closed_loop_yellowfin(staleness, gain=0.1, nesterov=nesterov)
  finally:
    _closed_loop.total_momentum = original
  params = {'w': jnp.linspace(-1.0, 1.0, 6000).reshape(60, 100),
            'b': jnp.zeros(7)}
  grad = jax.grad(lambda p: jnp.sum(p['w'] ** 4) + jnp.sum((p['b'] - 1) ** 2))
  runs = []
  for tx in (fast, plain):
    p, state, step = params, tx.init(params), jax.jit(tx.update)
    for t in range(40):  # spikes at 10, 11: the clipping paths
      g = jax.tree.map(lambda x: x * (1e3 if t in (10, 11) else 1.0), grad(p))
      u, state = step(g, state, p)
      p = optax.apply_updates(p, u)
    runs.append((p, state))
  (p_fast, s_fast), (p_plain, s_plain) = runs
  ring = lambda s: optax.tree.get(s, 'past_updates')
  for a, b in zip(jax.tree.leaves(ring(s_fast)), jax.tree.leaves(ring(s_plain))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
  hp_fast, hp_plain = yf.hyperparams(s_fast), yf.hyperparams(s_plain)
  assert int(optax.tree.get(s_fast, 'measured')) > 20
  for key in ('total_momentum', 'algorithmic_momentum', 'learning_rate'):
    np.testing.assert_allclose(hp_fast[key], hp_plain[key], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(p_fast), jax.tree.leaves(p_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_closed_loop_configuration_errors_name_the_argument():
  with pytest.raises(ValueError, match='momentum_range must be'):
    yf.closed_loop(yf.total_momentum(optax.sgd(0.1), learning_rate=0.1),
                   momentum_range=(0.5, 0.5))
  tx = yf.total_momentum(optax.sgd(0.1, momentum=0.5))  # no learning_rate
  with pytest.raises(ValueError, match='pass the constant learning_rate'):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


def test_closed_loop_owns_the_momentum_range_it_reports():
  """Built by hand with a narrower range than the default, the applied
  momentum, the reported algorithmic momentum and the anti-windup clip all
  use closed_loop's range (tuned_momentum has none of its own)."""
  low, high = -0.5, 0.3
  tuner = yf.yellowfin_tuner(yf.gradient_statistics())
  tx = yf.closed_loop(yf.total_momentum(yf.tuned_momentum(tuner)), gain=5.0,
                      momentum_range=(low, high))
  params = jnp.linspace(1.0, 2.0, 8)
  state = tx.init(params)
  for _ in range(60):
    before = state
    updates, state = tx.update(params, state)  # gradient of |x|^2 / 2
    params = params + updates
  hp = yf.hyperparams(state)
  applied = float(hp['algorithmic_momentum'])
  assert low - 1e-6 <= applied <= high + 1e-6
  assert applied != float(hp['target_momentum'])  # the loop did move it
  # The momentum the last step really used: v_new = mu v_old + c g.
  trace = lambda s: optax.tree.get(s, 'trace')
  scale = optax.tree.get(state, 'grad_scale')
  grad = params - updates
  used = (trace(state) - scale * grad) / trace(before)
  np.testing.assert_allclose(used, applied, rtol=1e-4)
  delta = float(state.momentum_offset)
  target = float(hp['target_momentum'])
  assert low - 1e-6 <= target + delta <= high + 1e-6  # no wind-up
