"""Momentum SGD with tuned values, exactly as ``torch.optim.SGD`` applies it.

Memory: one parameter-size buffer (the momentum trace, in the params' dtypes)
plus the wrapped tuner's state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def offset_momentum(
    momentum: jax.Array,
    offset: jax.Array,
    momentum_range: tuple[float, float] | None,
) -> jax.Array:
  """``momentum + offset`` clipped to ``momentum_range``; exactly ``momentum``
  while ``offset`` is zero, so a closed loop that never corrects (gain 0) is
  exactly open loop."""
  moved = momentum + offset
  if momentum_range is not None:
    moved = jnp.clip(moved, *momentum_range)
  return jnp.where(offset == 0.0, momentum, moved)


def applied_momentum(
    tuner_state: Any,
    momentum_offset: jax.Array | None = None,
    momentum_range: tuple[float, float] | None = None,
) -> jax.Array:
  """The momentum :func:`tuned_momentum` applies: the tuner's, moved by the
  closed loop's ``momentum_offset`` if given (see :func:`offset_momentum`)."""
  if momentum_offset is None:
    return tuner_state.momentum
  return offset_momentum(tuner_state.momentum, momentum_offset, momentum_range)


def momentum_trace(
    grads: optax.Updates, trace: optax.Updates, momentum: jax.typing.ArrayLike
) -> optax.Updates:
  """The heavy-ball buffer after one step, ``mu v + g``, in ``v``'s dtypes.

  While ``momentum`` is exactly 0 ``v`` stays as it is (torch's rule).
  """
  moving = momentum != 0.0
  return jax.tree.map(
      lambda g, v: jnp.where(moving, (momentum * v + g).astype(v.dtype), v),
      grads, trace,
  )


def momentum_updates(
    grads: optax.Updates,
    trace: optax.Updates,
    learning_rate: jax.typing.ArrayLike,
    momentum: jax.typing.ArrayLike,
    *,
    nesterov: bool = False,
) -> optax.Updates:
  r"""Torch's momentum-SGD update from the gradient and the *new* trace.

  :math:`u = -\alpha v` (:math:`-\alpha g` while :math:`\mu` is exactly 0),
  or :math:`u = -\alpha (g + \mu v)` with ``nesterov``, in the gradients'
  dtypes.

  Args:
    grads: the gradients that entered the trace this step.
    trace: the heavy-ball buffer after this step's update.
    learning_rate: :math:`\alpha`.
    momentum: :math:`\mu`.
    nesterov: Nesterov momentum.

  Returns:
    The updates, to be added to the parameters.

  Examples:
    >>> import jax.numpy as jnp
    >>> import yellowfin_optax as yf
    >>> print(yf.momentum_updates(jnp.ones(2), jnp.full(2, 3.0), 0.1, 0.5))
    [-0.3 -0.3]
  """
  if nesterov:
    direction = jax.tree.map(lambda g, v: g + momentum * v, grads, trace)
  else:
    moving = momentum != 0.0
    direction = jax.tree.map(
        lambda g, v: jnp.where(moving, v, g), grads, trace
    )
  return jax.tree.map(
      lambda d, g: (-learning_rate * d).astype(g.dtype), direction, grads
  )


class TunedMomentumState(NamedTuple):
  """State of :func:`tuned_momentum`.

  Attributes:
    tuner: state of the wrapped tuner (it holds ``learning_rate`` and
      ``momentum``).
    trace: pytree like the params: the heavy-ball buffer ``v``.
  """

  tuner: Any
  trace: optax.Updates


def tuned_momentum(
    tuner: optax.GradientTransformation,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Momentum SGD with the learning rate and momentum chosen by ``tuner``.

  After ``tuner`` updates, its state's ``learning_rate`` :math:`\alpha` and
  ``momentum`` :math:`\mu` are applied in torch's heavy-ball form:

  .. math::
    v \leftarrow \mu v + g, \quad u = -\alpha v
    \quad (\text{Nesterov: } u = -\alpha (g + \mu v)).

  As in ``torch.optim.SGD``, a step whose momentum is exactly zero leaves
  ``v`` untouched and applies :math:`-\alpha g`, so the step-0 gradient of a
  run started at :math:`\mu_0 = 0` never enters ``v``.

  ``update`` accepts the keywords ``momentum_offset`` (the closed loop's
  correction :math:`\delta`) and ``momentum_range``: then :math:`\mu + \delta`
  is applied, clipped to ``momentum_range`` if given (and :math:`\mu` itself
  while :math:`\delta = 0`). :func:`closed_loop` passes both.

  Args:
    tuner: a transformation whose state has ``learning_rate`` and ``momentum``
      fields, normally :func:`yellowfin_tuner`.
    nesterov: use Nesterov momentum.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose updates are to be added
    to the parameters.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import yellowfin_optax as yf
    >>> tx = yf.tuned_momentum(yf.yellowfin_tuner(yf.gradient_statistics()))
    >>> params = jnp.array([1.0, -2.0])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)  # grad of |x|^2 / 2 is x
    >>> print(optax.apply_updates(params, updates))
    [ 0.9999 -1.9998]
  """

  def init_fn(params):
    return TunedMomentumState(
        tuner=tuner.init(params), trace=optax.tree.zeros_like(params)
    )

  def update_fn(updates, state, params=None, *, momentum_offset=None,
                momentum_range=None, **extra_args):
    del extra_args
    grads, tuner_state = tuner.update(updates, state.tuner, params)
    lr = tuner_state.learning_rate
    mu = applied_momentum(tuner_state, momentum_offset, momentum_range)
    trace = momentum_trace(grads, state.trace, mu)
    new_updates = momentum_updates(grads, trace, lr, mu, nesterov=nesterov)
    return new_updates, TunedMomentumState(tuner=tuner_state, trace=trace)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
