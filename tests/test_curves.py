"""Learning curves: metrics.jsonl read back as it was last written, and drawn as a readable four-panel PNG."""

import json
import subprocess
import sys

import numpy as np
import pytest

from xmodal.train import curves

PIL = pytest.importorskip('PIL.Image')
pytest.importorskip('matplotlib')

VAL = {'val/itc/t2i_r1': 40.0, 'val/itc/i2t_r1': 45.0, 'val/itc+itm/t2i_r1': 50.0, 'val/binding/itc': 55.0,
       'val/binding/itm': 70.0, 'val/oracle/t2i_r1': 80.0, 'val/oracle/i2t_r1': 90.0}


def training_line(step, **extra):
  t = step / 100
  return {'step': step, 'time': 1e9 + step, 'loss': 5 - 4 * t, 'itc_loss': 4 - 3 * t, 'itm_loss': 0.7 - 0.5 * t,
          'itc_i2t_acc': 0.1 + 0.8 * t, 'itc_t2i_acc': 0.1 + 0.7 * t, 'itm_acc': 0.5 + 0.4 * t, 'lr': 1e-4,
          'temperature': 0.07, **extra}


def write_run(path, validation=True):
  """A run of 100 steps killed after step 60 and resumed from 40 (steps 50 and 60 written twice: the killed run's
  loss + 10 and validation - 30 first), with pipeline lines, validation every 20 steps, a final test line and a
  truncated last line."""
  lines = []
  for step in range(10, 61, 10):
    lines += [training_line(step, loss=training_line(step)['loss'] + 10 * (step >= 50)),
              {'step': step, 'time': 1e9, 'data/queue': 2.0}]
    if validation and step % 20 == 0:
      lines.append({'step': step, 'time': 1e9, **{k: v + step / 10 - 30 * (step == 60) for k, v in VAL.items()}})
  for step in range(50, 101, 10):
    lines.append(training_line(step))
    if validation and step % 20 == 0 and step < 100:
      lines.append({'step': step, 'time': 1e9, **{k: v + step / 10 for k, v in VAL.items()}})
  if validation:
    lines.append({'step': 100, 'time': 1e9, 'eval/itc/t2i_r1': 48.0, 'eval/itc/i2t_r1': 52.0,
                  'eval/binding/itc': 60.0, 'eval/binding/itm': 75.0, 'eval/oracle/t2i_r1': 79.0})
  text = '\n'.join(json.dumps(line) for line in lines)
  path.write_text(text + '\n\n{"step": 110, "time": 1e9, "lo')  # killed while writing
  return path


def saturated_pixels(image):
  """Counts per quadrant (top-left, top-right, bottom-left, bottom-right) of clearly coloured pixels: the data.
  Axes, text, grid and the 'no data' note are black or grey."""
  rgb = np.asarray(image.convert('RGB')).astype(int)
  coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 60
  h, w = coloured.shape
  return [int(coloured[:h // 2, :w // 2].sum()), int(coloured[:h // 2, w // 2:].sum()),
          int(coloured[h // 2:, :w // 2].sum()), int(coloured[h // 2:, w // 2:].sum())]


def axis_lines(ax):
  return {line.get_label(): line for line in ax.get_lines()}


def test_read_metrics_keeps_last_value_of_repeated_step_sorted_by_step(tmp_path):
  metrics = curves.read_metrics(write_run(tmp_path / 'metrics.jsonl'))
  steps, loss = metrics['loss']
  np.testing.assert_array_equal(steps, np.arange(10, 101, 10))
  assert steps.dtype == np.int64 and loss.dtype == np.float64
  # The resumed run rewrote 50 and 60 without the killed run's + 10 (and - 30): the values written last win.
  np.testing.assert_allclose(loss, [training_line(s)['loss'] for s in range(10, 101, 10)])
  np.testing.assert_array_equal(metrics['val/itc/t2i_r1'][0], [20, 40, 60, 80])
  np.testing.assert_allclose(metrics['val/itc/t2i_r1'][1], [42.0, 44.0, 46.0, 48.0])
  np.testing.assert_array_equal(metrics['data/queue'][0], [10, 20, 30, 40, 50, 60])
  assert metrics['eval/oracle/t2i_r1'][1].tolist() == [79.0]
  assert 'step' not in metrics and 'lo' not in metrics and 110 not in metrics['time'][0]


def test_read_metrics_skips_a_fragment_a_resumed_run_appended_to(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  # Logging every 2 steps, killed while writing step 5, resumed from step 0 logging every step: the resumed step 1 is
  # glued to the fragment (lost, the first run's value stays), step 2 is new and comes after step 3 in the file.
  path.write_text('{"step": 1, "loss": 3.0}\n{"step": 3, "loss": 9.0}\n{"step": 5, "lo{"step": 1, "loss": 7.0}\n'
                  '{"step": 2, "loss": 2.0, "ok": true, "name": "x"}\n\n{"step": 3, "loss": 1.0}\n')
  metrics = curves.read_metrics(path)
  assert metrics['loss'][0].tolist() == [1, 2, 3] and metrics['loss'][1].tolist() == [3.0, 2.0, 1.0]
  assert set(metrics) == {'loss'}  # booleans and strings are not curves


def test_write_curves_writes_a_png_of_the_figure_size_with_every_panel_drawn(tmp_path):
  metrics_path = write_run(tmp_path / 'metrics.jsonl')
  out = curves.write_curves(metrics_path, tmp_path / 'plots' / 'curves.png', title='synthetic run')
  assert out == tmp_path / 'plots' / 'curves.png'
  with PIL.open(out) as image:
    assert image.format == 'PNG'
    assert image.size == (curves.FIGSIZE[0] * curves.DPI, curves.FIGSIZE[1] * curves.DPI) == (1200, 800)
    assert len(image.convert('RGB').getcolors(maxcolors=1 << 20)) > 200
    assert min(saturated_pixels(image)) > 500, saturated_pixels(image)
  assert sorted(p.name for p in out.parent.iterdir()) == ['curves.png']  # the temporary file was renamed, not left


def test_training_only_file_writes_png_whose_evaluation_panels_say_no_data(tmp_path):
  metrics_path = write_run(tmp_path / 'metrics.jsonl', validation=False)
  out = curves.write_curves(metrics_path, tmp_path / 'curves.png')
  with PIL.open(out) as image:
    assert image.size == (1200, 800)
    losses, accuracy, retrieval, binding = saturated_pixels(image)
  assert losses > 500 and accuracy > 500 and retrieval == 0 and binding == 0
  fig = curves.plot_curves(curves.read_metrics(metrics_path))
  notes = [[t.get_text() for t in ax.texts] for ax in fig.axes]
  assert notes == [[], [], ['no data'], ['no data']]
  assert not axis_lines(fig.axes[3])  # no chance line without a curve to compare it with


def test_panels_draw_percent_accuracy_last_oracle_test_markers_and_chance(tmp_path):
  fig = curves.plot_curves(curves.read_metrics(write_run(tmp_path / 'metrics.jsonl')))
  losses, accuracy, retrieval, binding = (axis_lines(ax) for ax in fig.axes)
  assert set(losses) == {'loss', 'itc_loss', 'itm_loss'}
  np.testing.assert_allclose(accuracy['itm_acc'].get_ydata(), [100 * training_line(s)['itm_acc']
                                                               for s in range(10, 101, 10)])
  oracle = {label.split(' ')[1]: line for label, line in retrieval.items() if label.startswith('oracle')}
  assert set(oracle) == {'t2i', 'i2t'}
  # The last validation value (80 + 80 / 10), not the test slice's 79, and dashed across the panel.
  assert list(oracle['t2i'].get_ydata()) == [88.0, 88.0] and oracle['t2i'].get_linestyle() == '--'
  assert list(oracle['i2t'].get_ydata()) == [98.0, 98.0]
  test_t2i = retrieval['test itc/t2i_r1 48.0']
  assert list(test_t2i.get_xdata()) == [100] and test_t2i.get_linestyle() == 'None'
  assert test_t2i.get_color() == retrieval['itc/t2i_r1'].get_color()
  chance = binding['chance']
  assert list(chance.get_ydata()) == [50.0, 50.0] and chance.get_linestyle() == ':'
  assert binding['test binding/itm 75.0'].get_ydata()[0] == 75.0
  assert fig.axes[3].get_ylim()[0] < 50.0  # the chance line is inside the panel, not on its frame


def test_single_point_is_drawn_as_a_marker(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(json.dumps(training_line(10)) + '\n' + json.dumps({'step': 10, 'val/binding/itc': 51.0}) + '\n')
  fig = curves.plot_curves(curves.read_metrics(path))
  assert axis_lines(fig.axes[0])['loss'].get_marker() == 'o'
  assert axis_lines(fig.axes[3])['binding/itc'].get_marker() == 'o'


def test_missing_matplotlib_raises_import_error_naming_the_extra(tmp_path, monkeypatch):
  for module in ('matplotlib', 'matplotlib.figure', 'matplotlib.backends', 'matplotlib.backends.backend_agg'):
    monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules makes `import` raise ImportError
  with pytest.raises(ImportError, match=r"pip install 'xmodal\[plots\]'"):
    curves.write_curves(write_run(tmp_path / 'metrics.jsonl'), tmp_path / 'curves.png')
  assert not (tmp_path / 'curves.png').exists()


def test_importing_curves_does_not_import_matplotlib():
  code = 'import sys, xmodal.train.curves; assert "matplotlib" not in sys.modules, "matplotlib imported"'
  subprocess.run([sys.executable, '-c', code], check=True)
