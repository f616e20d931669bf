"""Skip steps with non-finite gradients or tuner output, leaving state intact.

Memory: one int32 counter besides the wrapped state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

NONFINITE_MODES = ('skip', 'raise_in_debug', 'propagate')


class SkipNonFiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`.

  Attributes:
    inner: state of the wrapped transformation.
    skipped_steps: int32, number of steps skipped so far.
  """

  inner: Any
  skipped_steps: jax.Array


def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    on_nonfinite: str = 'skip',
) -> optax.GradientTransformationExtraArgs:
  """Applies ``inner`` only where its inputs and tuned scalars are finite.

  A step is *bad* when any gradient entry is NaN or infinite, or when any
  scalar (0-d) field of ``inner``'s new state is (a tuner output driven
  non-finite by extreme but finite gradients). A bad step emits a zero update
  and keeps ``inner``'s state bit-identical; ``skipped_steps`` counts them.
  Unlike ``optax.apply_if_finite`` this also checks the tuner's output and
  never gives up after a run of bad steps: YellowFin's statistics must never
  see a non-finite value.

  Args:
    inner: the transformation to protect.
    on_nonfinite: ``'skip'`` (the default), ``'raise_in_debug'`` (skip, and
      also raise through ``jax.debug`` checks when ``jax_debug_nans`` is on, to
      find the bad step), or ``'propagate'`` (return ``inner`` unwrapped: no
      check, no cost).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> tx = yf.skip_nonfinite(yf.yellowfin())
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.array([1.0, jnp.nan]), state)
    >>> print(updates, int(state.skipped_steps))
    [0. 0.] 1
  """
  if on_nonfinite not in NONFINITE_MODES:
    raise ValueError(
        f'on_nonfinite must be one of {NONFINITE_MODES}, got {on_nonfinite!r}.'
    )
  inner = optax.with_extra_args_support(inner)
  if on_nonfinite == 'propagate':
    return inner

  def init_fn(params):
    return SkipNonFiniteState(
        inner=inner.init(params), skipped_steps=jnp.zeros([], jnp.int32)
    )

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_inner = inner.update(
        updates, state.inner, params, **extra_args
    )
    scalars = [x for x in jax.tree.leaves(new_inner) if jnp.ndim(x) == 0]
    ok = _all_finite(updates) & _all_finite(scalars)
    if on_nonfinite == 'raise_in_debug':
      jax.debug.callback(_raise_if_bad, ok)
    new_updates = jax.tree.map(
        lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates
    )
    new_inner = optax.tree.where(ok, new_inner, state.inner)
    skipped = jnp.where(
        ok, state.skipped_steps, optax.safe_increment(state.skipped_steps)
    )
    return new_updates, SkipNonFiniteState(inner=new_inner, skipped_steps=skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _raise_if_bad(ok) -> None:
  if jax.config.jax_debug_nans and not ok:
    raise FloatingPointError('yellowfin_optax: non-finite gradient or tuner output')
