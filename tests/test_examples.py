"""Every example runs end to end in a shortened form, so none of them rots.

Each example exposes ``main(argv)``, prints a table, writes a figure to
``--out`` and returns what it measured. It is loaded by path, with
``examples/`` first on ``sys.path`` as ``python examples/x.py`` has it (the
examples import their sibling ``plotting.py``).
"""

import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'examples')


def _load(name):
  if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)  # as for `python examples/<name>.py`
  spec = importlib.util.spec_from_file_location(
      f'_example_{name}', os.path.join(EXAMPLES, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def _assert_figure(path):
  assert path.exists() and path.stat().st_size > 10_000, path


def _assert_finite(values):
  values = np.asarray(values, np.float64)
  assert values.size > 0 and np.all(np.isfinite(values))


def _assert_tuned(result, steps):
  """The logged learning rate and momentum are the tuner's, step by step."""
  lr, mu = np.asarray(result['learning_rate']), np.asarray(result['momentum'])
  assert lr.shape == mu.shape == (steps,)
  _assert_finite(lr)
  assert np.all(lr >= 0) and np.ptp(lr) > 0  # tuned: it moved
  assert np.all((mu >= 0) & (mu < 1))


def test_digits(tmp_path, capsys):
  steps, grid = 60, [1e-3, 1e-2]
  out = tmp_path / 'fig' / 'digits.png'
  summary = _load('digits').main(
      ['--steps', str(steps), '--adam-grid', *map(str, grid), '--out',
       str(out)])
  printed = capsys.readouterr().out
  _assert_figure(out)
  results = summary['results']
  assert list(results) == ['yellowfin_auto', 'yellowfin', 'adam']
  for line in ('optimizer', 'train loss', 'test acc', 'final lr',
               'final mom', 'wall s', 'yellowfin_auto (untuned)',
               'yellowfin (untuned)', 'adam (lr'):
    assert line in printed, (line, printed)
  for name, r in results.items():
    assert len(r['losses']) == steps
    _assert_finite(r['losses'])
    assert r['final_loss'] == pytest.approx(np.mean(r['losses'][-50:]))
    assert f"{r['final_loss']:.4f}" in printed
    assert 0.0 <= r['test_accuracy'] <= 1.0
    assert r['wall_s'] > 0
  auto = results['yellowfin_auto']
  assert auto['final_loss'] < np.mean(auto['losses'][:5])  # it trained
  _assert_tuned(auto, steps)
  _assert_tuned(results['yellowfin'], steps)
  # The reference applies its initial learning rate at step 0.
  assert results['yellowfin']['learning_rate'][0] == pytest.approx(1e-4)
  # total_steps: the cosine has taken yellowfin_auto's learning rate down.
  assert auto['learning_rate'][-1] < 0.01 * np.max(auto['learning_rate'])
  # Adam: every grid point ran; the reported one has the lowest final loss.
  adam = results['adam']
  assert sorted(adam['grid']) == grid
  assert adam['picked_lr'] == min(adam['grid'], key=adam['grid'].get)
  assert adam['final_loss'] == adam['grid'][adam['picked_lr']]
  assert adam['momentum'] is None


def test_nnx_mlp(tmp_path, capsys):
  out = tmp_path / 'nnx_mlp.png'
  summary = _load('nnx_mlp').main(['--steps', '20', '--hidden', '32',
                                   '--out', str(out)])
  assert 'momentum' in capsys.readouterr().out
  _assert_figure(out)
  _assert_finite(summary['losses'])
  _assert_tuned(summary, 20)
  hp = summary['final_hyperparams']  # read from optimizer.opt_state
  assert {'learning_rate', 'momentum', 'h_min', 'h_max', 'count'} <= set(hp)
  assert hp['count'] == 20 and hp['skipped_steps'] == 0
  # The value logged inside nnx.jit at the last step is the one read after.
  assert hp['learning_rate'] == pytest.approx(summary['learning_rate'][-1])
  assert hp['momentum'] == pytest.approx(summary['momentum'][-1])


def test_linen_train_state(tmp_path):
  out = tmp_path / 'linen.png'
  summary = _load('linen_train_state').main(
      ['--steps', '20', '--num-samples', '400', '--out', str(out)])
  _assert_figure(out)
  _assert_finite(summary['losses'])
  _assert_tuned(summary, 20)
  # apply_gradients(grads=..., value=loss) reached yellowfin_auto's update
  # (without value= it raises), once per step.
  assert summary['final_hyperparams']['count'] == 20


def test_pure_jax(tmp_path):
  out = tmp_path / 'pure_jax.png'
  summary = _load('pure_jax').main(['--steps', '60', '--chunk', '30',
                                    '--out', str(out)])
  _assert_figure(out)
  assert len(summary['losses']) == 60
  _assert_finite(summary['losses'])
  assert summary['final_hyperparams']['count'] == 60
  history = summary['history']
  _assert_tuned({'learning_rate': history['learning_rate'],
                 'momentum': history['momentum']}, 60)
  # Logistic loss starts at log 2 from zero weights; it must have gone down.
  assert np.mean(summary['losses'][-10:]) < np.log(2.0)


def test_char_lstm(tmp_path):
  module = _load('char_lstm')
  if not os.path.exists(module.DEFAULT_DATA):
    pytest.skip(f'Tiny Shakespeare not available at {module.DEFAULT_DATA}')
  out = tmp_path / 'char_lstm.png'
  summary = module.main(['--steps', '8', '--batch-size', '4', '--seq-len',
                         '16', '--hidden', '16', '--sample-chars', '10',
                         '--out', str(out)])
  _assert_figure(out)
  _assert_finite(summary['losses'])
  _assert_tuned(summary, 8)
  assert summary['final_hyperparams']['count'] == 8
  assert math.isfinite(summary['valid_loss'])
  assert summary['sample'].startswith('ROMEO:\n')
  assert len(summary['sample']) == len('ROMEO:\n') + 10


def test_char_lstm_missing_data_is_a_clear_error(tmp_path):
  module = _load('char_lstm')
  missing = tmp_path / 'nowhere' / 'input.txt'
  with pytest.raises(FileNotFoundError, match='Tiny Shakespeare not found'):
    module.main(['--data', str(missing), '--out', str(tmp_path / 'x.png')])


def test_plot_runs_one_line_per_run_in_the_panels_it_has(tmp_path):
  plotting = _load('plotting')
  steps = np.arange(1, 41, dtype=np.float64)
  fig = plotting.plot_runs({
      'a': {'loss': 1.0 / steps, 'learning_rate': 0.1 / steps,
            'momentum': 0.5 + 0.0 * steps},
      'b': {'loss': 2.0 / steps},  # e.g. Adam: loss only
  }, path=tmp_path / 'sub' / 'f.png', smoothing_window=5, title='t')
  _assert_figure(tmp_path / 'sub' / 'f.png')
  titles = [ax.get_title() for ax in fig.axes]
  assert titles == ['training loss', 'learning rate', 'momentum']
  labels = [[l.get_label() for l in ax.get_lines()
             if not l.get_label().startswith('_')] for ax in fig.axes]
  assert labels == [['a', 'b'], ['a'], ['a']]
  loss_line = fig.axes[0].get_lines()[1]  # the smoothed one of run 'a'
  np.testing.assert_allclose(loss_line.get_ydata(),
                             plotting.smooth(1.0 / steps, 5))
  fig = plotting.plot_runs({'b': {'loss': steps}})
  assert [ax.get_title() for ax in fig.axes] == ['training loss']
  with pytest.raises(ValueError, match='Nothing to plot'):
    plotting.plot_runs({'c': {}})


def test_smooth_is_a_trailing_mean():
  plotting = _load('plotting')
  np.testing.assert_allclose(plotting.smooth([1.0, 3.0, 5.0, 7.0], 2),
                             [1.0, 2.0, 4.0, 6.0])
  values = np.random.default_rng(0).normal(size=30)
  smoothed = plotting.smooth(values, 7)
  assert smoothed[-1] == pytest.approx(np.mean(values[-7:]))
  np.testing.assert_allclose(plotting.smooth(values, 1), values, rtol=1e-12)
  with pytest.raises(ValueError, match='window'):
    plotting.smooth(values, 0)


def test_main_job_runs_as_a_script():
  """``python examples/digits.py``: sys.path[0] is examples/, so ``import
  plotting`` finds the sibling (``--help`` stops before any training)."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  proc = subprocess.run(
      [sys.executable, os.path.join(EXAMPLES, 'digits.py'), '--help'],
      cwd=os.path.dirname(EXAMPLES), env=env, capture_output=True, text=True,
      timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '--adam-grid' in proc.stdout and '--out' in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize('name,argv', [
    ('data_parallel', ['--steps', '5', '--count-collectives']),
    ('sharded_jit', ['--steps', '5']),
    ('async_workers', ['--steps', '16']),
])
def test_multidevice_examples(name, argv, tmp_path):
  _load(name).main(argv + ['--out', str(tmp_path)])
  assert any(tmp_path.iterdir()), f'{name} wrote nothing'
