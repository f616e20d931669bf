"""Plots of what YellowFin's tuner did during training.

The standard figure has four panels: the smoothed training loss (several runs
can be overlaid, e.g. YellowFin against Adam), the applied learning rate (log
scale), the applied momentum, and the curvature range ``h_min``/``h_max`` (log
scale). Its input is the sequence of :func:`yellowfin_optax.hyperparams`
dicts logged during training, one per step, or the same data already stacked
into arrays (e.g. returned from a ``jax.lax.scan``).

matplotlib is imported inside the functions, so ``import yellowfin_optax``
never needs it. The figure is built with ``matplotlib.figure.Figure`` directly
(no ``pyplot``): it needs no display, does not change the user's backend and
is not kept alive by pyplot's figure registry.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence, Union

import numpy as np

__all__ = ['plot_training', 'smooth', 'stack_history']

History = Union[Sequence[Mapping[str, Any]], Mapping[str, Any]]


def stack_history(history: History) -> dict[str, np.ndarray]:
  """Stacks a list of per-step ``hyperparams`` dicts into 1-d numpy arrays.

  Args:
    history: a sequence of dicts of scalars (one per step, as returned by
      :func:`yellowfin_optax.hyperparams`), or a dict of arrays with a leading
      step axis (returned as numpy arrays, flattened to 1-d).

  Returns:
    A dict mapping each name present in *every* step to a float64 array of
    shape ``[num_steps]``.

  Raises:
    ValueError: if ``history`` is empty or a dict's arrays have different
      lengths.

  Examples:
    >>> import jax.numpy as jnp
    >>> from yellowfin_optax import plotting
    >>> h = [{'learning_rate': jnp.array(0.5), 'momentum': jnp.array(0.25)},
    ...      {'learning_rate': jnp.array(1.5), 'momentum': jnp.array(0.75)}]
    >>> stacked = plotting.stack_history(h)
    >>> print(stacked['learning_rate'], stacked['momentum'])
    [0.5 1.5] [0.25 0.75]
  """
  if isinstance(history, Mapping):
    stacked = {
        k: np.asarray(v, np.float64).reshape(-1) for k, v in history.items()
    }
    lengths = {len(v) for v in stacked.values()}
    if len(lengths) > 1:
      raise ValueError(
          f'history arrays have different lengths: {sorted(lengths)}.'
      )
    if not stacked or lengths == {0}:
      raise ValueError('history is empty.')
    return stacked
  history = list(history)
  if not history:
    raise ValueError('history is empty.')
  names = set(history[0])
  for step in history[1:]:
    names &= set(step)
  return {
      k: np.asarray([float(np.asarray(step[k])) for step in history])
      for k in sorted(names)
  }


def smooth(values: Any, window: int) -> np.ndarray:
  """Trailing uniform moving average (the paper's smoothed training loss).

  Point ``i`` is the mean of ``values[max(0, i - window + 1) : i + 1]``, so the
  output has the input's length and its first points average fewer values.

  Args:
    values: 1-d sequence of numbers.
    window: averaging window, ``>= 1``; ``1`` returns the values unchanged.

  Returns:
    A float64 numpy array like ``values``.

  Examples:
    >>> from yellowfin_optax import plotting
    >>> print(plotting.smooth([1.0, 3.0, 5.0, 7.0], 2))
    [1. 2. 4. 6.]
  """
  if int(window) < 1:
    raise ValueError(f'window must be >= 1, got {window!r}.')
  values = np.asarray(values, np.float64).reshape(-1)
  csum = np.concatenate([[0.0], np.cumsum(values)])
  idx = np.arange(1, len(values) + 1)
  start = np.maximum(idx - int(window), 0)
  return (csum[idx] - csum[start]) / (idx - start)


def _is_single_history(history: Any) -> bool:
  """A list of dicts, or a dict of arrays, is one run; a dict of those is many."""
  if not isinstance(history, Mapping):
    return True
  return not all(
      isinstance(v, Mapping)
      or (isinstance(v, (list, tuple)) and v and isinstance(v[0], Mapping))
      for v in history.values()
  )


def _as_runs(data: Any, default_label: str) -> dict[str, Any]:
  if data is None:
    return {}
  if isinstance(data, Mapping):
    return dict(data)
  return {default_label: data}


def _solid_and_dashed(ax, runs, color_of, solid, dashed):
  """Plots each run's ``solid`` and ``dashed`` ``(key, label)`` series."""
  for name, h in runs.items():
    for (key, label), style in ((solid, {}), (dashed, dict(ls='--', alpha=0.7))):
      if key in h:
        ax.plot(h[key], color=color_of[name], label=f'{name}: {label}', **style)


def plot_training(
    history: History | Mapping[str, History] | None,
    losses: Any = None,
    *,
    labels: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    smoothing_window: int = 20,
    title: str | None = None,
    loss_log_scale: bool = True,
) -> Any:
  """Draws the standard YellowFin training figure.

  Four panels against the step: the training loss smoothed with a uniform
  ``smoothing_window`` (raw loss faint behind it), the applied
  ``learning_rate`` with the smoothed ``lr`` dashed (log scale), the applied
  ``momentum`` with the smoothed ``mu`` dashed, and ``h_min``/``h_max`` (log
  scale). Panels whose values are absent from the history are left out.

  Args:
    history: one run's logged :func:`yellowfin_optax.hyperparams` (a list of
      per-step dicts or a dict of stacked arrays), a dict ``{label: history}``
      of several runs to overlay, or ``None`` to plot losses only.
    losses: one run's per-step training losses, or a dict ``{label: losses}``
      of several runs (e.g. ``{'YellowFin': ..., 'Adam': ...}``); ``None``
      for no loss panel.
    labels: names for a single ``history``/``losses`` run (first entry used);
      ``None`` labels it ``'YellowFin'``.
    path: if given, the figure is saved there (PNG by extension; parent
      directories are created).
    smoothing_window: width of the uniform loss smoothing, ``>= 1``.
    title: figure title; ``None`` for none.
    loss_log_scale: draw the loss on a log scale.

  Returns:
    The ``matplotlib.figure.Figure``.

  Examples:
    >>> import os, tempfile
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import yellowfin_optax as yf
    >>> from yellowfin_optax import plotting
    >>> loss = lambda x: jnp.sum(jnp.array([1.0, 10.0]) * x**2)
    >>> tx = yf.yellowfin()
    >>> params = jnp.array([1.0, 1.0])
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   value, grads = jax.value_and_grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   return optax.apply_updates(params, updates), state, value, (
    ...       yf.hyperparams(state))
    >>> history, losses = [], []
    >>> for _ in range(50):
    ...   params, state, value, hp = step(params, state)
    ...   history.append(hp)
    ...   losses.append(value)
    >>> path = os.path.join(tempfile.mkdtemp(), 'yellowfin.png')
    >>> fig = plotting.plot_training(history, losses, path=path)
    >>> print([ax.get_title() for ax in fig.axes], os.path.exists(path))
    ['training loss', 'learning rate', 'momentum', 'curvature range'] True
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  default_label = labels[0] if labels else 'YellowFin'
  if history is None:
    runs = {}
  elif _is_single_history(history):
    runs = {default_label: stack_history(history)}
  else:
    runs = {k: stack_history(v) for k, v in history.items()}
  loss_runs = _as_runs(losses, default_label)

  panels = []
  if loss_runs:
    panels.append('loss')
  if any('learning_rate' in h for h in runs.values()):
    panels.append('learning_rate')
  if any('momentum' in h for h in runs.values()):
    panels.append('momentum')
  if any('h_min' in h or 'h_max' in h for h in runs.values()):
    panels.append('curvature')
  if not panels:
    raise ValueError('Nothing to plot: give losses or a history of hyperparams.')

  ncols = 2 if len(panels) > 1 else 1
  nrows = -(-len(panels) // ncols)
  fig = Figure(figsize=(5.5 * ncols, 3.6 * nrows), layout='constrained')
  axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
  for ax in axes[len(panels):]:
    fig.delaxes(ax)
  colors = [f'C{i}' for i in range(10)]
  color_of = {}
  for name in list(loss_runs) + list(runs):
    color_of.setdefault(name, colors[len(color_of) % len(colors)])

  for ax, panel in zip(axes, panels):
    ax.set_xlabel('step')
    ax.grid(True, alpha=0.3)
    if panel == 'loss':
      for name, values in loss_runs.items():
        values = np.asarray(values, np.float64).reshape(-1)
        steps = np.arange(len(values))
        ax.plot(steps, values, color=color_of[name], alpha=0.2, lw=0.8)
        ax.plot(steps, smooth(values, smoothing_window), color=color_of[name],
                label=name, lw=1.6)
      ax.set_title('training loss')
      ax.set_ylabel(f'loss (smoothed, window {smoothing_window})')
      if loss_log_scale:
        ax.set_yscale('log')
    elif panel == 'learning_rate':
      _solid_and_dashed(ax, runs, color_of, ('learning_rate', 'applied'),
                        ('lr', 'smoothed'))
      ax.set_title('learning rate')
      ax.set_ylabel('learning rate (log)')
      ax.set_yscale('log')
    elif panel == 'momentum':
      _solid_and_dashed(ax, runs, color_of, ('momentum', 'applied'),
                        ('mu', 'smoothed'))
      for name, h in runs.items():
        if 'total_momentum' in h:
          ax.plot(h['total_momentum'], color=color_of[name], ls=':',
                  label=f'{name}: measured total')
      ax.set_title('momentum')
      ax.set_ylabel('momentum')
    else:
      _solid_and_dashed(ax, runs, color_of, ('h_max', 'h_max'),
                        ('h_min', 'h_min'))
      ax.set_title('curvature range')
      ax.set_ylabel('h_min, h_max (log)')
      ax.set_yscale('log')
    ax.legend(fontsize='small')
  if title:
    fig.suptitle(title)
  if path is not None:
    directory = os.path.dirname(os.fspath(path))
    if directory:
      os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110)
  return fig
