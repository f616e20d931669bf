"""Data-parallel YellowFin with ``pmap``: one tuner, identical on every device.

Each device gets ``1/N`` of every batch and computes the gradient of its mean
loss; ``yellowfin(axis_name='batch')`` averages the gradients over the axis
(``lax.pmean``) *before* measuring anything, so every replica sees the
full-batch gradient, measures the same global statistics and tunes the same
learning rate and momentum: replicas stay bit-identical and equal a
single-device run on the whole batch (``tests/test_multidevice.py``). Do not
``pmean`` the gradients yourself as well: that is a second all-reduce of the
full gradient for nothing.

It also counts the all-reduces in the compiled step (``--count-collectives``),
for YellowFin and for ``optax.sgd(momentum=0.9)`` with the usual
``lax.pmean(grads)``, under ``pmap`` and ``shard_map``.

Run (CPU; 8 host devices are forced below if XLA_FLAGS is not set)::

  python examples/data_parallel.py --steps 300
  python examples/data_parallel.py --steps 0 --count-collectives

Writes ``<out>/data_parallel.json`` and ``.png`` and prints tables.
"""

from __future__ import annotations

import os

if 'XLA_FLAGS' not in os.environ:
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import re
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
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
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(10)(x)


MODEL = MLP()


def loss_fn(params, x, y):
  logits = MODEL.apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _tuned_values(state) -> dict[str, jax.Array]:
  """``yf.hyperparams(state)``; ``{}`` for an optimizer without YellowFin
  (``optax.sgd``), where it raises."""
  try:
    return yf.hyperparams(state)
  except ValueError:
    return {}


def make_pmap_step(tx, axis_name: str = 'batch', pmean_grads: bool = False,
                   devices=None):
  """The pmapped train step. ``pmean_grads``: average here (for optimizers
  without an ``axis_name``, like ``optax.sgd``)."""

  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    if pmean_grads:
      grads = jax.lax.pmean(grads, axis_name)
    # value=: yellowfin_auto / closed loops use the loss; yellowfin() and
    # optax.sgd ignore it. With axis_name it is averaged like the gradient.
    updates, state = tx.update(grads, state, params, value=loss)
    return (optax.apply_updates(params, updates), state,
            jax.lax.pmean(loss, axis_name), _tuned_values(state))

  return jax.pmap(step, axis_name=axis_name, devices=devices)


def make_shard_map_step(tx, mesh, axis_name: str = 'batch',
                        check_vma: bool = True):
  """The same with ``shard_map``.

  With replication checking (``check_vma=True``, the default) autodiff
  itself sums the gradient of the replicated params over the axis, so the
  loss is the pmean of the local means and the gradient arrives already
  averaged and replicated: use ``yellowfin()`` *without* ``axis_name`` (with
  it, its pmean all-reduces the replicated gradient a second time). With
  ``check_vma=False`` the gradient is per device: use ``axis_name``.
  """

  def step(params, state, x, y):
    if check_vma:
      loss_of = lambda p: jax.lax.pmean(loss_fn(p, x, y), axis_name)
    else:
      loss_of = lambda p: loss_fn(p, x, y)
    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, state = tx.update(grads, state, params, value=loss)
    return (optax.apply_updates(params, updates), state,
            jax.lax.pmean(loss, axis_name))

  return jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), P(axis_name), P(axis_name)),
      out_specs=(P(), P(), P()), check_vma=check_vma))


COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter',
               'collective-permute', 'all-to-all')


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Collective ops in compiled HLO text (an async start/done pair counts
  once), and the number of array elements the all-reduces carry."""
  counts = {}
  for op in COLLECTIVES:
    counts[op] = len(re.findall(rf'(?<![%\w.-]){op}(?:-start)?\(', hlo_text))
  elements = 0
  for line in hlo_text.splitlines():
    match = re.search(r'=\s*(.*?)\s(?<![%\w.-])all-reduce(?:-start)?\(', line)
    if match:
      for dims in re.findall(r'\w+\[([\d,]*)\]', match.group(1)):
        elements += int(np.prod([int(d) for d in dims.split(',') if d]))
  counts['all-reduce elements'] = elements
  return counts


def collective_table(params, x, y, devices: int) -> list[dict[str, Any]]:
  """All-reduces of one compiled step: YellowFin vs SGD with momentum."""
  rows = []
  rep = lambda t: jax.tree.map(
      lambda a: jnp.broadcast_to(a, (devices,) + jnp.shape(a)), t)
  xs = x.reshape(devices, -1, *x.shape[1:])
  ys = y.reshape(devices, -1)
  mesh = jax.make_mesh((devices,), ('batch',), devices=jax.devices()[:devices])
  pmap_variants = [
      ('sgd(0.1, momentum=0.9) + pmean(grads)', optax.sgd(0.1, momentum=0.9),
       True),
      ("yellowfin(axis_name='batch')", yf.yellowfin(axis_name='batch'), False),
  ]
  for name, tx, pmean_grads in pmap_variants:
    state = tx.init(params)
    step = make_pmap_step(tx, pmean_grads=pmean_grads,
                          devices=jax.devices()[:devices])
    hlo = step.lower(rep(params), rep(state), xs, ys).compile().as_text()
    rows.append({'mode': 'pmap', 'optimizer': name, **count_collectives(hlo)})
  shard_map_variants = [
      ('sgd(0.1, momentum=0.9)', optax.sgd(0.1, momentum=0.9), True),
      ('yellowfin()', yf.yellowfin(), True),
      ("yellowfin(axis_name='batch')  [wasteful]",
       yf.yellowfin(axis_name='batch'), True),
      ("yellowfin(axis_name='batch'), check_vma=False",
       yf.yellowfin(axis_name='batch'), False),
  ]
  data = jax.sharding.NamedSharding(mesh, P('batch'))
  for name, tx, check_vma in shard_map_variants:
    state = tx.init(params)
    step = make_shard_map_step(tx, mesh, check_vma=check_vma)
    hlo = step.lower(params, state, jax.device_put(x, data),
                     jax.device_put(y, data)).compile().as_text()
    rows.append({'mode': 'shard_map', 'optimizer': name,
                 **count_collectives(hlo)})
  return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch', type=int, default=128,
                      help='global batch, split over the devices')
  parser.add_argument('--devices', type=int, default=0, help='0: all')
  parser.add_argument('--count-collectives', action='store_true')
  parser.add_argument('--out', default='results/data_parallel')
  args = parser.parse_args(argv)

  n = args.devices or jax.device_count()
  if args.batch % n:
    parser.error(f'--batch {args.batch} must divide over {n} devices')
  x, y = load_digits(return_X_y=True)
  x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
  params = MODEL.init(jax.random.key(0), x[:1])
  summary: dict[str, Any] = {'devices': n, 'batch': args.batch}

  if args.count_collectives:
    rows = collective_table(params, x[:args.batch], y[:args.batch], n)
    summary['collectives'] = rows
    print(f'\nCollectives in one compiled train step, {n} devices')
    print(f"{'mode':10} {'optimizer':56} {'all-reduce':>10} "
          f"{'elements':>9} {'all-gather':>10}")
    for r in rows:
      print(f"{r['mode']:10} {r['optimizer']:56} {r['all-reduce']:>10} "
            f"{r['all-reduce elements']:>9} {r['all-gather']:>10}")
    print(f'(parameters: {sum(a.size for a in jax.tree.leaves(params))})')

  losses, lrs, mus = [], [], []
  if args.steps:
    tx = yf.yellowfin(axis_name='batch')
    devices = jax.devices()[:n]
    step = make_pmap_step(tx, devices=devices)
    replicate = lambda t: jax.tree.map(
        lambda a: jnp.broadcast_to(a, (n,) + jnp.shape(a)), t)
    p, s = replicate(params), replicate(tx.init(params))
    rng = np.random.default_rng(0)
    t0 = time.time()
    for _ in tqdm(range(args.steps), desc='pmap steps'):
      idx = rng.choice(len(x), args.batch, replace=False)
      p, s, loss, hp = step(p, s, x[idx].reshape(n, -1, 64),
                            y[idx].reshape(n, -1))
      losses.append(loss[0])
      lrs.append(hp['learning_rate'][0])
      mus.append(hp['momentum'][0])
    losses, lrs, mus = (np.asarray(jax.device_get(v)) for v in
                        (losses, lrs, mus))
    # Every replica holds the same state.
    same = all(bool(np.all(np.asarray(a) == np.asarray(a)[0]))
               for a in jax.tree.leaves(jax.device_get(s)))
    summary.update(seconds=time.time() - t0, replicas_identical=same,
                   losses=losses.tolist(), learning_rate=lrs.tolist(),
                   momentum=mus.tolist())
    print(f'\npmap over {n} devices, global batch {args.batch}, '
          f'{args.steps} steps, {summary["seconds"]:.1f} s, replicas '
          f'identical: {same}')
    print(f"{'step':>6} {'loss':>10} {'learning_rate':>14} {'momentum':>10}")
    for t in np.unique(np.linspace(0, args.steps - 1, 8).astype(int)):
      print(f'{t:>6} {losses[t]:>10.4f} {lrs[t]:>14.4g} {mus[t]:>10.4f}')

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'data_parallel.json'), 'w') as f:
    json.dump(summary, f)
  if args.steps:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, v, name in zip(axes, (losses, lrs, mus),
                           ('loss', 'learning rate', 'momentum')):
      ax.plot(v)
      ax.set(xlabel='step', title=name)
    axes[0].set_yscale('log')
    fig.suptitle(f'YellowFin, pmap over {n} devices')
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, 'data_parallel.png'), dpi=120)
    plt.close(fig)
  return summary


if __name__ == '__main__':
  main()
