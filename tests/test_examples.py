"""Every example runs end to end in a shortened form, so none of them rots.

Each example exposes ``main(argv)``; it is imported from ``examples/`` and run
for a few steps into a temporary directory.
"""

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                        'examples')


def _load(name):
  spec = importlib.util.spec_from_file_location(
      f'_example_{name}', os.path.join(EXAMPLES, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def _check_outputs(out, stem):
  png = out / f'{stem}.png'
  assert png.exists() and png.stat().st_size > 10_000, png
  with open(out / f'{stem}.json') as f:
    summary = json.load(f)
  return summary


def _assert_finite(values):
  values = np.asarray(values, np.float64)
  assert values.size > 0 and np.all(np.isfinite(values))


def test_digits(tmp_path):
  summary = _load('digits').main(['--steps', '30', '--out', str(tmp_path)])
  saved = _check_outputs(tmp_path, 'digits')
  assert set(saved['results']) == {'YellowFin (untuned)', 'Adam(1e-3)'}
  for result in summary['results'].values():
    assert len(result['losses']) == 30
    _assert_finite(result['losses'])
    assert 0.0 <= result['test_accuracy'] <= 1.0
  yf = summary['results']['YellowFin (untuned)']
  lr = np.asarray(yf['history']['learning_rate'])
  assert len(lr) == 30 and lr[0] == pytest.approx(1e-4)
  assert lr[-1] != pytest.approx(1e-4)  # the tuner moved it
  assert 0.0 <= yf['final_momentum'] < 1.0


def test_nnx_mlp(tmp_path):
  summary = _load('nnx_mlp').main(['--steps', '20', '--hidden', '32',
                                   '--out', str(tmp_path)])
  _check_outputs(tmp_path, 'nnx_mlp')
  _assert_finite(summary['losses'])
  hp = summary['final_hyperparams']
  # The NNX-wrapped state was read: the tuned values are all there.
  assert {'learning_rate', 'momentum', 'h_min', 'h_max', 'step'} <= set(hp)
  assert hp['step'] == 20
  assert math.isfinite(hp['learning_rate']) and hp['learning_rate'] > 0


def test_linen_train_state(tmp_path):
  summary = _load('linen_train_state').main(
      ['--steps', '20', '--num-samples', '400', '--out', str(tmp_path)])
  _check_outputs(tmp_path, 'linen_train_state')
  _assert_finite(summary['losses'])
  assert summary['final_hyperparams']['step'] == 20


def test_pure_jax(tmp_path):
  summary = _load('pure_jax').main(['--steps', '60', '--chunk', '30',
                                    '--out', str(tmp_path)])
  _check_outputs(tmp_path, 'pure_jax')
  assert len(summary['losses']) == 60
  _assert_finite(summary['losses'])
  assert summary['final_hyperparams']['step'] == 60
  # Logistic loss starts at log 2 from zero weights; it must have gone down.
  assert np.mean(summary['losses'][-10:]) < np.log(2.0)


def test_char_lstm(tmp_path):
  module = _load('char_lstm')
  if not os.path.exists(module.DEFAULT_DATA):
    pytest.skip(f'Tiny Shakespeare not available at {module.DEFAULT_DATA}')
  summary = module.main(['--steps', '8', '--batch-size', '4', '--seq-len',
                         '16', '--hidden', '16', '--sample-chars', '10',
                         '--out', str(tmp_path)])
  _check_outputs(tmp_path, 'char_lstm')
  _assert_finite(summary['losses'])
  assert math.isfinite(summary['valid_loss'])
  assert summary['sample'].startswith('ROMEO:\n')
  assert len(summary['sample']) == len('ROMEO:\n') + 10


def test_char_lstm_missing_data_is_a_clear_error(tmp_path):
  module = _load('char_lstm')
  missing = tmp_path / 'nowhere' / 'input.txt'
  with pytest.raises(FileNotFoundError, match='Tiny Shakespeare not found'):
    module.main(['--data', str(missing), '--out', str(tmp_path)])


@pytest.mark.slow
@pytest.mark.parametrize('name,argv', [
    ('data_parallel', ['--steps', '5', '--count-collectives']),
    ('sharded_jit', ['--steps', '5']),
    ('async_workers', ['--steps', '16']),
])
def test_multidevice_examples(name, argv, tmp_path):
  _load(name).main(argv + ['--out', str(tmp_path)])
  assert any(tmp_path.iterdir()), f'{name} wrote nothing'
