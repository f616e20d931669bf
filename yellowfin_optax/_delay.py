"""Stale gradients: simulate round-robin asynchronous workers.

Memory: ``staleness`` parameter-size buffers (the ring of pending gradients).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from yellowfin_optax import _checks


class DelayedGradientsState(NamedTuple):
  """State of :func:`delayed_gradients`.

  Attributes:
    received: int32, number of gradients received (saturating).
    pending: pytree like the params with a leading ``[staleness]`` axis: the
      ring of gradients not yet applied; slot ``received % staleness`` holds
      the oldest.
    inner: state of the wrapped transformation.
  """

  received: jax.Array
  pending: optax.Updates
  inner: Any


def delayed_gradients(
    staleness: int,
    inner: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Feeds ``inner`` the gradient received ``staleness`` steps earlier.

  ``M`` workers updating round-robin, each computing its gradient at the model
  it last read, apply at step :math:`t` the gradient computed at
  :math:`x_{t-\tau}` with :math:`\tau = M - 1`. This transformation keeps the
  last :math:`\tau` gradients in a ring buffer in the optimizer state and
  hands ``inner`` the oldest.

  While the buffer fills (the first :math:`\tau` steps) nothing is applied:
  the update is zero and ``inner`` is not called, so its state (e.g.
  YellowFin's curvature window) never sees placeholder zeros, which would
  collapse its statistics. ``staleness=0`` returns ``inner`` itself.

  Args:
    staleness: the delay :math:`\tau \ge 0`, a Python int (a buffer shape).
    inner: the transformation fed the stale gradients; ``None`` for
      ``optax.identity()`` (then the stale gradient itself is emitted, zeros
      while filling).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> tx = yf.delayed_gradients(2)
    >>> state = tx.init(jnp.zeros(1))
    >>> for t in range(4):
    ...   out, state = tx.update(jnp.array([t + 1.0]), state)
    ...   print(out)
    [0.]
    [0.]
    [1.]
    [2.]
  """
  _checks.check_int('staleness', staleness, 0)
  inner = optax.with_extra_args_support(
      optax.identity() if inner is None else inner
  )
  if staleness == 0:
    return inner

  def init_fn(params):
    pending = jax.tree.map(
        # Broadcast from zeros_like so that the ring inherits the params'
        # sharding (sharding in types; eager init on sharded params).
        lambda p: jnp.broadcast_to(
            jnp.zeros_like(p)[None], (staleness,) + jnp.shape(p)
        ),
        params,
    )
    return DelayedGradientsState(
        received=jnp.zeros([], jnp.int32),
        pending=pending,
        inner=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    slot = state.received % staleness
    stale = jax.tree.map(lambda b: b[slot], state.pending)
    pending = jax.tree.map(
        lambda b, g: b.at[slot].set(g.astype(b.dtype)), state.pending, updates
    )

    def apply(_):
      return inner.update(stale, state.inner, params, **extra_args)

    def wait(_):
      shapes = jax.eval_shape(apply, None)[0]
      # zeros_like(stale) carries the gradients' sharding, as cond's branches
      # must agree on it.
      zeros = jax.tree.map(
          lambda s, g: jnp.zeros_like(g, dtype=s.dtype), shapes, stale
      )
      return zeros, state.inner

    new_updates, inner_state = jax.lax.cond(
        state.received >= staleness, apply, wait, None
    )
    return new_updates, DelayedGradientsState(
        received=optax.safe_increment(state.received),
        pending=pending,
        inner=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
