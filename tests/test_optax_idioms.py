"""YellowFin inside the optax idioms people already use.

Each test composes ``yellowfin()`` with an optax combinator and checks the
result against the same computation written out by hand.
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
  return {'w': jnp.array([1.0, -2.0, 0.5]), 'b': jnp.array(0.3)}


def _loss(p):
  return jnp.sum(CURVATURES * p['w'] ** 2) + 3.0 * p['b'] ** 2


def _grad(p, t):
  # A deterministic "noise" term so that the variance estimate is not zero.
  noise = 0.1 * jnp.sin(jnp.arange(3.0) + t)
  g = jax.grad(_loss)(p)
  return {'w': g['w'] + noise, 'b': g['b']}


def _check_against_hand_composition(tx, prepare, steps=12):
  """``tx`` = chain(piece, yellowfin()); ``prepare`` does the piece by hand."""
  plain = yf.yellowfin()
  params = _params()
  state = tx.init(params)
  for t in range(steps):
    g = _grad(params, t)
    expected_updates, expected_inner = plain.update(
        prepare(g, params), state[1], params)
    updates, state = tx.update(g, state, params)
    assert_trees_equal(updates, expected_updates, rtol=1e-6, atol=1e-9)
    assert_trees_equal(state[1], expected_inner, rtol=1e-6, atol=1e-9)
    params = optax.apply_updates(params, updates)
  return params, state


def test_chain_with_add_decayed_weights():
  wd = 1e-2
  tx = optax.chain(optax.add_decayed_weights(wd), yf.yellowfin())
  prepare = lambda g, p: jax.tree.map(lambda gi, pi: gi + wd * pi, g, p)
  _, state = _check_against_hand_composition(tx, prepare)
  # The tuner saw the decayed gradient, not the raw one: its step count moved.
  assert int(yf.hyperparams(state)['step']) == 12


def test_chain_with_clip_by_global_norm():
  max_norm = 0.5  # below the gradient norm, so the clip is active
  tx = optax.chain(optax.clip_by_global_norm(max_norm), yf.yellowfin())

  def prepare(g, _):
    norm = optax.tree.norm(g)
    return jax.tree.map(lambda x: x * jnp.minimum(1.0, max_norm / norm), g)

  params, _ = _check_against_hand_composition(tx, prepare)
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
  params = _params() if params is None else params
  state = tx.init(params) if state is None else state
  for t in range(steps):
    updates, state = tx.update(_grad(params, t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_inject_hyperparams_constant_values_reproduce_plain_exactly():
  # beta and eps static: injected as arrays they would be rounded to float32,
  # and 1 - float32(beta) is not 1 - beta (see the spec's Precision rule).
  injected = optax.inject_hyperparams(
      yf.yellowfin, static_args=('curvature_window', 'beta', 'eps'))()
  p_inj, s_inj = _run(injected, 25)
  p_plain, s_plain = _run(yf.yellowfin(), 25)
  assert_trees_equal(p_inj, p_plain)
  assert_trees_equal(s_inj.inner_state, s_plain)


def test_inject_hyperparams_lr_factor_on_the_fly():
  tx = optax.inject_hyperparams(yf.yellowfin,
                                static_args=('curvature_window',))()
  params, state = _run(tx, 30)
  g = _grad(params, 30)
  results = {}
  for factor in (1.0, 0.5):
    s = state._replace(hyperparams={**state.hyperparams,
                                    'lr_factor': jnp.asarray(factor)})
    results[factor] = tx.update(g, s, params)
  (u1, s1), (u05, s05) = results[1.0], results[0.5]
  hp1, hp05 = yf.hyperparams(s1), yf.hyperparams(s05)
  # The catastrophic-move cap must not be what sets the step here.
  grad_norm = float(optax.tree.norm(g))
  assert float(hp1['learning_rate']) * grad_norm < 100.0
  np.testing.assert_allclose(float(hp05['learning_rate']),
                             0.5 * float(hp1['learning_rate']), rtol=1e-6)
  # The tuner itself is unaffected: same lr_t and momentum.
  assert float(hp05['lr_t']) == float(hp1['lr_t'])
  assert float(hp05['momentum']) == float(hp1['momentum'])
  assert_trees_equal(u05, jax.tree.map(lambda u: 0.5 * u, u1), rtol=1e-6)
  assert float(s05.hyperparams['lr_factor']) == 0.5


def test_inject_hyperparams_beta_on_the_fly():
  tx = optax.inject_hyperparams(yf.yellowfin,
                                static_args=('curvature_window',))()
  params, state = _run(tx, 30)
  g = _grad(params, 30)
  s = state._replace(hyperparams={**state.hyperparams,
                                  'beta': jnp.asarray(0.9)})
  _, new = tx.update(g, s, params)
  _, unchanged = tx.update(g, state, params)
  # Hand-composed: the plain optimizer built with beta=0.9 (float32, as the
  # injected value is), applied to the same inner state.
  _, expected = yf.yellowfin(beta=jnp.asarray(0.9, jnp.float32)).update(
      g, state.inner_state, params)
  assert_trees_equal(new.inner_state, expected, rtol=1e-6, atol=1e-9)
  h_new, h_old = yf.hyperparams(new), yf.hyperparams(unchanged)
  assert abs(float(h_new['h_max']) - float(h_old['h_max'])) > 1e-3 * float(
      h_old['h_max'])


def test_lr_factor_schedule_scales_tuned_lr():
  schedule = optax.cosine_decay_schedule(1.0, decay_steps=20)
  tx = yf.yellowfin(lr_factor=schedule)
  params = _params()
  state = tx.init(params)
  seen_decay = False
  for t in range(25):
    updates, state = tx.update(_grad(params, t), state, params)
    params = optax.apply_updates(params, updates)
    hp = yf.hyperparams(state)
    expected = float(hp['lr_t']) * float(schedule(t))
    np.testing.assert_allclose(float(hp['learning_rate']), expected,
                               rtol=1e-6, atol=1e-12)
    seen_decay |= 0.0 < float(schedule(t)) < 0.9
  assert seen_decay
  assert float(hp['learning_rate']) == 0.0  # the cosine reached zero


def test_tree_get_finds_applied_learning_rate():
  params, state = _run(yf.yellowfin(), 10)
  del params
  lr = optax.tree.get(state, 'learning_rate')
  assert float(lr) == float(yf.hyperparams(state)['learning_rate'])
  assert float(optax.tree.get(state, 'momentum')) == float(
      yf.hyperparams(state)['momentum'])
  assert float(lr) != 1e-4  # tuned away from the initial value


def test_tree_get_under_inject_hyperparams_needs_the_inner_state():
  # inject_hyperparams also stores the *initial* learning_rate under the same
  # name, so optax.tree.get on the whole state is ambiguous; hyperparams()
  # and tree.get on inner_state are not.
  tx = optax.inject_hyperparams(yf.yellowfin,
                                static_args=('curvature_window',))()
  _, state = _run(tx, 10)
  with pytest.raises(KeyError, match='multiple values'):
    optax.tree.get(state, 'learning_rate')
  lr = optax.tree.get(state.inner_state, 'learning_rate')
  assert float(lr) == float(yf.hyperparams(state)['learning_rate'])


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
  alone = {'embed': yf.yellowfin(), 'rest': yf.yellowfin()}
  state = tx.init(params)
  alone_state = {'embed': alone['embed'].init(params['embed']),
                 'rest': alone['rest'].init(params['dense'])}
  p = params
  for t in range(15):
    g = jax.grad(loss)(p)
    g = jax.tree.map(lambda x: x * (1.0 + 0.05 * jnp.sin(t + 0.0)), g)
    updates, state = tx.update(g, state, p)
    u_e, alone_state['embed'] = alone['embed'].update(
        g['embed'], alone_state['embed'], p['embed'])
    u_r, alone_state['rest'] = alone['rest'].update(
        g['dense'], alone_state['rest'], p['dense'])
    assert_trees_equal(updates, {'embed': u_e, 'dense': u_r}, rtol=1e-6,
                        atol=1e-10)
    p = optax.apply_updates(p, updates)

  with pytest.raises(ValueError, match='more than one'):
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


def test_reduce_on_plateau_chained_after():
  plateau = optax.contrib.reduce_on_plateau(patience=2, factor=0.5,
                                            cooldown=0, accumulation_size=1)
  tx = optax.chain(yf.yellowfin(), plateau)
  plain = yf.yellowfin()
  params = _params()
  state = tx.init(params)
  for t in range(8):
    g = _grad(params, t)
    expected_updates, expected_inner = plain.update(g, state[0], params)
    # A loss that never improves: the plateau must fire.
    updates, state = tx.update(g, state, params, value=jnp.asarray(1.0))
    scale = state[1].scale
    assert_trees_equal(updates,
                        jax.tree.map(lambda u: scale * u, expected_updates),
                        rtol=1e-6, atol=1e-12)
    assert_trees_equal(state[0], expected_inner)
    params = optax.apply_updates(params, updates)
  assert float(state[1].scale) <= 0.5
  # hyperparams() still finds the tuner inside the chain.
  assert int(yf.hyperparams(state)['step']) == 8


def test_vmap_over_independent_problems_matches_separate_runs():
  """A vmapped YellowFin is three independent ones (its state is stacked),
  and hyperparams() reads the stacked state with its batch axis."""
  tx = yf.yellowfin()
  starts = jnp.array([[1.0, -2.0, 0.5], [3.0, 0.1, -1.0], [0.2, 0.2, 0.2]])
  grad = jax.vmap(jax.grad(lambda x: 0.5 * jnp.sum(CURVATURES * x**2)))
  step = jax.jit(jax.vmap(tx.update))
  params, state = starts, jax.vmap(tx.init)(starts)
  for _ in range(30):
    updates, state = step(grad(params), state)
    params = params + updates
  batched = yf.hyperparams(state)
  assert batched['learning_rate'].shape == (3,)
  single = jax.jit(tx.update)
  for i in range(3):
    p, s = starts[i], tx.init(starts[i])
    for _ in range(30):
      u, s = single(CURVATURES * p, s)
      p = p + u
    np.testing.assert_allclose(params[i], p, rtol=2e-5, atol=1e-7)
    for key, value in yf.hyperparams(s).items():
      np.testing.assert_allclose(batched[key][i], value, rtol=1e-4)  # sums
      # are reordered under vmap: float32 rounding only
