"""Construction-time argument checks shared by every piece."""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
  """Raises ``ValueError`` naming ``name`` if a concrete ``value`` is out of range.

  Traced values (``optax.inject_hyperparams`` re-calls factories with arrays)
  and callables (schedules) are not checked: they cannot be branched on.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return
  below = low is not None and (value <= low if low_open else value < low)
  above = high is not None and (value >= high if high_open else value > high)
  if below or above or value != value:  # value != value: NaN
    left = '(' if low_open else '['
    right = ')' if high_open else ']'
    lo = '-inf' if low is None else repr(low)
    hi = 'inf' if high is None else repr(high)
    raise ValueError(
        f'{name} must be in {left}{lo}, {hi}{right}, got {value!r}.'
    )


def check_int(name: str, value: Any, low: int) -> None:
  """Raises ``ValueError`` unless ``value`` is a Python int ``>= low``
  (a static value: it sets a shape or is compared with the step)."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < low):
    raise ValueError(f'{name} must be an int >= {low}, got {value!r}.')


def check_whole(name: str, value: Any, low: int) -> None:
  """Like :func:`check_int` for a value that may also arrive as an array
  (``optax.inject_hyperparams``), which is not checked; a concrete Python
  number must be a whole number ``>= low``."""
  if isinstance(value, numbers.Real) and not (
      math.isfinite(value) and value == int(value) and value >= low):
    raise ValueError(f'{name} must be an int >= {low}, got {value!r}.')
