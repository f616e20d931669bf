"""Stress: 100,000 steps of varying scale and sparsity with injected NaNs.

Slow (excluded from the default run): ``pytest -m slow tests/test_stress.py``.
The run is a jitted ``lax.scan`` over chunks of 10,000 steps: one compilation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import yellowfin_optax as yf

N_STEPS = 100_000
CHUNK = 10_000
N_BAD = 250
LOG_SCALE_RANGE = (-3.0, 3.0)


def _schedule(seed=0):
  """Per step: gradient scale, kept fraction, and the injected-NaN steps."""
  rng = np.random.default_rng(seed)
  log_scale = rng.uniform(*LOG_SCALE_RANGE, N_STEPS)
  # Scales drift in runs of 1..500 steps rather than jumping every step.
  run_starts = np.cumsum(rng.integers(1, 500, N_STEPS))
  run_starts = run_starts[run_starts < N_STEPS]
  run_id = np.searchsorted(run_starts, np.arange(N_STEPS), side='right')
  scale = (10.0 ** log_scale[run_id]).astype(np.float32)
  keep = rng.uniform(0.05, 1.0, N_STEPS).astype(np.float32)
  bad = np.zeros(N_STEPS, bool)
  bad[rng.choice(N_STEPS, N_BAD, replace=False)] = True
  return scale, keep, bad


@pytest.mark.slow
def test_stress_100k_steps():
  tx = yf.yellowfin()
  curvatures = {'w': jnp.linspace(1.0, 10.0, 64), 'b': jnp.full([8], 0.5)}

  def body(carry, xs):
    p, s, key = carry
    scale, keep, bad = xs
    key, k_noise, k_mask, k_nan = jax.random.split(key, 4)
    noise = jax.tree.map(
        lambda x, k: 0.1 * jax.random.normal(k, x.shape),
        p, dict(zip(p, jax.random.split(k_noise, len(p)))),
    )
    masks = jax.tree.map(
        lambda x, k: jax.random.uniform(k, x.shape) < keep,
        p, dict(zip(p, jax.random.split(k_mask, len(p)))),
    )
    g = jax.tree.map(
        lambda h, x, n, m: jnp.where(m, scale * (h * x + n), 0.0),
        curvatures, p, noise, masks,
    )
    # A bad step: one NaN entry in leaf 'w' at a random position.
    pos = jax.random.randint(k_nan, [], 0, 64)
    g['w'] = jnp.where(bad, g['w'].at[pos].set(jnp.nan), g['w'])
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    hp = yf.hyperparams(s)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                for x in jax.tree.leaves(p)]))
    return (p, s, key), (hp['learning_rate'], finite)

  @jax.jit
  def chunk(carry, xs):
    return jax.lax.scan(body, carry, xs)

  scale, keep, bad = _schedule()
  params = {'w': jnp.ones(64), 'b': jnp.ones(8)}
  carry = (params, tx.init(params), jax.random.PRNGKey(0))
  max_lr, all_finite, lr_finite = 0.0, True, True
  for start in range(0, N_STEPS, CHUNK):
    sl = slice(start, start + CHUNK)
    carry, (lr, finite) = chunk(carry, (scale[sl], keep[sl], bad[sl]))
    lr = np.asarray(lr)
    lr_finite &= bool(np.isfinite(lr).all())
    max_lr = max(max_lr, float(lr.max()))
    all_finite &= bool(np.asarray(finite).all())
  params, state, _ = carry
  hp = yf.hyperparams(state)
  assert all_finite, 'non-finite parameters'
  assert lr_finite
  # lr_t <= 1 / (h_min + eps) <= 1 / eps; the catastrophic-move cap then
  # keeps lr * ||g|| <= 100.
  assert max_lr <= 1e6, max_lr
  assert int(hp['skipped_steps']) == N_BAD
  assert int(hp['count']) == N_STEPS - N_BAD
  print(f'max lr {max_lr:.3g}, final lr {float(hp["learning_rate"]):.3g}, '
        f'momentum {float(hp["momentum"]):.3f}, skipped '
        f'{int(hp["skipped_steps"])}, max |param| '
        f'{max(float(jnp.abs(x).max()) for x in jax.tree.leaves(params)):.3g}')
