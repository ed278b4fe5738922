r"""Learning curves of one or more training runs as a PNG.

  python -m experiments.plot --workdir=runs/lenet_mnist_tjml [--workdir=runs/lenet_bp ...]
      [--out=curves.png]

Reads each workdir's metrics.jsonl (one row per epoch, written by tp_jax.train) and
draws train/test accuracy, train/test loss, and, where the rows have them, the
per-block local losses of the TP methods, the feedback losses of LDRL/DTP and
per-block JMLs (``block_jml``). Several workdirs are overlaid, labelled by their
method (from result.json or the checkpoint-free config in metrics) or directory name.
Default output: <first workdir>/curves.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_multi_string('workdir', None, 'Run directory holding metrics.jsonl; '
                                     'repeat to overlay runs.')
_OUT = flags.DEFINE_string('out', None, 'PNG path (default: <first workdir>/curves.png).')
_TITLE = flags.DEFINE_string('title', None, 'Figure title.')


def read_history(workdir: str | Path) -> list[dict]:
  path = Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    raise FileNotFoundError(f'{path} not found: is {workdir} a training workdir '
                            f'(python -m experiments.train --workdir=...)?')
  rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  if not rows:
    raise ValueError(f'{path} has no rows yet: no epoch has finished')
  return rows


def run_label(workdir: str | Path) -> str:
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


# (row key, panel title, y label, log scale)
PER_BLOCK = [('block_loss', 'per-block local loss', 'loss', True),
             ('feedback_loss', 'feedback loss (LDRL/DTP)', 'loss', False),
             ('block_jml', 'per-block TJML', 'TJML', True)]


def plot_runs(workdirs: Sequence[str | Path], out: str | Path | None = None,
              title: str | None = None) -> Path:
  """Draws the curves of ``workdirs`` into ``out`` (PNG); returns its path."""
  # The object-oriented API draws on an Agg canvas without touching pyplot's backend
  # (so a notebook's inline plots keep working).
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.figure  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top

  if not workdirs:
    raise ValueError('give at least one workdir')
  runs = [(run_label(w), read_history(w)) for w in workdirs]
  extra = [p for p in PER_BLOCK if any(p[0] in r for _, rows in runs for r in rows)]
  ncols = 2 + len(extra)
  fig = matplotlib.figure.Figure(figsize=(4.2 * ncols, 3.4))
  axes = fig.subplots(1, ncols, squeeze=False)[0]
  colors = matplotlib.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (label, rows) in enumerate(runs):
    c = colors[i % len(colors)]
    ep = [r['epoch'] for r in rows]
    axes[0].plot(ep, [100 * r['train_accuracy'] for r in rows], '--', color=c,
                 label=f'{label} train')
    axes[0].plot(ep, [100 * r['test_accuracy'] for r in rows], '-', color=c,
                 label=f'{label} test')
    axes[1].plot(ep, [r['train_loss'] for r in rows], '--', color=c, label=f'{label} train')
    axes[1].plot(ep, [r['test_loss'] for r in rows], '-', color=c, label=f'{label} test')
    for ax, (key, _, _, _) in zip(axes[2:], extra):
      have = [(r['epoch'], r[key]) for r in rows if key in r]
      if not have:
        continue
      nblocks = len(have[0][1])
      for b in range(nblocks):
        ax.plot([e for e, _ in have], [v[b] for _, v in have], color=c,
                alpha=0.35 + 0.65 * (b + 1) / nblocks,
                label=f'{label} block {b + 1}' if len(runs) > 1 else f'block {b + 1}')
  axes[0].set(title='accuracy', xlabel='epoch', ylabel='%')
  axes[1].set(title='cross-entropy', xlabel='epoch', ylabel='loss')
  for ax, (_, name, ylabel, log) in zip(axes[2:], extra):
    ax.set(title=name, xlabel='epoch', ylabel=ylabel)
    if log:
      ax.set_yscale('log')
  for ax in axes:
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  out = Path(out) if out else Path(workdirs[0]) / 'curves.png'
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  out = plot_runs(_WORKDIR.value, _OUT.value, _TITLE.value)
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
