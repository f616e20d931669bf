"""yellowfin() as an optax transformation: API, state layout, jit, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import yellowfin_optax as yf
from tests._trees import assert_trees_equal

PARAMS = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}


def grads_at(t):
  return jax.tree.map(lambda p: jnp.sin(p + 0.1 * t + jnp.arange(p.size).reshape(p.shape)), PARAMS)


def run(tx, steps=6, jit=True):
  state = tx.init(PARAMS)
  update = jax.jit(tx.update) if jit else tx.update
  outs = []
  for t in range(steps):
    updates, state = update(grads_at(t), state, PARAMS)
    outs.append(updates)
  return outs, state


def test_jit_and_eager_agree():
  a, sa = run(yf.yellowfin(), jit=True)
  b, sb = run(yf.yellowfin(), jit=False)
  chex_close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-9)
  jax.tree.map(chex_close, a, b)
  jax.tree.map(chex_close, sa, sb)


def test_state_is_two_parameter_size_buffers():
  state = yf.yellowfin().init(PARAMS)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(PARAMS))
  big = [x for x in jax.tree.leaves(state) if x.ndim > 0 and x.shape != (20,)]
  assert sum(x.nbytes for x in big) == 2 * param_bytes
  small = [x for x in jax.tree.leaves(state) if x.ndim == 0 or x.shape == (20,)]
  assert sum(x.size for x in small) < 50


@pytest.mark.parametrize('staleness', [1, 4])
@pytest.mark.parametrize('estimator', ['median', 'least_squares'])
def test_closed_loop_buffers(staleness, estimator):
  """tau + 2 parameter-size buffers (median) or 2 tau + 3 (least squares).

  tau pending gradients and YellowFin's two; least squares also keeps the
  last tau + 1 updates, the median only their 4096 sampled coordinates.
  """
  params = jnp.ones((250, 100))  # bigger than the 4096-coordinate sample x 5
  state = yf.closed_loop_yellowfin(
      staleness=staleness, estimator=estimator).init(params)
  leaves = jax.tree.leaves(state)
  big = sum(x.size for x in leaves if x.size >= params.size)
  if estimator == 'median':
    assert big == (staleness + 2) * params.size
    small = sum(x.size for x in leaves if x.size < params.size)
    assert 4096 * (staleness + 1) <= small < 4096 * (staleness + 1) + 100
  else:
    assert big == (2 * staleness + 3) * params.size


def test_bfloat16_params_keep_float32_statistics():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  tx = yf.yellowfin()
  state = tx.init(params)
  grads = jax.tree.map(lambda p: p.astype(jnp.bfloat16), grads_at(0))
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  stats = state.inner.tuner.statistics
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(stats.grad_ema))
  assert stats.h_max.dtype == jnp.float32


def test_no_host_sync_in_update():
  tx = yf.closed_loop_yellowfin(staleness=2)
  state = tx.init(PARAMS)
  jaxpr = jax.make_jaxpr(tx.update)(grads_at(0), state, PARAMS)
  text = str(jaxpr)
  for primitive in ('callback', 'pure_callback', 'io_callback', 'debug_callback'):
    assert primitive not in text
  step = jax.jit(tx.update)
  args = jax.device_put((grads_at(0), state, PARAMS))
  step(*args)  # compile outside the guard
  with jax.transfer_guard('disallow'):
    updates, new_state = step(*args)
    hp = jax.jit(yf.hyperparams)(new_state)
  assert set(hp) >= {'learning_rate', 'momentum', 'total_momentum'}


def test_no_recompilation():
  tx = yf.yellowfin()
  step = jax.jit(tx.update)
  state = tx.init(PARAMS)
  for t in range(3):
    _, state = step(grads_at(t), state, PARAMS)
  assert step._cache_size() == 1


def test_hyperparams_keys_and_jit():
  _, state = run(yf.yellowfin(), steps=3)
  hp = jax.jit(yf.hyperparams)(state)
  assert set(hp) == {
      'learning_rate', 'momentum', 'lr_t', 'mu_t', 'lr', 'mu', 'h_min',
      'h_max', 'grad_var', 'dist_to_opt', 'step', 'skipped_steps'}
  assert int(hp['step']) == 3
  assert all(v.shape == () for v in hp.values())
  # the applied values are the instantaneous ones by default
  assert float(hp['learning_rate']) == float(hp['lr_t'])


def test_hyperparams_ignores_parameter_names():
  params = {'lr': jnp.ones(2), 'momentum': jnp.ones(()), 'step': jnp.ones(3)}
  tx = yf.yellowfin()
  _, state = tx.update(params, tx.init(params), params)
  assert float(yf.hyperparams(state)['momentum']) == 0.0


def test_hyperparams_rejects_two_optimizers():
  tx = optax.multi_transform({'a': yf.yellowfin(), 'b': yf.yellowfin()},
                             {'w': 'a', 'b': 'b'})
  with pytest.raises(ValueError, match='more than one'):
    yf.hyperparams(tx.init(PARAMS))


def test_smoothed_hyperparams_apply_the_smoothed_values():
  _, state = run(yf.yellowfin(smoothed_hyperparams=True), steps=4)
  hp = yf.hyperparams(state)
  assert float(hp['learning_rate']) == float(hp['lr'])
  assert float(hp['momentum']) == float(hp['mu'])
  assert float(hp['lr']) != float(hp['lr_t'])


def test_heavy_ball_and_nesterov_updates():
  """u = -lr v (heavy ball) or -lr (g + mu v), v = mu v + g on moving steps."""
  for nesterov in (False, True):
    tx = yf.yellowfin(learning_rate=0.1, momentum=0.5, nesterov=nesterov,
                      adaptive_clipping=False)
    state = tx.init(PARAMS)
    trace = jax.tree.map(jnp.zeros_like, PARAMS)
    for t in range(3):
      g = grads_at(t)
      updates, state = tx.update(g, state, PARAMS)
      hp = yf.hyperparams(state)
      lr, mu = hp['learning_rate'], hp['momentum']
      assert float(mu) > 0.0
      trace = jax.tree.map(lambda v, gi: mu * v + gi, trace, g)
      want = jax.tree.map(
          lambda v, gi: -lr * (gi + mu * v if nesterov else v), trace, g)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), updates, want)


def test_zero_momentum_step_leaves_trace_untouched():
  """Step 0 (momentum 0): the update is -lr g and the trace stays zero."""
  tx = yf.yellowfin()
  state = tx.init(PARAMS)
  updates, state = tx.update(grads_at(0), state, PARAMS)
  assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(state.inner.trace))
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -1e-4 * g, rtol=1e-6),
               updates, grads_at(0))


def test_lr_factor_schedule():
  schedule = optax.linear_schedule(1.0, 0.0, 10)
  _, state = run(yf.yellowfin(lr_factor=schedule, adaptive_clipping=False), steps=5)
  hp = yf.hyperparams(state)
  np.testing.assert_allclose(hp['learning_rate'], hp['lr_t'] * schedule(4), rtol=1e-6)


def test_works_in_chain_with_extra_args():
  tx = optax.chain(optax.clip_by_global_norm(1.0), yf.yellowfin())
  state = tx.init(PARAMS)
  updates, _ = tx.update(grads_at(0), state, PARAMS, value=jnp.ones(()))
  assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


def test_multisteps_first_micro_step_is_zero():
  tx = optax.MultiSteps(yf.yellowfin(), every_k_schedule=2)
  updates, _ = tx.update(grads_at(0), tx.init(PARAMS), PARAMS)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))


def test_state_types_stable_under_lax_cond():
  tx = yf.closed_loop_yellowfin(staleness=2)
  state = tx.init(PARAMS)
  new = jax.lax.cond(True, lambda s: tx.update(grads_at(0), s, PARAMS)[1],
                     lambda s: s, state)
  assert jax.tree.map(jax.typeof, new) == jax.tree.map(jax.typeof, state)


def test_converges_on_rosenbrock_in_scan():
  def loss(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)

  tx = yf.yellowfin()
  x0 = jnp.array([-1.0, 1.5, 0.5])

  def step(carry, _):
    x, state = carry
    u, state = tx.update(jax.grad(loss)(x), state, x)
    return (x + u, state), loss(x)

  _, losses = jax.jit(lambda: jax.lax.scan(step, (x0, tx.init(x0)), None, 3000))()
  assert losses[-1] < 0.05 * losses[0]


BAD_CONFIGS = [
    (dict(beta=1.0), 'beta must be in (0.0, 1.0)'),
    (dict(beta=0.0), 'beta must be in (0.0, 1.0)'),
    (dict(curvature_window=0), 'curvature_window must be an int >= 1'),
    (dict(curvature_window=2.5), 'curvature_window must be an int'),
    (dict(stat_protect_factor=-1.0), 'stat_protect_factor must be in [0.0, inf]'),
    (dict(catastrophic_move_threshold=0.0), 'catastrophic_move_threshold must be in (0.0, inf]'),
    (dict(clip_norm=-1.0), 'clip_norm must be in (0.0, inf]'),
    (dict(learning_rate=-1e-3), 'learning_rate must be in [0.0, inf]'),
    (dict(momentum=1.0), 'momentum must be in [0.0, 1.0)'),
    (dict(lr_factor=-1.0), 'lr_factor must be in [0.0, inf]'),
    (dict(eps=-1.0), 'eps must be in (0.0, 1.0)'),
    (dict(eps=0.0), 'eps must be in (0.0, 1.0)'),
    (dict(beta=float('nan')), 'beta must be in'),
    (dict(on_nonfinite='ignore'), 'on_nonfinite must be one of'),
]


@pytest.mark.parametrize('config,message', BAD_CONFIGS)
def test_bad_configuration_is_rejected_at_construction(config, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    yf.yellowfin(**config)


def test_closed_loop_bad_configuration():
  with pytest.raises(ValueError, match='staleness must be an int >= 0'):
    yf.closed_loop_yellowfin(staleness=-1)
  with pytest.raises(ValueError, match=re.escape('gain must be in [0.0, inf]')):
    yf.closed_loop_yellowfin(gain=-0.1)
  with pytest.raises(TypeError, match='Unknown YellowFin option'):
    yf.closed_loop_yellowfin(curvature_windw=10)


@pytest.mark.parametrize('make', [yf.yellowfin, lambda: yf.closed_loop_yellowfin(staleness=2)])
def test_state_from_eager_init_can_be_donated(make):
  """No two state leaves share a buffer (XLA refuses to donate one twice)."""
  tx = make()
  state = tx.init(PARAMS)
  leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
  assert len({id(x) for x in leaves}) == len(leaves)
  step = jax.jit(tx.update, donate_argnums=1)
  for t in range(2):
    _, state = step(grads_at(t), state, PARAMS)


def test_train_step_updates_momentum_buffers_in_place():
  """A donated train step copies no parameter-size buffer.

  Without ``updates_from_state`` the skip's select and the update both read
  the old trace, and XLA copies every trace on every step.
  """
  tx = yf.yellowfin()

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  big = {'w': jnp.ones((64, 32)), 'b': jnp.ones(512)}
  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(
      big, tx.init(big), big).compile().as_text()
  copies = re.findall(r'= f32\[(?:64,32|512)\]\S* copy\(', hlo)
  assert not copies


@pytest.mark.parametrize('nesterov', [False, True])
def test_updates_from_state_match_the_inner_updates(nesterov):
  """Recomputing yellowfin()'s update from its new state changes nothing.

  Same states bit for bit, updates within float32 rounding (XLA may fuse
  the product differently), through clipped, exploding and skipped steps.
  """
  from yellowfin_optax import _alias, _momentum, _nonfinite
  fast = yf.yellowfin(nesterov=nesterov)
  plain = _nonfinite.skip_nonfinite(
      _momentum.tuned_momentum(
          _alias.yellowfin_tuner_from_options(), nesterov=nesterov),
      check_gradients=False)
  params = {'w': jnp.zeros(40), 'h': jnp.zeros((3, 4), jnp.bfloat16)}
  states = [fast.init(params), plain.init(params)]
  steps = [jax.jit(fast.update), jax.jit(plain.update)]
  for t in range(60):
    g = jax.tree.map(
        lambda p: (jnp.sin(jnp.arange(p.size).reshape(p.shape) + t)
                   * (1e3 if t in (30, 31) else 1.0)).astype(p.dtype),
        params)
    if t == 40:
      g['w'] = g['w'].at[3].set(jnp.nan)
    (u_fast, states[0]), (u_plain, states[1]) = [
        step(g, s) for step, s in zip(steps, states)]
    assert_trees_equal(states[0], states[1])
    scale = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(u_plain))
    assert_trees_equal(u_fast, u_plain, rtol=1e-6, atol=1e-6 * scale)
  assert int(states[0].skipped_steps) == 1


def test_tree_dots_group_small_leaves_exactly():
  """The grouped reductions equal per-leaf float64 sums, for mixed trees."""
  from yellowfin_optax import _statistics
  rng = np.random.default_rng(0)
  sizes = [(3,), (5000,), (7, 11), (), (4096,), (64, 64), (1,)]
  a = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in sizes]
  b = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in sizes]
  for trees in ([a, b], [a[1:2], b[1:2]], [a[:1], b[:1]], [a[:4], b[:4]]):
    got = _statistics.tree_dots(tuple(trees), [(0, 0), (0, 1), (1, 1)])
    for (i, j), value in zip([(0, 0), (0, 1), (1, 1)], got):
      want = sum(np.sum(np.float64(x) * np.float64(y))
                 for x, y in zip(trees[i], trees[j]))
      np.testing.assert_allclose(value, want, rtol=2e-6)


def test_small_leaves_are_reduced_together():
  """40 small leaves: the statistics' sums do not cost kernels per leaf.

  XLA:CPU reduces each array under 4096 entries with a reduce-window tree;
  grouped, the three sums need a handful of them, not 3 per leaf.
  """
  params = {f'b{i}': jnp.zeros(100 + i) for i in range(40)}
  tx = yf.yellowfin()
  hlo = jax.jit(tx.update).lower(params, tx.init(params)).compile().as_text()
  assert hlo.count('reduce-window') < 20
