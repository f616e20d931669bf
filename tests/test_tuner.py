"""The tuner's formulas from first principles (spec section 2, paper Lemma 2.1).

The math is private pure functions of ``yellowfin_optax._yellowfin``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import yellowfin_optax as yf
from yellowfin_optax import _yellowfin


def spectral_radius(alpha, mu, h):
  """Of the heavy-ball operator [[1 - alpha h + mu, -mu], [1, 0]]."""
  op = np.array([[1.0 - alpha * h + mu, -mu], [1.0, 0.0]])
  return np.max(np.abs(np.linalg.eigvals(op)))


@pytest.mark.parametrize('mu', [0.01, 0.25, 0.5, 0.81, 0.99])
def test_lemma_2_1_robust_region(mu):
  """Inside (1-sqrt mu)^2 <= alpha h <= (1+sqrt mu)^2 the rate is sqrt(mu)."""
  r = np.sqrt(mu)
  for ah in np.linspace((1 - r) ** 2, (1 + r) ** 2, 41):
    np.testing.assert_allclose(spectral_radius(ah, mu, 1.0), r, rtol=1e-6)
  for ah in ((1 - r) ** 2 * 0.5, (1 + r) ** 2 * 1.1):
    assert spectral_radius(ah, mu, 1.0) > r * (1 + 1e-6)


def test_cubic_root_minimises_the_one_step_objective():
  rng = np.random.default_rng(0)
  grid = np.linspace(0.0, 1.0, 200001)
  cdh = 10.0 ** rng.uniform(-4, 4, size=(200, 3))
  ps = cdh[:, 1] ** 2 * cdh[:, 2] ** 2 / (2 * cdh[:, 0])
  xs = np.asarray(_yellowfin.cubic_root(jnp.asarray(ps, jnp.float32)))
  for (c, d, h), x in zip(cdh, xs):
    x = float(x)
    objective = grid**2 * d**2 + (1 - grid) ** 4 * c / h**2
    best = grid[np.argmin(objective)]
    assert 0.0 <= x < 1.0
    assert abs(x - best) < 2e-4 + 1e-3 * best, (c, d, h, x, best)


def test_cubic_root_does_not_overflow_for_huge_p():
  x = _yellowfin.cubic_root(jnp.float32([1e20, 1e30, 3e37]))
  assert np.all(np.isfinite(x)) and np.all(x >= -1e-3) and np.all(x < 1e-3 + 1e-2)


@pytest.mark.parametrize('p', [0.0, 1e-30, 1e-24, 1e-20, 1e-12, 1e-6, 0.3,
                               0.4, 1.0, 1e4, 1e8, 1e20, 1e30])
def test_cubic_root_is_float32_exact_from_zero_to_huge_p(p):
  p = float(np.float32(p))
  lo, hi = 0.0, 1.0  # float64 bisection on (1 - x)^3 = p x, decreasing in x
  for _ in range(100):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if (1 - mid) ** 3 > p * mid else (lo, mid)
  x = float(_yellowfin.cubic_root(jnp.float32(p)))
  # Tiny p: the root 1 - p^(1/3) + ... is 1 to within float32's spacing.
  np.testing.assert_allclose(x, lo, rtol=1e-7, atol=6e-8)


def test_robust_momentum_puts_every_curvature_in_the_robust_region():
  rng = np.random.default_rng(1)
  for _ in range(100):
    h_min = 10.0 ** rng.uniform(-3, 3)
    h_max = h_min * 10.0 ** rng.uniform(0.01, 4)
    mu = float(_yellowfin.robust_momentum(jnp.float32(h_min), jnp.float32(h_max), 1e-6))
    alpha = (1 - np.sqrt(mu)) ** 2 / h_min
    for h in np.geomspace(h_min, h_max, 7):
      assert (1 - np.sqrt(mu)) ** 2 * (1 - 1e-4) <= alpha * h
      assert alpha * h <= (1 + np.sqrt(mu)) ** 2 * (1 + 1e-3)


def test_tune_follows_the_spec_formulas():
  h_min, h_max, c, d = 2.0, 50.0, 0.3, 0.7
  for step in (1, 5, 500):
    lr_t, mu_t = _yellowfin.tune(*map(jnp.float32, (h_min, h_max, c, d)),
                         jnp.int32(step), curvature_window=20)
    eps = 1e-6
    p = (d + eps) ** 2 * (h_min + eps) ** 2 / 2 / (c + eps)
    w3 = (-np.sqrt(p**2 + 4 / 27 * p**3) - p) / 2
    w = np.sign(w3) * np.abs(w3) ** (1 / 3)
    x = w - p / 3 / (w + eps) + 1
    dr = max((h_max + eps) / (h_min + eps), 1 + eps)
    mu = max(x**2, ((np.sqrt(dr) - 1) / (np.sqrt(dr) + 1)) ** 2)
    lr = (1 - np.sqrt(mu)) ** 2 / (h_min + eps)
    lr = min(lr, lr * (step + 1) / 200)
    np.testing.assert_allclose(mu_t, mu, rtol=1e-5)
    np.testing.assert_allclose(lr_t, lr, rtol=1e-5)


@pytest.mark.slow  # convergence: tests/test_battery.py (default run)
def test_noisy_quadratic_converges_untuned():
  h = jnp.array([1.0, 3.0, 10.0, 30.0])
  tx = yf.yellowfin()

  def step(carry, key):
    x, state = carry
    g = h * x + 0.01 * jax.random.normal(key, x.shape)
    u, state = tx.update(g, state, x)
    return (x + u, state), 0.5 * jnp.sum(h * x**2)

  x0 = jnp.ones(4)
  keys = jax.random.split(jax.random.PRNGKey(0), 1500)
  _, losses = jax.jit(lambda: jax.lax.scan(step, (x0, tx.init(x0)), keys))()
  assert losses[-100:].mean() < 1e-3 * losses[0]
  assert np.all(np.isfinite(losses))


def test_curvature_range_reads_only_the_filled_slots():
  """Before the ring is full, the empty (zero) slots are not curvatures."""
  window = jnp.array([3.0, 1.0, 5.0, 0.0, 0.0])
  low, high = _yellowfin.curvature_range(window, jnp.int32(2), False, False, 1e-6)
  assert (float(low), float(high)) == (1.0, 5.0)
  low, high = _yellowfin.curvature_range(window, jnp.int32(2), True, True, 1e-6)
  np.testing.assert_allclose([low, high], np.log([1.0 + 1e-6, 5.0 + 1e-6]),
                             rtol=1e-6, atol=1e-7)  # float32 1 + 1e-6
  # Full ring (count past the width): every slot, the zeros too.
  low, _ = _yellowfin.curvature_range(window, jnp.int32(7), False, False, 1e-6)
  assert float(low) == 0.0


def test_cosine_factor_decays_to_zero_and_stays():
  counts = jnp.array([0, 25, 50, 100, 150], jnp.int32)
  np.testing.assert_allclose(_yellowfin.cosine_factor(counts, 100),
                             [1.0, (1 + np.cos(np.pi / 4)) / 2, 0.5, 0.0, 0.0],
                             atol=1e-7)


def test_clip_factor_is_torchs():
  """torch.nn.utils.clip_grad_norm_ scales by min(1, c / (|g| + 1e-6))."""
  np.testing.assert_allclose(
      _yellowfin.clip_factor(jnp.array([0.0, 1.0, 100.0]), 5.0),
      [1.0, 1.0, 5.0 / (10.0 + 1e-6)], rtol=1e-7)


def test_gradient_variance_is_the_debiased_ema_variance():
  """C = E||g||^2 - ||E g||^2 with the debiased EMAs of a gradient stream,
  floored at eps."""
  rng = np.random.default_rng(0)
  beta, steps = 0.9, 30
  grads = rng.normal(size=(steps, 5)) + 2.0
  weights = (1 - beta) * beta ** np.arange(steps)[::-1]
  d = 1 - beta**steps
  mean = (weights[:, None] * grads).sum(0) / d
  var = (weights * (grads**2).sum(1)).sum() / d - (mean**2).sum()
  sq_norm_ema = (weights * (grads**2).sum(1)).sum()
  ema_sq_norm = (((weights[:, None] * grads).sum(0)) ** 2).sum()
  c = _yellowfin.gradient_variance(jnp.float32(sq_norm_ema),
                                   jnp.float32(ema_sq_norm), d, 1e-6)
  np.testing.assert_allclose(c, var, rtol=1e-4)
  constant = _yellowfin.gradient_variance(jnp.float32(4.0), jnp.float32(16.0),
                                          jnp.float32(1.0) / 2, 1e-6)
  assert float(constant) == 1e-6 * np.float32(1)  # no variance: the floor
