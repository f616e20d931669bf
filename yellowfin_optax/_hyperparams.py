"""Reading named scalars (tuned values, statistics) out of optimizer states."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

HYPERPARAM_NAMES = (
    'learning_rate', 'momentum', 'lr_t', 'mu_t', 'lr', 'mu', 'h_min', 'h_max',
    'grad_var', 'dist_to_opt', 'step', 'skipped_steps', 'total_momentum',
    'target_momentum', 'algorithmic_momentum',
)


def find_scalars(state: Any, names: tuple[str, ...]) -> dict[str, jax.Array]:
  """Returns the 0-d NamedTuple fields of ``state`` called one of ``names``.

  Only attribute (NamedTuple field) paths match, so a parameter dict key that
  happens to be called ``'lr'`` inside a per-parameter buffer never does.

  Raises:
    ValueError: if a name occurs twice (several optimizers in one state).
  """
  found: dict[str, jax.Array] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    # Flax NNX wraps each state leaf in a Variable: its path ends in `.value`.
    while path and getattr(path[-1], 'name', None) in ('value', 'raw_value'):
      path = path[:-1]
    name = getattr(path[-1], 'name', None) if path else None
    if name in names and jnp.ndim(leaf) == 0:
      if name in found:
        raise ValueError(
            f'The state holds more than one {name!r}: it contains several '
            "YellowFin optimizers. Call hyperparams() on each one's state."
        )
      found[name] = leaf
  return found


def _is_own_state(node: Any) -> bool:
  """Whether ``node`` is one of this package's NamedTuple states."""
  return hasattr(node, '_fields') and type(node).__module__.startswith(
      'yellowfin_optax.')


def _own_fields(state: Any):
  """``(name, value)`` for every field of every state of this package inside
  ``state``, outermost first (optax chains and wrappers are looked through)."""
  for node in jax.tree.leaves(state, is_leaf=_is_own_state):
    if _is_own_state(node):
      for name, value in zip(node._fields, node):
        yield name, value
        yield from _own_fields(value)


def hyperparams(state: Any) -> dict[str, jax.Array]:
  """Reads YellowFin's tuned values and statistics from an optimizer state.

  Works on the state of :func:`yellowfin`, :func:`closed_loop_yellowfin`, any
  single piece, or any optax wrapper or chain holding one of them, inside or
  outside ``jit`` (it only selects fields of this package's states: no
  computation, no host sync), and on a ``vmap``- or ``pmap``-stacked state.

  Args:
    state: an optimizer state containing exactly one YellowFin.

  Returns:
    A dict of 0-d arrays (with the leading axes of a stacked state):
    ``learning_rate`` and ``momentum`` (the values
    applied at the last step), ``lr_t``, ``mu_t`` (instantaneous tuner
    output), ``lr``, ``mu`` (smoothed), ``h_min``, ``h_max``, ``grad_var``,
    ``dist_to_opt``, ``step``, ``skipped_steps`` and, for the closed loop,
    ``total_momentum``, ``target_momentum`` and ``algorithmic_momentum``, those
    that the state holds. In the closed loop ``momentum`` is the algorithmic
    momentum actually applied.

  Raises:
    ValueError: if the state holds more than one YellowFin (e.g. under
      ``optax.multi_transform``): call it on each group's state instead.

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> tx = yf.yellowfin()
    >>> state = tx.init(jnp.zeros(3))
    >>> _, state = tx.update(jnp.ones(3), state)
    >>> print(f"{float(yf.hyperparams(state)['learning_rate']):.0e}")
    1e-04
  """
  found: dict[str, jax.Array] = {}
  for name, value in _own_fields(state):
    leaves = jax.tree.leaves(value)  # Flax NNX: a Variable around the array
    if name not in HYPERPARAM_NAMES or len(leaves) != 1:
      continue
    if name in found:
      raise ValueError(
          f'The state holds more than one {name!r}: it contains several '
          "YellowFin optimizers. Call hyperparams() on each one's state."
      )
    found[name] = leaves[0]
  if 'algorithmic_momentum' in found:
    found['momentum'] = found['algorithmic_momentum']
  return found
