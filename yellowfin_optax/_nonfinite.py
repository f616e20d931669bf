"""Skip steps with non-finite gradients or tuner output, leaving state intact.

YellowFin tunes itself from running statistics of the gradients, so one NaN,
one infinity, or one overflow inside the tuner would otherwise poison every
later step. The PyTorch reference recovers by restoring a deep copy of the
model; a functional optimizer instead keeps its state bit-identical on a bad
step and emits a zero update.

Memory: one int32 counter besides the wrapped state. Cost per step: one
``isfinite`` reduction over the gradients and one over the new updates.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

NONFINITE_MODES = ('skip', 'raise_in_debug', 'propagate')
UPDATE_CHECKS = ('all', 'narrow')


class SkipNonFiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`.

  Attributes:
    inner: state of the wrapped transformation.
    skipped_steps: int32 0-d array, number of steps skipped so far
      (saturating).
  """

  inner: Any
  skipped_steps: jax.Array


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point entry of ``tree`` is finite.

  Integer, boolean and empty leaves count as finite, so a tree without float
  entries is finite.

  Args:
    tree: a pytree of arrays.

  Returns:
    A boolean 0-d array.
  """
  leaves = [
      x for x in jax.tree.leaves(tree)
      if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  if not leaves:
    return jnp.array(True)
  scalars = [x for x in leaves if jnp.ndim(x) == 0]
  arrays = [x for x in leaves if jnp.ndim(x) > 0]
  finite = jnp.all(jnp.isfinite(jnp.stack(scalars))) if scalars else True
  if arrays:
    # x - x is 0 where x is finite and NaN where it is not, so one float sum
    # per leaf tells whether all entries are finite (and cannot overflow).
    # XLA:CPU runs it as one vectorized reduction; jnp.all(jnp.isfinite(x))
    # writes a boolean array and reduces it in a chain of four reduce-windows
    # (BUILD_NOTES.md section 9).
    zero = sum(jnp.sum(x - x, dtype=jnp.float32) for x in arrays)
    finite = finite & jnp.isfinite(zero)
  return jnp.asarray(finite)


def _check_structure(updates: Any, params: Any) -> None:
  """Raises a ``ValueError`` if ``params`` is given and shaped unlike ``updates``."""
  if params is None:
    return
  updates_def = jax.tree.structure(updates)
  params_def = jax.tree.structure(params)
  if updates_def != params_def:
    raise ValueError(
        'The gradient and parameter pytrees differ in structure: '
        f'gradients {updates_def}, parameters {params_def}.'
    )


def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    on_nonfinite: str = 'skip',
    check_gradients: bool = True,
    check_updates: str = 'all',
    updates_from_state: (
        Callable[[optax.Updates, Any], optax.Updates] | None
    ) = None,
) -> optax.GradientTransformationExtraArgs:
  """Applies ``inner`` only on steps whose gradients and outputs are finite.

  A step is *bad* when any gradient entry is NaN or infinite, when any scalar
  (0-d) field of ``inner``'s new state is (a tuner output driven non-finite by
  extreme but finite gradients, e.g. by a float32 overflow), or when any entry
  of ``inner``'s update is (e.g. a float16 momentum trace that overflowed). A
  bad step emits a zero update and keeps ``inner``'s state bit-identical;
  ``skipped_steps`` counts bad steps. Unlike ``optax.apply_if_finite`` this
  also checks the tuner's output and never gives up after a run of bad steps:
  YellowFin's statistics must never see a non-finite value. The two compose:
  ``optax.apply_if_finite(yellowfin(), max_consecutive_errors=k)`` adds
  ``apply_if_finite``'s give-up rule on top.

  Args:
    inner: the transformation to protect.
    on_nonfinite: ``'skip'`` (the default); ``'raise_in_debug'``: skip, and
      also raise ``FloatingPointError`` on a bad step while jax's
      ``jax_debug_nans`` or ``jax_debug_infs`` flag is on, to find the step
      (under ``jit`` it surfaces as a ``JaxRuntimeError`` carrying that
      message). The flags are read when the step runs, not when it is traced
      (``jit`` does not retrace when they change), so this mode costs one
      host callback per step even with them off: use it for debugging, not
      production. ``'propagate'``: return ``inner`` unwrapped, with no check
      and no cost (its state then has no ``skipped_steps``).
    check_gradients: check the incoming gradients too. ``False`` saves a
      reduction over them when ``inner``'s state already holds a scalar that
      is non-finite exactly when they are: YellowFin's ``grad_sq_norm``
      (``||g||^2``), which :func:`yellowfin` and
      :func:`closed_loop_yellowfin` rely on.
    check_updates: ``'all'`` checks every update entry; ``'narrow'`` only
      those of leaves narrower than float32 (float16 / bfloat16 traces can
      overflow). ``'narrow'`` saves a pass over the updates, which must end
      before anything is written, when ``inner`` cannot turn finite inputs
      into a non-finite float32 update: momentum SGD with finite tuned
      scalars only scales and adds finite values (short of overflowing
      3e38), so :func:`yellowfin` and :func:`closed_loop_yellowfin` pass it.
    updates_from_state: ``f(gradients, new_inner_state) -> updates``, which
      gives ``inner``'s updates from its new state. With it the updates are
      recomputed from the selected state instead of taken from ``inner``:
      the same values on a good step, but they then read the new momentum
      buffer instead of the old one, so XLA can update a donated buffer in
      place; without it, a step that donates the state copies every
      momentum buffer (the select and the update both read its old value).
      :func:`yellowfin` passes it.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: at construction, for an unknown ``on_nonfinite`` or
      ``check_updates``; at update,
      if ``params`` is given and its pytree structure differs from the
      gradients'.

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
  if check_updates not in UPDATE_CHECKS:
    raise ValueError(
        f'check_updates must be one of {UPDATE_CHECKS}, got {check_updates!r}.'
    )
  inner = optax.with_extra_args_support(inner)
  if on_nonfinite == 'propagate':
    return inner

  def init_fn(params):
    return SkipNonFiniteState(
        inner=inner.init(params), skipped_steps=jnp.zeros([], jnp.int32)
    )

  def update_fn(updates, state, params=None, **extra_args):
    _check_structure(updates, params)
    new_updates, new_inner = inner.update(
        updates, state.inner, params, **extra_args
    )
    scalars = [x for x in jax.tree.leaves(new_inner) if jnp.ndim(x) == 0]
    checked = [
        u for u in jax.tree.leaves(new_updates)
        if check_updates == 'all' or (
            jnp.issubdtype(jnp.result_type(u), jnp.floating)
            and jnp.finfo(jnp.result_type(u)).bits < 32)
    ]  # 'narrow': a pass fewer (BUILD_NOTES.md section 9)
    ok = all_finite(scalars) & all_finite(checked)
    if check_gradients:
      ok &= all_finite(updates)
    if on_nonfinite == 'raise_in_debug':
      jax.debug.callback(_raise_if_bad, ok)
    new_inner = optax.tree.where(ok, new_inner, state.inner)
    if updates_from_state is not None:
      new_updates = updates_from_state(updates, new_inner)
    new_updates = jax.tree.map(
        lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates
    )
    skipped = jnp.where(
        ok, state.skipped_steps, optax.safe_increment(state.skipped_steps)
    )
    return new_updates, SkipNonFiniteState(inner=new_inner, skipped_steps=skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _raise_if_bad(ok) -> None:
  debugging = jax.config.jax_debug_nans or jax.config.jax_debug_infs
  if debugging and not np.all(ok):  # np.all: ok is batched under vmap
    raise FloatingPointError(
        'yellowfin_optax: non-finite gradient or tuner output; the step was '
        'skipped (on_nonfinite="raise_in_debug" with jax_debug_nans/infs on).'
    )
