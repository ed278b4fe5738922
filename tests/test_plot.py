"""tp_jax.plot and experiments.plot: learning curves from metrics.jsonl as PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('matplotlib')

from tp_jax import plot  # pylint: disable=g-import-not-at-top

ROOT = Path(__file__).resolve().parents[1]


def _run(workdir: Path, method: str, blocks: int | None, epochs: int = 3) -> Path:
  workdir.mkdir(parents=True)
  rows = []
  for e in range(1, epochs + 1):
    row = dict(
        epoch=e,
        step=10 * e,
        train_loss=2.0 / e,
        train_accuracy=0.3 * e / epochs,
        test_loss=2.1 / e,
        test_accuracy=0.28 * e / epochs,
    )
    if blocks:
      row['block_loss'] = [0.1 * (b + 1) / e for b in range(blocks)]
    rows.append(row)
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (workdir / 'result.json').write_text(json.dumps(dict(config=dict(method=method, model='lenet'))))
  return workdir


def _is_png(path: Path) -> bool:
  return path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_plot_one_and_two_runs(tmp_path):
  tp = _run(tmp_path / 'tp', 'tjml_dtp', blocks=4)
  bp = _run(tmp_path / 'bp', 'bp', blocks=None)
  out = plot.plot_runs([tp])
  assert out == tp / 'curves.png' and _is_png(out)
  both = plot.plot_runs([tp, bp], tmp_path / 'both.png', title='TJML-DTP vs BP')
  assert _is_png(both)
  # With the per-block panel the figure is wider than without it.
  import matplotlib.image  # pylint: disable=g-import-not-at-top

  w_tp = matplotlib.image.imread(out).shape[1]
  w_bp = matplotlib.image.imread(plot.plot_runs([bp], tmp_path / 'bp.png')).shape[1]
  assert w_tp > w_bp
  assert plot.run_label(tp).startswith('tjml_dtp (lenet')


@pytest.mark.parametrize('ncols', [1, 3])
def test_a_long_title_stays_inside_the_figure(tmp_path, monkeypatch, ncols):
  import matplotlib.backends.backend_agg  # pylint: disable=g-import-not-at-top
  import matplotlib.figure  # pylint: disable=g-import-not-at-top

  saved, savefig = [], matplotlib.figure.Figure.savefig

  def recording_savefig(fig, *args, **kwargs):
    saved.append(fig)
    return savefig(fig, *args, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', recording_savefig)
  panel = plot.Panel('a panel', 'x', 'y', [plot.Line('l', [0, 1], [0, 1])])
  title = 'LeNet on MNIST, Fashion-MNIST and CIFAR-10: accuracy against training time ' * ncols
  plot.save_figure([[panel] * ncols], tmp_path / 'f.png', title=title)
  (fig,) = saved
  renderer = matplotlib.backends.backend_agg.FigureCanvasAgg(fig).get_renderer()
  box = fig._suptitle.get_window_extent(renderer)  # pylint: disable=protected-access
  assert 0 <= box.x0 and box.x1 <= fig.bbox.width, (box, fig.bbox)
  assert fig._suptitle.get_text().split() == title.split()  # pylint: disable=protected-access


def test_missing_or_empty_metrics_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='metrics.jsonl not found'):
    plot.plot_runs([tmp_path])
  (tmp_path / 'metrics.jsonl').write_text('')
  with pytest.raises(ValueError, match='no rows yet'):
    plot.plot_runs([tmp_path])


@pytest.mark.slow
def test_command_line(tmp_path):
  tp = _run(tmp_path / 'tp', 'tjml_dtp', blocks=2)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  p = subprocess.run(
      [sys.executable, '-m', 'experiments.plot', f'--workdir={tp}', f'--out={tmp_path / "x.png"}'],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert p.returncode == 0, p.stderr
  assert _is_png(tmp_path / 'x.png')
  p = subprocess.run(
      [sys.executable, '-m', 'experiments.plot', f'--workdir={tmp_path / "nothing"}'],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert p.returncode != 0 and 'metrics.jsonl not found' in p.stderr


def test_progress_line_and_eta():
  from tp_jax import metrics_writer  # pylint: disable=g-import-not-at-top

  line = metrics_writer.progress_line(
      2, 10, 50, 200, elapsed_s=5.0, run_steps_left=1350, loss=0.25, width=10
  )
  assert line.startswith('epoch 2/10 [##--------] 50/200')
  assert '100.0 ms/step' in line and 'ETA 0:15' in line and 'run ETA 2:15' in line
  assert line.endswith('loss 0.2500')
  assert 'ETA ?' in metrics_writer.progress_line(1, 1, 0, 10, 0.0)
  assert metrics_writer.format_duration(3725) == '1:02:05'
  import io  # pylint: disable=g-import-not-at-top

  out = io.StringIO()
  bar = metrics_writer.Progress(True, out)
  bar.update('abc')
  bar.update('x')
  bar.clear()
  assert out.getvalue() == '\rabc\rx  \r \r'
  silent = io.StringIO()
  metrics_writer.Progress(False, silent).update('abc')
  assert not silent.getvalue()
