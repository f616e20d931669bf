"""YellowFin under sharded ``jit``: FSDP-style parameter and state sharding.

The batch is sharded over a ``Mesh`` axis (data parallelism) and every
parameter whose leading dimension divides the axis is sharded over it too
(FSDP); the rest are replicated. Under ``jit`` the global norms YellowFin
needs are ordinary reductions over sharded arrays, which XLA turns into
all-reduces of scalars: no ``axis_name`` is needed (that is for
``pmap``/``shard_map``).

The optimizer state must inherit the parameters' sharding, or the two
parameter-size buffers (``grad_ema``, ``trace``) end up fully replicated (or
on one device). Two plain-JAX ways, both shown here:

* ``--mesh explicit`` (sharding in types, ``jax.set_mesh``): just
  ``jax.jit(tx.init)(params)``; the model all-gathers each FSDP weight for
  its forward pass (``jax.reshard(p, P())``) and the gradient comes back
  sharded like the parameter.
* ``--mesh auto``: ``jax.jit(tx.init)`` alone does *not* follow the params
  (the buffers are zeros, with no data dependence on them), so give it
  ``out_shardings`` from ``optax.tree.map_params`` (param-like subtrees get
  the params' shardings, scalars are replicated); alternatively
  ``tx.init(params)`` outside jit follows concrete sharded params.

Run (CPU; 8 host devices are forced below if XLA_FLAGS is not set)::

  python examples/sharded_jit.py --steps 300
  python examples/sharded_jit.py --steps 300 --mesh explicit

Prints a table of the state's shardings, the collectives in one compiled
step (YellowFin vs ``optax.sgd(momentum=0.9)``) and the training run; writes
``<out>/sharded_jit.json`` and ``.png``.
"""

from __future__ import annotations

import os

if 'XLA_FLAGS' not in os.environ:
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import importlib.util
import json
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
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


def loss_fn(params, x, y, gather: bool = False):
  if gather:  # FSDP on an Explicit mesh: all-gather weights for the forward.
    params = jax.tree.map(lambda a: jax.reshard(a, P()), params)
  logits = MODEL.apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def fsdp_sharding(params, mesh, axis: str = 'data'):
  """Leading axis sharded over ``axis`` where it divides; else replicated."""
  size = mesh.shape[axis]

  def spec(a):
    return P(axis) if a.ndim and a.shape[0] % size == 0 else P()

  return jax.tree.map(lambda a: NamedSharding(mesh, spec(a)), params)


def state_shardings(tx, params, param_shardings, mesh):
  """Shardings for ``tx.init(params)`` on an Auto mesh: param-like subtrees
  of the state follow the params, every other leaf is replicated."""
  return optax.tree.map_params(
      tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params),
      param_shardings,
      transform_non_params=lambda _: NamedSharding(mesh, P()),
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
  )


def _tuned_values(state) -> dict[str, jax.Array]:
  """``yf.hyperparams(state)``; ``{}`` for an optimizer without YellowFin
  (``optax.sgd``), where it raises."""
  try:
    return yf.hyperparams(state)
  except ValueError:
    return {}


def setup(tx, params, mesh, explicit: bool):
  """Sharded params, state and the jitted train step."""
  param_shardings = fsdp_sharding(params, mesh)
  params = jax.device_put(params, param_shardings)

  def step(p, s, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y, explicit)
    updates, s = tx.update(grads, s, p, value=loss)
    return optax.apply_updates(p, updates), s, loss, _tuned_values(s)

  if explicit:
    state = jax.jit(tx.init)(params)
    return params, state, jax.jit(step, donate_argnums=(0, 1))
  shardings = state_shardings(tx, params, param_shardings, mesh)
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  step = jax.jit(step, donate_argnums=(0, 1),
                 out_shardings=(param_shardings, shardings, None, None))
  return params, state, step


def _count_collectives(hlo: str) -> dict[str, int]:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'data_parallel.py')
  spec = importlib.util.spec_from_file_location('_data_parallel', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.count_collectives(hlo)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--mesh', choices=('auto', 'explicit'), default='auto')
  parser.add_argument('--out', default='results/sharded_jit')
  args = parser.parse_args(argv)

  explicit = args.mesh == 'explicit'
  kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(kind,))
  x, y = load_digits(return_X_y=True)
  x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
  params0 = MODEL.init(jax.random.key(0), x[:1])
  data = NamedSharding(mesh, P('data'))
  summary: dict[str, Any] = {'devices': jax.device_count(), 'mesh': args.mesh}

  with jax.set_mesh(mesh):
    # Collectives of one compiled step, YellowFin vs SGD with momentum.
    rows = []
    xb = jax.device_put(x[:args.batch], data)
    yb = jax.device_put(y[:args.batch], data)
    for name, tx in [('sgd(0.1, momentum=0.9)', optax.sgd(0.1, momentum=0.9)),
                     ('yellowfin()', yf.yellowfin()),
                     ("yellowfin(on_nonfinite='propagate')",
                      yf.yellowfin(on_nonfinite='propagate'))]:
      params, state, step = setup(tx, params0, mesh, explicit)
      hlo = step.lower(params, state, xb, yb).compile().as_text()
      rows.append({'optimizer': name, **_count_collectives(hlo)})
    summary['collectives'] = rows
    print(f'\nCollectives in one compiled step, FSDP over {mesh.shape} '
          f'({args.mesh} mesh)')
    print(f"{'optimizer':38} {'all-reduce':>10} {'elements':>9} "
          f"{'all-gather':>10} {'reduce-scatter':>14}")
    for r in rows:
      print(f"{r['optimizer']:38} {r['all-reduce']:>10} "
            f"{r['all-reduce elements']:>9} {r['all-gather']:>10} "
            f"{r['reduce-scatter']:>14}")

    tx = yf.yellowfin()
    params, state, step = setup(tx, params0, mesh, explicit)
    print('\nState leaves of parameter size and their shardings')
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
      if leaf.size > 64:
        print(f'  {jax.tree_util.keystr(path):70} {leaf.sharding.spec}')
    rng = np.random.default_rng(0)
    losses, lrs, mus = [], [], []
    t0 = time.time()
    for _ in tqdm(range(args.steps), desc='sharded jit steps'):
      idx = rng.choice(len(x), args.batch, replace=False)
      params, state, loss, hp = step(params, state,
                                     jax.device_put(x[idx], data),
                                     jax.device_put(y[idx], data))
      losses.append(loss)
      lrs.append(hp['learning_rate'])
      mus.append(hp['momentum'])
  losses, lrs, mus = (np.asarray(jax.device_get(v)) for v in (losses, lrs, mus))
  summary.update(seconds=time.time() - t0, losses=losses.tolist(),
                 learning_rate=lrs.tolist(), momentum=mus.tolist())
  if args.steps:
    print(f"\n{'step':>6} {'loss':>10} {'learning_rate':>14} {'momentum':>10}")
    for t in np.unique(np.linspace(0, args.steps - 1, 8).astype(int)):
      print(f'{t:>6} {losses[t]:>10.4f} {lrs[t]:>14.4g} {mus[t]:>10.4f}')

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'sharded_jit.json'), 'w') as f:
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
    fig.suptitle(f'YellowFin, sharded jit (FSDP) over {mesh.shape}')
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, 'sharded_jit.png'), dpi=120)
    plt.close(fig)
  return summary


if __name__ == '__main__':
  main()
