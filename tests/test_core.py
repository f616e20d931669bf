"""yellowfin() as an optax transformation: API, state layout, jit, errors.

Optax's battery (extra args, recompilation, MultiSteps, lax.cond, dtypes,
inject_hyperparams) is tests/test_battery.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import yellowfin_optax as yf
from tests._trees import assert_trees_equal
from yellowfin_optax import _yellowfin

PARAMS = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}


def grads_at(t):
  return jax.tree.map(lambda p: jnp.sin(p + 0.1 * t + jnp.arange(p.size).reshape(p.shape)), PARAMS)


# Compiling an update takes seconds: tests share this one, or run eagerly.
TX = yf.yellowfin()
STEP = jax.jit(TX.update)


def run(tx, steps=6, jit=False):
  state = tx.init(PARAMS)
  update = (STEP if tx is TX else jax.jit(tx.update)) if jit else tx.update
  outs = []
  for t in range(steps):
    updates, state = update(grads_at(t), state, PARAMS)
    outs.append(updates)
  return outs, state


def test_jit_and_eager_agree():
  a, sa = run(TX, jit=True)
  b, sb = run(TX, jit=False)
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
  updates, state = jax.eval_shape(tx.update, grads, state, params)  # types
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.grad_ema))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.trace))
  assert state.h_max.dtype == jnp.float32


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


def test_hyperparams_keys_and_jit():
  _, state = run(TX, steps=3, jit=True)
  hp = jax.jit(yf.hyperparams)(state)
  assert set(hp) == {
      'learning_rate', 'momentum', 'lr_t', 'mu_t', 'lr_smoothed',
      'mu_smoothed', 'h_min', 'h_max', 'grad_var', 'dist_to_opt', 'count',
      'skipped_steps'}
  assert int(hp['count']) == 3
  assert all(v.shape == () for v in hp.values())
  # the applied values are the instantaneous ones by default
  assert float(hp['learning_rate']) == float(hp['lr_t'])


def test_hyperparams_ignores_parameter_names():
  params = {'lr_t': jnp.ones(2), 'momentum': jnp.ones(()), 'count': jnp.ones(3)}
  tx = yf.yellowfin()
  _, state = tx.update(params, tx.init(params), params)
  assert float(yf.hyperparams(state)['momentum']) == 0.0


def test_hyperparams_rejects_two_optimizers():
  tx = optax.multi_transform({'a': yf.yellowfin(), 'b': yf.yellowfin()},
                             {'w': 'a', 'b': 'b'})
  with pytest.raises(ValueError, match='exactly one YellowFin; this one holds 2'):
    yf.hyperparams(tx.init(PARAMS))


def test_hyperparams_rejects_two_in_a_chain():
  tx = optax.chain(yf.yellowfin(), yf.yellowfin_auto())
  with pytest.raises(ValueError, match='holds 2'):
    yf.hyperparams(tx.init(PARAMS))


def test_hyperparams_rejects_a_state_without_yellowfin():
  with pytest.raises(ValueError, match='holds 0 .is it the state of a '
                     'yellowfin_optax optimizer'):
    yf.hyperparams(optax.adam(1e-3).init(PARAMS))


def test_hyperparams_in_a_chain_and_under_vmap():
  tx = optax.chain(optax.clip_by_global_norm(1.0), yf.yellowfin())
  _, state = tx.update(grads_at(0), tx.init(PARAMS), PARAMS)
  assert int(yf.hyperparams(state)['count']) == 1
  stacked = jax.vmap(lambda _: yf.yellowfin().init(PARAMS))(jnp.arange(3))
  hp = yf.hyperparams(stacked)
  assert all(v.shape == (3,) for v in hp.values())


def test_smoothed_hyperparams_apply_the_smoothed_values():
  _, state = run(yf.scale_by_yellowfin(smoothed_hyperparams=True), steps=4)
  hp = yf.hyperparams(state)
  assert float(hp['learning_rate']) == float(hp['lr_smoothed'])
  assert float(hp['momentum']) == float(hp['mu_smoothed'])
  assert float(hp['lr_smoothed']) != float(hp['lr_t'])


def test_heavy_ball_and_nesterov_updates():
  """u = -lr v (heavy ball) or -lr (g + mu v), v = mu v + g on moving steps."""
  for nesterov in (False, True):
    tx = yf.scale_by_yellowfin(initial_learning_rate=0.1, initial_momentum=0.5,
                               nesterov=nesterov, adaptive_clipping=False)
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
  assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(state.trace))
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -1e-4 * g, rtol=1e-6),
               updates, grads_at(0))


def test_lr_factor_schedule():
  schedule = optax.linear_schedule(1.0, 0.0, 10)
  _, state = run(
      yf.scale_by_yellowfin(lr_factor=schedule, adaptive_clipping=False), steps=5)
  hp = yf.hyperparams(state)
  np.testing.assert_allclose(hp['learning_rate'], hp['lr_t'] * schedule(4), rtol=1e-6)


def test_works_in_chain_with_extra_args():
  tx = optax.chain(optax.clip_by_global_norm(1.0), yf.yellowfin())
  state = tx.init(PARAMS)
  updates, _ = tx.update(grads_at(0), state, PARAMS, value=jnp.ones(()))
  assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


BAD_CONFIGS = [
    (dict(beta=1.0), 'beta must be in (0.0, 1.0)'),
    (dict(beta=0.0), 'beta must be in (0.0, 1.0)'),
    (dict(curvature_window=0), 'curvature_window must be an int >= 1'),
    (dict(curvature_window=2.5), 'curvature_window must be an int'),
    (dict(stat_protect_factor=-1.0), 'stat_protect_factor must be in [0.0, inf]'),
    (dict(catastrophic_move_threshold=0.0), 'catastrophic_move_threshold must be in (0.0, inf]'),
    (dict(clip_norm=-1.0), 'clip_norm must be in (0.0, inf]'),
    (dict(initial_learning_rate=-1e-3),
     'initial_learning_rate must be in [0.0, inf]'),
    (dict(initial_momentum=1.0), 'initial_momentum must be in [0.0, 1.0)'),
    (dict(lr_factor=-1.0), 'lr_factor must be in [0.0, inf]'),
    (dict(eps=-1.0), 'eps must be in (0.0, 1.0)'),
    (dict(eps=0.0), 'eps must be in (0.0, 1.0)'),
    (dict(beta=float('nan')), 'beta must be in'),
    (dict(on_nonfinite='ignore'),
     "on_nonfinite must be one of ('skip', 'raise_in_debug', 'propagate')"),
    (dict(curvature='hessian'), "curvature must be one of ('gradient', 'loss')"),
    (dict(beta=jnp.array(-0.5)), 'beta must be in (0.0, 1.0), got -0.5'),
    (dict(beta=jnp.array([0.9, 0.99])), 'beta must be a scalar'),
    (dict(curvature_window=jnp.array(2.5)), 'curvature_window must be an int'),
    (dict(total_steps=0), 'total_steps must be an int >= 1'),
    (dict(direction=optax.identity()), "direction needs curvature='loss'"),
]


# All arguments are keyword-only: a positional one is a TypeError.
POSITIONAL = [
    lambda: yf.yellowfin(1e-3),
    lambda: yf.yellowfin_auto(1000),
    lambda: yf.scale_by_yellowfin('loss'),
    lambda: yf.closed_loop_yellowfin(2),
]


@pytest.mark.parametrize('call', POSITIONAL)
def test_positional_arguments_are_rejected(call):
  with pytest.raises(TypeError, match='positional argument'):
    call()


@pytest.mark.parametrize('factory', [yf.yellowfin, yf.scale_by_yellowfin])
@pytest.mark.parametrize('name', ['initial_learning_rate', 'initial_momentum'])
def test_schedule_as_initial_value_points_to_lr_factor(factory, name):
  schedule = optax.linear_schedule(1e-3, 0.0, 100)
  with pytest.raises(TypeError, match=f'{name} must be a number.*lr_factor'):
    factory(**{name: schedule})
  factory(lr_factor=schedule)  # where a schedule goes


@pytest.mark.parametrize('factory,option', [
    (yf.yellowfin_auto, dict(beta=0.9)),
    (yf.yellowfin_auto, dict(curvature_window=5)),
    (yf.closed_loop_yellowfin, dict(beta=0.9)),
    (yf.yellowfin, dict(learning_rate=1e-3)),
])
def test_aliases_take_only_their_own_options(factory, option):
  """Every option lives on scale_by_yellowfin; the aliases have no
  **options, and the old names learning_rate/momentum are gone."""
  with pytest.raises(TypeError, match=next(iter(option))):
    factory(**option)


@pytest.mark.parametrize('make', [
    yf.yellowfin_auto,
    lambda: yf.scale_by_yellowfin(curvature='loss'),
    lambda: yf.closed_loop_yellowfin(curvature='loss'),
])
def test_loss_curvature_needs_value(make):
  tx = make()
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match=r'update\(grads, state, params, value=loss\)'):
    tx.update(grads_at(0), state, PARAMS)
  if make is yf.yellowfin_auto:  # one successful update (eager)
    updates, _ = tx.update(grads_at(0), state, PARAMS, value=jnp.float32(2.0))
    assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


@pytest.mark.parametrize('config,message', BAD_CONFIGS)
def test_bad_configuration_is_rejected_at_construction(config, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    yf.scale_by_yellowfin(**config)


def test_closed_loop_bad_configuration():
  with pytest.raises(ValueError, match='staleness must be an int >= 0'):
    yf.closed_loop_yellowfin(staleness=-1)
  with pytest.raises(ValueError, match=re.escape('gain must be in [0.0, inf]')):
    yf.closed_loop_yellowfin(gain=-0.1)
  with pytest.raises(TypeError, match='curvature_windw'):
    yf.closed_loop_yellowfin(curvature_windw=10)
  with pytest.raises(ValueError, match="estimator must be one of .'median', "
                     "'least_squares'."):
    yf.closed_loop_yellowfin(estimator='mean')
  with pytest.raises(ValueError, match='momentum_range'):
    yf.closed_loop_yellowfin(momentum_range=(0.5, 0.2))


@pytest.mark.parametrize('make', [
    yf.yellowfin, yf.yellowfin_auto,
    lambda: yf.closed_loop_yellowfin(staleness=2),
    lambda: yf.closed_loop_yellowfin(estimator='least_squares', staleness=1)])
def test_state_from_eager_init_has_no_shared_buffers(make):
  """No two state leaves share a buffer (XLA refuses to donate one twice);
  a donated step runs in test_train_step_updates_momentum_buffers_in_place."""
  state = make().init(PARAMS)
  leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
  assert len({id(x) for x in leaves}) == len(leaves)


def test_train_step_updates_momentum_buffers_in_place():
  """A donated train step copies no parameter-size buffer, and runs.

  ``copy`` is the HLO instruction XLA inserts when a donated buffer is
  still read after it was overwritten (e.g. the skip's select and the update
  both reading the old trace); the update is derived from the selected trace
  so that none is needed.
  """
  tx = yf.yellowfin()

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  big = {'w': jnp.ones((64, 32)), 'b': jnp.ones(512)}
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      big, tx.init(big), big).compile()
  copies = re.findall(r'= f32\[(?:64,32|512)\]\S* copy\(', compiled.as_text())
  assert not copies
  params, state = {k: v + 0.0 for k, v in big.items()}, tx.init(big)
  for _ in range(2):
    old = jax.tree.leaves((params, state))
    params, state = compiled(params, state, big)
    assert all(x.is_deleted() for x in old)  # donated, not copied
  assert int(state.count) == 2


def test_tree_dots_group_small_leaves_exactly():
  """The grouped reductions equal per-leaf float64 sums, for mixed trees."""
  rng = np.random.default_rng(0)
  sizes = [(3,), (5000,), (7, 11), (), (4096,), (64, 64), (1,)]
  a = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in sizes]
  b = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in sizes]
  for trees in ([a, b], [a[1:2], b[1:2]], [a[:1], b[:1]], [a[:4], b[:4]]):
    got = _yellowfin.tree_dots(tuple(trees), [(0, 0), (0, 1), (1, 1)])
    for (i, j), value in zip([(0, 0), (0, 1), (1, 1)], got):
      want = sum(np.sum(np.float64(x) * np.float64(y))
                 for x, y in zip(trees[i], trees[j]))
      np.testing.assert_allclose(value, want, rtol=2e-6)


def test_direction_must_be_a_transformation():
  with pytest.raises(TypeError, match='direction must be an optax.GradientTransformation'):
    yf.yellowfin_auto(direction=lambda g: g)


def _run_directed(tx, steps=30):
  """``steps`` eager updates on a fixed stream with a loss of 2."""
  state, out = tx.init(PARAMS), []
  for t in range(steps):
    updates, state = tx.update(grads_at(t), state, PARAMS, value=jnp.float32(2.0))
    out.append(updates)
  return out, state


def test_identity_direction_is_the_plain_optimizer_bit_for_bit():
  """Along d = g the curvature <g, d> / 2f is ||g||^2 / 2f, exactly."""
  plain, plain_state = _run_directed(yf.yellowfin_auto())
  directed, state = _run_directed(yf.yellowfin_auto(direction=optax.identity()))
  assert_trees_equal(plain, directed)
  assert_trees_equal(plain_state, state._replace(
      direction_state=plain_state.direction_state))


def test_direction_against_the_gradient_is_skipped_and_its_state_kept():
  """<g, d> <= 0: not a descent direction. The step is skipped and the
  direction's own state is left as it was (no silent state change)."""
  tx = yf.yellowfin_auto(direction=optax.chain(
      yf.rms_direction(), optax.scale(-1.0)))
  updates, state = _run_directed(tx, steps=3)
  assert int(state.skipped_steps) == 3 and int(state.count) == 0
  assert all(not np.any(np.asarray(u)) for step in updates
             for u in jax.tree.leaves(step))
  assert_trees_equal(state.direction_state, tx.init(PARAMS).direction_state)


@pytest.mark.parametrize('dtype', [jnp.float16, jnp.bfloat16])
def test_rms_direction_keeps_low_precision_gradients_finite(dtype):
  """A direction runs in float32: float16 gradients of 1e-5 (whose squares
  underflow in float16) still train; updates keep the gradients' dtype."""
  params = {'w': jnp.ones(8, dtype)}
  tx = yf.yellowfin_auto(direction=yf.rms_direction())
  state = tx.init(params)
  assert state.direction_state.nu['w'].dtype == jnp.float32
  for t in range(5):
    grads = {'w': jnp.full(8, 1e-5 * (1 + t), dtype)}
    updates, state = tx.update(grads, state, params, value=jnp.float32(1.0))
  assert updates['w'].dtype == dtype
  assert int(state.skipped_steps) == 0
  assert np.all(np.isfinite(np.asarray(updates['w'], np.float32)))
  assert np.all(np.asarray(updates['w'], np.float32) < 0)


def test_rms_direction_decay_is_checked():
  with pytest.raises(ValueError, match=re.escape('decay must be in (0.0, 1.0)')):
    yf.rms_direction(decay=1.0)
