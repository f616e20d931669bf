"""YellowFin inside the optax idioms people already use.

Each test composes ``yellowfin()`` or ``yellowfin_auto()`` with an optax
combinator and checks the result against the same computation written out
by hand. The steps run eagerly (op by op): a few dozen steps cost less than
compiling each combination (the primitives' compilations are shared).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import yellowfin_optax as yf
from tests._trees import assert_trees_equal

CURVATURES = jnp.array([1.0, 5.0, 20.0])


def _params():
  return {'w': jnp.array([1.0, -2.0, 0.5]), 'b': jnp.array(0.3, jnp.float32)}


def _loss(p):
  return jnp.sum(CURVATURES * p['w'] ** 2) + 3.0 * p['b'] ** 2 + 0.01


def _grad(p, t):
  # A deterministic "noise" term so that the variance estimate is not zero.
  noise = 0.1 * jnp.sin(jnp.arange(3.0) + t)
  g = jax.grad(_loss)(p)
  return {'w': g['w'] + noise, 'b': g['b']}


def _check_against_hand_composition(tx, plain, prepare, steps=12, rtol=1e-6):
  """``tx`` = chain(piece, plain); ``prepare`` does the piece by hand."""
  params = _params()
  state = tx.init(params)
  for t in range(steps):
    g = _grad(params, t)
    value = _loss(params)
    expected_updates, expected_inner = plain.update(
        prepare(g, params), state[1], params, value=value)
    updates, state = tx.update(g, state, params, value=value)
    assert_trees_equal(updates, expected_updates, rtol=rtol, atol=1e-9)
    assert_trees_equal(state[1], expected_inner, rtol=rtol, atol=1e-9)
    params = optax.apply_updates(params, updates)
  return params, state


def test_chain_with_add_decayed_weights():
  wd = 1e-2
  tx = optax.chain(optax.add_decayed_weights(wd), yf.yellowfin_auto())
  prepare = lambda g, p: jax.tree.map(lambda gi, pi: gi + wd * pi, g, p)
  params, state = _check_against_hand_composition(tx, yf.yellowfin_auto(),
                                                  prepare)
  assert int(yf.hyperparams(state)['count']) == 12  # found inside the chain
  assert float(_loss(params)) < float(_loss(_params()))


def test_chain_with_clip_by_global_norm_pins_the_reference_curvature():
  """Clipping before ``yellowfin()`` makes every gradient norm the clip:
  the reference's curvature is ``||g||^2``, so ``h_min`` and ``h_max`` are
  pinned near ``clip**2`` (and the tuned step no longer sees the landscape).
  ``yellowfin_auto`` divides by the loss and is not pinned."""
  max_norm = 0.5  # below the gradient norm, so the clip is active
  tx = optax.chain(optax.clip_by_global_norm(max_norm), yf.yellowfin())

  def prepare(g, _):
    norm = optax.tree.norm(g)
    return jax.tree.map(lambda x: x * jnp.minimum(1.0, max_norm / norm), g)

  # rtol: the clip rounds differently in optax's and the hand-written form,
  # and grad_var, a difference of two nearly equal EMAs once every norm is
  # the clip, amplifies that rounding.
  params, state = _check_against_hand_composition(tx, yf.yellowfin(), prepare,
                                                  rtol=1e-3)
  hp = yf.hyperparams(state)
  np.testing.assert_allclose(float(hp['h_min']), max_norm**2, rtol=1e-4)
  np.testing.assert_allclose(float(hp['h_max']), max_norm**2, rtol=1e-4)
  # yellowfin(clip_norm=...) is the built-in equivalent (torch's 1e-6 epsilon
  # in the denominator is the only difference).
  builtin = yf.yellowfin(clip_norm=max_norm)
  p = _params()
  s = builtin.init(p)
  for t in range(12):
    u, s = builtin.update(_grad(p, t), s, p)
    p = optax.apply_updates(p, u)
  assert_trees_equal(p, params, rtol=1e-4, atol=1e-7)


def _run(tx, steps, params=None, state=None):
  """``steps`` steps with ``value=loss`` (ignored by yellowfin())."""
  params = _params() if params is None else params
  state = tx.init(params) if state is None else state
  for t in range(steps):
    updates, state = tx.update(_grad(params, t), state, params,
                               value=_loss(params))
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize('factory,kwargs,rtol', [
    (yf.yellowfin, {}, 0.0),
    (yf.yellowfin_auto, {}, 0.0),
    # A traced total_steps is divided by at run time, a Python one may be
    # folded into a reciprocal: float32 rounding.
    (yf.yellowfin_auto, {'total_steps': 40}, 1e-5),
])
def test_inject_hyperparams_constant_values_reproduce_plain(factory, kwargs,
                                                            rtol):
  # No static_args: the aliases' hyperparameters are float32-exact numbers
  # (lr_factor=1, the initial values, loss_floor=0) or ints, and the state's
  # shapes come from init.
  p_inj, s_inj = _run(optax.inject_hyperparams(factory)(**kwargs), 25)
  p_plain, s_plain = _run(factory(**kwargs), 25)
  assert_trees_equal(p_inj, p_plain, rtol=rtol)
  assert_trees_equal(s_inj.inner_state, s_plain, rtol=rtol, atol=rtol * 1e-3)
  assert set(s_inj.hyperparams) >= {'lr_factor'} | set(kwargs)


def test_inject_hyperparams_shape_setting_int_needs_no_static_args():
  tx = optax.inject_hyperparams(yf.scale_by_yellowfin)(curvature='loss',
                                                       curvature_window=7)
  _, state = _run(tx, 10)
  assert state.inner_state.window.shape == (7,)
  # beta and eps are injected too, as float32 arrays (1 - float32(0.999) is
  # not 1 - 0.999): compare with the plain transform built with those.
  plain = yf.scale_by_yellowfin(curvature='loss', curvature_window=7,
                                beta=jnp.float32(0.999), eps=jnp.float32(1e-6))
  _, plain_state = _run(plain, 10)
  assert_trees_equal(state.inner_state, plain_state, rtol=1e-6, atol=1e-12)


def test_inject_hyperparams_lr_factor_on_the_fly():
  tx = optax.inject_hyperparams(yf.yellowfin_auto)()
  params, state = _run(tx, 30)
  g, value = _grad(params, 30), _loss(params)
  results = {}
  for factor in (1.0, 0.5):
    s = state._replace(hyperparams={**state.hyperparams,
                                    'lr_factor': jnp.asarray(factor)})
    results[factor] = tx.update(g, s, params, value=value)
  (u1, s1), (u05, s05) = results[1.0], results[0.5]
  hp1, hp05 = yf.hyperparams(s1), yf.hyperparams(s05)
  # The catastrophic-move cap must not be what sets the step here.
  assert float(hp1['learning_rate']) * float(optax.tree.norm(g)) < 100.0
  np.testing.assert_allclose(float(hp05['learning_rate']),
                             0.5 * float(hp1['learning_rate']), rtol=1e-6)
  # The tuner itself is unaffected: same lr_t and momentum.
  assert float(hp05['lr_t']) == float(hp1['lr_t'])
  assert float(hp05['momentum']) == float(hp1['momentum'])
  assert_trees_equal(u05, jax.tree.map(lambda u: 0.5 * u, u1), rtol=1e-6)
  assert float(s05.hyperparams['lr_factor']) == 0.5


def test_inject_hyperparams_beta_on_the_fly():
  tx = optax.inject_hyperparams(yf.scale_by_yellowfin)()
  params, state = _run(tx, 30)
  g = _grad(params, 30)
  s = state._replace(hyperparams={**state.hyperparams,
                                  'beta': jnp.asarray(0.9)})
  _, new = tx.update(g, s, params)
  _, unchanged = tx.update(g, state, params)
  # Hand-composed: the plain optimizer built with beta=0.9 (float32, as the
  # injected value is), applied to the same inner state.
  plain = yf.scale_by_yellowfin(beta=jnp.asarray(0.9, jnp.float32))
  _, expected = plain.update(g, state.inner_state, params)
  assert_trees_equal(new.inner_state, expected, rtol=1e-6, atol=1e-9)
  h_new, h_old = yf.hyperparams(new), yf.hyperparams(unchanged)
  assert abs(float(h_new['h_max']) - float(h_old['h_max'])) > 1e-3 * float(
      h_old['h_max'])


@pytest.mark.parametrize('factory', [yf.yellowfin, yf.yellowfin_auto])
def test_lr_factor_schedule_scales_tuned_lr(factory):
  schedule = optax.cosine_decay_schedule(1.0, decay_steps=20)
  tx = factory(lr_factor=schedule)
  params = _params()
  state = tx.init(params)
  seen_decay = False
  for t in range(25):
    updates, state = tx.update(_grad(params, t), state, params,
                               value=_loss(params))
    params = optax.apply_updates(params, updates)
    hp = yf.hyperparams(state)
    expected = float(hp['lr_t']) * float(schedule(t))
    # rtol: the schedule's float32 cosine, evaluated at a traced count.
    np.testing.assert_allclose(float(hp['learning_rate']), expected,
                               rtol=1e-5, atol=1e-12)
    seen_decay |= 0.0 < float(schedule(t)) < 0.9
  assert seen_decay
  assert float(hp['learning_rate']) == 0.0  # the cosine reached zero


def test_a_schedule_goes_in_lr_factor():
  schedule = optax.linear_schedule(1e-3, 0.0, 100)
  with pytest.raises(TypeError, match='lr_factor'):
    yf.yellowfin(initial_learning_rate=schedule)


def test_tree_get_finds_applied_learning_rate():
  _, state = _run(yf.yellowfin(), 10)
  lr = optax.tree.get(state, 'learning_rate')
  assert float(lr) == float(yf.hyperparams(state)['learning_rate'])
  assert float(optax.tree.get(state, 'momentum')) == float(
      yf.hyperparams(state)['momentum'])
  assert float(lr) != 1e-4  # tuned away from the initial value


def test_tree_get_under_inject_hyperparams():
  # The injected argument is initial_learning_rate: no clash with the
  # state's learning_rate, so tree.get finds the applied one directly.
  tx = optax.inject_hyperparams(yf.yellowfin)()
  _, state = _run(tx, 10)
  lr = optax.tree.get(state, 'learning_rate')
  assert float(lr) == float(yf.hyperparams(state)['learning_rate'])
  assert float(optax.tree.get(state, 'initial_learning_rate')) == (
      pytest.approx(1e-4))


def test_multi_transform_gives_each_group_its_own_tuner():
  params = {
      'embed': jnp.linspace(-1.0, 1.0, 12).reshape(4, 3),
      'dense': {'w': jnp.array([0.5, -0.5]), 'b': jnp.array(0.1)},
  }

  def loss(p):
    # The embedding sees a much flatter landscape than the dense layer.
    return (0.01 * jnp.sum(p['embed'] ** 2)
            + 50.0 * jnp.sum(p['dense']['w'] ** 2) + p['dense']['b'] ** 2)

  labels = lambda p: {'embed': 'embed',
                      'dense': jax.tree.map(lambda _: 'rest', p['dense'])}
  tx = optax.multi_transform({'embed': yf.yellowfin(), 'rest': yf.yellowfin()},
                             labels)
  alone = yf.yellowfin()
  state = tx.init(params)
  alone_state = {'embed': alone.init(params['embed']),
                 'rest': alone.init(params['dense'])}
  p = params
  for t in range(15):
    g = jax.grad(loss)(p)
    g = jax.tree.map(lambda x: x * (1.0 + 0.05 * jnp.sin(t + 0.0)), g)
    updates, state = tx.update(g, state, p)
    u_e, alone_state['embed'] = alone.update(
        g['embed'], alone_state['embed'], p['embed'])
    u_r, alone_state['rest'] = alone.update(
        g['dense'], alone_state['rest'], p['dense'])
    assert_trees_equal(updates, {'embed': u_e, 'dense': u_r}, rtol=1e-6,
                       atol=1e-10)
    p = optax.apply_updates(p, updates)

  with pytest.raises(ValueError, match='holds 2'):
    yf.hyperparams(state)
  hp = {k: yf.hyperparams(state.inner_states[k]) for k in ('embed', 'rest')}
  for k in hp:
    np.testing.assert_allclose(
        float(hp[k]['learning_rate']),
        float(yf.hyperparams(alone_state[k])['learning_rate']), rtol=1e-6)
  # Different curvature, different tuned values.
  assert float(hp['embed']['h_max']) < 0.1 * float(hp['rest']['h_max'])
  assert float(hp['embed']['learning_rate']) > 2 * float(
      hp['rest']['learning_rate'])


def test_multi_transform_forwards_the_loss_to_each_yellowfin_auto():
  params = {'a': jnp.array([1.0, -1.0]), 'b': jnp.array([2.0])}
  tx = optax.multi_transform(
      {'x': yf.yellowfin_auto(), 'y': yf.yellowfin_auto()},
      {'a': 'x', 'b': 'y'})
  alone = yf.yellowfin_auto()
  grads, value = {'a': jnp.array([0.5, -2.0]), 'b': jnp.array([1.0])}, 3.0
  updates, state = tx.update(grads, tx.init(params), params, value=value)
  for key, label in (('a', 'x'), ('b', 'y')):
    u, s = alone.update(grads[key], alone.init(params[key]), params[key],
                        value=value)
    assert_trees_equal(updates[key], u)
    assert float(yf.hyperparams(state.inner_states[label])['h_max']) == (
        float(s.h_max))


def test_reduce_on_plateau_chained_after():
  # Both read value=: yellowfin_auto's curvature, the plateau's loss.
  plateau = optax.contrib.reduce_on_plateau(patience=2, factor=0.5,
                                            cooldown=0, accumulation_size=1)
  tx = optax.chain(yf.yellowfin_auto(), plateau)
  plain = yf.yellowfin_auto()
  params = _params()
  state = tx.init(params)
  value = jnp.asarray(1.0)  # a loss that never improves: the plateau fires
  for t in range(8):
    g = _grad(params, t)
    expected_updates, expected_inner = plain.update(g, state[0], params,
                                                    value=value)
    updates, state = tx.update(g, state, params, value=value)
    scale = state[1].scale
    assert_trees_equal(updates,
                       jax.tree.map(lambda u: scale * u, expected_updates),
                       rtol=1e-6, atol=1e-12)
    assert_trees_equal(state[0], expected_inner)
    params = optax.apply_updates(params, updates)
  assert float(state[1].scale) <= 0.5
  # hyperparams() still finds the tuner inside the chain.
  assert int(yf.hyperparams(state)['count']) == 8


def test_vmap_over_independent_problems_matches_separate_runs():
  """A vmapped yellowfin_auto is three independent ones (its state is
  stacked), and hyperparams() reads the stacked state with its batch axis."""
  tx = yf.yellowfin_auto(total_steps=30)
  starts = jnp.array([[1.0, -2.0, 0.5], [3.0, 0.1, -1.0], [0.2, 0.2, 0.2]])
  loss = lambda x: 0.5 * jnp.sum(CURVATURES * x**2) + 0.01

  def step(x, state):
    value, grads = jax.value_and_grad(loss)(x)
    updates, state = tx.update(grads, state, x, value=value)
    return x + updates, state

  batched_step, single_step = jax.jit(jax.vmap(step)), jax.jit(step)
  params, state = starts, jax.vmap(tx.init)(starts)
  for _ in range(30):
    params, state = batched_step(params, state)
  batched = yf.hyperparams(state)
  assert batched['learning_rate'].shape == (3,)
  for i in range(3):
    p, s = starts[i], tx.init(starts[i])
    for _ in range(30):
      p, s = single_step(p, s)
    np.testing.assert_allclose(params[i], p, rtol=2e-5, atol=1e-7)
    for key, value in yf.hyperparams(s).items():
      # Sums are reordered under vmap: float32 rounding only.
      np.testing.assert_allclose(batched[key][i], value, rtol=1e-4)
  assert float(loss(params[0])) < float(loss(starts[0]))
