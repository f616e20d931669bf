"""M asynchronous round-robin workers simulated as M devices.

Each device is a worker. Worker ``w`` holds the model it last read and
computes its gradient on its own data shard *at that model*; the workers
deliver round-robin, so the gradient applied at step ``t`` was computed at
``x_{t - (M - 1)}``: asynchrony with staleness ``tau = M - 1``, as in the
paper's Section 4 experiments.

One jitted ``shard_map`` call per round of ``M`` steps:

1. every device computes its worker's gradient at its own stale model and
   batch, in parallel (the only parallel part: the rest is inherently
   sequential, as on a parameter server);
2. the ``M`` gradients are gathered on every device and the server optimizer is applied
   to them in delivery order (``lax.scan``, replicated on every device);
3. worker ``w`` reads the model right after its own delivery, ``x_{t+1}``:
   its snapshot for the next round.

During the first round only the last worker has a gradient (the others are
"still computing"), which is exactly what
``yellowfin_optax.delayed_gradients(M - 1, ...)`` does on one device while
its ring buffer fills; with the same data order the two simulations agree to
float32 rounding (``--check`` runs both and prints the difference; the test
is ``tests/test_async_workers.py``).

The server optimizer is YellowFin fed the stale gradients (and each worker's
loss as ``value=``), either open loop (``yellowfin()``) or closed loop
(``--closed-loop``): ``closed_loop_yellowfin(staleness=M - 1,
simulate_staleness=False)``, which measures the total momentum the delay adds
and corrects it by negative feedback. The gradients already arrive stale, so
it must not delay them again: ``simulate_staleness=False`` only tells it the
staleness. Its one-device simulation, fed fresh gradients, is the default
``closed_loop_yellowfin(staleness=M - 1)``.

Run (CPU, 8 host devices; the flag is set below if XLA_FLAGS is not)::

  python examples/async_workers.py --steps 400
  python examples/async_workers.py --steps 400 --closed-loop --check

Writes ``<out>/async_workers.json`` and ``.png`` and prints a table.
"""

from __future__ import annotations

import os

if 'XLA_FLAGS' not in os.environ:
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from tqdm import tqdm

import yellowfin_optax as yf

class MLP(nn.Module):

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(10)(x)


MODEL = MLP()


def loss_fn(params, x, y):
  logits = MODEL.apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def server_optimizer(
    staleness: int, closed_loop: bool, gain: float = 0.01
) -> optax.GradientTransformationExtraArgs:
  """The optimizer the server applies to gradients that arrive stale.

  The closed loop is told the staleness but does not simulate it
  (``simulate_staleness=False``): the workers' gradients are already
  ``staleness`` steps old. The open loop is plain ``yellowfin()``.
  """
  if not closed_loop:
    return yf.yellowfin()
  return yf.closed_loop_yellowfin(staleness=staleness, gain=gain,
                                  simulate_staleness=False)


def simulated_optimizer(
    staleness: int, closed_loop: bool, gain: float = 0.01
) -> optax.GradientTransformationExtraArgs:
  """The same system on one device, fed *fresh* gradients: a ring buffer
  delays them by ``staleness`` steps (``delayed_gradients``; the closed loop
  simulates its staleness by default)."""
  if not closed_loop:
    return yf.delayed_gradients(staleness, yf.yellowfin())
  return yf.closed_loop_yellowfin(staleness=staleness, gain=gain)


def worker_batches(x, y, rounds: int, workers: int, batch: int):
  """Batch of worker ``w`` in round ``r``: the one step ``(r-1)M + w + 1``
  of a single-device run would compute its gradient on (clipped at 0: those
  first-round gradients are never applied). Returns ``[R, M, B, ...]``."""
  r = np.arange(rounds)[:, None]
  w = np.arange(workers)[None, :]
  index = np.maximum((r - 1) * workers + w + 1, 0)
  rows = index[..., None] * batch + np.arange(batch)
  return x[rows], y[rows]


def make_round(
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    loss: Callable[..., jax.Array] = loss_fn,
) -> Callable[..., Any]:
  """One round: parallel stale gradients, then M server steps in order."""
  workers = mesh.shape['workers']
  staleness = workers - 1

  def round_fn(params, state, snapshots, x, y, r):
    w = jax.lax.axis_index('workers')
    snapshot = jax.tree.map(lambda a: a[0], snapshots)  # this worker's model
    value, grads = jax.value_and_grad(loss)(snapshot, x[0], y[0])
    # Gather every worker's gradient onto every device as a psum of one-hot
    # slots: exact (adding zeros), and its result is replicated in shard_map's
    # type system (all_gather's is not), as the server state must be.
    gather = lambda a: jax.lax.psum(
        jnp.zeros((workers,) + a.shape, a.dtype).at[w].set(a), 'workers'
    )
    losses = gather(value)
    all_grads = jax.tree.map(gather, grads)

    def deliver(carry, inputs):
      p, s = carry
      g, value, k = inputs
      u, s_new = tx.update(g, s, p, value=value)
      p_new = optax.apply_updates(p, u)
      arrived = r * workers + k >= staleness  # the first round: still computing
      p = optax.tree.where(arrived, p_new, p)
      s = optax.tree.where(arrived, s_new, s)
      return (p, s), (p, yf.hyperparams(s))

    (params, state), (history, hparams) = jax.lax.scan(
        deliver, (params, state), (all_grads, losses, jnp.arange(workers))
    )
    # Worker w reads the model right after its own delivery.
    new_snapshot = jax.tree.map(lambda h: h[w][None], history)
    return params, state, new_snapshot, losses, hparams

  return jax.jit(jax.shard_map(
      round_fn, mesh=mesh,
      in_specs=(P(), P(), P('workers'), P('workers'), P('workers'), P()),
      out_specs=(P(), P(), P('workers'), P(), P()),
  ))


def run_devices(tx, params, x, y, rounds: int, batch: int, mesh, progress=True):
  """The device simulation. Returns final params, state, per-step logs."""
  workers = mesh.shape['workers']
  xb, yb = worker_batches(x, y, rounds, workers, batch)
  step = make_round(tx, mesh)
  shard = NamedSharding(mesh, P('workers'))
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)  # no recompile after round 0
  state = jax.device_put(tx.init(params), replicated)
  snapshots = jax.device_put(
      jax.tree.map(lambda a: jnp.broadcast_to(a, (workers,) + a.shape), params),
      shard,
  )
  losses, hparams = [], []
  for r in tqdm(range(rounds), desc='rounds', disable=not progress):
    params, state, snapshots, loss, hp = step(
        params, state, snapshots, jax.device_put(xb[r], shard),
        jax.device_put(yb[r], shard), jnp.int32(r),
    )
    losses.append(loss)
    hparams.append(hp)
  losses = np.concatenate(jax.device_get(losses))
  hparams = {k: np.concatenate([h[k] for h in jax.device_get(hparams)])
             for k in hparams[0]}
  return params, state, losses, hparams


def run_ring_buffer(tx, params, x, y, steps: int, batch: int):
  """Single-device reference: ``tx`` (``simulated_optimizer``) fed fresh
  gradients and losses.

  Step ``t`` computes the gradient at ``x_t`` on batch ``t``; the ring
  buffer of ``tx`` applies it at step ``t + staleness``.
  """

  @jax.jit
  def step(p, s, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
    u, s = tx.update(grads, s, p, value=loss)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for t in range(steps):
    sl = slice(t * batch, (t + 1) * batch)
    params, state = step(params, state, x[sl], y[sl])
  return params, state


def _max_rel_diff(a, b) -> float:
  worst = 0.0
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    u = np.asarray(u, np.float64)
    v = np.asarray(v, np.float64)
    if u.size:
      worst = max(worst, np.max(np.abs(u - v)) / max(np.max(np.abs(u)), 1e-30))
  return worst


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=400,
                      help='server steps (rounded up to a multiple of M)')
  parser.add_argument('--workers', type=int, default=0,
                      help='M; 0 for every device')
  parser.add_argument('--batch', type=int, default=8,
                      help='per-worker batch size')
  parser.add_argument('--closed-loop', action='store_true')
  parser.add_argument('--gain', type=float, default=0.01)
  parser.add_argument('--check', action='store_true',
                      help='also run the one-device ring-buffer simulation')
  parser.add_argument('--out', default='results/async_workers')
  args = parser.parse_args(argv)

  workers = args.workers or jax.device_count()
  mesh = jax.make_mesh((workers,), ('workers',),
                       devices=jax.devices()[:workers])
  rounds = -(-args.steps // workers)
  steps = rounds * workers
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)
  repeat = -(-steps * args.batch // len(x))  # epochs, same order each time
  x, y = np.tile(x, (repeat, 1)), np.tile(y, repeat)
  params0 = MODEL.init(jax.random.key(0), x[:1])
  tx = server_optimizer(workers - 1, args.closed_loop, args.gain)

  t0 = time.time()
  params, state, losses, hparams = run_devices(
      tx, params0, x, y, rounds, args.batch, mesh)
  seconds = time.time() - t0
  summary: dict[str, Any] = {
      'workers': workers, 'staleness': workers - 1, 'steps': steps,
      'closed_loop': args.closed_loop, 'seconds': seconds,
      'losses': losses.tolist(),
      'history': {k: v.tolist() for k, v in hparams.items()},
  }
  if args.check:
    reference = simulated_optimizer(workers - 1, args.closed_loop, args.gain)
    ref_params, ref_state = run_ring_buffer(
        reference, params0, x, y, steps, args.batch)
    summary['max_rel_diff_params'] = _max_rel_diff(ref_params, params)
    summary['max_rel_diff_state'] = _max_rel_diff(ref_state.inner, state)

  mode = 'closed loop' if args.closed_loop else 'open loop'
  print(f'\n{workers} asynchronous workers (staleness {workers - 1}), '
        f'YellowFin {mode}, {steps} steps, {seconds:.1f} s')
  keys = ['learning_rate', 'momentum'] + (
      ['total_momentum', 'target_momentum'] if args.closed_loop else [])
  print(f"{'step':>6} {'worker loss':>12} " + ' '.join(f'{k:>16}' for k in keys))
  for t in np.unique(np.linspace(0, steps - 1, 9).astype(int)):
    window = losses[max(0, t - workers + 1):t + 1].mean()
    print(f'{t:>6} {window:>12.4f} '
          + ' '.join(f'{hparams[k][t]:>16.4g}' for k in keys))
  if args.check:
    print(f"device vs ring-buffer simulation: max rel diff params "
          f"{summary['max_rel_diff_params']:.2e}, state "
          f"{summary['max_rel_diff_state']:.2e}")

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'async_workers.json'), 'w') as f:
    json.dump(summary, f)
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.5))
  ax0.plot(losses, lw=0.5, alpha=0.5)
  smooth = np.convolve(losses, np.ones(workers) / workers, mode='valid')
  ax0.plot(np.arange(workers - 1, steps), smooth, lw=1.5)
  ax0.set(xlabel='step', ylabel='worker loss', yscale='log',
          title=f'{workers} async workers, {mode}')
  for k in keys[1:]:
    ax1.plot(hparams[k], label=k)
  ax1.set(xlabel='step', ylabel='momentum')
  ax1.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, 'async_workers.png'), dpi=120)
  plt.close(fig)
  return summary


if __name__ == '__main__':
  main()
