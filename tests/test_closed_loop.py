"""Delayed gradients, the total-momentum estimators and the closed loop.

The quadratic runs share a few compiled ``lax.scan`` runners: the problem's
curvatures, the loop gain and the gradient noise are traced arguments, so one
compilation per (optimizer kind, staleness, estimator) serves every test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import yellowfin_optax as yf
from yellowfin_optax import _closed_loop

N = 8  # quadratic dimension of every run
STEPS = 2000
STALENESS = 15  # 16 round-robin workers, the paper's Section 4 setting


# ------------------------------------------------------- delayed gradients


@pytest.mark.parametrize('staleness', [0, 1, 3])
def test_delay_is_exact(staleness):
  tx = yf.delayed_gradients(staleness)
  state = tx.init({'a': jnp.zeros(2)})
  step = jax.jit(tx.update)
  for t in range(8):
    out, state = step({'a': jnp.full(2, t + 1.0)}, state)
    want = 0.0 if t < staleness else t + 1.0 - staleness
    np.testing.assert_array_equal(out['a'], want)


TAU = 3
GRADS = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
VALUES = np.random.default_rng(1).uniform(0.5, 2.0, size=12).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _auto(delayed: bool):
  """yellowfin_auto() (the curvature ||g||^2 / 2f needs the loss), behind
  delayed_gradients(TAU) or not: ``(tx, jitted update)``."""
  tx = yf.yellowfin_auto()
  if delayed:
    tx = yf.delayed_gradients(TAU, tx)
  return tx, jax.jit(tx.update)


def test_inner_is_not_fed_while_the_buffer_fills():
  tx, update = _auto(delayed=True)
  state = tx.init(jnp.zeros(5))
  for t in range(TAU + 2):
    u, state = update(GRADS[t], state, value=VALUES[t])
    assert int(yf.hyperparams(state)['count']) == max(0, t + 1 - TAU)
    if t < TAU:
      np.testing.assert_array_equal(u, 0.0)
  # The first curvature samples the tuner saw, ||g||^2 / 2f, are those of the
  # first gradients and losses received, not placeholder zeros.
  first = [np.sum(GRADS[t] ** 2) / (2 * VALUES[t]) for t in range(2)]
  np.testing.assert_allclose(state.inner.window[:2], first, rtol=1e-5)


def test_value_is_delayed_with_its_gradient():
  """delayed_gradients(3, yellowfin_auto()) fed (g_t, f_t) is, from step 3
  on, yellowfin_auto() fed (g_{t-3}, f_{t-3}): the loss travels with its
  gradient (a loss out of step would change every statistic)."""
  (delayed, step_delayed), (direct, step_direct) = _auto(True), _auto(False)
  s_delayed, s_direct = delayed.init(jnp.zeros(5)), direct.init(jnp.zeros(5))
  for t in range(12):
    u, s_delayed = step_delayed(GRADS[t], s_delayed, value=VALUES[t])
    if t < TAU:
      continue
    want, s_direct = step_direct(GRADS[t - TAU], s_direct,
                                 value=VALUES[t - TAU])
    np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-12)
  for a, b in zip(jax.tree.leaves(s_delayed.inner), jax.tree.leaves(s_direct)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert int(yf.hyperparams(s_delayed)['count']) == 12 - TAU
  # The same gradients with the losses shuffled: another trajectory.
  s_other = delayed.init(jnp.zeros(5))
  for t in range(12):
    _, s_other = step_delayed(GRADS[t], s_other, value=VALUES[::-1][t])
  assert not np.allclose(s_other.inner.trace, s_delayed.inner.trace)
  # Without value= the loss-units tuner refuses, naming the argument.
  with pytest.raises(ValueError, match='value='):
    delayed.update(GRADS[0], delayed.init(jnp.zeros(5)))


# ---------------------------------------------- the estimators, pure math


def test_masked_median_matches_numpy():
  """Odd and even counts, one and all entries, values with ties."""
  rng = np.random.default_rng(0)
  median = jax.jit(_closed_loop.masked_median)
  values = rng.normal(0.3, 0.5, size=1000).astype(np.float32)
  values[:10] = values[10]  # ties
  for count in (1, 2, 37, 100, 700, 1000):
    mask = np.zeros(1000, bool)
    mask[rng.choice(1000, count, replace=False)] = True
    med, got = median(jnp.asarray(values), jnp.asarray(mask))
    assert int(got) == count
    np.testing.assert_allclose(med, np.median(values[mask]), rtol=1e-6)
  # Nothing selected: 0.
  med, got = median(jnp.asarray(values), jnp.zeros(1000, bool))
  assert int(got) == 0 and float(med) == 0.0
  med, got = _closed_loop.masked_median(jnp.ones(0), jnp.zeros(0, bool))
  assert int(got) == 0 and float(med) == 0.0


def test_integer_key_sort_equals_numpy_sort():
  """masked_median's float32 sort (via int32 keys) orders like np.sort.

  Magnitudes 1e-30..1e30 of both signs, infinities, NaN (last) and signed
  zeros (-0.0 == 0.0, so equal as values whatever their order).
  """
  rng = np.random.default_rng(0)
  sort = jax.jit(_closed_loop._sort_float32)
  for _ in range(20):
    x = (rng.standard_normal(1000)
         * 10.0 ** rng.integers(-30, 30, 1000)).astype(np.float32)
    x[rng.integers(0, 1000, 20)] = np.inf
    x[rng.integers(0, 1000, 20)] = -np.inf
    x[rng.integers(0, 1000, 10)] = np.nan
    x[:3], x[3:6] = 0.0, -0.0
    np.testing.assert_array_equal(np.asarray(sort(jnp.asarray(x))), np.sort(x))


def test_sampled_coordinates_are_uniform_and_fixed():
  shapes = [(300, 200), (7,), (), (1000,)]
  a = _closed_loop.sample_coordinates(shapes, 5000)
  b = _closed_loop.sample_coordinates(shapes, 5000)
  assert all(all(np.array_equal(x, y) for x, y in zip(p, q))
             for p, q in zip(a, b))
  counts = [len(idx[0]) for idx in a]
  assert sum(counts) == 5000
  # Proportional to leaf size: the big leaf holds ~60000/61008 of them...
  assert abs(counts[0] / 5000 - 60000 / 61008) < 0.02
  # ... spread uniformly over it (rows and columns), without repeats.
  rows, cols = a[0]
  assert len(set(zip(rows.tolist(), cols.tolist()))) == counts[0]
  for index, size in ((rows, 300), (cols, 200)):
    hist = np.bincount(index * 10 // size, minlength=10)
    assert np.all(np.abs(hist - counts[0] / 10) < 5 * np.sqrt(counts[0] / 10))
  everything = _closed_loop.sample_coordinates(shapes, 10**9)
  assert [len(i[0]) for i in everything] == [60000, 7, 1, 1000]


def _heavy_ball_measurement(mu, size=100_000, steps=6, lr=0.01, seed=0):
  """Heavy ball with momentum ``mu`` on a quadratic with ``size``
  coordinates, in float32: the estimator's numerator ``u_t + lr g_t``
  and denominator ``u_{t-1}`` at the last step (their ratio is ``mu``)."""
  rng = np.random.default_rng(seed)
  h = np.linspace(1.0, 20.0, size).astype(np.float32)
  x = rng.normal(size=size).astype(np.float32)
  u_prev = np.zeros(size, np.float32)
  lr, mu = np.float32(lr), np.float32(mu)
  for _ in range(steps):
    g = h * x + np.float32(0.1) * rng.normal(size=size).astype(np.float32)
    u = mu * u_prev - lr * g
    numerator, denominator = u + lr * g, u_prev
    x, u_prev = x + u, u
  return numerator, denominator


@pytest.mark.parametrize('mu', [-0.4, 0.3, 0.6, 0.9])
def test_median_estimator_recovers_known_momentum_of_a_large_model(mu):
  """100k coordinates, the 4096 fixed sampled ones, a tenth of them
  corrupted, some unusable (0 or non-finite): the median is the momentum."""
  numerator, denominator = _heavy_ball_measurement(mu)
  rng = np.random.default_rng(1)
  bad = rng.random(numerator.size) < 0.1
  numerator[bad] = rng.normal(0.0, 10.0, bad.sum())
  kind = rng.integers(0, 100, numerator.size)  # 3% unusable:
  denominator[kind == 0] = 0.0
  numerator[kind == 1] = np.nan
  denominator[kind == 2] = np.inf
  (where,) = _closed_loop.sample_coordinates(
      [numerator.shape], _closed_loop.MEDIAN_SAMPLES)
  assert len(where[0]) == _closed_loop.MEDIAN_SAMPLES
  median = jax.jit(_closed_loop.median_momentum)
  est, count = median(numerator[where], denominator[where])
  usable = ((denominator[where] != 0) & np.isfinite(numerator[where])
            & np.isfinite(denominator[where]))
  assert int(count) == usable.sum() < _closed_loop.MEDIAN_SAMPLES
  assert abs(float(est) - mu) < 0.02
  # Uncorrupted, every ratio is mu to float32 rounding.
  numerator, denominator = _heavy_ball_measurement(mu)
  est, count = median(numerator[where], denominator[where])
  assert int(count) == _closed_loop.MEDIAN_SAMPLES
  assert abs(float(est) - mu) < 1e-4


@pytest.mark.parametrize('mu', [-0.4, 0.3, 0.9])
def test_least_squares_estimator_recovers_known_momentum(mu):
  numerator, denominator = _heavy_ball_measurement(mu)
  split = lambda v: {'a': v[:60_000].reshape(300, 200), 'b': v[60_000:]}
  est, count = jax.jit(_closed_loop.least_squares_momentum)(
      split(numerator), split(denominator))
  assert int(count) == 1
  assert abs(float(est) - mu) < 1e-4
  # It weighs coordinates by d^2: those that move most dominate.
  d = np.array([1e-3, 1e-3, 1.0], np.float32)
  est, _ = _closed_loop.least_squares_momentum(d * [5.0, 5.0, 0.5], d)
  np.testing.assert_allclose(est, 0.5, atol=1e-4)
  est, _ = _closed_loop.median_momentum(d * [5.0, 5.0, 0.5], d)
  np.testing.assert_allclose(est, 5.0, rtol=1e-5)
  # Nothing to fit: count 0.
  _, count = _closed_loop.least_squares_momentum(jnp.ones(3), jnp.zeros(3))
  assert int(count) == 0


# ------------------------------------------------------ quadratic runs


def _problem(n: int):
  """Curvatures log-uniform in [1, 10] of an ``n``-dimensional quadratic,
  padded with inert coordinates (zero curvature, start and noise) to ``N``:
  they never move and no estimator uses them, so one compiled runner serves
  every ``n``. Returns ``(h, x0, noise_mask)``."""
  h = jnp.exp(jax.random.uniform(jax.random.PRNGKey(0), (n,),
                                 maxval=np.log(10.0)))
  pad = lambda v: jnp.concatenate([v, jnp.zeros(N - n)])
  return pad(h), pad(jnp.full(n, 3.0)), pad(jnp.ones(n))


@functools.lru_cache(maxsize=None)
def _runner(kind: str, staleness: int = 0, estimator: str = 'median',
            stale_feed: bool = False, steps: int = STEPS):
  """A jitted ``run(h, x0, gain, noise) -> (hyperparams, loss, params)``,
  each per step (params before the step), on ``0.5 sum h x^2``.

  kind: ``'open'``: ``yellowfin()`` (``delayed_gradients(staleness, .)``);
  ``'closed'``: ``closed_loop_yellowfin``. ``stale_feed``: a real
  asynchronous system, the loop not simulating the delay
  (``simulate_staleness=False``) and fed gradients (and losses) computed at
  the params of ``staleness`` steps earlier (the initial params before
  that). Step ``t`` draws the gradient noise of key ``t``.
  """

  def run(h, x0, gain, noise):
    if kind == 'open':
      tx = yf.yellowfin()
      if staleness:
        tx = yf.delayed_gradients(staleness, tx)
    else:
      tx = yf.closed_loop_yellowfin(
          staleness=staleness, gain=gain, estimator=estimator,
          simulate_staleness=not stale_feed)

    def step(carry, key):
      x, history, state = carry  # history: params of the last tau+1 steps
      at = history[0] if stale_feed else x
      g = h * at + noise * jax.random.normal(key, (N,))
      u, state = tx.update(g, state, x, value=0.5 * jnp.sum(h * at**2))
      new = x + u
      history = jnp.concatenate([history[1:], new[None]])
      return (new, history, state), (yf.hyperparams(state),
                                     0.5 * jnp.sum(h * x**2), x)

    history = jnp.broadcast_to(x0, (staleness + 1, N))
    keys = jax.random.split(jax.random.PRNGKey(1), steps)
    _, out = jax.lax.scan(step, (x0, history, tx.init(x0)), keys)
    return out

  return jax.jit(run)


def quadratic_run(kind, n=N, gain=0.01, noise=0.0, **options):
  h, x0, mask = _problem(n)
  hp, losses, xs = _runner(kind, **options)(h, x0, gain, noise * mask)
  return jax.tree.map(np.asarray, hp), np.asarray(losses), np.asarray(xs)


@pytest.mark.parametrize('estimator', ['median', 'least_squares'])
def test_synchronous_measurement_matches_yellowfin_momentum(estimator):
  """No staleness: heavy ball's total momentum is mu lr_s / lr_{s-1}
  (the tuner's momentum and learning rate vary step to step)."""
  hp, _, _ = quadratic_run('closed', gain=0.0, noise=0.01, estimator=estimator)
  lr, mu = hp['learning_rate'], hp['momentum']
  late = slice(300, None)
  assert np.ptp(lr[late]) > 0.01 * lr[late].mean()  # it does vary
  algorithmic = mu[late] * lr[late] / lr[299:-1]
  np.testing.assert_allclose(hp['total_momentum'][late], algorithmic,
                             atol=1e-3)
  np.testing.assert_array_equal(hp['momentum'], hp['target_momentum'])


def test_gain_zero_is_open_loop_bit_for_bit():
  open_hp, open_loss, open_x = quadratic_run('open', noise=0.01)
  hp, loss, x = quadratic_run('closed', gain=0.0, noise=0.01)
  np.testing.assert_array_equal(x, open_x)
  np.testing.assert_array_equal(loss, open_loss)
  for key in ('learning_rate', 'momentum', 'count'):
    np.testing.assert_array_equal(hp[key], open_hp[key], err_msg=key)
  assert not np.allclose(x[-1], x[0])


def test_gain_zero_is_delayed_open_loop_bit_for_bit():
  open_hp, _, open_x = quadratic_run('open', noise=0.01, staleness=STALENESS)
  hp, _, x = quadratic_run('closed', gain=0.0, noise=0.01,
                           staleness=STALENESS)
  np.testing.assert_array_equal(x, open_x)
  for key in ('learning_rate', 'momentum', 'count'):
    np.testing.assert_array_equal(hp[key], open_hp[key], err_msg=key)
  # Nothing moves while the ring fills.
  np.testing.assert_array_equal(
      x[:STALENESS + 1], np.broadcast_to(x[0], (STALENESS + 1, N)))
  assert not np.array_equal(x[STALENESS + 1], x[0])


def test_closed_loop_matches_target_under_delay():
  """Staleness 15: open loop's total momentum exceeds the target; closed
  loop brings its running average within 0.05 of the target."""
  open_hp, _, _ = quadratic_run('closed', gain=0.0, staleness=STALENESS)
  closed_hp, _, _ = quadratic_run('closed', staleness=STALENESS)
  late = slice(1000, None)
  assert (open_hp['total_momentum'][late].mean()
          > open_hp['target_momentum'][late].mean())
  gap = (closed_hp['total_momentum'][late].mean()
         - closed_hp['target_momentum'][late].mean())
  assert abs(gap) < 0.05
  # ... by lowering the applied (algorithmic) momentum below the target.
  assert (closed_hp['momentum'][late].mean()
          < closed_hp['target_momentum'][late].mean())


def test_closed_loop_stabilises_a_delayed_run():
  """n = 1, staleness 15: open loop is unstable, closed loop
  converges."""
  _, open_loss, _ = quadratic_run('closed', 1, gain=0.0, noise=0.01,
                                  staleness=STALENESS)
  _, closed_loss, _ = quadratic_run('closed', 1, noise=0.01,
                                    staleness=STALENESS)
  assert closed_loss[-200:].mean() < 1e-3 * open_loss[-200:].mean()


def test_least_squares_loop_sees_the_unstable_direction():
  """n = 4, staleness 15: the median misses the few unstable
  coordinates; the least-squares loop stabilises them."""
  _, open_loss, _ = quadratic_run('closed', 4, gain=0.0, noise=0.01,
                                  staleness=STALENESS)
  _, ls_loss, _ = quadratic_run('closed', 4, noise=0.01,
                                staleness=STALENESS,
                                estimator='least_squares')
  assert ls_loss[-200:].mean() < 1e-2 * open_loss[-200:].mean()


@pytest.mark.parametrize('estimator', [
    'median', pytest.param('least_squares', marks=pytest.mark.slow)])
def test_real_async_equals_simulated_delay(estimator):
  """closed_loop_yellowfin(staleness=tau, simulate_staleness=False) fed
  gradients (and losses) that are already tau steps stale is the simulated
  closed_loop_yellowfin(staleness=tau) fed fresh ones, once the simulated
  run's tau idle warm-up steps are accounted for."""
  tau = STALENESS
  sim_hp, _, sim_x = quadratic_run('closed', noise=0.01, staleness=tau,
                                   estimator=estimator)
  real_hp, _, real_x = _real_run(estimator)
  np.testing.assert_array_equal(  # the idle warm-up
      sim_x[:tau + 1], np.broadcast_to(sim_x[0], (tau + 1, N)))
  np.testing.assert_allclose(real_x, sim_x[tau:], rtol=1e-6, atol=1e-6)
  for key in ('learning_rate', 'momentum', 'target_momentum'):
    np.testing.assert_allclose(real_hp[key], sim_hp[key][tau:], rtol=1e-6,
                               atol=1e-6, err_msg=key)
  # The measured total momentum is a ratio of consecutive updates: once the
  # run has converged to the noise floor (|x| ~ 1e-3) the float32 rounding
  # of the two compiled programs is amplified in it; before, it agrees to
  # 1e-6 too.
  total, sim_total = real_hp['total_momentum'], sim_hp['total_momentum'][tau:]
  np.testing.assert_allclose(total[:1000], sim_total[:1000], atol=1e-6)
  np.testing.assert_allclose(total, sim_total, atol=1e-4)
  np.testing.assert_array_equal(real_hp['count'], sim_hp['count'][tau:])
  # The loop acted: measured, and corrected the momentum.
  assert np.mean(real_hp['momentum'][-500:]
                 < real_hp['target_momentum'][-500:]) > 0.5
  assert np.all(real_hp['total_momentum'][-500:] != 0)


def _real_run(estimator):
  return quadratic_run('closed', noise=0.01, staleness=STALENESS,
                       estimator=estimator, stale_feed=True,
                       steps=STEPS - STALENESS)


# ------------------------------------------------ small models, jitted steps


PARAMS = {'w': jnp.linspace(-1.0, 1.0, 6000).reshape(60, 100),
          'b': jnp.zeros(7)}  # 6007 entries: more than the 4096 sampled


def _loss(p):
  return jnp.sum(p['w'] ** 4) + jnp.sum((p['b'] - 1) ** 2)


_grad = jax.jit(jax.grad(_loss))


@functools.lru_cache(maxsize=None)
def _small_loop(staleness, estimator='median', nesterov=False, simulate=False,
                curvature='gradient', gain=0.1):
  """``(tx, jitted update)`` of a closed loop (compiled once per config)."""
  tx = yf.closed_loop_yellowfin(staleness=staleness, gain=gain,
                                estimator=estimator, nesterov=nesterov,
                                simulate_staleness=simulate,
                                curvature=curvature)
  return tx, jax.jit(tx.update)


@pytest.mark.parametrize('staleness,nesterov', [
    pytest.param(0, False, marks=pytest.mark.slow), (2, True)])
def test_sampled_past_updates_are_the_updates_at_the_sampled_coordinates(
    staleness, nesterov):
  """The median's ring holds, at the fixed sampled coordinates, exactly the
  updates applied (computed from the inputs there), with the controller
  acting, clipped steps and a parameter larger than the sample."""
  tx, update = _small_loop(staleness, nesterov=nesterov)
  shapes = [x.shape for x in jax.tree.leaves(PARAMS)]
  where = _closed_loop.sample_coordinates(shapes, _closed_loop.MEDIAN_SAMPLES)
  take = lambda tree: np.concatenate(
      [np.asarray(x)[i] for x, i in zip(jax.tree.leaves(tree), where)])
  p, state = PARAMS, tx.init(PARAMS)
  assert state.past_updates.shape == (staleness + 1,
                                      _closed_loop.MEDIAN_SAMPLES)
  for t in range(40):  # spikes at 10, 11: the clipping paths
    g = jax.tree.map(lambda x: x * (1e3 if t in (10, 11) else 1.0), _grad(p))
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
    want = take(u)
    np.testing.assert_allclose(
        state.past_updates[t % (staleness + 1)], want, rtol=1e-5,
        atol=1e-6 * np.abs(want).max())
  hp = yf.hyperparams(state)
  assert int(hp['count']) == 40 and int(hp['skipped_steps']) == 0
  assert int(state.measured) == 40 - staleness - 1
  assert float(state.momentum_offset) != 0.0


def _assert_skipped(before, after, updates):
  """``after`` is ``before`` bit for bit, but for skipped_steps + 1; the
  update is zero."""
  hb, ha = yf.hyperparams(before), yf.hyperparams(after)
  assert int(ha['skipped_steps']) == int(hb['skipped_steps']) + 1
  flat_b = jax.tree_util.tree_leaves_with_path(before)
  flat_a = jax.tree_util.tree_leaves_with_path(after)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, a), (_, b) in zip(flat_a, flat_b):
    if 'skipped_steps' not in jax.tree_util.keystr(path):
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  for x in jax.tree.leaves(updates):
    np.testing.assert_array_equal(x, 0.0)


def _warm_up(tx, update, steps=12):
  p, state = PARAMS, tx.init(PARAMS)
  for _ in range(steps):
    u, state = update(_grad(p), state, p, value=_loss(p))
    p = optax.apply_updates(p, u)
  return p, state


def _nonfinite(tree, bad):
  return jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(bad), tree)


@pytest.mark.parametrize('staleness,estimator,nesterov,curvature', [
    pytest.param(0, 'median', False, 'gradient', marks=pytest.mark.slow),
    (2, 'median', True, 'gradient'),
    pytest.param(2, 'least_squares', False, 'loss', marks=pytest.mark.slow),
])
def test_nonfinite_and_absurd_steps_are_skipped_bit_identically(
    staleness, estimator, nesterov, curvature):
  """NaN, inf and absurd (||g||^2 > 1e10 h_max) gradients (and a NaN loss in
  loss units) leave the whole closed-loop state (tuner, controller, rings)
  bit-identical but for skipped_steps, and apply nothing; then training
  resumes."""
  tx, update = _small_loop(staleness, estimator, nesterov,
                           curvature=curvature)
  p, state = _warm_up(tx, update)
  assert isinstance(state, yf.ClosedLoopState)
  assert int(state.measured) > 0 and float(state.momentum_offset) != 0.0
  g, value = _grad(p), _loss(p)
  bad_inputs = [(_nonfinite(g, jnp.nan), value),
                (_nonfinite(g, jnp.inf), value),
                (jax.tree.map(lambda x: x * 1e6, g), value)]  # 1e12 ||g||^2
  if curvature == 'loss':
    bad_inputs.append((g, jnp.float32(jnp.nan)))
  for grads, v in bad_inputs:
    u, new = update(grads, state, p, value=v)
    _assert_skipped(state, new, u)
    state = new
  u, state = update(g, state, p, value=value)
  hp = yf.hyperparams(state)
  assert int(hp['count']) == 13
  assert int(hp['skipped_steps']) == len(bad_inputs)
  assert all(np.all(np.isfinite(x)) and np.any(x != 0)
             for x in jax.tree.leaves(u))


def test_simulated_delay_skips_a_nonfinite_gradient_when_it_arrives():
  """With the simulated delay a NaN gradient waits in the ring; the step that
  applies it leaves the closed loop's state bit-identical but for
  skipped_steps."""
  tau = 2
  tx, update = _small_loop(tau, simulate=True, gain=0.02)
  p, state = _warm_up(tx, update)
  assert isinstance(state, yf.DelayedGradientsState)
  g = _grad(p)
  inputs = [_nonfinite(g, jnp.nan)] + [g] * 4
  history = []
  for grads in inputs:
    u, new = update(grads, state, p)
    history.append((state, new, u))
    state = new
  for t, (before, after, u) in enumerate(history):
    if t == tau:  # the NaN gradient arrives
      _assert_skipped(before.inner, after.inner, u)
    else:
      assert not np.array_equal(after.inner.yellowfin.trace['w'],
                                before.inner.yellowfin.trace['w'])
  assert int(yf.hyperparams(state)['skipped_steps']) == 1


def test_closed_loop_owns_the_momentum_range_it_applies():
  """A narrower range than the default: the applied momentum stays in it,
  the loop moved it off the target, and the controller does not wind up."""
  low, high = -0.5, 0.3
  tx = yf.closed_loop_yellowfin(gain=5.0, momentum_range=(low, high))
  update = jax.jit(tx.update)
  params = jnp.linspace(1.0, 2.0, 8)
  state = tx.init(params)
  for _ in range(60):
    before = state
    updates, state = update(params, state, params)  # gradient of |x|^2 / 2
    params = params + updates
  hp = yf.hyperparams(state)
  applied = float(hp['momentum'])
  target = float(hp['target_momentum'])
  assert low - 1e-6 <= applied <= high + 1e-6
  assert applied != target  # the loop did move it
  # The momentum the last step really used: v_new = mu v_old + g.
  grad = params - updates
  used = (state.yellowfin.trace - grad) / before.yellowfin.trace
  np.testing.assert_allclose(used, applied, rtol=1e-4)
  delta = float(state.momentum_offset)
  assert low - 1e-6 <= target + delta <= high + 1e-6  # no wind-up


def test_inject_hyperparams_needs_no_static_args():
  """optax.inject_hyperparams(closed_loop_yellowfin)(staleness=2, gain=0.02)
  runs (init eagerly, update jitted) like the plain optimizer, and its gain
  can be changed in the state."""
  injected = optax.inject_hyperparams(yf.closed_loop_yellowfin)(
      staleness=2, gain=0.02)
  plain, plain_update = _small_loop(2, simulate=True, gain=0.02)
  update = jax.jit(injected.update)
  state, p = injected.init(PARAMS), PARAMS
  plain_state, plain_p = plain.init(PARAMS), PARAMS
  for _ in range(20):
    u, state = update(_grad(p), state, p)
    p = optax.apply_updates(p, u)
    u, plain_state = plain_update(_grad(plain_p), plain_state, plain_p)
    plain_p = optax.apply_updates(plain_p, u)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(plain_p)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  hp, plain_hp = yf.hyperparams(state), yf.hyperparams(plain_state)
  assert int(hp['count']) == 18
  for key in ('learning_rate', 'momentum', 'total_momentum'):
    np.testing.assert_allclose(hp[key], plain_hp[key], rtol=1e-6, atol=1e-7)
  loop = state.inner_state.inner
  assert isinstance(loop, yf.ClosedLoopState)
  assert float(loop.momentum_offset) != 0.0
  # Gain 0 from now on: the correction stays where it is.
  state.hyperparams['gain'] = jnp.zeros_like(state.hyperparams['gain'])
  for _ in range(3):
    u, state = update(_grad(p), state, p)
    p = optax.apply_updates(p, u)
  np.testing.assert_array_equal(state.inner_state.inner.momentum_offset,
                                loop.momentum_offset)
  assert int(yf.hyperparams(state)['count']) == 21


@pytest.mark.parametrize('kwargs,name', [
    ({'staleness': -1}, 'staleness'),
    ({'staleness': 1.5}, 'staleness'),
    ({'gain': -1.0}, 'gain'),
    ({'gain': float('nan')}, 'gain'),
    ({'estimator': 'x'}, 'estimator'),
    ({'momentum_range': (0.5, 0.1)}, 'momentum_range'),
    ({'momentum_range': (-1.5, 0.5)}, 'momentum_range'),
])
def test_closed_loop_configuration_errors_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    yf.closed_loop_yellowfin(**kwargs)


def test_delayed_gradients_rejects_a_negative_staleness():
  with pytest.raises(ValueError, match='staleness'):
    yf.delayed_gradients(-1)
  with pytest.raises(TypeError):
    yf.closed_loop_yellowfin(2)  # keyword-only
