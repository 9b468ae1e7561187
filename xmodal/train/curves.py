"""Learning curves a user can look at: WORKDIR/metrics.jsonl drawn as one PNG of four panels against step.

  from xmodal.train import curves
  curves.write_curves('WORKDIR/metrics.jsonl', 'WORKDIR/curves.png', title='shapes, tiny')

Panels: (1) training losses, (2) in-batch accuracies in percent, (3) validation R@1 with the oracle ceiling of the
validation slice as dashed lines and the final test points as markers, (4) binding accuracy against chance (50 %).
matplotlib is an optional extra (`pip install 'xmodal[plots]'`), imported only when a figure is drawn.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import uuid
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from matplotlib.axes import Axes
  from matplotlib.figure import Figure

log = logging.getLogger(__name__)

Series = tuple[np.ndarray, np.ndarray]  # (steps (N,) int64, values (N,) float64), sorted by step

LOSS_KEYS = ('loss', 'itc_loss', 'itm_loss', 'sigmoid_loss', 'mlm_loss', 'region_loss')
# Fractions in [0, 1], drawn in percent.
ACCURACY_KEYS = ('itc_i2t_acc', 'itc_t2i_acc', 'itm_acc', 'mlm_acc', 'region_acc')
RETRIEVAL_KEYS = ('itc/t2i_r1', 'itc/i2t_r1', 'itc+itm/t2i_r1')  # under 'val/' (curve) and 'eval/' (final markers)
BINDING_KEYS = ('binding/itc', 'binding/itm')
ORACLE_KEYS = (('oracle/t2i_r1', 'oracle t2i'), ('oracle/i2t_r1', 'oracle i2t'))
CHANCE_BINDING = 50.0  # percent: a binding pair is a two-way choice

FIGSIZE = (12, 8)  # inches
DPI = 100


# ------------------------------------------------------------------------------------------------------ reading

def read_metrics(path: str | os.PathLike) -> dict[str, Series]:
  """Every numeric key of a metrics.jsonl file as (steps, values), sorted by step.

  A run resumed from a checkpoint writes some steps again: the value written last for a step wins. Lines that are not
  a JSON object with a 'step' are skipped with a warning rather than raised: a killed run leaves a truncated last line,
  and a run resumed after that appends its first line to the fragment.
  """
  points: dict[str, dict[int, float]] = {}
  skipped = 0
  with open(path, encoding='utf-8') as f:
    for line in f:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        step = int(record['step'])
      except (ValueError, TypeError, KeyError):
        skipped += 1
        continue
      for key, value in record.items():
        # bool is an int to Python but never a curve; 'step' is the x axis itself.
        if key != 'step' and isinstance(value, (int, float)) and not isinstance(value, bool):
          points.setdefault(key, {})[step] = float(value)
  if skipped:
    log.warning('%s: skipped %d line(s) that are not a JSON object with a step (a killed run?)', path, skipped)
  metrics = {}
  for key, by_step in points.items():
    steps = np.array(sorted(by_step), dtype=np.int64)
    metrics[key] = steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64)
  return metrics


# ------------------------------------------------------------------------------------------------------ drawing

def _import_matplotlib():
  """(Figure, FigureCanvasAgg): the object API with the Agg canvas, so no pyplot state, display or thread issues."""
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError as e:
    raise ImportError("drawing learning curves needs matplotlib: pip install 'xmodal[plots]'") from e
  return Figure, FigureCanvasAgg


def _finite(series: Series, scale: float = 1.0) -> Series:
  """The series without NaN or infinite points (a skipped non-finite step), values times `scale`."""
  steps, values = series
  keep = np.isfinite(values)
  return steps[keep], values[keep] * scale


def _plot_lines(ax: Axes, metrics: dict[str, Series], keys, prefix: str = '', scale: float = 1.0,
                marker: str | None = None) -> dict[str, str]:
  """Draws each present `prefix + key` as a line; returns key -> colour for the matching final markers."""
  colours = {}
  for key in keys:
    if prefix + key not in metrics:
      continue
    steps, values = _finite(metrics[prefix + key], scale)
    if not len(steps):
      continue
    # A lone point has no segment to draw: it needs a marker to be visible at all.
    (line,) = ax.plot(steps, values, label=key, marker=marker or ('o' if len(steps) == 1 else None),
                      markersize=4, linewidth=1.2)
    colours[key] = line.get_color()
  return colours


def _plot_final(ax: Axes, metrics: dict[str, Series], keys, colours: dict[str, str]) -> bool:
  """Marks the test evaluation ('eval/' + key) at its step, in the colour of the key's validation curve."""
  drawn = False
  for key in keys:
    if 'eval/' + key not in metrics:
      continue
    steps, values = _finite(metrics['eval/' + key])
    if len(steps):
      # The final number is what a reader looks for: it goes in the label rather than being read off the axis.
      ax.plot(steps, values, linestyle='none', marker='*', markersize=13, markeredgecolor='black',
              markeredgewidth=0.6, color=colours.get(key), label=f'test {key} {values[-1]:.1f}')
      drawn = True
  return drawn


def _plot_oracle(ax: Axes, metrics: dict[str, Series]) -> bool:
  """The ceiling of the validation slice (its last value) as dashed lines; the test slice's if no validation one."""
  drawn = False
  for key, label in ORACLE_KEYS:
    for prefix, suffix in (('val/', ''), ('eval/', ' (test)')):
      values = _finite(metrics[prefix + key])[1] if prefix + key in metrics else ()
      if len(values):
        value = values[-1]
        ax.axhline(value, linestyle='--', linewidth=1.2, color='tab:gray' if 't2i' in key else 'tab:brown',
                   label=f'{label}{suffix} {value:.1f}')
        drawn = True
        break
  return drawn


def _finish(ax: Axes, drawn: bool, title: str, ylabel: str) -> None:
  """Titles, labels and grid; the legend, in two columns once it is long enough to hide the curves, or 'no data'."""
  ax.set_title(title)
  ax.set_ylabel(ylabel)
  if ax.get_subplotspec().is_last_row():  # the step axis is shared: the top row's labels would repeat it
    ax.set_xlabel('step')
  ax.grid(True, alpha=0.3)
  if drawn:
    ax.legend(fontsize=8, loc='best', ncols=2 if len(ax.get_legend_handles_labels()[1]) > 5 else 1)
  else:
    ax.text(0.5, 0.5, 'no data', transform=ax.transAxes, ha='center', va='center', fontsize=14, color='0.5')
    ax.tick_params(axis='y', labelleft=False)  # matplotlib's default 0..1 would read as a measured range


def plot_curves(metrics: dict[str, Series], title: str = '') -> Figure:
  """The four-panel figure (FIGSIZE at DPI) of `read_metrics` output; a panel with none of its keys says 'no data'."""
  Figure, _ = _import_matplotlib()
  fig = Figure(figsize=FIGSIZE, dpi=DPI)
  # One step axis for all panels, so that a validation point lines up with the losses of its step.
  losses, accuracy, retrieval, binding = fig.subplots(2, 2, sharex=True).flat

  drawn = bool(_plot_lines(losses, metrics, LOSS_KEYS))
  _finish(losses, drawn, 'training losses', 'loss')

  drawn = bool(_plot_lines(accuracy, metrics, ACCURACY_KEYS, scale=100.0))
  _finish(accuracy, drawn, 'in-batch accuracy', 'accuracy (%)')

  colours = _plot_lines(retrieval, metrics, RETRIEVAL_KEYS, prefix='val/', marker='o')
  drawn = _plot_final(retrieval, metrics, RETRIEVAL_KEYS, colours)
  drawn = _plot_oracle(retrieval, metrics) or drawn or bool(colours)
  retrieval.set_ybound(lower=0.0)  # R@1 from zero: room below the curves for the legend, and no exaggerated gains
  _finish(retrieval, drawn, 'validation R@1 (test: stars)', 'R@1 (%)')

  colours = _plot_lines(binding, metrics, BINDING_KEYS, prefix='val/', marker='o')
  drawn = _plot_final(binding, metrics, BINDING_KEYS, colours) or bool(colours)
  if drawn:  # chance alone, with no curve to compare, would read as data
    binding.axhline(CHANCE_BINDING, linestyle=':', linewidth=1.2, color='black', label='chance')
    # Curves above chance put the line on the frame, where it is hidden: keep a margin below it.
    binding.set_ybound(lower=min(binding.get_ybound()[0], CHANCE_BINDING - 2.5))
  _finish(binding, drawn, 'binding accuracy (test: stars)', 'accuracy (%)')

  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


# ------------------------------------------------------------------------------------------------------ writing

def write_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike, title: str = '') -> pathlib.Path:
  """Reads `metrics_path`, draws `plot_curves` and writes it as a PNG to `out_path`; returns `out_path`.

  Atomic: written to a temporary file in the same folder, then renamed, so a viewer refreshing the file while
  training runs never sees half a PNG.
  """
  _, FigureCanvasAgg = _import_matplotlib()  # before reading: a missing extra fails at once
  fig = plot_curves(read_metrics(metrics_path), title)
  out_path = pathlib.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  # A unique name per call (threads, processes); open() rather than mkstemp so the PNG gets the umask's mode, not 0600.
  tmp = out_path.with_name(f'.{out_path.name}.{uuid.uuid4().hex}.tmp')
  try:
    with open(tmp, 'xb') as f:
      FigureCanvasAgg(fig).print_png(f)
    os.replace(tmp, out_path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return out_path
