"""Hypothesis property tests over random parameter pytrees.

Random nested dicts and lists with scalar, empty and small array leaves of
mixed float dtypes, optionally under ``optax.masked``. One test checks all
properties per example, since each new tree structure costs a compilation.
"""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax

import yellowfin_optax as yf

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


@hypothesis.settings(
    max_examples=12, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
@hypothesis.given(
    spec=tree_specs,
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-3.0, 3.0),
    masked=st.booleans(),
)
def test_random_pytrees(spec, seed, log_scale, masked):
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
  jit_updates, jit_state, _ = run(jax.jit(tx.update))

  # The state's structure, shapes and dtypes never change.
  assert all(layout == layouts[0] for layout in layouts)
  # Updates keep the params' structure and dtypes.
  for updates in eager_updates:
    assert _layout(updates) == _layout(params)
  # jit and eager agree.
  _assert_close(eager_updates, jit_updates)
  _assert_close(eager_state, jit_state)
  # Finite input gives finite output, and nothing is skipped.
  for tree in (eager_updates, eager_state):
    for x in jax.tree.leaves(tree):
      assert bool(jnp.all(jnp.isfinite(x)))
  hp = yf.hyperparams(eager_state)
  assert int(hp['skipped_steps']) == 0
  assert int(hp['step']) == 2


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
