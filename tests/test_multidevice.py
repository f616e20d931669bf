"""YellowFin on 8 host CPU devices: pmap, shard_map and sharded jit.

YellowFin's statistics are global (norms over every parameter and the whole
batch). These tests train a small Flax MLP on sklearn digits for 20 steps on
one device and under each multi-device mode, with a *mean* loss so that the
average of the per-device gradients is the full-batch gradient, and check that
parameters, ``hyperparams(state)`` and the whole state agree with the
single-device run (per leaf: ``max|a - b| <= 1e-6 max|a|``, the float32
rounding of a different summation order), that ``pmap`` replicas stay
bit-identical, and that the optimizer state inherits the parameters' sharding.

conftest.py sets ``--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import yellowfin_optax as yf

N_DEV = 8
BATCH = 64
STEPS = 20
RTOL = 1e-6

pytestmark = pytest.mark.skipif(
    jax.device_count() < N_DEV, reason='needs 8 (host) devices'
)



class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(10)(x)


MODEL = MLP()


def loss_fn(params, x, y):
  logits = MODEL.apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.lru_cache(maxsize=None)
def _data():
  x, y = load_digits(return_X_y=True)
  n = BATCH * STEPS
  return (x[:n] / 16.0).astype(np.float32), y[:n].astype(np.int32)


def _batches():
  x, y = _data()
  for i in range(STEPS):
    yield x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]


def _params0():
  return MODEL.init(jax.random.key(0), jnp.zeros((1, 64)))


def _make_tx(kind: str, axis_name: str | None = None):
  if kind == 'yellowfin':
    return yf.yellowfin(axis_name=axis_name)
  return yf.closed_loop_yellowfin(staleness=2, axis_name=axis_name)


def _train_loss(params, x, y, gather: bool = False):
  if gather:
    params = jax.tree.map(lambda a: jax.reshard(a, P()), params)
  return loss_fn(params, x, y)


def _train_step(tx, gather: bool = False):
  """One training step; ``gather``: all-gather FSDP weights for the forward
  pass (needed on an Explicit mesh, where the model's matmuls would otherwise
  contract a sharded axis; the gradient comes back sharded like the params).
  The loss goes to ``update`` as ``value=`` (the closed loop's delay ring
  carries it; under pmap it is averaged over the axis with the gradient)."""
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(_train_loss)(params, x, y, gather)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state
  return step


@functools.lru_cache(maxsize=None)
def _single_device(kind: str):
  tx = _make_tx(kind)
  step = jax.jit(_train_step(tx))
  params = _params0()
  state = tx.init(params)
  for x, y in _batches():
    params, state = step(params, state, x, y)
  return jax.device_get((params, state))


def _assert_close(got, want, what: str):
  """Every leaf: ``max|got - want| <= RTOL * max|want|``; same structure."""
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)
  ):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, jax.tree_util.keystr(path))
    scale = np.max(np.abs(a)) if a.size else 0.0
    if 'momentum' in jax.tree_util.keystr(path):
      # Momenta (the closed loop's correction, a measured ratio of float32
      # differences) are compared in momentum units.
      scale = max(scale, 1.0)
    err = np.max(np.abs(a - b)) if a.size else 0.0
    assert err <= RTOL * scale + 1e-30, (
        f'{what}{jax.tree_util.keystr(path)}: max abs diff {err:.3g} vs '
        f'{RTOL:g} x max {scale:.3g}'
    )


def _assert_matches_single(kind, params, state):
  ref_params, ref_state = _single_device(kind)
  _assert_close(params, ref_params, 'params')
  _assert_close(yf.hyperparams(state), yf.hyperparams(ref_state), 'hyperparams')
  _assert_close(state, ref_state, 'state')
  # The run must have done something worth comparing.
  assert int(yf.hyperparams(ref_state)['count']) > 10
  assert not np.allclose(
      ref_params['params']['Dense_0']['kernel'],
      _params0()['params']['Dense_0']['kernel'],
  )


# ---------------------------------------------------------------- pmap


@pytest.mark.parametrize('kind', [
    'yellowfin',
    pytest.param('closed_loop', marks=pytest.mark.slow),
])
def test_pmap_replicas_identical_and_equal_to_single_device(kind):
  tx = _make_tx(kind, axis_name='batch')
  step = jax.pmap(_train_step(tx), axis_name='batch')
  replicate = lambda t: jax.tree.map(
      lambda a: jnp.broadcast_to(a, (N_DEV,) + jnp.shape(a)), t
  )
  params0 = _params0()
  params, state = replicate(params0), replicate(tx.init(params0))
  for x, y in _batches():
    params, state = step(
        params, state, x.reshape(N_DEV, -1, 64), y.reshape(N_DEV, -1)
    )
  params, state = jax.device_get((params, state))
  for path, leaf in jax.tree_util.tree_leaves_with_path((params, state)):
    np.testing.assert_array_equal(
        leaf, np.broadcast_to(leaf[0], leaf.shape),
        err_msg=f'replicas differ at {jax.tree_util.keystr(path)}',
    )
  first = lambda t: jax.tree.map(lambda a: a[0], t)
  _assert_matches_single(kind, first(params), first(state))


# ----------------------------------------------------------- shard_map


@pytest.mark.slow
def test_shard_map_state_is_replicated_and_equal_to_single_device():
  # With shard_map's replication checking (check_vma, the default) the
  # gradient of replicated parameters is already summed over the axis by
  # autodiff, so the per-device loss is the pmean of the local means and the
  # gradient arrives averaged and replicated: YellowFin needs no axis_name
  # here (with one, its pmean would all-reduce the replicated gradient again;
  # examples/data_parallel.py counts it). out_specs=P() for the state makes
  # shard_map itself verify that the state is the same on every device.
  mesh = jax.make_mesh((N_DEV,), ('batch',))
  tx = _make_tx('yellowfin')

  def step(params, state, x, y):
    global_loss = lambda p: jax.lax.pmean(loss_fn(p, x, y), 'batch')
    loss, grads = jax.value_and_grad(global_loss)(params)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), P('batch'), P('batch')),
      out_specs=(P(), P()),
  ))
  data = NamedSharding(mesh, P('batch'))
  params = _params0()
  state = tx.init(params)
  for x, y in _batches():
    params, state = step(
        params, state, jax.device_put(x, data), jax.device_put(y, data)
    )
  _assert_matches_single('yellowfin', *jax.device_get((params, state)))


# --------------------------------------------------------- sharded jit


def _fsdp_spec(leaf) -> P:
  """Shard the leading axis over the mesh when it divides, else replicate."""
  shape = jnp.shape(leaf)
  return P('d') if shape and shape[0] % N_DEV == 0 else P()


def _state_shardings_auto(tx, params, param_shardings, mesh):
  """The documented idiom for Auto meshes: param-like state follows params."""
  return optax.tree.map_params(
      tx, lambda _, sharding: sharding,
      jax.eval_shape(tx.init, params), param_shardings,
      transform_non_params=lambda _: NamedSharding(mesh, P()),
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
  )


def _sharded_setup(kind: str, layout: str, axis_type):
  mesh = jax.make_mesh((N_DEV,), ('d',), axis_types=(axis_type,))
  tx = _make_tx(kind)
  params0 = _params0()
  spec = _fsdp_spec if layout == 'fsdp' else (lambda _: P())
  param_shardings = jax.tree.map(
      lambda a: NamedSharding(mesh, spec(a)), params0
  )
  return mesh, tx, params0, param_shardings


def _run_sharded(kind: str, layout: str, axis_type):
  mesh, tx, params0, param_shardings = _sharded_setup(kind, layout, axis_type)
  data = NamedSharding(mesh, P('d'))
  with jax.set_mesh(mesh):
    params = jax.device_put(params0, param_shardings)
    if axis_type == jax.sharding.AxisType.Explicit:
      state = jax.jit(tx.init)(params)
      step = jax.jit(_train_step(tx, gather=True))
    else:
      state_shardings = _state_shardings_auto(tx, params0, param_shardings, mesh)
      state = jax.jit(tx.init, out_shardings=state_shardings)(params)
      step = jax.jit(
          _train_step(tx), out_shardings=(param_shardings, state_shardings)
      )
    for x, y in _batches():
      params, state = step(
          params, state, jax.device_put(x, data), jax.device_put(y, data)
      )
  return params, state, param_shardings


@pytest.mark.parametrize('layout,axis_type', [
    ('fsdp', jax.sharding.AxisType.Auto),
    pytest.param('fsdp', jax.sharding.AxisType.Explicit, marks=pytest.mark.slow),
    pytest.param('replicated', jax.sharding.AxisType.Auto,
                 marks=pytest.mark.slow),
])
def test_sharded_jit_equal_to_single_device(layout, axis_type):
  params, state, param_shardings = _run_sharded('yellowfin', layout, axis_type)
  for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(param_shardings)):
    assert p.sharding.is_equivalent_to(s, p.ndim)
  # After 20 steps the state still follows the params.
  _check_state_shardings(state, param_shardings, _params0())
  _assert_matches_single('yellowfin', *jax.device_get((params, state)))


def _check_state_shardings(state, param_shardings, params):
  """grad_ema and trace follow the params; every other leaf is replicated."""
  param_leaves = jax.tree.leaves(param_shardings)
  n_param_buffers = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    names = jax.tree_util.keystr(path)
    if '.grad_ema' in names or '.trace' in names:
      # The buffer's subtree mirrors the params: match by key path suffix.
      matches = [
          s for (ppath, _), s in zip(
              jax.tree_util.tree_leaves_with_path(params), param_leaves)
          if names.endswith(jax.tree_util.keystr(ppath))
      ]
      assert len(matches) == 1, names
      assert leaf.sharding.is_equivalent_to(matches[0], leaf.ndim), (
          f'{names}: {leaf.sharding} != {matches[0]}'
      )
      n_param_buffers += 1
    elif leaf.ndim == 0 or leaf.size < 64:
      assert leaf.sharding.is_fully_replicated, names
  assert n_param_buffers == 2 * len(param_leaves)


@pytest.mark.parametrize('axis_type', [
    # Auto: also checked after a whole run in test_sharded_jit_equal_to_...
    pytest.param(jax.sharding.AxisType.Auto, marks=pytest.mark.slow),
    jax.sharding.AxisType.Explicit,
])
def test_state_sharding_follows_params_after_init_and_update(axis_type):
  mesh, tx, params0, param_shardings = _sharded_setup(
      'yellowfin', 'fsdp', axis_type
  )
  # Some leaves really are sharded, some replicated: the test can tell.
  specs = [s.spec for s in jax.tree.leaves(param_shardings)]
  assert P('d') in specs and P() in specs
  with jax.set_mesh(mesh):
    params = jax.device_put(params0, param_shardings)
    if axis_type == jax.sharding.AxisType.Explicit:
      state = jax.jit(tx.init)(params)
      update = jax.jit(tx.update)
    else:
      state_shardings = _state_shardings_auto(tx, params0, param_shardings, mesh)
      state = jax.jit(tx.init, out_shardings=state_shardings)(params)
      update = jax.jit(tx.update, out_shardings=(param_shardings, state_shardings))
    _check_state_shardings(state, param_shardings, params0)
    x, y = next(_batches())
    gather = axis_type == jax.sharding.AxisType.Explicit
    grads = jax.jit(
        lambda p: jax.grad(lambda q: _train_loss(q, x, y, gather))(p)
    )(params)
    updates, state = update(grads, state, params)
    _check_state_shardings(state, param_shardings, params0)
    for u, s in zip(jax.tree.leaves(updates), jax.tree.leaves(param_shardings)):
      assert u.sharding.is_equivalent_to(s, u.ndim)
    if axis_type == jax.sharding.AxisType.Explicit:
      # Sharding in types: update must not change any state leaf's type.
      state0 = jax.jit(tx.init)(params)
      assert jax.tree.map(jax.typeof, state0) == jax.tree.map(jax.typeof, state)


def test_plain_jit_init_loses_sharding_on_auto_mesh():
  # Why the idiom above is needed: on an Auto mesh, jit(tx.init) alone has no
  # data dependence on the params' shardings and puts buffers on one device.
  mesh, tx, params0, param_shardings = _sharded_setup(
      'yellowfin', 'fsdp', jax.sharding.AxisType.Auto
  )
  params = jax.device_put(params0, param_shardings)
  state = jax.jit(tx.init)(params)
  kernel = state.grad_ema['params']['Dense_0']['kernel']
  assert not kernel.sharding.is_equivalent_to(
      param_shardings['params']['Dense_0']['kernel'], 2
  )
  # Eager init, by contrast, follows the concrete params' shardings.
  state = tx.init(params)
  kernel = state.grad_ema['params']['Dense_0']['kernel']
  assert kernel.sharding.is_equivalent_to(
      param_shardings['params']['Dense_0']['kernel'], 2
  )


# ------------------------------------------ closed loop with staleness


@pytest.mark.slow
@pytest.mark.parametrize('axis_type', [
    jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit,
])
def test_closed_loop_sharded_jit_equal_to_single_device(axis_type):
  mesh, tx, params0, param_shardings = _sharded_setup(
      'closed_loop', 'fsdp', axis_type
  )
  data = NamedSharding(mesh, P('d'))
  with jax.set_mesh(mesh):
    params = jax.device_put(params0, param_shardings)
    # Eager init follows the params' shardings on both mesh kinds.
    state = tx.init(params)
    step = jax.jit(
        _train_step(tx, gather=axis_type == jax.sharding.AxisType.Explicit)
    )
    for x, y in _batches():
      params, state = step(
          params, state, jax.device_put(x, data), jax.device_put(y, data)
      )
  _assert_matches_single('closed_loop', *jax.device_get((params, state)))
  # The gradient ring (leading [staleness] axis) must be sharded like the
  # params on the other axes, not replicated.
  kernel = state.pending['params']['Dense_0']['kernel']
  assert kernel.sharding.is_equivalent_to(
      NamedSharding(mesh, P(None, 'd')), kernel.ndim
  ), f'pending is not sharded like the params: {kernel.sharding}'
  # The median estimator keeps past updates at its sample only: one
  # [staleness + 1, k] float32 array, k = min(4096, number of parameters),
  # replicated (the sample is gathered from every shard).
  samples = state.inner.past_updates
  assert samples.dtype == jnp.float32
  assert samples.shape == (3, min(4096, sum(
      x.size for x in jax.tree.leaves(params))))
  assert samples.sharding.is_fully_replicated

