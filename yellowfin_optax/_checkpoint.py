"""Saving and restoring optimizer state with Orbax, checked against the config.

An optimizer state restored into a differently configured optimizer (another
``curvature_window``, ``closed_loop_yellowfin`` instead of ``yellowfin``,
other parameters) is garbage that may still run. These helpers compare the
restored tree's structure, shapes and dtypes with what ``tx.init(params)``
would build (``jax.eval_shape``: nothing is computed) and raise a
``ValueError`` naming every field that differs.

What they cannot see: a change of a hyperparameter that does not set a shape
(``beta``, ``eps``, ``lr_factor``, the clipping flags) leaves the state's
layout unchanged, so such a state restores without error and is then run
with the new values.

Orbax (the ``checkpoint`` extra: ``pip install yellowfin_optax[checkpoint]``)
is imported only when :func:`save_state` or :func:`restore_state` is called.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

_MAX_LINES = 20  # per kind of difference, in the error message


def _key_name(key: Any) -> str:
  for attr in ('name', 'key', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_layout(tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Maps each leaf's dotted path to ``(shape, dtype)``.

  The path uses field names, dict keys and list indices alike, so a
  NamedTuple state and the nested dicts Orbax writes for it (its metadata,
  or a restore without a target) give the same paths.
  """
  layout = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = '.'.join(_key_name(k) for k in path) or '<root>'
    shape = tuple(getattr(leaf, 'shape', jnp.shape(leaf)))
    dtype = getattr(leaf, 'dtype', None)
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(leaf)
    layout[name] = (shape, dtype)
  return layout


def _is_empty(leaf: Any) -> bool:
  return math.prod(getattr(leaf, 'shape', jnp.shape(leaf))) == 0


def _drop_empty(tree: Any) -> Any:
  """Replaces zero-size leaves by ``None``: Orbax refuses to save them."""
  return jax.tree.map(lambda x: None if _is_empty(x) else x, tree)


def _describe(layout_entry: tuple[tuple[int, ...], Any]) -> str:
  shape, dtype = layout_entry
  return f'shape {shape} {jnp.dtype(dtype).name}'


def check_state_compatible(
    tx: optax.GradientTransformation, params: optax.Params, state: Any
) -> None:
  """Raises ``ValueError`` unless ``state`` has the layout of ``tx.init(params)``.

  Compares leaf paths, shapes and dtypes of ``state`` (an optimizer state, the
  nested dicts Orbax restores without a target, or Orbax's metadata tree of
  ``ArrayMetadata``) with ``jax.eval_shape(tx.init, params)``.

  Args:
    tx: the optimizer the state is meant for.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``) it optimizes.
    state: the state to check.

  Raises:
    ValueError: naming each missing, unexpected, or differently shaped or
      typed field, e.g.
      ``inner.tuner.statistics.sq_norm_window: saved shape (20,) float32,
      expected shape (10,) float32``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> params = jnp.zeros(3)
    >>> state = yf.yellowfin(curvature_window=20).init(params)
    >>> yf.check_state_compatible(yf.yellowfin(curvature_window=20), params, state)
    >>> yf.check_state_compatible(yf.yellowfin(curvature_window=10), params, state)
    Traceback (most recent call last):
    ...
    ValueError: ... inner.tuner.statistics.sq_norm_window: saved shape (20,) float32, expected shape (10,) float32...
  """
  _check_layouts(
      _flat_layout(jax.eval_shape(tx.init, params)), _flat_layout(state)
  )


def _check_layouts(
    expected: dict[str, Any], found: dict[str, Any]
) -> None:
  """Raises the ``ValueError`` of :func:`check_state_compatible`."""
  missing = [
      f'{name}: missing (expected {_describe(expected[name])})'
      for name in sorted(expected.keys() - found.keys())
  ]
  unexpected = [
      f'{name}: unexpected field ({_describe(found[name])})'
      for name in sorted(found.keys() - expected.keys())
  ]
  changed = [
      f'{name}: saved {_describe(found[name])}, expected '
      f'{_describe(expected[name])}'
      for name in sorted(expected.keys() & found.keys())
      if expected[name] != found[name]
  ]
  problems = []
  for group in (changed, missing, unexpected):
    problems += group[:_MAX_LINES]
    if len(group) > _MAX_LINES:
      problems.append(f'... and {len(group) - _MAX_LINES} more like that')
  if problems:
    raise ValueError(
        'The optimizer state does not match the optimizer configuration '
        '(was it saved with other settings, another optimizer or other '
        'parameters?):\n  ' + '\n  '.join(problems)
    )


def save_state(directory: str | os.PathLike[str], state: Any) -> None:
  """Saves an optimizer state with Orbax's ``StandardCheckpointer``.

  Blocks until the checkpoint is written. Zero-size leaves (Orbax cannot
  save them) are stored as ``None`` and rebuilt by :func:`restore_state`.

  Args:
    directory: where to write the checkpoint (made absolute); it must not
      exist yet.
    state: the optimizer state (any pytree of arrays).

  Examples:
    >>> import os, tempfile
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> state = yf.yellowfin().init(jnp.zeros(3))
    >>> path = os.path.join(tempfile.mkdtemp(), 'opt_state')
    >>> yf.save_state(path, state)
    >>> sorted(os.listdir(path))[:1]
    ['_CHECKPOINT_METADATA']
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), _drop_empty(state))
  checkpointer.wait_until_finished()


def restore_state(
    directory: str | os.PathLike[str],
    tx: optax.GradientTransformation,
    params: optax.Params,
) -> Any:
  """Restores a state saved by :func:`save_state`, checked against ``tx``.

  Reads the checkpoint's metadata first and checks it as
  :func:`check_state_compatible` does, so a changed configuration fails with
  a ``ValueError`` naming the differing fields before any array is read.
  Then restores into the exact state type (NamedTuples included) of
  ``tx.init(params)``, bit for bit.

  Args:
    directory: the checkpoint written by :func:`save_state`.
    tx: the optimizer to resume.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    The optimizer state.

  Raises:
    ValueError: if the saved state does not match ``tx.init(params)``.

  Examples:
    >>> import tempfile, os
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> params = jnp.zeros(3)
    >>> tx = yf.yellowfin()
    >>> _, state = tx.update(jnp.ones(3), tx.init(params), params)
    >>> path = os.path.join(tempfile.mkdtemp(), 'opt_state')
    >>> yf.save_state(path, state)
    >>> restored = yf.restore_state(path, tx, params)
    >>> print(int(yf.hyperparams(restored)['step']))
    1
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(directory)
  metadata = getattr(metadata, 'item_metadata', metadata)
  metadata = getattr(metadata, 'tree', metadata)
  target = jax.eval_shape(tx.init, params)
  # Compare without zero-size leaves: save_state stored them as None.
  _check_layouts(_flat_layout(_drop_empty(target)), _flat_layout(metadata))
  restored = checkpointer.restore(directory, _drop_empty(target))
  leaves, treedef = jax.tree.flatten(target)
  restored_leaves = jax.tree.leaves(restored, is_leaf=lambda x: x is None)
  return jax.tree.unflatten(treedef, [
      jnp.zeros(t.shape, t.dtype) if r is None else r
      for t, r in zip(leaves, restored_leaves)
  ])
