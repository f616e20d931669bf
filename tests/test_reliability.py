"""Reliability: non-finite gradients, extreme inputs, argument validation.

Issue 8: one NaN or one 1e10 spike must not poison YellowFin's statistics.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import yellowfin_optax as yf
from tests._trees import assert_trees_equal
from yellowfin_optax import _nonfinite

CURVATURES = jnp.linspace(1.0, 10.0, 10)


def _params():
  return {'a': jnp.ones(10), 'b': [jnp.full((2, 3), 0.5), jnp.ones([])]}


def _grads(params, key, scale=1.0):
  """Noisy quadratic gradient; leaf 'a' has curvatures 1..10, the rest 1."""
  keys = jax.random.split(key, 3)
  leaves, treedef = jax.tree.flatten(params)
  noisy = [
      x * (CURVATURES if x.shape == (10,) else 1.0)
      + 0.1 * jax.random.normal(k, x.shape)
      for x, k in zip(leaves, keys)
  ]
  return jax.tree.map(lambda g: scale * g, jax.tree.unflatten(treedef, noisy))


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# One optimizer and a few compiled functions shared by the tests: compiling
# dominates their run time.
TX = yf.yellowfin()
STEP = jax.jit(lambda p, s, g: TX.update(g, s, p))
N_SCAN = 1500  # one scan length for every scanned test: one compilation


def _make_scan(tx):
  """Jitted ``lax.scan`` over ``N_SCAN`` steps on a 10-d noisy quadratic.

  Step ``i``'s gradient is multiplied by ``scales[i]`` (0 for a zero gradient,
  NaN for a bad step, 1e10 for a spike). Returns the final params and state
  and, per step, the applied learning rate, ``skipped_steps`` and whether the
  params are finite.
  """

  def body(carry, scale):
    p, s, key = carry
    key, k = jax.random.split(key)
    g = scale * (CURVATURES * p + 0.1 * jax.random.normal(k, p.shape))
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    hp = yf.hyperparams(s)
    return (p, s, key), (hp['learning_rate'], hp['skipped_steps'],
                         jnp.all(jnp.isfinite(p)))

  @jax.jit
  def run(scales):
    p = jnp.ones(10)
    (p, s, _), (lr, skipped, finite) = jax.lax.scan(
        body, (p, tx.init(p), jax.random.PRNGKey(0)), scales
    )
    return p, s, lr, skipped, finite

  def call(scales):
    scales = np.asarray(scales, np.float32)
    assert scales.shape == (N_SCAN,)
    p, s, lr, skipped, finite = run(scales)
    return p, s, np.asarray(lr), np.asarray(skipped), np.asarray(finite)

  return call


SCAN = _make_scan(TX)


# --------------------------------------------------------------------------
# Non-finite gradients.


@pytest.mark.parametrize(
    'bad,leaf', [(math.nan, 'a'), (math.inf, 'b1'), (-math.inf, 'a')]
)
def test_nonfinite_step_is_skipped_bit_identically(bad, leaf):
  params = _params()
  state = TX.init(params)
  key = jax.random.PRNGKey(0)
  for _ in range(5):
    key, k = jax.random.split(key)
    updates, state = STEP(params, state, _grads(params, k))
    params = optax.apply_updates(params, updates)
  g = _grads(params, key)
  if leaf == 'a':
    g['a'] = g['a'].at[3].set(bad)
  else:
    g['b'][1] = jnp.asarray(bad, g['b'][1].dtype)
  updates, new_state = STEP(params, state, g)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, jnp.zeros_like(u))
  assert_trees_equal(new_state.inner, state.inner)
  assert int(new_state.skipped_steps) == 1
  assert int(yf.hyperparams(new_state)['skipped_steps']) == 1
  assert int(yf.hyperparams(new_state)['step']) == 5


def test_skipped_steps_leave_trajectory_unchanged():
  """A run with NaN steps equals, bit for bit, the run without them."""
  n, bad_steps = 30, (7, 8, 20)
  params_a = params_b = _params()
  state_a = state_b = TX.init(params_a)
  key = jax.random.PRNGKey(1)
  for i in range(n):
    key, k = jax.random.split(key)
    g = _grads(params_a, k)
    if i in bad_steps:
      g = jax.tree.map(lambda x: x * jnp.nan, g)
    updates, state_a = STEP(params_a, state_a, g)
    params_a = optax.apply_updates(params_a, updates)
    if i not in bad_steps:
      updates, state_b = STEP(params_b, state_b, _grads(params_b, k))
      params_b = optax.apply_updates(params_b, updates)
  assert_trees_equal(params_a, params_b)
  assert_trees_equal(state_a.inner, state_b.inner)
  assert int(state_a.skipped_steps) == len(bad_steps)
  assert int(state_b.skipped_steps) == 0


def test_injected_nan_steps_are_counted():
  scales = np.ones(N_SCAN)
  bad = np.random.default_rng(0).choice(N_SCAN, 37, replace=False)
  scales[bad] = np.nan
  p, _, lr, skipped, finite = SCAN(scales)
  assert skipped[-1] == 37 and finite.all() and np.isfinite(lr).all()
  # Counter rises exactly on the injected steps.
  np.testing.assert_array_equal(np.flatnonzero(np.diff(skipped, prepend=0)),
                                np.sort(bad))


def test_nonfinite_tuner_output_from_finite_gradients_is_skipped():
  # 1e20 is finite in float32, but ||g||^2 overflows to inf inside.
  scales = np.ones(N_SCAN)
  scales[10] = 1e20
  p, state, _, skipped, finite = SCAN(scales)
  assert skipped[9] == 0 and skipped[10] == 1 and skipped[-1] == 1
  assert finite.all() and _all_finite(state)


def test_nonfinite_update_from_finite_state_is_skipped():
  """The wrapper also checks the emitted update (e.g. a float16 overflow)."""

  def overflowing():
    return optax.GradientTransformation(
        lambda p: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)),
        lambda u, s, p=None: (
            jax.tree.map(lambda x: x * jnp.float16(6e4), u),
            optax.ScaleByScheduleState(count=s.count + 1),
        ),
    )

  tx = yf.skip_nonfinite(overflowing())
  x = jnp.full([3], 10.0, jnp.float16)
  state = tx.init(x)
  updates, new_state = tx.update(x, state)
  np.testing.assert_array_equal(updates, jnp.zeros(3, jnp.float16))
  assert int(new_state.inner.count) == 0
  assert int(new_state.skipped_steps) == 1
  updates, new_state = tx.update(x * 1e-3, state)
  assert _all_finite(updates) and int(new_state.skipped_steps) == 0
  assert int(new_state.inner.count) == 1


def test_all_finite_ignores_integer_and_empty_leaves():
  assert bool(_nonfinite.all_finite({'i': jnp.arange(3), 'e': jnp.zeros(0)}))
  assert bool(_nonfinite.all_finite({}))
  assert not bool(_nonfinite.all_finite([jnp.ones(2), jnp.array(jnp.inf)]))
  assert not bool(
      _nonfinite.all_finite([jnp.array([1.0, jnp.nan], jnp.bfloat16)])
  )


def test_on_nonfinite_invalid_value():
  with pytest.raises(ValueError, match="on_nonfinite must be one of .*'skip'"):
    yf.yellowfin(on_nonfinite='ignore')


def test_on_nonfinite_propagate_lets_nan_through():
  tx = yf.yellowfin(on_nonfinite='propagate')
  params = jnp.ones(3)
  state = tx.init(params)
  updates, state = tx.update(jnp.array([1.0, jnp.nan, 1.0]), state, params)
  assert bool(jnp.isnan(updates[1]))
  assert 'skipped_steps' not in yf.hyperparams(state)


def test_raise_in_debug():
  tx = yf.yellowfin(on_nonfinite='raise_in_debug')
  params = _params()
  good = _grads(params, jax.random.PRNGKey(0))
  bad = jax.tree.map(lambda x: x * jnp.nan, good)
  fn = jax.jit(lambda s, g: tx.update(g, s, params))
  state = tx.init(params)
  # Debug flags off: skips exactly as 'skip' does, without raising.
  assert_trees_equal(fn(state, bad), STEP(params, TX.init(params), bad))
  with jax.debug_nans(True):  # read at run time: no retrace needed
    fn(state, good)  # a finite step passes
    with pytest.raises(Exception, match='non-finite gradient or tuner output'):
      jax.block_until_ready(fn(state, bad))
  assert 'callback' not in str(jax.make_jaxpr(STEP)(params, state, bad))


def test_composes_with_apply_if_finite():
  tx = optax.apply_if_finite(yf.yellowfin(), max_consecutive_errors=2)
  scales = np.ones(N_SCAN)
  scales[500:505] = np.nan  # five in a row: more than max_consecutive_errors
  p, state, lr, skipped, finite = _make_scan(tx)(scales)
  assert finite.all() and np.isfinite(lr).all()
  assert int(state.total_notfinite) == 5
  # apply_if_finite skips 2, then gives up and lets 3 through to YellowFin,
  # whose own guard skips them.
  assert skipped[-1] == 3
  assert int(yf.hyperparams(state)['step']) == N_SCAN - 5


# --------------------------------------------------------------------------
# Extreme but finite inputs.


def test_epoch_of_zero_gradients():
  n_before, n_zero = 200, 1000
  scales = np.ones(N_SCAN)
  scales[n_before:n_before + n_zero] = 0.0
  p, state, lrs, skipped, finite = SCAN(scales)
  assert np.isfinite(lrs).all() and finite.all() and _all_finite(state)
  assert skipped[-1] == 0  # zero gradients are valid, never skipped
  # Measured: the lr falls during the zeros and stays low when they end.
  assert lrs[n_before:].max() <= 2 * lrs[:n_before].max()


def test_all_zero_gradients_from_the_start():
  _, state, lrs, skipped, finite = SCAN(np.zeros(N_SCAN))
  assert np.isfinite(lrs).all() and skipped[-1] == 0 and finite.all()
  for name, value in yf.hyperparams(state).items():
    assert bool(jnp.isfinite(value)), name


@pytest.mark.parametrize('spike_len', [1, 20])
def test_gradient_spike_recovers(spike_len):
  """A 1e10x jump: parameters stay finite, lr stays within 2x of before."""
  start = 500
  scales = np.ones(N_SCAN)
  scales[start:start + spike_len] = 1e10
  _, _, lr, skipped, finite = SCAN(scales)
  assert finite.all() and skipped[-1] == 0
  pre = lr[start - 1]
  after = lr[start + spike_len:start + spike_len + 500]
  # Measured (BUILD_NOTES.md section 7): the adaptive clips keep lr inside the
  # band at every step, i.e. recovery takes 0 steps.
  assert after.min() >= pre / 2 and after.max() <= 2 * pre, (
      after.min() / pre, after.max() / pre,
  )


@pytest.mark.parametrize(
    'scale',
    [1e-10, 1e-5, 1e5, 1e8, 1e10],
)
def test_gradient_scales(scale):
  p, state, lr, skipped, finite = SCAN(np.full(N_SCAN, scale))
  assert finite.all() and _all_finite(state) and np.isfinite(lr).all()
  assert skipped[-1] == 0


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_params(dtype):
  params = {'w': jnp.ones(10, dtype), 'b': jnp.full([3], 0.5, dtype)}

  def loss(p):
    return jnp.sum(CURVATURES * p['w'].astype(jnp.float32) ** 2) + jnp.sum(
        p['b'].astype(jnp.float32) ** 2
    )

  @jax.jit
  def run(p):
    def body(carry, _):
      p, s = carry
      u, s = TX.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None

    (p, s), _ = jax.lax.scan(body, (p, TX.init(p)), None, length=300)
    u, _ = TX.update(jax.grad(loss)(p), s, p)
    return p, s, u

  loss0 = float(loss(params))
  params, state, updates = run(params)
  for x, u in zip(jax.tree.leaves(params), jax.tree.leaves(updates)):
    assert x.dtype == dtype and u.dtype == dtype
  assert _all_finite(params)
  for leaf in jax.tree.leaves(state.inner.tuner.statistics.grad_ema):
    assert leaf.dtype == jnp.float32
  for name, value in yf.hyperparams(state).items():
    if name not in ('step', 'skipped_steps'):
      assert value.dtype == jnp.float32, name
  assert int(yf.hyperparams(state)['skipped_steps']) == 0
  assert float(loss(params)) < 0.5 * loss0


# --------------------------------------------------------------------------
# Argument validation and structure checks.

BAD_ARGUMENTS = [
    ('learning_rate', -1e-3),
    ('learning_rate', math.nan),
    ('momentum', -0.1),
    ('momentum', 1.0),
    ('beta', 0.0),
    ('beta', 1.0),
    ('beta', math.nan),
    ('curvature_window', 0),
    ('curvature_window', 2.5),
    ('stat_protect_factor', -1.0),
    ('catastrophic_move_threshold', 0.0),
    ('clip_norm', 0.0),
    ('clip_norm', -1.0),
    ('lr_factor', -1.0),
    ('eps', -1e-6),
    ('eps', 0.0),  # log(0) on an all-zero gradient
    ('eps', math.inf),
    ('on_nonfinite', 'never'),
]


@pytest.mark.parametrize('name,value', BAD_ARGUMENTS)
def test_invalid_argument_is_named(name, value):
  with pytest.raises(ValueError, match=name):
    yf.yellowfin(**{name: value})


def test_valid_boundary_arguments_accepted():
  yf.yellowfin(learning_rate=0.0, momentum=0.0, stat_protect_factor=0.0,
               eps=1e-12, curvature_window=1, lr_factor=0.0)
  yf.yellowfin(lr_factor=optax.linear_schedule(1.0, 0.1, 100))


def test_gradient_structure_mismatch_raises():
  tx = yf.yellowfin()
  state = tx.init({'a': jnp.ones(2), 'b': jnp.ones(3)})
  with pytest.raises(ValueError, match='gradient pytree does not match'):
    tx.update({'a': jnp.ones(2), 'c': jnp.ones(3)}, state)
  with pytest.raises(ValueError, match='gradient pytree does not match'):
    tx.update({'a': jnp.ones(2)}, state)


def test_params_structure_mismatch_raises():
  tx = yf.yellowfin()
  params = {'a': jnp.ones(2), 'b': jnp.ones(3)}
  state = tx.init(params)
  with pytest.raises(ValueError, match='gradient and parameter pytrees differ'):
    tx.update(params, state, {'a': jnp.ones(2)})


def test_generic_inner_needs_the_gradient_check():
  """skip_nonfinite around a plain optimizer: only check_gradients sees a NaN
  gradient whose update would be NaN (yellowfin relies on ||g||^2 instead)."""
  inner = optax.sgd(0.1, momentum=0.9)
  grads = jnp.array([1.0, jnp.nan])
  checked = yf.skip_nonfinite(inner)
  updates, state = checked.update(grads, checked.init(jnp.zeros(2)))
  assert int(state.skipped_steps) == 1
  assert float(jnp.abs(updates).max()) == 0.0
  # yellowfin() skips without the gradient check: grad_sq_norm is NaN.
  tx = yf.yellowfin()
  updates, state = tx.update(grads, tx.init(jnp.zeros(2)))
  assert int(state.skipped_steps) == 1
  assert float(jnp.abs(updates).max()) == 0.0


@pytest.mark.parametrize('options', [
    {}, dict(smoothed_hyperparams=True, debias_smoothed=True),
    dict(max_step_growth=2.0, step_growth_anchor=2)])
def test_no_nan_is_computed_on_finite_gradients(options):
  """Not even in a branch that ``where`` discards: under ``jax_debug_nans``
  (what ``raise_in_debug`` is for) the first steps would raise."""
  tx = yf.yellowfin(**options)
  params = _params()
  state = tx.init(params)
  with jax.debug_nans(True):
    for t in range(4):
      _, state = tx.update(_grads(params, jax.random.PRNGKey(t)), state,
                           params)
  assert int(state.skipped_steps) == 0


def test_step_growth_anchor_must_be_an_int():
  with pytest.raises(ValueError, match='step_growth_anchor must be an int'):
    yf.yellowfin(max_step_growth=2.0, step_growth_anchor=200.5)


def test_skip_nonfinite_checks_every_update_unless_told_narrow():
  """The public wrapper's contract: a non-finite update entry skips the step.
  ``check_updates='narrow'`` (what yellowfin() passes) checks only leaves
  narrower than float32."""
  grads = jnp.array([10.0, 1.0])
  tx = yf.skip_nonfinite(optax.scale(1e38))  # 1e39 overflows float32
  updates, state = tx.update(grads, tx.init(grads))
  assert int(state.skipped_steps) == 1 and not np.any(updates)
  narrow = yf.skip_nonfinite(optax.scale(1e38), check_updates='narrow')
  updates, state = narrow.update(grads, narrow.init(grads))
  assert int(state.skipped_steps) == 0 and np.isinf(updates[0])
  updates, state = narrow.update(grads.astype(jnp.bfloat16) * 1e4,
                                 narrow.init(grads))
  assert int(state.skipped_steps) == 1
  with pytest.raises(ValueError, match='check_updates must be one of'):
    yf.skip_nonfinite(optax.identity(), check_updates='none')
