"""Smoothing, iterations-to-target and speedups (paper Section 3 protocol)."""

from __future__ import annotations

import numpy as np


def smooth(loss: np.ndarray, window: int) -> np.ndarray:
  """Uniform moving average; entry ``i`` averages steps ``i .. i+window-1``.

  A non-finite loss makes that point and every later one ``inf`` (a diverged
  run never "reaches" a target afterwards).
  """
  loss = np.asarray(loss, np.float64)
  bad = np.cumsum(~np.isfinite(loss)) > 0
  clean = np.where(bad, 0.0, loss)
  c = np.concatenate([[0.0], np.cumsum(clean)])
  out = (c[window:] - c[:-window]) / window
  bad_w = np.convolve(bad.astype(float), np.ones(window), 'valid') > 0
  return np.where(bad_w, np.inf, out)


def iterations_to(smoothed: np.ndarray, target: float, window: int) -> float:
  """Iterations until the smoothed loss first is ``<= target`` (inf if never).

  The smoothed value at index ``i`` is known after step ``i + window``.
  """
  hit = np.nonzero(smoothed <= target)[0]
  return float(hit[0] + window) if hit.size else float('inf')


def speedup(loss_a: np.ndarray, loss_b: np.ndarray, window: int) -> float:
  """Speedup of A over B: ``iters_B / iters_A`` to the lowest loss both reach.

  The target is the larger of the two minimum smoothed losses, so both runs
  reach it (unless one never has a finite loss: then ``nan``).
  """
  sa, sb = smooth(loss_a, window), smooth(loss_b, window)
  target = max(sa.min(), sb.min())
  if not np.isfinite(target):
    return float('nan')
  return iterations_to(sb, target, window) / iterations_to(sa, target, window)


def summary(values: list[float]) -> dict[str, float]:
  """Median and spread (min, max) of per-seed values, ignoring nan."""
  v = np.asarray(values, np.float64)
  v = v[~np.isnan(v)]
  if not v.size:
    return {'median': float('nan'), 'min': float('nan'), 'max': float('nan'),
            'n': 0}
  return {'median': float(np.median(v)), 'min': float(v.min()),
          'max': float(v.max()), 'n': int(v.size)}


def fmt(s: dict[str, float], digits: int = 2) -> str:
  """``median [min, max]``."""
  if s['n'] == 0:
    return 'n/a'
  if s['n'] == 1:
    return f'{s["median"]:.{digits}f}'
  return (f'{s["median"]:.{digits}f} [{s["min"]:.{digits}f}, '
          f'{s["max"]:.{digits}f}]')
