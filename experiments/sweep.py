r"""Trains a grid of settings: scalar hyper-parameters in one vmapped program, the rest in turn.

  python -m experiments.sweep --config=experiments/configs/mlp_mnist.py \
      --sweep='optimizer.lr=[0.01,0.03,0.1] beta=[0.3,0.5]' --workdir=runs/mlp_sweep

``--sweep`` (or the config's ``sweep`` field) is ``<field>=[v1,v2,...]`` per field, separated
by spaces; the grid is every combination. Fields in ``tp_jax.sweep.VMAPPED`` (seed, beta,
optimizer.lr/momentum/weight_decay, feedback.noise/lr/momentum) become members of one
program's leading axis, times ``num_seeds``; every other field (model, feedback.iterations,
batch_size, method, ...) runs one program per value, one after the other. Each member equals
the separate ``experiments.train`` run of its setting. Bad input (an unknown field, a
non-numeric value of a vmapped field, an empty grid, a bad config of any setting) is one
``error: ...`` line before anything is compiled.

The workdir gets ``results.md`` and ``results.csv`` (every setting's final test and train
accuracy, mean over seeds, ranked), ``best_config.py`` (the best setting, for
``experiments.train --config=``), ``test_accuracy.png`` (test accuracy against the first
swept number), ``sweep.json``, and ``programs/<i>/``, each program's training workdir (which
resumes as ``experiments.train``'s does).

``--compare_sequential`` then trains every member again as its own program (under
``sequential/``) and prints the wall-clock per member of both ways, with the hardware:
the throughput of one program against separate runs. ``--sweep='seed=[0,1,2,3,4]'`` measures
5 seeds in one program against 5 runs. ``--synthetic`` trains on random images of the
dataset's shapes (``experiments/synthetic.py``): smoke tests, timings without the data files.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import pprint
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import synthetic
from tp_jax import config as config_lib
from tp_jax import data
from tp_jax import plot
from tp_jax import sweep
from tp_jax import train


def run(cfg, workdir, dataset: data.Dataset | None = None, log: Callable = print) -> list[dict]:
  """Trains ``cfg.sweep``'s grid into ``workdir`` and writes the table, best config and
  figure; returns the table's rows, best first. Raises ConfigError before anything is
  compiled for a bad grid or a bad config of any setting."""
  workdir = Path(workdir)
  programs = sweep.programs(cfg)
  grid = sweep.grid_of(cfg)
  workdir.mkdir(parents=True, exist_ok=True)
  members = []  # (program index, member's full setting, seed, result values)
  t0 = time.perf_counter()
  for i, (structural, program) in enumerate(programs):
    log(f'program {i + 1}/{len(programs)}: {sweep.name(structural) or "every setting"}')
    result = train.train_and_evaluate(program, workdir / 'programs' / str(i), dataset, log)
    program_members = sweep.members(program)
    for m, member in enumerate(program_members):
      # result.json holds one value per member, a list when there are several
      value = lambda k, m=m: result[k][m] if len(program_members) > 1 else result[k]
      members.append(
          dict(
              program=i,
              setting={**structural, **member.setting},
              seed=member.seed,
              test_accuracy=value('test_accuracy'),
              train_accuracy=value('train_accuracy'),
          )
      )
  wall_s = time.perf_counter() - t0
  rows = table(grid, members)
  _write_table(workdir, grid, rows)
  best = sweep.apply(cfg, rows[0]['setting'])
  best.sweep = ''
  write_config(
      best,
      workdir / 'best_config.py',
      f'The best setting of the sweep {sweep.text(grid)}: {sweep.name(rows[0]["setting"])}, '
      f'test accuracy {100 * rows[0]["test_accuracy"]:.2f}% (mean of seeds {rows[0]["seeds"]}).',
  )
  figure(grid, rows, workdir / 'test_accuracy.png')
  (workdir / 'sweep.json').write_text(
      json.dumps(
          dict(
              sweep=cfg.sweep,
              programs=[sweep.name(s) for s, _ in programs],
              wall_s=wall_s,
              hardware=train.hardware(),
              rows=rows,
          ),
          indent=1,
          default=str,
      )
  )
  log(f'best: {sweep.name(rows[0]["setting"])}  test {100 * rows[0]["test_accuracy"]:.2f}%')
  return rows


def table(grid: sweep.Grid, members: list[dict]) -> list[dict]:
  """One row per setting of ``grid`` (its seeds' mean accuracies), best test accuracy first."""
  by_setting: dict[str, list[dict]] = {}
  for m in members:
    setting = {k: m['setting'][k] for k in grid if k != 'seed'}
    by_setting.setdefault(sweep.name(setting), []).append(dict(m, setting=setting))
  rows = []
  for group in by_setting.values():
    test = [m['test_accuracy'] for m in group]
    rows.append(
        dict(
            setting=group[0]['setting'],
            program=group[0]['program'],
            seeds=[m['seed'] for m in group],
            test_accuracy=float(np.mean(test)),
            test_accuracy_min=float(np.min(test)),
            test_accuracy_max=float(np.max(test)),
            train_accuracy=float(np.mean([m['train_accuracy'] for m in group])),
        )
    )
  rows.sort(key=lambda r: (-r['test_accuracy'], -r['train_accuracy']))
  return [dict(rank=i + 1, **r) for i, r in enumerate(rows)]


def _write_table(workdir: Path, grid: sweep.Grid, rows: list[dict]) -> None:
  """results.csv (accuracies as fractions, seeds' min and max too) and results.md (%)."""
  fields = [k for k in grid if k != 'seed']
  accuracies = ('test_accuracy', 'test_accuracy_min', 'test_accuracy_max', 'train_accuracy')
  head = ['rank', *fields, 'seeds', *accuracies, 'program']
  cells = [
      [r['rank'], *(r['setting'][k] for k in fields), ' '.join(map(str, r['seeds']))]
      + [r[k] for k in accuracies]
      + [r['program']]
      for r in rows
  ]
  with open(workdir / 'results.csv', 'w', newline='') as f:
    csv.writer(f).writerows([head, *cells])
  md_head = ['rank', *fields, 'seeds', 'test accuracy (%)', 'train accuracy (%)', 'program']
  md = [
      '| ' + ' | '.join(md_head) + ' |',
      '|' + '---|' * len(md_head),
      *(
          f'| {" | ".join(map(str, c[: len(fields) + 2]))} | {100 * r["test_accuracy"]:.2f} | '
          f'{100 * r["train_accuracy"]:.2f} | {r["program"]} |'
          for c, r in zip(cells, rows)
      ),
  ]
  (workdir / 'results.md').write_text(
      f'Sweep `{sweep.text(grid)}`: final accuracies, mean over the seeds, best first.\n\n'
      + '\n'.join(md)
      + '\n'
  )


def write_config(cfg, path: Path, what: str) -> None:
  """``cfg`` as a config file that ``experiments.train --config=`` reads."""
  path.write_text(
      f'r"""{what}\n\n  python -m experiments.train --config={path} --workdir=...\n"""\n\n'
      'import ml_collections\n\n\n'
      'def get_config():\n'
      '  return ml_collections.ConfigDict(\n'
      + textwrap.indent(pprint.pformat(cfg.to_dict(), width=94, sort_dicts=False), ' ' * 6)
      + '\n  )\n'
  )


def figure(grid: sweep.Grid, rows: list[dict], out: Path) -> Path | None:
  """Test accuracy (mean and min-max over seeds) against the swept field of numbers with
  the most values, one line per setting of the other fields; None without matplotlib."""
  if importlib.util.find_spec('matplotlib') is None:  # the optional plots extra
    return None
  fields = [k for k in grid if k != 'seed']
  numeric = [k for k in fields if all(config_lib.is_number(v) for v in grid[k])]
  x_field = max(numeric, key=lambda k: len(grid[k])) if numeric else None  # most values
  lines: dict[str, list[dict]] = {}
  for r in rows:
    rest = {k: v for k, v in r['setting'].items() if k != x_field}
    lines.setdefault(sweep.name(rest), []).append(r)
  drawn = []
  for label, group in lines.items():
    group.sort(key=lambda r: r['setting'][x_field] if x_field else r['rank'])
    x = [r['setting'][x_field] if x_field else r['rank'] for r in group]
    y = [100 * r['test_accuracy'] for r in group]
    band = (
        [100 * r['test_accuracy_min'] for r in group],
        [100 * r['test_accuracy_max'] for r in group],
    )
    drawn.append(
        plot.Line(label or 'test', x, y, '-o', band=band if len(group[0]['seeds']) > 1 else None)
    )
  log_x = bool(x_field) and min(grid[x_field]) > 0 and max(grid[x_field]) >= 10 * min(grid[x_field])
  panel = plot.Panel(
      'test accuracy (mean, min-max over seeds)',
      x_field or 'rank',
      '%',
      drawn,
      log_x=log_x,
  )
  return plot.save_figure([[panel]], out, f'sweep {sweep.text(grid)}')


def compare_sequential(cfg, workdir, dataset=None, log: Callable = print) -> dict[str, Any]:
  """The sweep (``run``), then each member as its own program, the sequential runs;
  prints and returns, per member, the wall-clock of both ways (compile included) and the
  training seconds alone (epochs, without compile and evaluation), with the hardware.
  The dataset is loaded once for all; the sequential runs go without diagnostics, as a
  program of several members does. Writes ``compare_sequential.json``."""
  workdir = Path(workdir)
  if dataset is None and 'dataset' not in sweep.grid_of(cfg):
    dataset = data.load_dataset(
        cfg.dataset, cfg.data_dir or None, verify=cfg.verify_checksums, backend=cfg.data_backend
    )
  t0 = time.perf_counter()
  run(cfg, workdir / 'together', dataset, log)
  together = dict(wall_s=time.perf_counter() - t0, train_s=0.0)
  programs = sweep.programs(cfg)
  for i in range(len(programs)):
    together['train_s'] += _train_seconds(workdir / 'together' / 'programs' / str(i))
  separate = []
  for i, (_, program) in enumerate(programs):
    for m, member in enumerate(sweep.members(program)):
      one = sweep.member_config(program, member)
      one.diagnostics = False
      t0 = time.perf_counter()
      train.train_and_evaluate(one, workdir / 'sequential' / f'{i}_{m}', dataset, log)
      wall_s = time.perf_counter() - t0
      train_s = _train_seconds(workdir / 'sequential' / f'{i}_{m}')
      separate.append(dict(member=member.label, program=i, wall_s=wall_s, train_s=train_s))
  n = len(separate)
  out = dict(
      sweep=cfg.sweep,
      members=n,
      together=together,
      sequential=separate,
      per_member=dict(
          together_wall_s=together['wall_s'] / n,
          sequential_wall_s=float(np.mean([s['wall_s'] for s in separate])),
          together_train_s=together['train_s'] / n,
          sequential_train_s=float(np.mean([s['train_s'] for s in separate])),
      ),
      hardware=train.hardware(),
  )
  (workdir / 'compare_sequential.json').write_text(json.dumps(out, indent=1))
  hw, per = out['hardware'], out['per_member']
  log(
      f'hardware: {hw["backend"]} x{hw["num_devices"]} ({hw["devices"][0]}), '
      f'{hw["cpu_count"]} CPUs, {hw["platform"]}, jax {hw["jax"]}'
  )
  for s in separate:
    log(f'sequential  {s["member"]}: {s["wall_s"]:.1f} s wall, {s["train_s"]:.1f} s training')
  for what in ('wall', 'train'):
    one, alone = per[f'together_{what}_s'], per[f'sequential_{what}_s']
    log(
        f'{n} members, {"wall-clock (compile included)" if what == "wall" else "training"} '
        f'per member: one program {one:.2f} s, sequential {alone:.2f} s ({alone / one:.2f}x)'
    )
  return out


def _train_seconds(workdir: Path) -> float:
  """The training seconds of a finished run (compile and evaluation left out)."""
  return float(json.loads((workdir / 'result.json').read_text())['train_s'])


def define_flags() -> None:
  """Defined only when run as a program, so that importing the module (tests) never
  collides with another binary's flags of the same name."""
  config_flags.DEFINE_config_file(
      'config', 'experiments/configs/lenet_mnist.py', 'Base config file.', lock_config=True
  )
  flags.DEFINE_string(
      'sweep',
      None,
      "The grid, e.g. 'optimizer.lr=[0.01,0.03] beta=[0.3,0.5]' (default: " 'config.sweep).',
  )
  flags.DEFINE_string('workdir', 'runs/sweep', 'Where the sweep writes its results.')
  flags.DEFINE_string('data_dir', None, 'Dataset root (overrides config.data_dir).')
  flags.DEFINE_bool('synthetic', False, "Random images of the dataset's shapes, not its files.")
  flags.DEFINE_bool(
      'compare_sequential', False, 'Then train each member as its own program; print both times.'
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f['verbosity'].present:  # Orbax and JAX log at INFO
    logging.set_verbosity(logging.WARNING)
  cfg = f.config
  with cfg.unlocked():
    if f.sweep is not None:
      cfg.sweep = f.sweep
    if f.data_dir:
      cfg.data_dir = f.data_dir
  try:
    sweep.programs(cfg)  # every setting checked before a dataset is loaded
    dataset = synthetic.dataset(cfg.dataset) if f.synthetic else None
    if f.compare_sequential:
      compare_sequential(cfg, f.workdir, dataset)
    else:
      run(cfg, f.workdir, dataset)
  except train.REPORTED_ERRORS as e:
    print(f'error: {type(e).__name__}: {e}', file=sys.stderr)
    return 1
  print(f'-> {f.workdir}/results.md')
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main)
