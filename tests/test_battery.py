"""Optax's battery for contributed optimizers, on every public optimizer.

In the spirit of ``optax/contrib/_common_test.py``: extra keyword arguments
to ``update``, no recompilation, convergence on Optax's targets inside
``lax.scan`` (same targets and tolerances), ``inject_hyperparams``, dtype
preservation, ``optax.MultiSteps``, state types under ``lax.cond`` and on a
sharded mesh. ``value=loss`` is passed to every update (``yellowfin_auto``
needs it, the others ignore it).

Compilation dominates: a YellowFin update takes seconds to compile on CPU.
Type checks therefore trace only (``jax.eval_shape``), and the default run
checks convergence on Rosenbrock in 3,000 steps; Optax's 30,000-step run of
every target is ``@pytest.mark.slow``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import yellowfin_optax as yf

DEFAULT_STEPS = 3_000  # run as two calls of a 1,500-step scan
OPTAX_STEPS = 30_000  # optax/contrib/_common_test.py

# (factory, keyword arguments); total_steps=None is replaced by the run length.
OPTIMIZERS = {
    'yellowfin': (yf.yellowfin, {}),
    'yellowfin_auto': (yf.yellowfin_auto, {}),
    'yellowfin_auto_total_steps': (yf.yellowfin_auto, {'total_steps': None}),
    'closed_loop_staleness_2': (yf.closed_loop_yellowfin, {'staleness': 2}),
    'closed_loop_least_squares': (
        yf.closed_loop_yellowfin,
        {'staleness': 0, 'estimator': 'least_squares'}),
}
NAMES = list(OPTIMIZERS)


def make(name, steps=DEFAULT_STEPS):
  factory, kwargs = OPTIMIZERS[name]
  if 'total_steps' in kwargs:
    kwargs = dict(kwargs, total_steps=steps)
  return factory(**kwargs)


# --------------------------------------------------------------------------
# Optax's targets (optax/contrib/_common_test.py).


def _setup_parabola(dtype):
  initial_params = jnp.array([-1.0, 10.0, 1.0], dtype=dtype)
  final_params = jnp.array([1.0, -1.0, 1.0], dtype=dtype)

  def obj_fn(params):
    return jnp.sum(jnp.square(params - final_params))

  return initial_params, final_params, obj_fn


def _setup_rosenbrock(dtype):
  a, b = 1.0, 100.0
  initial_params = jnp.array([0.0, 0.0], dtype=dtype)
  final_params = jnp.array([a, a**2], dtype=dtype)

  def obj_fn(params):
    return jnp.square(a - params[0]) + b * jnp.square(params[1] - params[0] ** 2)

  return initial_params, final_params, obj_fn


def _setup_matrix_parabola(dtype):
  initial_params = jnp.zeros((2, 2), dtype=dtype)
  final_params = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype=dtype)

  def obj_fn(params):
    return jnp.sum(jnp.square(params - final_params))

  return initial_params, final_params, obj_fn


def _setup_mixed_tensor_target(dtype):
  final_1d = jnp.array([1.0, -1.0, 2.0], dtype=dtype)
  final_2d = jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype=dtype)

  def obj_fn(params):
    params_1d, params_2d = params
    return (jnp.sum(jnp.square(params_1d - final_1d))
            + jnp.sum(jnp.square(params_2d - final_2d)))

  initial_params = (jnp.zeros((3,), dtype=dtype), jnp.zeros((2, 2), dtype=dtype))
  return initial_params, (final_1d, final_2d), obj_fn


TARGETS = {
    'parabola': _setup_parabola,
    'rosenbrock': _setup_rosenbrock,
    'matrix_parabola': _setup_matrix_parabola,
    'mixed_tensor': _setup_mixed_tensor_target,
}


def assert_converged(params, final_params, what=''):
  """Optax's check: ``assert_trees_all_close(rtol=3e-2, atol=3e-2)``."""
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(final_params)):
    np.testing.assert_allclose(x, y, rtol=3e-2, atol=3e-2, err_msg=what)


def _trajectory(opt, obj_fn, length):
  """A jitted ``lax.scan`` of ``length`` steps from ``(params, state)``, with
  an unexpected extra keyword argument, and the list its traces append to.
  Per step: the loss, the update, the state and hyperparams(state)."""
  traces = []

  def body(carry, _):
    params, state = carry
    value, grads = jax.value_and_grad(obj_fn)(params)
    updates, state = opt.update(
        grads, state, params, value=value,
        unexpected_extra_args_your_optimizer_doesnt_expect=1)
    return ((optax.apply_updates(params, updates), state),
            (value, updates, state, yf.hyperparams(state)))

  @jax.jit
  def run(params, state):
    traces.append(None)
    return jax.lax.scan(body, (params, state), None, length)

  return run, traces


def _describe(params, values, lrs, mus):
  """The numbers a failure report needs."""
  n = len(values)
  at = sorted({0, 10, 100, 300, 1000, 3000, 10000, n - 1} & set(range(n)))
  series = ', '.join(f't={t}: loss {values[t]:.3g} lr {lrs[t]:.3g} mu '
                     f'{mus[t]:.4g}' for t in at)
  final = jax.tree.map(lambda x: np.asarray(x).tolist(), params)
  return f'final params {final}; {series}'


_ROSENBROCK_RUNS = {}


def _rosenbrock_run(name):
  """``(opt, run, traces, first)``: the jitted half-run on Rosenbrock and its
  first call from init (shared by the recompilation and inject tests)."""
  if name not in _ROSENBROCK_RUNS:
    factory, kwargs = INJECTED[name]
    if 'total_steps' in kwargs:
      kwargs = dict(kwargs, total_steps=DEFAULT_STEPS)
    opt = factory(**kwargs)
    params0, _, obj_fn = _setup_rosenbrock(jnp.float32)
    run, traces = _trajectory(opt, obj_fn, DEFAULT_STEPS // 2)
    state = opt.init(params0)
    state = optax.tree.map_params(opt, lambda v: v, state)  # a no-op change
    _ROSENBROCK_RUNS[name] = (opt, run, traces, run(params0, state))
  return _ROSENBROCK_RUNS[name]


# --------------------------------------------------------------------------
# Extra args, no recompilation, Rosenbrock (default run).


# Measured: closed_loop_yellowfin(staleness=2) does not reach Optax's
# tolerance on Rosenbrock (3,000 steps: [0.86, 0.72]; 30,000: [0.97, 0.93]):
# the median over two coordinates is noise (it sits at the +-2 clip), and
# the controller drives the momentum negative. Not fixed yet.
_CLOSED_LOOP_ROSENBROCK = pytest.mark.xfail(
    strict=True, reason='closed loop at staleness 2 misses Rosenbrock')


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=_CLOSED_LOOP_ROSENBROCK)
    if n == 'closed_loop_staleness_2' else n for n in NAMES])
def test_extra_args_no_recompilation_and_rosenbrock(name):
  """Optax's extra-args and recompilation checks, on the Rosenbrock run.

  The scan's second call starts from the state the first returned: it must
  neither retrace nor recompile (the updated state keeps init's types), and
  3,000 steps must reach Optax's tolerance of [1, 1].
  """
  _, run, traces, first = _rosenbrock_run(name)
  _, final_params, _ = _setup_rosenbrock(jnp.float32)
  (params, state), _ = first
  (params, state), second = run(params, state)
  assert len(traces) == 1, 'update retraced on the second call'
  assert run._cache_size() == 1, 'update recompiled on the second call'
  assert second[1].dtype == jnp.float32  # the updates
  values = np.concatenate([first[1][0], second[0]])
  lrs, mus = (np.concatenate([first[1][3][k], second[3][k]])
              for k in ('learning_rate', 'momentum'))
  assert_converged(params, final_params, _describe(params, values, lrs, mus))


# --------------------------------------------------------------------------
# Convergence on every target at Optax's length (slow).


def _run_all_targets(name):
  """Every target in one jitted scan of OPTAX_STEPS steps (one compilation)."""
  setups = [setup(jnp.float32) for setup in TARGETS.values()]
  opts = [make(name, OPTAX_STEPS) for _ in setups]

  def body(carry, _):
    new, out = [], []
    for opt, (_, _, obj_fn), (params, state) in zip(opts, setups, carry):
      value, grads = jax.value_and_grad(obj_fn)(params)
      updates, state = opt.update(grads, state, params, value=value)
      params = optax.apply_updates(params, updates)
      hp = yf.hyperparams(state)
      new.append((params, state))
      out.append((params, value, hp['learning_rate'], hp['momentum']))
    return tuple(new), tuple(out)

  @jax.jit
  def run():
    init = tuple((p, opt.init(p)) for opt, (p, _, _) in zip(opts, setups))
    return jax.lax.scan(body, init, None, OPTAX_STEPS)[1]

  return dict(zip(TARGETS, jax.tree.map(np.asarray, run()))), setups


_ALL_TARGETS_CACHE = {}


def _all_targets(name):
  if name not in _ALL_TARGETS_CACHE:
    _ALL_TARGETS_CACHE[name] = _run_all_targets(name)
  return _ALL_TARGETS_CACHE[name]


@pytest.mark.slow
@pytest.mark.parametrize('name,target', [
    pytest.param(name, target, marks=_CLOSED_LOOP_ROSENBROCK)
    if (name, target) == ('closed_loop_staleness_2', 'rosenbrock')
    else (name, target) for name in NAMES for target in TARGETS
    # The reference there: test_reference_on_rosenbrock_ends_in_a_2_cycle.
    if (name, target) != ('yellowfin', 'rosenbrock')])
def test_converges_at_optax_length(name, target):
  runs, setups = _all_targets(name)
  path, values, lrs, mus = runs[target]
  final_params = setups[list(TARGETS).index(target)][1]
  final = jax.tree.map(lambda x: x[-1], path)
  assert_converged(final, final_params, _describe(final, values, lrs, mus))


@pytest.mark.slow
def test_reference_on_rosenbrock_ends_in_a_2_cycle():
  """yellowfin() (the reference, step for step) on Optax's Rosenbrock run.

  Measured: it passes loss 1e-6 within a few hundred steps (and is within
  Optax's tolerance at 3,000 steps, see the default test) but, once the
  gradients vanish, its statistics drift; it leaves the optimum and ends in
  a period-2 orbit short of [1, 1] with h_min = h_max.
  """
  runs, _ = _all_targets('yellowfin')
  path, values, _, _ = runs['rosenbrock']
  assert values.min() < 1e-6
  assert values[-1] > 1e-3  # not converged
  np.testing.assert_allclose(path[-1], path[-3], rtol=1e-5)  # period 2
  assert np.abs(path[-1] - path[-2]).max() > 1e-2  # not a fixed point
  assert np.abs(path[-1] - 1.0).max() > 3e-2 + 3e-2  # outside Optax's tolerance


# --------------------------------------------------------------------------
# inject_hyperparams.

INJECTED = {
    **OPTIMIZERS,
    # A float32 beta: a traced beta is float32 (the precision rule), so only
    # a float32-representable one gives the plain run's numbers.
    'scale_by_yellowfin_window_5': (
        yf.scale_by_yellowfin,
        {'curvature_window': 5, 'beta': float(np.float32(0.9))}),
}
INJECT_STEPS = 20
# Values out of float32 cancellations (tests/_reference.py's README floors).
_FLOORS = {'grad_var': 5e-6, 'mu_t': 2e-7, 'mu_smoothed': 2e-7,
           'momentum': 2e-7, 'target_momentum': 2e-7, 'total_momentum': 2e-7,
           'momentum_offset': 2e-7}


def _assert_close_step(got, want, what, h_max):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    key = jax.tree_util.keystr(path)
    name = key.rsplit('.', 1)[-1].strip("[]'")
    atol = _FLOORS.get(name, 0.0) * (h_max if name == 'grad_var' else 1.0)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=atol,
                               err_msg=f'{what} {key}')


# Each case compiles twice (plain and injected): two run only with -m slow.
INJECT_SLOW = ('yellowfin_auto_total_steps', 'closed_loop_least_squares')


@pytest.mark.parametrize('name', [
    pytest.param(name, marks=pytest.mark.slow) if name in INJECT_SLOW
    else name for name in INJECTED])
def test_inject_hyperparams_without_static_args(name):
  """``optax.inject_hyperparams(factory)(**kwargs)``, no static_args, jitted
  (every hyperparameter traced, the shape-setting ints too): with constant
  values the updates, the inner state and hyperparams() equal the plain
  optimizer's at each of 20 steps on Rosenbrock; then lowering ``lr_factor``
  on the fly scales the applied learning rate and the update."""
  factory, kwargs = INJECTED[name]
  if 'total_steps' in kwargs:
    kwargs = dict(kwargs, total_steps=DEFAULT_STEPS)
  injected = optax.inject_hyperparams(factory)(**kwargs)
  params0, _, obj_fn = _setup_rosenbrock(jnp.float32)
  state0 = injected.init(params0)  # eagerly: the ints are read here
  assert 'lr_factor' in state0.hyperparams
  run, _ = _trajectory(injected, obj_fn, INJECT_STEPS)
  (params, state), (_, updates, states, hps) = run(params0, state0)

  _, _, _, (_, (_, want_updates, want_states, want_hps)) = _rosenbrock_run(name)
  head = lambda tree: jax.tree.map(lambda x: x[:INJECT_STEPS], tree)
  want_updates, want_states, want_hps = map(
      head, (want_updates, want_states, want_hps))
  assert set(hps) == set(want_hps)
  h_max = np.asarray(want_hps['h_max'])
  scale = np.abs(np.asarray(want_updates)).max()
  for t in range(INJECT_STEPS):
    at = lambda tree: jax.tree.map(lambda x: np.asarray(x[t]), tree)  # noqa: B023
    np.testing.assert_allclose(updates[t], want_updates[t], rtol=1e-6,
                               atol=1e-6 * scale, err_msg=f'updates, step {t}')
    _assert_close_step(at(states.inner_state), at(want_states),
                       f'state, step {t}', h_max[t])
    _assert_close_step(at(hps), at(want_hps), f'hyperparams, step {t}',
                       h_max[t])

  # On the fly: the same compiled run, from the same state, lr_factor 1/4.
  (_, _), (_, full, _, full_hp) = run(params, state)
  state.hyperparams['lr_factor'] = jnp.asarray(0.25, jnp.float32)
  (_, _), (_, quarter, _, quarter_hp) = run(params, state)
  assert float(full_hp['learning_rate'][0]) > 0.0
  np.testing.assert_allclose(quarter_hp['learning_rate'][0],
                             0.25 * full_hp['learning_rate'][0], rtol=1e-6)
  np.testing.assert_allclose(quarter[0], 0.25 * full[0], rtol=1e-5)
  np.testing.assert_allclose(quarter_hp['lr_t'][0], full_hp['lr_t'][0],
                             rtol=1e-6)


# --------------------------------------------------------------------------
# Dtypes, MultiSteps, lax.cond, sharding.


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize('name', NAMES)
def test_preserve_dtype(name, dtype):
  """Updates have the params' dtype (traced: the dtype is a type)."""
  opt = make(name)
  fun = lambda x: jnp.sum(x**2)
  params = jnp.array([1.0, 2.0], dtype=dtype)
  value, grads = jax.value_and_grad(fun)(params)
  state = opt.init(params)
  updates, _ = jax.eval_shape(
      lambda g, s, p, v: opt.update(g, s, p, value=v), grads, state, params,
      value)
  assert updates.dtype == params.dtype


@pytest.mark.parametrize('dtype', [
    'bfloat16', pytest.param('float32', marks=pytest.mark.slow)])
@pytest.mark.parametrize('name', NAMES)
def test_multisteps_first_micro_step_is_zero(name, dtype):
  """optax.MultiSteps(every_k_schedule=4): traced, both cond branches agree
  (the update has the params' dtype); run, the first micro-step's update is
  an exact zero (under disable_jit: no compilation, only that branch runs)."""
  opt = optax.MultiSteps(make(name), every_k_schedule=4)
  fun = lambda x: jnp.sum(x**2)
  params = jnp.array([1.0, 2.0], dtype=dtype)
  value, grads = jax.value_and_grad(fun)(params)
  step = lambda g, s, p, v: opt.update(g, s, p, value=v)
  state = opt.init(params)
  updates, _ = jax.eval_shape(step, grads, state, params, value)
  assert updates.dtype == params.dtype
  with jax.disable_jit():
    updates, _ = step(grads, opt.init(params), params, value)
  assert updates.dtype == params.dtype
  np.testing.assert_array_equal(updates, jnp.zeros_like(params))


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16', 'float32', 'float64'])
@pytest.mark.parametrize('name', NAMES)
def test_state_shape_dtype_stable_under_lax_cond(name, dtype):
  """Optax's stability check: ``lax.cond`` between the update and the old
  ``(params, state)`` only traces if they have the same types; the value is
  passed in a confusing dtype on purpose. Traced, not compiled."""
  with jax.enable_x64(dtype == 'float64'):
    opt = make(name)
    params, _, objective = _setup_parabola(jnp.dtype(dtype))

    def step(params, state):
      value, grads = jax.value_and_grad(objective)(params)
      value = value.astype(jnp.float16 if dtype != 'float16' else jnp.bfloat16)
      cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      updates, state = jax.lax.cond(
          cond, lambda: opt.update(grads, state, params, value=value),
          lambda: (params, state))
      return optax.apply_updates(params, updates), state

    def two_steps(params, state):
      for _ in range(2):
        params, new_state = step(params, state)
        cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
        state = jax.lax.cond(cond, lambda: state, lambda: new_state)  # noqa: B023
      return params, state

    state = opt.init(params)
    new_params, new_state = jax.eval_shape(two_steps, params, state)
    assert new_params.dtype == params.dtype
    assert (jax.tree.map(jax.typeof, new_state)
            == jax.tree.map(jax.typeof, state))


N_DEV = 8


@pytest.mark.parametrize('name', NAMES)
def test_state_types_keep_sharding_on_a_mesh(name):
  """On an 8-device Explicit mesh with a sharded and a replicated leaf,
  ``jax.tree.map(jax.typeof, state)`` (shapes, dtypes, shardings) is the same
  after an update as after init, and the update has the params' types."""
  if jax.device_count() != N_DEV:
    pytest.skip(f'needs {N_DEV} devices (conftest.py sets XLA_FLAGS='
                f'--xla_force_host_platform_device_count={N_DEV}), found '
                f'{jax.device_count()}')
  mesh = jax.make_mesh((N_DEV,), ('d',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    params = {
        'w': jax.device_put(jnp.ones((16, 4)), NamedSharding(mesh, P('d'))),
        'b': jax.device_put(jnp.zeros(3), NamedSharding(mesh, P())),
    }
    opt = make(name)
    state = opt.init(params)
    types = jax.tree.map(jax.typeof, state)
    assert any(str(t.sharding.spec) != str(P()) for t in jax.tree.leaves(types)
               if t.ndim), 'no state leaf is sharded like the params'

    def step(grads, state, params, value):
      return opt.update(grads, state, params, value=value)

    updates, new_state = jax.eval_shape(step, params, state, params,
                                        jnp.float32(1.0))
    assert jax.tree.map(jax.typeof, new_state) == types
    assert (jax.tree.map(jax.typeof, updates)
            == jax.tree.map(jax.typeof, params))
