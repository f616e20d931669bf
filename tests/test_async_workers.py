"""Asynchronous workers as devices == the one-device ring-buffer simulation.

``examples/async_workers.py`` runs M = 8 round-robin workers as 8 host
devices (each computes its gradient at the model it last read, on its own
batch); the server applies them with ``yellowfin()`` or
``closed_loop_yellowfin(staleness=M - 1, simulate_staleness=False)``. The
one-device simulation fed fresh gradients in the same data order
(``delayed_gradients(M - 1, yellowfin())``, resp. the default
``closed_loop_yellowfin(staleness=M - 1)``) must give the same parameters and
optimizer state, to float32 rounding (per leaf ``max|a - b| <= 1e-6
max|a|``).
"""

import importlib.util
import os
import sys

import jax
import numpy as np
import pytest

import yellowfin_optax as yf

WORKERS = 8
ROUNDS = 3
BATCH = 8


def _load_example():
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'examples',
                      'async_workers.py')
  spec = importlib.util.spec_from_file_location('_example_async_workers', path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def _assert_close(got, want, what, rtol=1e-6):
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree.leaves(got)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(a)) if a.size else 0.0
    if 'momentum_offset' in jax.tree_util.keystr(path):
      scale = max(scale, 1.0)  # a small difference of momenta
    err = np.max(np.abs(a - b)) if a.size else 0.0
    assert err <= rtol * scale + 1e-30, (
        f'{what}{jax.tree_util.keystr(path)}: {err:.3g} vs max {scale:.3g}')


@pytest.mark.skipif(jax.device_count() < WORKERS, reason='needs 8 devices')
@pytest.mark.parametrize('closed_loop', [
    False, pytest.param(True, marks=pytest.mark.slow)])
def test_device_workers_equal_ring_buffer(closed_loop):
  ex = _load_example()
  mesh = jax.make_mesh((WORKERS,), ('workers',))
  x, y = ex.load_digits(return_X_y=True)
  x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
  params0 = ex.MODEL.init(jax.random.key(0), x[:1])
  tx = ex.server_optimizer(WORKERS - 1, closed_loop)
  reference = ex.simulated_optimizer(WORKERS - 1, closed_loop)

  params, state, losses, hparams = ex.run_devices(
      tx, params0, x, y, ROUNDS, BATCH, mesh, progress=False)
  steps = ROUNDS * WORKERS
  ref_params, ref_state = ex.run_ring_buffer(
      reference, params0, x, y, steps, BATCH)

  params, state = jax.device_get((params, state))
  assert isinstance(ref_state, yf.DelayedGradientsState)
  assert type(state) is type(ref_state.inner)
  # The run did something: steps 7.. applied gradients and moved the model.
  applied = steps - (WORKERS - 1)
  assert int(yf.hyperparams(ref_state)['count']) == applied
  assert int(yf.hyperparams(state)['count']) == applied
  assert hparams['learning_rate'].shape == (steps,)
  assert np.all(np.isfinite(losses))
  _assert_close(params, ref_params, 'params')
  _assert_close(state, ref_state.inner, 'state')
  if closed_loop:  # the loop measured the total momentum
    assert int(state.measured) == applied - WORKERS
    assert np.any(hparams['total_momentum'] != 0)
  # The comparison can tell: the model moved by far more than the tolerance.
  moved = np.max(np.abs(params['params']['Dense_0']['kernel']
                        - params0['params']['Dense_0']['kernel']))
  assert moved > 1e-3
