"""YellowFin against the authors' PyTorch reference, step by step.

Every scenario of ../shared/conformance is fed its recorded gradients for 300
steps; statistics, tuner outputs, applied values and parameters must match at
every step within the tolerances of the conformance README.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import yellowfin_optax as yf
from tests import _reference

SCENARIOS = _reference.scenarios()
pytestmark = pytest.mark.skipif(
    not SCENARIOS, reason=f'no conformance data in {_reference.CONFORMANCE_DIR}'
)

# Our hyperparams() name for each recorded series.
OURS = {
    'h_min': 'h_min', 'h_max': 'h_max', 'grad_var': 'grad_var',
    'dist_to_opt': 'dist_to_opt', 'lr_t': 'lr_t', 'mu_t': 'mu_t', 'lr': 'lr',
    'mu': 'mu', 'applied_lr': 'learning_rate', 'applied_mu': 'momentum',
}


def run_recorded(tx, grads):
  """Feeds recorded gradients through ``tx`` in one scan from zero params."""
  params = [jnp.zeros(g.shape[1:], jnp.float32) for g in grads]

  def step(carry, g):
    p, state = carry
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
    return (p, state), (p, yf.hyperparams(state))

  _, (ps, hp) = jax.jit(
      lambda: jax.lax.scan(step, (params, tx.init(params)), grads)
  )()
  return [np.asarray(p) for p in ps], {k: np.asarray(v) for k, v in hp.items()}


def assert_close(name, ours, ref, rtol, atol):
  err = np.abs(ours - ref) - (atol + rtol * np.abs(ref))
  worst = int(np.argmax(err))
  assert err[worst] <= 0, (
      f'{name} differs from the reference at step {worst}: ours '
      f'{ours[worst]!r}, reference {ref[worst]!r}'
  )


@pytest.mark.parametrize('file,scenario', SCENARIOS)
def test_matches_reference(file, scenario):
  ref = _reference.load(file, scenario)
  params, hp = run_recorded(yf.yellowfin(**ref['config']), ref['grads'])
  steps = len(ref['h_max']) if ref['first_restore'] < 0 else ref['first_restore']
  assert steps > 100  # the fallback must not hide most of the run

  h_max = ref['h_max'][:steps]
  for key, ours in OURS.items():
    atol = 0.0
    if key == 'grad_var':  # a float32 cancellation (conformance README)
      atol = 5e-6 * h_max
    elif 'mu' in key:  # 1e-9..1e-4 values out of cancellations
      atol = 2e-7
    assert_close(key, hp[ours][:steps], ref[key][:steps], 1e-3, atol)

  scale = np.max([np.abs(p).reshape(len(p), -1).max(1) for p in ref['params']], 0)
  for i, (ours, theirs) in enumerate(zip(params, ref['params'])):
    atol = (1e-5 * scale[:steps]).reshape((-1,) + (1,) * (theirs.ndim - 1))
    err = np.abs(ours[:steps] - theirs[:steps]) - (atol + 2e-2 * np.abs(theirs[:steps]))
    assert err.max() <= 0, f'params leaf {i} off at step {np.argmax(err.max(axis=tuple(range(1, err.ndim))))}'


def test_statistics_stay_close_to_rounding():
  """A faithful float32 implementation lands near 1e-5 (README): check 1e-4."""
  ref = _reference.load(_reference.FILES[0], 'gaussian')
  _, hp = run_recorded(yf.yellowfin(), ref['grads'])
  for key in ('h_min', 'h_max', 'dist_to_opt', 'lr_t', 'applied_lr'):
    np.testing.assert_allclose(hp[OURS[key]], ref[key], rtol=1e-4, err_msg=key)


@pytest.mark.parametrize('beta', [0.999, 0.9, 0.99999])
def test_debias_factor_uses_exact_beta(beta):
  """The spec's Precision rule: d = 1 - beta**(t+1) from the exact beta.

  float32(beta)**(t+1) is off by 1e-5 relative at t = 0, which collapses C to
  eps at step 1 of the quadratic scenario.
  """
  from yellowfin_optax import _statistics
  _, _, log_beta = _statistics.ema_constants(beta)
  for t in (0, 1, 10, 1000, 100000):
    exact = 1.0 - beta ** (t + 1)
    ours = float(_statistics.debias_factor(jnp.asarray(t, jnp.int32), log_beta))
    assert abs(ours - exact) <= 2e-6 * exact, (t, ours, exact)
  assert _statistics.ema_constants(beta)[1] == 1.0 - beta  # a Python float


def test_sparsity_debias_without_zero_debias_leaves_emas_alone():
  """The reference's in-place defect is not copied (spec, end of section 2).

  With sparsity_debias and zero_debias off, the reported h_max, D are the
  EMA-derived values times the sparsity correction, and the EMAs themselves
  are those of the uncorrected run.
  """
  ref = _reference.load(_reference.FILES[0], 'sparse')
  common = dict(zero_debias=False, adaptive_clipping=False,
                h_max_log_smooth=False, h_min_log_smooth=False)
  grads = [g[:50] for g in ref['grads']]

  def final_state(**kw):
    tx = yf.yellowfin(**common, **kw)
    params = [jnp.zeros(g.shape[1:]) for g in grads]
    state = tx.init(params)
    for t in range(50):
      _, state = tx.update([g[t] for g in grads], state, params)
    return state.inner.tuner.statistics

  plain = final_state()
  sparse = final_state(sparsity_debias=True)
  for field in ('h_min_ema', 'h_max_ema', 'dist_ema', 'sq_norm_ema'):
    np.testing.assert_allclose(getattr(sparse, field), getattr(plain, field),
                               rtol=1e-6, err_msg=field)
  np.testing.assert_allclose(sparse.h_max, plain.h_max * sparse.sparsity, rtol=1e-5)
  np.testing.assert_allclose(
      sparse.dist_to_opt, plain.dist_to_opt / (np.sqrt(sparse.sparsity) + 1e-6),
      rtol=1e-5)
  assert 0.05 < float(sparse.sparsity) < 0.2  # 90% zeros


def report() -> None:
  """Prints the worst relative error of each quantity per scenario."""
  for file, scenario in SCENARIOS:
    ref = _reference.load(file, scenario)
    _, hp = run_recorded(yf.yellowfin(**ref['config']), ref['grads'])
    worst = {
        key: np.max(np.abs(hp[ours] - ref[key]) / np.maximum(np.abs(ref[key]), 1e-30))
        for key, ours in OURS.items() if key not in ('grad_var', 'mu_t', 'mu', 'applied_mu')
    }
    print(f'{scenario:22s} ' + '  '.join(f'{k} {v:.1e}' for k, v in worst.items()))


if __name__ == '__main__':
  report()
