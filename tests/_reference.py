"""Loading the PyTorch reference's recorded trajectories (../shared/conformance)."""

from __future__ import annotations

import ast
import pathlib

import numpy as np

CONFORMANCE_DIR = (
    pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'conformance'
)
FILES = ('pytorch_reference_seed0.npz', 'pytorch_reference_options_seed0.npz')

# The reference's argument names -> ours (spec, end of section 2).
ARGUMENT_NAMES = {
    'lr': 'initial_learning_rate',
    'mu': 'initial_momentum',
    'curv_win_width': 'curvature_window',
    'stat_protect_fac': 'stat_protect_factor',
    'adapt_clip': 'adaptive_clipping',
    'catastrophic_move_thresh': 'catastrophic_move_threshold',
    'clip_thresh': 'clip_norm',
}


def scenarios() -> list[tuple[str, str]]:
  """(file, scenario) pairs; empty when the data is not there."""
  out = []
  for name in FILES:
    path = CONFORMANCE_DIR / name
    if path.exists():
      keys = np.load(path).files
      out += [(name, s) for s in sorted({k.split('/')[0] for k in keys})]
  return out


def load(file: str, scenario: str) -> dict:
  """One scenario: config (our names), grads/params lists, the recorded series."""
  data = np.load(CONFORMANCE_DIR / file)
  get = lambda key: data[f'{scenario}/{key}']
  leaves = len([k for k in data.files if k.startswith(f'{scenario}/grads/')])
  config = {
      ARGUMENT_NAMES.get(k, k): v
      for k, v in ast.literal_eval(str(get('config')))
  }
  series = (
      'h_min', 'h_max', 'grad_var', 'dist_to_opt', 'lr_t', 'mu_t', 'lr',
      'mu', 'applied_lr', 'applied_mu',
  )
  return dict(
      config=config,
      grads=[get(f'grads/{i}') for i in range(leaves)],
      params=[get(f'params/{i}') for i in range(leaves)],
      first_restore=int(get('first_restore')),
      **{k: get(k) for k in series},
  )
