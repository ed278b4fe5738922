"""Learning curves as PNG: of training workdirs (``plot_runs``), and the one figure
builder (``save_figure``) every curve plot of the project draws with.

matplotlib is an optional dependency (the ``plots`` extra); it is imported when a
figure is drawn. The object-oriented API draws on an Agg canvas without touching
pyplot's backend, so a notebook's inline plots keep working.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from tp_jax import train


@dataclasses.dataclass(frozen=True)
class Line:
  label: str
  x: Sequence[float]
  y: Sequence[float]
  style: str = '-'  # a matplotlib format string
  color: str | None = None
  alpha: float = 1.0
  band: tuple[Sequence[float], Sequence[float]] | None = None  # (low, high), shaded


@dataclasses.dataclass(frozen=True)
class Panel:
  title: str
  xlabel: str
  ylabel: str
  lines: Sequence[Line]
  log_y: bool = False
  integer_x: bool = False  # epochs: integer ticks
  log_x: bool = False
  xticks: Sequence[float] | None = None  # ticks at exactly these x values
  plain_numbers: bool = False  # log axes labelled 20, 0.5 rather than 2x10^1, 5x10^-1


def save_figure(
    grid: Sequence[Sequence[Panel]],
    out: str | Path,
    title: str | None = None,
    panel_size: tuple[float, float] = (4.2, 3.4),
    dpi: int = 110,
) -> Path:
  """Draws ``grid`` (rows of panels, all rows the same length) into the PNG ``out``."""
  import matplotlib.figure  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top

  nrows, ncols = len(grid), len(grid[0])
  fig = matplotlib.figure.Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows))
  axes = fig.subplots(nrows, ncols, squeeze=False)
  for i, row in enumerate(grid):
    for j, panel in enumerate(row):
      ax = axes[i, j]
      for line in panel.lines:
        (drawn,) = ax.plot(
            line.x, line.y, line.style, color=line.color, alpha=line.alpha, label=line.label
        )
        if line.band is not None:
          ax.fill_between(
              line.x, *line.band, color=drawn.get_color(), alpha=0.2 * line.alpha, linewidth=0
          )
      ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
      if panel.log_y:
        ax.set_yscale('log')
      if panel.log_x:
        ax.set_xscale('log')
      if panel.integer_x:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
      if panel.plain_numbers:
        for axis, log in ((ax.xaxis, panel.log_x), (ax.yaxis, panel.log_y)):
          if log:
            axis.set_major_formatter(matplotlib.ticker.LogFormatter())
            axis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
      if panel.xticks is not None:
        ax.set_xticks(list(panel.xticks), [f'{v:g}' for v in panel.xticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
      ax.grid(alpha=0.3)
      if panel.lines:
        ax.legend(fontsize=7)
  if title:
    # Wrapped to the figure's width (about 11 characters an inch at suptitle's size):
    # a table's title runs past a single panel's edges.
    fig.suptitle(textwrap.fill(title, width=int(11 * panel_size[0] * ncols)))
  fig.tight_layout()
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=dpi)
  return out


def read_history(workdir: str | Path) -> list[dict]:
  """A workdir's metrics.jsonl rows; a clear error when there is none yet."""
  path = Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    raise FileNotFoundError(
        f'{path} not found: is {workdir} a training workdir '
        f'(python -m experiments.train --workdir=...)?'
    )
  rows = train.read_history(path)
  if not rows:
    raise ValueError(f'{path} has no rows yet: no epoch has finished')
  return rows


def run_label(workdir: str | Path) -> str:
  """'method (model[, directory])' from result.json, else the directory's name."""
  result = Path(workdir) / 'result.json'
  if result.exists():
    try:
      cfg = json.loads(result.read_text())['config']
      name = Path(workdir).name
      where = '' if name == cfg['method'] else f', {name}'
      return f'{cfg["method"]} ({cfg["model"]}{where})'
    except (KeyError, ValueError):
      pass
  return Path(workdir).name


def num_seeds(rows: list[dict]) -> int:
  """Seeds of a workdir's metrics rows: a ``num_seeds`` > 1 run has per-seed lists."""
  accuracy = rows[0]['train_accuracy']
  return len(accuracy) if isinstance(accuracy, list) else 1


def seed_line(
    label: str,
    x: Sequence[float],
    per_seed: Sequence[Sequence[float]],
    style: str = '-',
    color: str | None = None,
    alpha: float = 1.0,
) -> Line:
  """The line of ``per_seed`` [seeds][len(x)] values: one seed's own values, or the mean
  over the seeds with a min-max band."""
  if len(per_seed) == 1:
    return Line(label, x, per_seed[0], style, color, alpha)
  y = np.asarray(per_seed, np.float64)
  return Line(
      f'{label} (mean, min-max of {len(y)} seeds)',
      x,
      list(y.mean(0)),
      style,
      color,
      alpha,
      band=(list(y.min(0)), list(y.max(0))),
  )


# (row key, panel title, y label, log scale): per-block lists of a metrics row.
PER_BLOCK = [
    ('block_loss', 'per-block local loss', 'loss', True),
    ('feedback_loss', 'feedback loss (LDRL/DTP)', 'loss', False),
    ('bp_angle', "angle of the TP update to BP's gradient", 'degrees', False),
    ('bp_norm_ratio', '|TP update| / |beta BP gradient|', 'ratio', True),
    ('tjml', 'relative TJML of the feedback (blocks 2..N)', 'relative TJML', True),
]


def plot_runs(
    workdirs: Sequence[str | Path], out: str | Path | None = None, title: str | None = None
) -> Path:
  """Train/test accuracy and loss per epoch of ``workdirs`` overlaid, and a panel per
  per-block quantity the rows hold; into ``out`` (default: <first workdir>/curves.png).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  if not workdirs:
    raise ValueError('give at least one workdir')
  runs = [(run_label(w), read_history(w)) for w in workdirs]
  colors = matplotlib.rcParams['axes.prop_cycle'].by_key()['color']
  accuracy, loss = [], []
  per_block = {key: [] for key, *_ in PER_BLOCK}
  for i, (label, rows) in enumerate(runs):
    c = colors[i % len(colors)]
    ep = [r['epoch'] for r in rows]
    seeds = num_seeds(rows)
    seed_rows = [[train.split_members(r, seeds)[s] for r in rows] for s in range(seeds)]
    for split, style in (('train', '--'), ('test', '-')):
      accuracy.append(
          seed_line(
              f'{label} {split}',
              ep,
              [[100 * r[f'{split}_accuracy'] for r in h] for h in seed_rows],
              style,
              c,
          )
      )
      loss.append(
          seed_line(
              f'{label} {split}', ep, [[r[f'{split}_loss'] for r in h] for h in seed_rows], style, c
          )
      )
    for key in per_block:
      have = [r['epoch'] for r in rows if key in r]
      if not have:
        continue
      values = [[r[key] for r in h if key in r] for h in seed_rows]  # [seed][epoch][block]
      nblocks = len(values[0][0])
      for b in range(nblocks):
        per_block[key].append(
            seed_line(
                f'{label} block {b + 1}' if len(runs) > 1 else f'block {b + 1}',
                have,
                [[v[b] for v in h] for h in values],
                '-',
                c,
                alpha=0.35 + 0.65 * (b + 1) / nblocks,
            )
        )
  panels = [
      Panel('accuracy', 'epoch', '%', accuracy, integer_x=True),
      Panel('cross-entropy', 'epoch', 'loss', loss, integer_x=True),
  ]
  panels += [
      Panel(name, 'epoch', ylabel, per_block[key], log_y=log, integer_x=True)
      for key, name, ylabel, log in PER_BLOCK
      if per_block[key]
  ]
  return save_figure([panels], Path(out) if out else Path(workdirs[0]) / 'curves.png', title)
