"""Checkpointing a YellowFin optimizer state with Orbax: a recipe.

A YellowFin state is a pytree of arrays (one flat ``YellowFinState``, inside
whatever optax chain holds it), so Orbax saves it like any other. Three
things are worth getting right, and this file does them in ~60 lines you can
copy:

1. **Restore against a target**: ``jax.eval_shape(tx.init, params)`` is the
   state's exact layout (NamedTuples, dtypes, shapes) at no cost; restoring
   into it gives back the same types, bit for bit, so training resumes
   exactly where it stopped.
2. **Check the layout first**: a state saved with another configuration
   (another ``curvature_window`` via ``scale_by_yellowfin``, another
   optimizer, other parameters) may still restore and then silently train
   with garbage. :func:`check_compatible` compares the saved tree (or
   Orbax's metadata, before reading any array) with the target and raises a
   ``ValueError`` naming every field that differs. It cannot see a change of
   an option that sets no shape (``beta``, ``eps``, ``lr_factor``, ...): such
   a state restores and runs with the new values.
3. **Zero-size leaves** (a zero-size parameter gives zero-size momentum
   buffers): Orbax refuses to save them, so they are stored as ``None`` and
   rebuilt from the target.

For several checkpoints (keep the last ``n``, save every ``k`` steps) use
``orbax.checkpoint.CheckpointManager`` with ``args.StandardSave(state)`` /
``args.StandardRestore(target)``; the same target and check apply.

Run ``python examples/checkpointing.py`` for a demo: yellowfin_auto trains a
few steps, is checkpointed, restored and resumed bit-identically, and a
restore into another ``curvature_window`` fails with the field named.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

import yellowfin_optax


def _layout(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{'dotted.path': (shape, dtype name)}`` of a state, of the nested
  dicts/lists Orbax restores without a target, or of Orbax's metadata
  (field names, dict keys and list indices give the same paths)."""
  layout = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = '.'.join(str(getattr(k, 'name', getattr(k, 'key', getattr(
        k, 'idx', k)))) for k in path)
    layout[name] = (tuple(leaf.shape), jnp.dtype(leaf.dtype).name)
  return layout


def _drop_empty(tree: Any) -> Any:
  """Zero-size leaves as ``None`` (Orbax cannot save them)."""
  return jax.tree.map(lambda x: None if math.prod(x.shape) == 0 else x, tree)


def check_compatible(tx: optax.GradientTransformation, params: Any,
                     state: Any) -> None:
  """Raises ``ValueError`` naming every field of ``state`` (a state, a
  target-less Orbax restore, or Orbax metadata) whose shape or dtype differs
  from ``tx.init(params)``'s, or that is missing or unexpected."""
  expected = _layout(_drop_empty(jax.eval_shape(tx.init, params)))
  found = _layout(_drop_empty(state))
  describe = lambda e: f'shape {e[0]} {e[1]}'
  problems = [f'{k}: saved {describe(found[k])}, expected {describe(v)}'
              for k, v in sorted(expected.items())
              if k in found and found[k] != v]
  problems += [f'{k}: missing (expected {describe(expected[k])})'
               for k in sorted(expected.keys() - found.keys())]
  problems += [f'{k}: unexpected field ({describe(found[k])})'
               for k in sorted(found.keys() - expected.keys())]
  if problems:
    raise ValueError(
        'The checkpointed optimizer state does not match this optimizer '
        '(saved with other settings, another optimizer or other '
        'parameters?):\n  ' + '\n  '.join(problems))


def save(directory: str, state: Any) -> None:
  """Saves an optimizer state (``directory`` must not exist yet)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), _drop_empty(state))
  checkpointer.wait_until_finished()


def restore(directory: str, tx: optax.GradientTransformation,
            params: Any) -> Any:
  """Restores a state saved by :func:`save` for ``tx`` and ``params``: the
  layout is checked on the metadata first, then the arrays are read into
  ``jax.eval_shape(tx.init, params)``'s exact types."""
  directory = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(directory)
  metadata = getattr(metadata, 'item_metadata', metadata)
  check_compatible(tx, params, getattr(metadata, 'tree', metadata))
  target = jax.eval_shape(tx.init, params)
  restored = checkpointer.restore(directory, _drop_empty(target))
  restored = jax.tree.leaves(restored, is_leaf=lambda x: x is None)
  leaves, treedef = jax.tree.flatten(target)
  return jax.tree.unflatten(treedef, [
      jnp.zeros(t.shape, t.dtype) if r is None else r
      for t, r in zip(leaves, restored)])


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--dir', default=None,
                      help='checkpoint directory (default: a temporary one)')
  args = parser.parse_args(argv)
  directory = args.dir or os.path.join(tempfile.mkdtemp(), 'opt_state')

  curvatures = jnp.linspace(1.0, 10.0, 8)
  loss_fn = lambda p, t: jnp.sum(curvatures * (p - jnp.sin(t)) ** 2) + 0.1
  tx = yellowfin_optax.yellowfin_auto(total_steps=args.steps)

  @jax.jit
  def step(params, state, t):
    loss, grads = jax.value_and_grad(loss_fn)(params, t)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  def run(params, state, start, stop):
    for t in range(start, stop):
      params, state = step(params, state, 0.01 * t)
    return params, state

  params0 = jnp.ones(8)
  half = args.steps // 2
  full = run(params0, tx.init(params0), 0, args.steps)
  params, state = run(params0, tx.init(params0), 0, half)
  save(directory, state)
  resumed = run(params, restore(directory, tx, params), half, args.steps)
  identical = all(bool(jnp.array_equal(a, b)) for a, b in zip(
      jax.tree.leaves(full), jax.tree.leaves(resumed)))
  print(f'saved at step {half} to {directory}; resumed to step {args.steps}: '
        f'bit-identical to an uninterrupted run: {identical}')

  other = yellowfin_optax.scale_by_yellowfin(curvature='loss',
                                             curvature_window=10)
  try:
    restore(directory, other, params)
    error = None
  except ValueError as e:
    error = str(e)
  print(f'restoring into curvature_window=10 fails:\n{error}')
  return {'identical': identical, 'error': error, 'directory': directory}


if __name__ == '__main__':
  main(sys.argv[1:])
