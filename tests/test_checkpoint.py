"""Orbax checkpoints of YellowFin state: exact resume, config mismatch errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import yellowfin_optax as yf
from tests._trees import assert_trees_equal
from yellowfin_optax._checkpoint import check_state_compatible
from yellowfin_optax._checkpoint import restore_state
from yellowfin_optax._checkpoint import save_state

pytest.importorskip('orbax.checkpoint')

CURVATURES = jnp.linspace(1.0, 10.0, 10)


def _params():
  return {'w': jnp.ones(10), 'b': [jnp.full((2, 3), 0.5), jnp.ones([])]}


def _grads(params, i):
  """Deterministic noisy gradient of step ``i``; NaN at step 5."""
  key = jax.random.PRNGKey(i)
  keys = jax.random.split(key, 3)
  leaves, treedef = jax.tree.flatten(params)
  leaves = [
      x * (CURVATURES if x.shape == (10,) else 1.0)
      + 0.1 * jax.random.normal(k, x.shape)
      for x, k in zip(leaves, keys)
  ]
  g = jax.tree.unflatten(treedef, leaves)
  return jax.tree.map(lambda x: x * jnp.nan, g) if i == 5 else g


def _train(step, params, state, start, stop):
  for i in range(start, stop):
    updates, state = step(params, state, _grads(params, i))
    params = optax.apply_updates(params, updates)
  return params, state


def test_resume_is_bit_identical(tmp_path):
  n, k = 30, 12
  tx = yf.yellowfin()
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  params0 = _params()
  full_params, full_state = _train(step, params0, tx.init(params0), 0, n)

  params_k, state_k = _train(step, params0, tx.init(params0), 0, k)
  save_state(tmp_path / 'opt', state_k)
  saved_params = jax.tree.map(np.asarray, params_k)
  del state_k, params_k

  # "New process": a freshly built optimizer and a restored state.
  tx2 = yf.yellowfin()
  params_k = jax.tree.map(jnp.asarray, saved_params)
  restored = restore_state(tmp_path / 'opt', tx2, params_k)
  assert type(restored) is yf.SkipNonFiniteState
  assert int(yf.hyperparams(restored)['step']) == k - 1  # one NaN skipped
  step2 = jax.jit(lambda p, s, g: tx2.update(g, s, p))
  resumed_params, resumed_state = _train(step2, params_k, restored, k, n)

  assert_trees_equal(resumed_params, full_params)
  assert_trees_equal(resumed_state, full_state)
  assert int(full_state.skipped_steps) == 1


def test_round_trip_keeps_types_and_bits(tmp_path):
  tx = optax.chain(optax.clip_by_global_norm(1.0), yf.yellowfin())
  params = {'w': jnp.ones(4, jnp.bfloat16), 'e': jnp.zeros(0)}
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  save_state(tmp_path / 'c', state)
  restored = restore_state(tmp_path / 'c', tx, params)
  assert_trees_equal(restored, state)
  assert type(restored[1].inner) is yf.TunedMomentumState


def test_changed_curvature_window_names_the_field(tmp_path):
  params = _params()
  save_state(tmp_path / 'c', yf.yellowfin(curvature_window=20).init(params))
  with pytest.raises(ValueError) as info:
    restore_state(tmp_path / 'c', yf.yellowfin(curvature_window=10), params)
  message = str(info.value)
  assert 'inner.tuner.statistics.sq_norm_window' in message
  assert 'saved shape (20,) float32, expected shape (10,) float32' in message
  assert message.count('\n') == 1  # only that field differs


def test_changed_params_name_the_fields(tmp_path):
  tx = yf.yellowfin()
  params = _params()
  save_state(tmp_path / 'c', tx.init(params))
  other = {'w': jnp.ones(11), 'b': [jnp.full((2, 3), 0.5), jnp.ones([])]}
  with pytest.raises(ValueError, match=r'inner\.trace\.w: saved shape \(10,\)'):
    restore_state(tmp_path / 'c', tx, other)
  with pytest.raises(ValueError, match=r'inner\.trace\.b\.1: saved shape \(\) '
                     r'float32, expected shape \(\) bfloat16'):
    restore_state(tmp_path / 'c', tx, {
        'w': jnp.ones(10), 'b': [jnp.full((2, 3), 0.5),
                                 jnp.ones([], jnp.bfloat16)]})


def test_other_optimizer_is_rejected():
  params = jnp.ones(3)
  state = optax.chain(optax.identity(), yf.yellowfin()).init(params)
  with pytest.raises(ValueError, match='missing') as info:
    check_state_compatible(yf.yellowfin(), params, state)
  message = str(info.value)
  assert 'inner.trace: missing (expected shape (3,) float32)' in message
  assert '1.inner.trace: unexpected field (shape (3,) float32)' in message
  assert 'more like that' in message  # long lists are cut


def test_check_accepts_targetless_orbax_restore(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  tx = yf.yellowfin()
  params = _params()
  save_state(tmp_path / 'c', tx.init(params))
  raw = ocp.StandardCheckpointer().restore(tmp_path / 'c')
  assert isinstance(raw, dict)  # orbax without a target: nested dicts
  check_state_compatible(tx, params, raw)
  with pytest.raises(ValueError, match='sq_norm_window'):
    check_state_compatible(yf.yellowfin(curvature_window=3), params, raw)
