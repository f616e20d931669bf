"""Property tests: random parameter pytrees, and loss-scale invariance.

Random nested dicts and lists with scalar, empty and small array leaves of
mixed float dtypes, optionally under ``optax.masked``. One test checks all
properties per example, since each new tree structure costs a compilation.

Loss-scale invariance, the claim of ``yellowfin_auto``: training on
``k * loss`` gives the same parameters for every ``k`` (like Adam), while the
reference ``yellowfin()`` measures its curvature in gradient units.
"""

import functools


import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import yellowfin_optax as yf
from sklearn.datasets import load_digits

SHAPES = [(), (0,), (1,), (3,), (2, 2)]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]

leaf_specs = st.tuples(st.sampled_from(SHAPES), st.sampled_from(DTYPES))
tree_specs = st.recursive(
    leaf_specs,
    lambda children: st.lists(children, min_size=1, max_size=3)
    | st.dictionaries(
        st.text('abcxyz', min_size=1, max_size=2), children,
        min_size=1, max_size=3,
    ),
    max_leaves=5,
)


def _is_spec(x):
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def _build(spec, rng, log_scale):
  """Params (or gradients) with the layout of ``spec``, finite values."""
  def leaf(s):
    shape, dtype = s
    values = rng.normal(size=shape) * 10.0 ** log_scale
    return jnp.asarray(values, dtype)
  return jax.tree.map(leaf, spec, is_leaf=_is_spec)


def _layout(tree):
  return jax.tree.structure(tree), [
      (x.shape, x.dtype) for x in jax.tree.leaves(tree)
  ]


def _assert_close(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    low = jnp.finfo(x.dtype).bits < 32 if jnp.issubdtype(
        x.dtype, jnp.floating) else False
    tol = 2e-2 if low else 1e-4
    np.testing.assert_allclose(
        np.asarray(x, np.float32), np.asarray(y, np.float32),
        rtol=tol, atol=tol * 1e-3,
    )


def _check_random_pytree(spec, seed, log_scale, masked, jit):
  rng = np.random.default_rng(seed)
  params = _build(spec, rng, 0.0)
  tx = yf.yellowfin()
  if masked:
    flat, treedef = jax.tree.flatten(params)
    mask = jax.tree.unflatten(
        treedef, [bool(m) for m in rng.integers(0, 2, len(flat))]
    )
    tx = optax.masked(tx, mask)
  grads = [_build(spec, rng, log_scale) for _ in range(2)]  # step 1 tunes

  def run(update):
    state = tx.init(params)
    layouts, all_updates = [_layout(state)], []
    for g in grads:
      updates, state = update(g, state, params)
      layouts.append(_layout(state))
      all_updates.append(updates)
    return all_updates, state, layouts

  eager_updates, eager_state, layouts = run(tx.update)

  # The state's structure, shapes and dtypes never change.
  assert all(layout == layouts[0] for layout in layouts)
  # Updates keep the params' structure and dtypes.
  for updates in eager_updates:
    assert _layout(updates) == _layout(params)
  # Finite input gives finite output, and nothing is skipped.
  for tree in (eager_updates, eager_state):
    for x in jax.tree.leaves(tree):
      assert bool(jnp.all(jnp.isfinite(x)))
  hp = yf.hyperparams(eager_state)
  assert int(hp['skipped_steps']) == 0
  assert int(hp['count']) == 2
  if jit:  # jit and eager agree (a compilation per tree: seconds each)
    jit_updates, jit_state, _ = run(jax.jit(tx.update))
    _assert_close(eager_updates, jit_updates)
    _assert_close(eager_state, jit_state)


_GIVEN = dict(
    spec=tree_specs,
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-3.0, 3.0),
    masked=st.booleans(),
)


@hypothesis.settings(
    max_examples=6, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
@hypothesis.given(**_GIVEN)
def test_random_pytrees(spec, seed, log_scale, masked):
  """Eagerly (each new tree costs a compilation under jit; core checks jit
  against eager on a fixed tree)."""
  _check_random_pytree(spec, seed, log_scale, masked, jit=False)


@pytest.mark.slow
@hypothesis.settings(
    max_examples=25, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
@hypothesis.given(**_GIVEN)
def test_random_pytrees_jit_matches_eager(spec, seed, log_scale, masked):
  _check_random_pytree(spec, seed, log_scale, masked, jit=True)


def test_degenerate_trees():
  """All leaves masked out, or all empty: a zero update, finite state."""
  params = {'a': jnp.ones(2), 'b': jnp.ones([], jnp.bfloat16)}
  cases = [
      (optax.masked(yf.yellowfin(), {'a': False, 'b': False}), params),
      (yf.yellowfin(), {'e': jnp.zeros(0), 'f': [jnp.zeros((0, 3))]}),
  ]
  for tx, p in cases:
    state = tx.init(p)
    for _ in range(2):
      updates, state = tx.update(p, state, p)
    assert _layout(updates) == _layout(p)
    for x in jax.tree.leaves((updates, state)):
      assert bool(jnp.all(jnp.isfinite(x)))
    assert int(yf.hyperparams(state)['skipped_steps']) == 0


# --------------------------------------------------------------------------
# Loss-scale invariance on sklearn digits.

SCALES = (1e-3, 1e-1, 10.0, 1e3)  # k; k = 1 is the reference run
INVARIANCE_STEPS = 200
BATCH = 64
# Measured relative parameter differences after 200 steps: yellowfin_auto
# <= 1e-6 (along rms_direction() <= 5e-7; with the gradient rescaled inside
# direction <= 1.5e-6), Adam with eps -> 0 <= 3e-7 (with its default eps=1e-8, 6e-2 at
# k = 1e-3: its eps is in gradient units), yellowfin() 0.5 .. 12.
INVARIANT = 1e-4
NOT_INVARIANT = 1e-1


@functools.lru_cache(maxsize=None)
def _digits_batches():
  x, y = load_digits(return_X_y=True)
  index = np.random.default_rng(0).integers(0, len(x), (INVARIANCE_STEPS, BATCH))
  return (jnp.asarray(x[index] / 16.0, jnp.float32),
          jnp.asarray(y[index], jnp.int32))


def _mlp_init():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {'w1': jax.random.normal(k1, (64, 32)) / 8.0, 'b1': jnp.zeros(32),
          'w2': jax.random.normal(k2, (32, 10)) / np.sqrt(32.0),
          'b2': jnp.zeros(10)}


def _mlp(p, x):
  return jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2'] + p['b2']


def _softmax_init():
  return {'w': jnp.zeros((64, 10)), 'b': jnp.zeros(10)}


def _softmax(p, x):
  return x @ p['w'] + p['b']


MODELS = {'mlp': (_mlp_init, _mlp), 'softmax_regression': (_softmax_init, _softmax)}
OPTIMIZERS = {
    'yellowfin_auto': yf.yellowfin_auto,
    'yellowfin_auto_rms': lambda: yf.yellowfin_auto(
        direction=yf.rms_direction()),
    # A constant rescale of the gradient before the tuner, as its direction:
    # k multiplies the gradient (not the loss) in _train_scaled.
    'yellowfin_auto_scaled_direction': lambda k: yf.yellowfin_auto(
        direction=optax.scale(k)),
    'adam': lambda: optax.adam(1e-2, eps=0.0, eps_root=1e-30),
    'yellowfin': yf.yellowfin,
}


def _cross_entropy(apply, params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()


@functools.lru_cache(maxsize=None)
def _train_scaled(optimizer, model):
  """Final params (and losses) for k = 1 and every k in SCALES: one jitted
  scan, vmapped over k (one compilation)."""
  xs, ys = _digits_batches()
  scales = jnp.asarray((1.0,) + SCALES, jnp.float32)
  in_direction = optimizer.endswith('_direction')

  def train(apply, params, xs, ys, k):
    tx = OPTIMIZERS[optimizer](k) if in_direction else OPTIMIZERS[optimizer]()
    loss_scale = 1.0 if in_direction else k
    loss = lambda p, x, y: loss_scale * _cross_entropy(apply, p, x, y)

    def step(carry, batch):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params, *batch)
      updates, state = tx.update(grads, state, params, value=value)
      return (optax.apply_updates(params, updates), state), value / loss_scale

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), (xs, ys))
    return params, losses

  # Data and initial params are arguments: as constants they slow XLA down.
  init, apply = MODELS[model]

  @jax.jit
  def run(params, xs, ys):
    return jax.vmap(functools.partial(train, apply, params, xs, ys))(scales)

  return run(init(), xs, ys)


def _relative_differences(stacked):
  """||p_k - p_1|| / ||p_1|| over all leaves, for each k in SCALES."""
  flat = jnp.concatenate([x.reshape(x.shape[0], -1)
                          for x in jax.tree.leaves(stacked)], axis=1)
  return np.asarray(jnp.linalg.norm(flat[1:] - flat[0], axis=1)
                    / jnp.linalg.norm(flat[0]))


@pytest.mark.parametrize('model', list(MODELS))
@pytest.mark.parametrize('optimizer', [
    'yellowfin_auto', 'yellowfin_auto_rms', 'yellowfin_auto_scaled_direction',
    'adam'])
def test_loss_scale_invariance(optimizer, model):
  """200 steps on k * loss, k in 1e-3..1e3: the parameters of k = 1 within
  1e-4 relative (Adam with eps -> 0 is the control). Also along
  ``rms_direction()``, and with the gradient (not the loss) rescaled by k
  inside ``direction``."""
  params, losses = _train_scaled(optimizer, model)
  assert losses[0, -10:].mean() < 0.5 * losses[0, 0]  # it trains
  diffs = _relative_differences(params)
  assert np.all(diffs <= INVARIANT), dict(zip(SCALES, diffs))


@pytest.mark.parametrize('model', [
    'mlp', pytest.param('softmax_regression', marks=pytest.mark.slow)])
def test_reference_is_not_loss_scale_invariant(model):
  """yellowfin()'s curvature ||g||^2 has gradient units: training on k * loss
  ends far from the k = 1 parameters (the reference's units, documented)."""
  params, _ = _train_scaled('yellowfin', model)
  diffs = _relative_differences(params)
  assert np.all(diffs > NOT_INVARIANT), dict(zip(SCALES, diffs))


@pytest.mark.slow  # documents a measurement (8 s of compilation)
def test_gradient_rescale_before_yellowfin_auto_scales_the_step_by_1_over_c():
  """A rescale by c chained *before* ``yellowfin_auto`` (inside
  ``direction`` it is invariant: test_loss_scale_invariance), the loss
  unscaled:
  the curvature ||c g||^2 / 2f is c^2 times larger, so (measured on a fixed
  stream of minibatch losses and gradients) the momentum is unchanged, the
  learning rate is divided by c^2 and the update by c; until the
  catastrophic-move cap (learning_rate * ||c g|| <= 100, in parameter units)
  binds, which it does for c = 1e-3."""
  xs, ys = _digits_batches()
  # A fixed stream: minibatch losses and gradients along an Adam run.
  adam = optax.adam(1e-2)

  def record(carry, batch):
    params, state = carry
    value, grads = jax.value_and_grad(
        functools.partial(_cross_entropy, _mlp))(params, *batch)
    updates, state = adam.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), (value, grads)

  params0 = _mlp_init()
  cs = jnp.asarray((1.0,) + SCALES, jnp.float32)

  def replay(params0, c, stream):
    tx = optax.chain(optax.scale(c), yf.yellowfin_auto())

    def step(state, value_grads):
      value, grads = value_grads
      updates, state = tx.update(grads, state, params0, value=value)
      return state, (updates, yf.hyperparams(state))

    return jax.lax.scan(step, tx.init(params0), stream)[1]

  @jax.jit
  def run(params0, xs, ys):
    stream = jax.lax.scan(record, (params0, adam.init(params0)), (xs, ys))[1]
    norms = jnp.sqrt(sum(jnp.sum(g**2, axis=tuple(range(1, g.ndim)))
                         for g in jax.tree.leaves(stream[1])))
    return jax.vmap(replay, in_axes=(None, 0, None))(params0, cs, stream), norms

  (updates, hp), grad_norms = run(params0, xs, ys)
  flat = np.asarray(jnp.concatenate(
      [u.reshape(u.shape[:2] + (-1,)) for u in jax.tree.leaves(updates)], axis=2))
  lr, mu = np.asarray(hp['learning_rate']), np.asarray(hp['momentum'])
  h_min = np.asarray(hp['h_min'])
  assert np.all(np.asarray(hp['skipped_steps'])[:, -1] == 0)
  for i, c in enumerate(np.asarray(cs)):
    capped = lr[i] * c * np.asarray(grad_norms) >= 100.0 * (1 - 1e-5)
    if c >= 1e-1:
      assert not capped.any()
      np.testing.assert_allclose(lr[i] * c * c, lr[0], rtol=1e-4, err_msg=c)
      np.testing.assert_allclose(mu[i], mu[0], rtol=1e-4, atol=1e-5, err_msg=c)
      np.testing.assert_allclose(h_min[i] / (c * c), h_min[0], rtol=1e-4)
      np.testing.assert_allclose(flat[i] * c, flat[0], rtol=1e-3,
                                 atol=1e-4 * np.abs(flat[0]).max(), err_msg=c)
    else:  # c = 1e-3: steps 1000x longer hit the cap
      assert capped.any()
      assert np.all(lr[i][capped] * c * c < lr[0][capped])
      np.testing.assert_allclose(lr[i][~capped] * c * c, lr[0][~capped],
                                 rtol=1e-4)
