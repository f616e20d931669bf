"""The Orbax checkpoint recipe (examples/checkpointing.py): exact resume and
errors that name the fields a configuration change altered."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import yellowfin_optax as yf
from tests._trees import assert_trees_equal

pytest.importorskip('orbax.checkpoint')

RECIPE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'examples', 'checkpointing.py')


def _load_recipe():
  spec = importlib.util.spec_from_file_location('_example_checkpointing',
                                                RECIPE)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


ckpt = _load_recipe()
CURVATURES = jnp.linspace(1.0, 10.0, 10)


def _params():
  return {'w': jnp.ones(10), 'b': [jnp.full((2, 3), 0.5, jnp.float32),
                                  jnp.ones([])]}


def _loss(params, t):
  """A noisy quadratic (the noise moves with the step ``t``), > 0."""
  noise = 0.1 * jnp.sin(jnp.arange(10.0) + t)
  return (jnp.sum(CURVATURES * (params['w'] - noise) ** 2)
          + sum(jnp.sum(x ** 2) for x in params['b']) + 0.05)


def _train(step, params, state, start, stop):
  for t in range(start, stop):
    params, state = step(params, state, jnp.float32(t))
  return params, state


def _make_step(tx):
  @jax.jit
  def step(params, state, t):
    loss, grads = jax.value_and_grad(_loss)(params, t)
    loss = jnp.where(t == 5, jnp.nan, loss)  # step 5 is skipped
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state
  return step


def test_resume_is_bit_identical(tmp_path):
  n, k = 30, 12
  tx = yf.yellowfin_auto(total_steps=n)
  step = _make_step(tx)
  params0 = _params()
  full_params, full_state = _train(step, params0, tx.init(params0), 0, n)

  params_k, state_k = _train(step, params0, tx.init(params0), 0, k)
  ckpt.save(str(tmp_path / 'opt'), state_k)
  saved_params = jax.tree.map(np.asarray, params_k)
  del state_k, params_k

  # "New process": a freshly built optimizer and a restored state (the step
  # is compiled once for the three runs: the same configuration).
  tx2 = yf.yellowfin_auto(total_steps=n)
  params_k = jax.tree.map(jnp.asarray, saved_params)
  restored = ckpt.restore(str(tmp_path / 'opt'), tx2, params_k)
  assert type(restored) is yf.YellowFinState
  hp = yf.hyperparams(restored)
  assert int(hp['count']) == k - 1 and int(hp['skipped_steps']) == 1
  resumed_params, resumed_state = _train(step, params_k, restored, k, n)
  assert_trees_equal(resumed_params, full_params)
  assert_trees_equal(resumed_state, full_state)
  assert float(_loss(full_params, n)) < float(_loss(params0, n))


def test_round_trip_keeps_types_and_bits(tmp_path):
  tx = optax.chain(optax.clip_by_global_norm(1.0), yf.yellowfin())
  # bfloat16 keeps its dtype; a zero-size leaf (Orbax cannot save one) too.
  params = {'w': jnp.arange(4.0, dtype=jnp.bfloat16), 'e': jnp.zeros((0, 3))}
  state = tx.init(params)
  grads = {'w': jnp.array([0.5, -1.0, 2.0, 0.25], jnp.bfloat16),
           'e': jnp.zeros((0, 3))}
  update = jax.jit(tx.update)
  for _ in range(3):
    _, state = update(grads, state, params)
  ckpt.save(str(tmp_path / 'c'), state)
  restored = ckpt.restore(str(tmp_path / 'c'), tx, params)
  assert_trees_equal(restored, state)
  assert type(restored[1]) is yf.YellowFinState
  assert restored[1].trace['w'].dtype == jnp.bfloat16
  assert restored[1].trace['e'].shape == (0, 3)
  assert int(restored[1].count) == 3


def test_changed_curvature_window_names_the_field(tmp_path):
  params = _params()
  saved = yf.scale_by_yellowfin(curvature='loss', curvature_window=20)
  ckpt.save(str(tmp_path / 'c'), saved.init(params))
  other = yf.scale_by_yellowfin(curvature='loss', curvature_window=10)
  with pytest.raises(ValueError) as info:
    ckpt.restore(str(tmp_path / 'c'), other, params)
  message = str(info.value)
  assert 'window: saved shape (20,) float32, expected shape (10,) float32' in (
      message)
  assert message.count('\n') == 1  # only that field differs
  # The same configuration restores.
  ckpt.restore(str(tmp_path / 'c'), yf.yellowfin_auto(), params)


def test_changed_params_name_the_fields():
  tx = yf.yellowfin_auto()
  state = tx.init(_params())
  wider = {'w': jnp.ones(11), 'b': [jnp.full((2, 3), 0.5), jnp.ones([])]}
  with pytest.raises(ValueError) as info:
    ckpt.check_compatible(tx, wider, state)
  message = str(info.value)
  assert 'grad_ema.w: saved shape (10,) float32, expected shape (11,) ' \
      'float32' in message
  assert 'trace.w: saved shape (10,) float32, expected shape (11,)' in message
  assert message.count('\n') == 2
  bf16 = {'w': jnp.ones(10), 'b': [jnp.full((2, 3), 0.5),
                                   jnp.ones([], jnp.bfloat16)]}
  with pytest.raises(ValueError, match=r'trace\.b\.1: saved shape \(\) '
                     r'float32, expected shape \(\) bfloat16'):
    ckpt.check_compatible(tx, bf16, state)


def test_other_optimizer_is_rejected(tmp_path):
  params = jnp.ones(3)
  ckpt.save(str(tmp_path / 'adam'), optax.adam(1e-3).init(params))
  with pytest.raises(ValueError) as info:
    ckpt.restore(str(tmp_path / 'adam'), yf.yellowfin_auto(), params)
  message = str(info.value)
  assert 'window: missing (expected shape (20,) float32)' in message
  assert '0.mu: unexpected field (shape (3,) float32)' in message
  # The closed loop's state holds a YellowFinState and more: not the same.
  closed = yf.closed_loop_yellowfin().init(params)
  with pytest.raises(ValueError, match=r'trace: missing[\s\S]*'
                     r'yellowfin\.trace: unexpected field'):
    ckpt.check_compatible(yf.yellowfin(), params, closed)


def test_check_accepts_a_targetless_orbax_restore(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  tx = yf.yellowfin()
  params = _params()
  ckpt.save(str(tmp_path / 'c'), tx.init(params))
  raw = ocp.StandardCheckpointer().restore(tmp_path / 'c')
  assert isinstance(raw, dict)  # orbax without a target: nested dicts
  ckpt.check_compatible(tx, params, raw)
  with pytest.raises(ValueError, match='window: saved shape'):
    ckpt.check_compatible(yf.scale_by_yellowfin(curvature_window=3), params,
                          raw)


def test_demo(tmp_path, capsys):
  result = ckpt.main(['--steps', '16', '--dir', str(tmp_path / 'demo')])
  assert result['identical'] is True
  assert 'window: saved shape (20,) float32, expected shape (10,)' in (
      result['error'])
  assert 'bit-identical to an uninterrupted run: True' in (
      capsys.readouterr().out)
