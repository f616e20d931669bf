"""Multi-host (TPU pod) data parallelism with YellowFin, one script for all.

Every host of a pod runs this same file unchanged. The script joins the hosts
with ``jax.distributed``, builds one global 1-D mesh over all devices of all
hosts and trains a small Flax MLP on sklearn digits under sharded ``jax.jit``:
the global batch is sharded along the mesh axis, the parameters and the
optimizer state are replicated. Each process builds only its own part of the
global batch and hands it to ``jax.make_array_from_process_local_data``.
YellowFin's statistics are norms over the whole (global) gradient, which XLA
computes with all-reduces across hosts; no ``axis_name`` is needed.

Run:

* one machine, N local CPU processes joined by ``jax.distributed`` (the
  script spawns them itself, with a free coordinator port and
  ``--devices-per-process`` host devices each)::

    python examples/multi_host.py --local-processes 2
    python examples/multi_host.py --local-processes 2 --devices-per-process 4

* a Cloud TPU pod slice: the same command on every host (the coordinator,
  process count and ids are detected)::

    gcloud compute tpus tpu-vm ssh NAME --worker=all \\
        --command='python examples/multi_host.py'

* other clusters (CPU/GPU), on host ``i`` of ``N``::

    python examples/multi_host.py --coordinator HOST0:1234 \\
        --num-processes N --process-id i

``--optimizer yellowfin|yellowfin_auto|closed_loop`` picks the optimizer
(default ``yellowfin_auto``). With ``--checkpoint-dir`` (a directory every
host can reach, e.g. ``gs://...`` on a pod) all processes save an Orbax
checkpoint every ``--save-every`` steps and at the end, and a restarted run
resumes from the latest one. Process 0 prints the step, the loss and the
tuned learning rate and momentum.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import subprocess
import sys
import time
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
from sklearn.datasets import load_digits

import yellowfin_optax as yf

OPTIMIZERS = {
    'yellowfin': yf.yellowfin,
    'yellowfin_auto': yf.yellowfin_auto,
    'closed_loop': lambda: yf.closed_loop_yellowfin(staleness=2),
}


# ----------------------------------------------------------------------------
# Joining the processes.


def initialize(coordinator: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """``jax.distributed.initialize``, before any other JAX call.

  With no arguments JAX detects the cluster (Cloud TPU, SLURM, ...). With an
  explicit coordinator (local processes, plain CPU clusters) CPU collectives
  go through gloo; without it CPU computations cannot span processes.
  """
  if coordinator is None:
    jax.distributed.initialize()
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator,
                             num_processes=num_processes,
                             process_id=process_id)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch_local(command: Sequence[str], num_processes: int,
                 devices_per_process: int = 2, timeout: float = 600.0,
                 log_dir: str | None = None) -> list[int]:
  """Runs ``command`` as ``num_processes`` CPU processes of one JAX cluster.

  Each child gets ``--coordinator 127.0.0.1:PORT --num-processes N
  --process-id i`` appended (PORT free at launch) and
  ``devices_per_process`` host devices. Waits up to ``timeout`` seconds;
  when a child fails (the others would block in collectives) or time runs
  out, kills the rest. ``log_dir``: write ``process_<i>.log`` (stdout and
  stderr) there instead of inheriting the terminal.

  Returns:
    The children's return codes (negative: killed by that signal).
  """
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  flags.append(f'--xla_force_host_platform_device_count={devices_per_process}')
  env = dict(os.environ, XLA_FLAGS=' '.join(flags), JAX_PLATFORMS='cpu')
  coordinator = f'127.0.0.1:{free_port()}'
  procs, logs = [], []
  try:
    for i in range(num_processes):
      out = None
      if log_dir is not None:
        out = open(os.path.join(log_dir, f'process_{i}.log'), 'w')
        logs.append(out)
      procs.append(subprocess.Popen(
          [*command, '--coordinator', coordinator,
           '--num-processes', str(num_processes), '--process-id', str(i)],
          env=env, stdout=out, stderr=subprocess.STDOUT if out else None))
    deadline = time.monotonic() + timeout
    while True:
      codes = [p.poll() for p in procs]
      if all(c == 0 for c in codes) or any(c not in (None, 0) for c in codes):
        break
      if time.monotonic() > deadline:
        print(f'timed out after {timeout:.0f} s', file=sys.stderr)
        break
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for f in logs:
      f.close()
  return [p.returncode for p in procs]


# ----------------------------------------------------------------------------
# The model, the data and the training loop.


class MLP(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


class TrainResult(NamedTuple):
  params: Any  # numpy pytree, the same on every process
  hyperparams: dict[str, np.ndarray]  # yf.hyperparams of the final state
  losses: np.ndarray  # loss of each step run here (first_step, ..., steps - 1)
  first_step: int  # 0, or the step restored from the checkpoint


def _digits() -> tuple[np.ndarray, np.ndarray]:
  x, y = load_digits(return_X_y=True)
  return (x / 16.0).astype(np.float32), y.astype(np.int32)


def _global_batch_indices(step: int, n: int, batch: int, seed: int):
  """Example ids of the global batch of ``step``: the same on every host."""
  return np.random.default_rng([seed, step]).choice(n, batch, replace=False)


def _local_rows(sharding: NamedSharding, batch: int) -> np.ndarray:
  """Rows of the global batch that this process's devices hold, in order."""
  slices = {idx[0].indices(batch) for idx in
            sharding.addressable_devices_indices_map((batch,)).values()}
  return np.concatenate([np.arange(*s) for s in sorted(slices)])


def _host(tree):
  """Numpy copy of a replicated (possibly multi-process) pytree."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


@functools.lru_cache(maxsize=None)
def _jitted(optimizer_name: str, hidden: int, seed: int,
            mesh: jax.sharding.Mesh):
  """Jitted ``init() -> {'params', 'opt_state'}`` and train step, replicated
  outputs (cached: later runs with the same settings skip compilation)."""
  model, tx = MLP(hidden), OPTIMIZERS[optimizer_name]()
  replicated = NamedSharding(mesh, P())

  def loss_fn(params, x, y):
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step_fn(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params, value=loss)
    return (optax.apply_updates(params, updates), state, loss,
            yf.hyperparams(state))

  def init_fn():
    params = model.init(jax.random.key(seed), jnp.zeros((1, 64), jnp.float32))
    return {'params': params, 'opt_state': tx.init(params)}

  return (jax.jit(init_fn, out_shardings=replicated),
          jax.jit(step_fn, out_shardings=replicated, donate_argnums=(0, 1)))


def train(optimizer_name: str = 'yellowfin_auto', steps: int = 200, *,
          batch: int = 128, hidden: int = 64, seed: int = 0,
          checkpoint_dir: str | None = None, save_every: int | None = None,
          log_every: int = 0) -> TrainResult:
  """Data-parallel training over every device of every process.

  Call it on every process (after :func:`initialize` for more than one).
  With ``checkpoint_dir``, resumes from its latest checkpoint if there is one
  and saves every ``save_every`` steps and after the last step.
  """
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  data = NamedSharding(mesh, P('data'))
  if batch % jax.device_count():
    raise ValueError(f'batch {batch} must divide over '
                     f'{jax.device_count()} devices')
  init, step = _jitted(optimizer_name, hidden, seed, mesh)
  train_state = init()

  manager, first_step = None, 0
  if checkpoint_dir is not None:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    manager = ocp.CheckpointManager(os.path.abspath(checkpoint_dir))
    if manager.latest_step() is not None:
      first_step = manager.latest_step()
      target = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
          train_state)
      train_state = manager.restore(first_step,
                                    args=ocp.args.StandardRestore(target))
      if jax.process_index() == 0:
        print(f'restored step {first_step} from {checkpoint_dir}')

  x_all, y_all = _digits()
  rows = _local_rows(data, batch)
  params, state = train_state['params'], train_state['opt_state']
  losses, hp = [], None
  if log_every and jax.process_index() == 0:
    print(f'{jax.process_count()} processes, {jax.device_count()} devices, '
          f'{optimizer_name}, global batch {batch}')
    print(f"{'step':>6} {'loss':>10} {'learning_rate':>14} {'momentum':>10}")
  for t in range(first_step, steps):
    # On a pod each host would load just its rows; digits fits everywhere.
    idx = _global_batch_indices(t, len(x_all), batch, seed)[rows]
    x = jax.make_array_from_process_local_data(data, x_all[idx], (batch, 64))
    y = jax.make_array_from_process_local_data(data, y_all[idx], (batch,))
    params, state, loss, hp = step(params, state, x, y)
    losses.append(_host(loss))
    if log_every and jax.process_index() == 0 and (
        t % log_every == 0 or t == steps - 1):
      h = _host(hp)
      print(f"{t:>6} {losses[-1]:>10.4f} {h['learning_rate']:>14.4g} "
            f"{h['momentum']:>10.4f}", flush=True)
    if manager is not None and (
        t + 1 == steps or (save_every and (t + 1) % save_every == 0)):
      manager.save(t + 1, args=ocp.args.StandardSave(
          {'params': params, 'opt_state': state}))
  if hp is None:  # nothing left to run
    hp = jax.jit(yf.hyperparams)(state)
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  return TrainResult(_host(params), _host(hp), np.asarray(losses, np.float32),
                     first_step)


# ----------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--optimizer', choices=sorted(OPTIMIZERS),
                      default='yellowfin_auto')
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--batch', type=int, default=128,
                      help='global batch, over all processes')
  parser.add_argument('--hidden', type=int, default=64)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--log-every', type=int, default=20)
  parser.add_argument('--checkpoint-dir', default=None)
  parser.add_argument('--save-every', type=int, default=None)
  local = parser.add_argument_group('one machine')
  local.add_argument('--local-processes', type=int, default=0,
                     help='spawn this many local CPU processes of this script')
  local.add_argument('--devices-per-process', type=int, default=2)
  local.add_argument('--timeout', type=float, default=600.0,
                     help='seconds before the local processes are killed')
  pod = parser.add_argument_group('explicit cluster (default: detected)')
  pod.add_argument('--coordinator', default=None, help='HOST:PORT of process 0')
  pod.add_argument('--num-processes', type=int, default=None)
  pod.add_argument('--process-id', type=int, default=None)
  return parser


def _without(argv: Sequence[str], flag: str) -> list[str]:
  """``argv`` minus ``flag VALUE`` / ``flag=VALUE``."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == flag:
      skip = True
    elif not a.startswith(flag + '='):
      out.append(a)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(argv)
  if args.local_processes:
    t0 = time.time()
    codes = launch_local(
        [sys.executable, os.path.abspath(__file__),
         *_without(argv, '--local-processes')],
        args.local_processes, args.devices_per_process, args.timeout)
    if any(codes):
      print(f'local processes failed, return codes {codes}', file=sys.stderr)
      return 1
    print(f'{args.local_processes} processes done in {time.time() - t0:.1f} s')
    return 0
  initialize(args.coordinator, args.num_processes, args.process_id)
  train(args.optimizer, args.steps, batch=args.batch, hidden=args.hidden,
        seed=args.seed, checkpoint_dir=args.checkpoint_dir,
        save_every=args.save_every, log_every=args.log_every)
  return 0


if __name__ == '__main__':
  sys.exit(main())
