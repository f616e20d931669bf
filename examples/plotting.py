"""The examples' training figure: loss, tuned learning rate and momentum.

A helper shared by the examples (``import plotting`` from a sibling file in
``examples/``; copy it next to your script to reuse it). It draws one line
per optimizer or run in up to three panels against the step:

* the training loss, smoothed with a trailing uniform window (raw loss faint
  behind it, log scale);
* the applied learning rate (log scale);
* the applied momentum.

A run without a learning rate or momentum (e.g. Adam) appears in the loss
panel only. Log the values with ``yellowfin_optax.hyperparams(state)``
inside the jitted step (or ``lax.scan``) and pass the stacked arrays::

  plotting.plot_runs({
      'yellowfin_auto': {'loss': losses, 'learning_rate': lr, 'momentum': mu},
      'adam': {'loss': adam_losses},
  }, path='digits.png')

The figure is built with ``matplotlib.figure.Figure`` directly (no
``pyplot``): it needs no display and leaves the user's backend alone.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

PANELS = (
    # (key, title, y label, log scale)
    ('loss', 'training loss', 'loss (smoothed)', True),
    ('learning_rate', 'learning rate', 'learning rate (log)', True),
    ('momentum', 'momentum', 'momentum', False),
)


def smooth(values: Any, window: int) -> np.ndarray:
  """Trailing uniform moving average.

  Point ``i`` is the mean of ``values[max(0, i - window + 1) : i + 1]``: the
  output has the input's length, and its last point is the mean of the last
  ``window`` values.

  >>> print(smooth([1.0, 3.0, 5.0, 7.0], 2))
  [1. 2. 4. 6.]
  """
  if int(window) < 1:
    raise ValueError(f'window must be >= 1, got {window!r}.')
  values = np.asarray(values, np.float64).reshape(-1)
  csum = np.concatenate([[0.0], np.cumsum(values)])
  idx = np.arange(1, len(values) + 1)
  start = np.maximum(idx - int(window), 0)
  return (csum[idx] - csum[start]) / (idx - start)


def plot_runs(runs: Mapping[str, Mapping[str, Any]],
              path: str | os.PathLike[str] | None = None, *,
              smoothing_window: int = 20, title: str | None = None):
  """Draws the figure: one line per run in each panel its data has.

  Args:
    runs: ``{label: {'loss': [steps], 'learning_rate': [steps],
      'momentum': [steps]}}``; every key is optional.
    path: where to save the figure (format by extension; parent
      directories are created), or ``None`` not to save it.
    smoothing_window: width of the loss smoothing, ``>= 1``.
    title: the figure's title.

  Returns:
    The ``matplotlib.figure.Figure``.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  panels = [p for p in PANELS if any(p[0] in run for run in runs.values())]
  if not panels:
    raise ValueError('Nothing to plot: no run has a loss, learning_rate or '
                     'momentum.')
  fig = Figure(figsize=(4.6 * len(panels), 3.6), layout='constrained')
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  colors = {label: f'C{i % 10}' for i, label in enumerate(runs)}
  for ax, (key, panel_title, ylabel, log) in zip(axes, panels):
    for label, run in runs.items():
      if key not in run:
        continue
      values = np.asarray(run[key], np.float64).reshape(-1)
      steps = np.arange(len(values))
      if key == 'loss':
        ax.plot(steps, values, color=colors[label], alpha=0.2, lw=0.8)
        values = smooth(values, smoothing_window)
      ax.plot(steps, values, color=colors[label], label=label, lw=1.5)
    ax.set_title(panel_title)
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel if key != 'loss' else
                  f'{ylabel}, window {smoothing_window}')
    if log:
      ax.set_yscale('log')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize='small')
  if title:
    fig.suptitle(title)
  if path is not None:
    directory = os.path.dirname(os.fspath(path))
    if directory:
      os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110)
  return fig
