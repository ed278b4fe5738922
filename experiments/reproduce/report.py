"""The files of a table, generated from whatever results exist: ``table<T>.md``
(header, one row per column and method, the performance targets) and
``table<T>_curves.png``."""

from __future__ import annotations

import datetime
import json
import re
import statistics
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from experiments.reproduce.accuracy import DIVERGED, run_dir
from experiments.reproduce.tables import (
    DATASET_NAMES,
    PAPER_TEST_ACC,
    TABLE_TITLES,
    TABLES,
    TARGET_SPEEDUP_OVER_LDRL,
    TARGET_TJML_OVER_BP,
    Column,
    Profile,
    full_epoch_steps,
    make_config,
    select_columns,
)
from tp_jax import data
from tp_jax import plot
from tp_jax import train

Log = Callable[[str], None]


def _fmt_mean_std(values: Sequence[float], digits: int = 2) -> str:
  """One seed's value, or the mean ± sample std over seeds; '' for none."""
  if not values:
    return ''
  if len(values) == 1:
    return f'{values[0]:.{digits}f}'
  return f'{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}'


def seed_values(result: dict, key: str, row: dict | None = None) -> list:
  """Each seed's value of ``key`` in ``result`` or in ``row``, one of its metrics rows
  (a num_seeds run holds per-seed lists)."""
  v = (result if row is None else row)[key]
  return v if result['config'].get('num_seeds', 1) > 1 else [v]


def _fmt_acc(result: dict | None, key: str) -> str:
  if result is None or key not in result:
    return ''
  return _fmt_mean_std([100 * v for v in seed_values(result, key)])


def final_bp_angle(result: dict) -> list[float] | None:
  """Each seed's mean over blocks of the last epoch's ``bp_angle`` (degrees), None
  when the run has none (BP, or diagnostics off)."""
  last = result['history'][-1] if result['history'] else {}
  if 'bp_angle' not in last:
    return None
  return [float(np.nanmean(angles)) for angles in seed_values(result, 'bp_angle', last)]


def _result(root: Path, col: Column, method: str, seeds: Sequence[int]) -> dict | None:
  f = run_dir(root, col, method, seeds) / 'result.json'
  return json.loads(f.read_text()) if f.exists() else None


def _diverged(root: Path, col: Column, method: str, seeds: Sequence[int]) -> list[str]:
  """'seed S at step N' for each seed whose training diverged (the run then has no
  result: one program trains all the seeds)."""
  f = run_dir(root, col, method, seeds) / DIVERGED
  if not f.exists():
    return []
  msg = json.loads(f.read_text())['diverged']
  if len(seeds) == 1:
    step = re.search(r'at step (\d+)', msg)
    return [f'seed {seeds[0]} at step {step.group(1) if step else "?"}']
  found = re.findall(r'seed (\d+): training diverged at step (\d+)', msg)
  return [f'seed {s} at step {n}' for s, n in found] or ['at step ?']


def _trained(result: dict | None, col: Column, diverged: Sequence[str] = ()) -> str:
  """How much training the accuracy reflects: epochs, or steps when partial (and the
  wall-clock budget that bought them); and which seeds diverged."""
  if diverged:
    return f'diverged: {", ".join(diverged)}'
  if result is None:
    return ''
  steps = result['step']
  full = full_epoch_steps(col.dataset, result['config']['batch_size'])
  budget = result['config'].get('train_seconds', 0.0)
  if budget:
    return f'{steps} steps ({steps / full:.2f} ep) in a {budget:.1f} s budget'
  if result['steps_per_epoch'] >= full:
    return f'{result["epochs"]} ep'
  return f'{steps} steps ({steps / full:.2f} ep)'


def hardware_line(hw: dict) -> str:
  return (
      f'{hw["backend"]} ({", ".join(sorted(set(hw["devices"])))} x{hw["num_devices"]}), '
      f'{hw["cpu_count"]} CPU cores visible, {hw["platform"]}, jax {hw["jax"]}'
  )


def _speeds(root: Path, table: int) -> dict[str, dict]:
  """Column id -> its speed file's content (columns not timed yet are left out)."""
  out = {}
  for col in TABLES[table]:
    f = root / f'speed_{col.id}.json'
    if f.exists():
      out[col.id] = json.loads(f.read_text())
  return out


def write_table(
    table: int,
    profile: Profile,
    root: Path,
    seeds: Sequence[int],
    command: str,
    log: Log,
    columns: Sequence[str] | None = None,
) -> Path:
  """``table<T>.md``, ``table<T>_curves.png`` and ``table<T>_time.png`` from the
  results under ``root`` (of the ``columns`` given, default all)."""
  cols = select_columns(table, columns)
  speeds = _speeds(root, table)
  lines_rows = []
  curves: dict[str, tuple[str, dict[str, dict]]] = {}
  results: dict[tuple[str, str], dict] = {}
  speed_notes, targets = [], []
  hardware = train.hardware()
  for col in cols:
    speed = speeds.get(col.id)
    sm = dict(speed['methods']) if speed else {}
    if speed and speed.get('joint'):  # timed together: compare with any column's LDRL/BP
      for other in speed['joint']:
        for m, v in speeds.get(other, {}).get('methods', {}).items():
          sm.setdefault(m, v)
    if speed:
      hardware = speed['hardware']
      note = (
          f'{col.title}: measured {speed["date"]}, load average '
          f'{speed["loadavg_before"][0]:.1f} before / {speed["loadavg_after"][0]:.1f} '
          f'after'
      )
      if speed.get('same_step_as'):
        note = (
            f'{col.title}: the same step as {DATASET_NAMES[speed["same_step_as"]]} '
            f'(same model, shapes and config), so its measurement is reused'
        )
      if speed.get('joint'):
        note = (
            f'{col.title}: timed in one interleaved session with '
            f'{", ".join(c.title for c in cols if c.id != col.id)} '
            f'({speed["date"]}); speed vs BP is vs that session\'s BP'
        )
      speed_notes.append(note)
    curves[col.id] = (col.title, {})
    for method in col.methods:
      res = _result(root, col, method, seeds)
      if res is not None:
        curves[col.id][1][col.label(method)] = res
        results[col.id, method] = res
      paper = PAPER_TEST_ACC.get((table, col.id, method))
      angle = final_bp_angle(res) if res else None
      row = [
          col.title,
          col.label(method),
          _trained(res, col, _diverged(root, col, method, seeds)),
          _fmt_acc(res, 'train_accuracy'),
          _fmt_acc(res, 'test_accuracy'),
          f'{paper:.1f}' if paper is not None else '',
          '' if angle is None else _fmt_mean_std(angle, 1),
      ]
      if speed and method in speed['methods']:
        mine = speed['methods'][method]
        ms = mine['ms_per_step']
        gflop = mine.get('gflop_per_step')
        row += [
            f'{ms:.1f}',
            '' if gflop is None else f'{gflop:.2f}',
            f'{mine["epoch_s"]:.1f}',
            f'×{sm["ldrl"]["epoch_s"] / mine["epoch_s"]:.2f}' if 'ldrl' in sm else '',
            f'×{sm["bp"]["epoch_s"] / mine["epoch_s"]:.2f}' if 'bp' in sm else '',
        ]
      else:
        row += [''] * 5
      lines_rows.append('| ' + ' | '.join(row) + ' |')
    if table in TARGET_TJML_OVER_BP and 'tjml_dtp' in sm and 'bp' in sm:
      ratio = sm['tjml_dtp']['ms_per_step'] / sm['bp']['ms_per_step']
      lim = TARGET_TJML_OVER_BP[table]
      flops = [sm[m].get('gflop_per_step') for m in ('tjml_dtp', 'bp')]
      flop_note = f'; GFLOP ratio {flops[0] / flops[1]:.2f}' if all(flops) else ''
      targets.append(
          f'- {col.title}: TJML-DTP time per step / BP = {ratio:.2f}{flop_note} '
          f'(target ≤ {lim}: {"met" if ratio <= lim else "NOT met"})'
      )
    if table in TARGET_SPEEDUP_OVER_LDRL and 'tjml_dtp' in sm and 'ldrl' in sm:
      up = sm['ldrl']['epoch_s'] / sm['tjml_dtp']['epoch_s']
      lim = TARGET_SPEEDUP_OVER_LDRL[table]
      targets.append(
          f'- {col.title}: TJML-DTP speed per epoch vs LDRL = ×{up:.1f} '
          f'(target ≥ ×{lim:g}: {"met" if up >= lim else "NOT met"})'
      )

  speed_commands = sorted({s['command'] for s in speeds.values() if s.get('command')})
  epochs_desc = []
  for col in cols:
    for method in col.methods:
      cfg = make_config(col, method, profile, seeds[0], len(seeds))
      spe = full_epoch_steps(col.dataset, cfg.batch_size)
      steps = min(cfg.steps_per_epoch or spe, spe)
      what = f'{cfg.epochs} ep' if steps == spe else f'{cfg.epochs} × {steps} steps'
      budget = results.get((col.id, method), {}).get('config', {}).get('train_seconds')
      if budget or (method == 'ldrl' and profile.ldrl_budget):
        what = (
            f'at most {what}, stopped after a training budget of '
            + (f'{budget:.1f} s' if budget else "TJML-DTP's training seconds")
            + (" (TJML-DTP's training seconds)" if budget and profile.ldrl_budget else '')
        )
      item = f'{col.label(method)} {what}'
      if len({c.model_name for c in cols}) > 1:
        item = f'{col.model_name} {item}'
      if item not in epochs_desc:
        epochs_desc.append(item)
  plan = profile.speed
  head = [
      f'# {TABLE_TITLES[table]} ({profile.name} profile)',
      '',
      f'- profile: `{profile.name}`: {profile.description}',
      f'- command: `{command}`'
      + ''.join(f'; speed measured by `{c}`' for c in speed_commands if c != command),
      f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}',
      f'- hardware: {hardware_line(hardware)}',
      f'- seeds: {", ".join(map(str, seeds))}'
      + (' in one program per row (num_seeds)' if len(seeds) > 1 else '')
      + ' (accuracy and angle: mean ± sample std over seeds when more than one)',
      f'- training (accuracy columns, planned): {"; ".join(epochs_desc)}; the "Trained" '
      f'column says what each finished run did (empty: not run yet). Train accuracy is '
      f'evaluated on the whole training set after training, test accuracy on the test set'
      + (
          f' (subsets: {profile.train_examples} train / {profile.test_examples} test ' f'examples)'
          if profile.train_examples
          else ''
      )
      + '.',
      f"- speed: every method's full jitted training step in one process, "
      f'{plan.describe()}; s/epoch = ms/step × steps of one full epoch (training set / '
      f"batch), excluding evaluation and compilation; speed vs X = X's time per epoch / "
      f"the method's (LDRL ×1.00, BP ×1.00 in their own rows; LDRL is tp-jax's, for "
      f"the reference scalingDTP's see `bench_cpu --reference_dir`); GFLOP/step = XLA's "
      f"cost analysis of the same step compiled with XLA's own convolution (XLA counts a "
      f"loop body once: the fast convolution's weight gradient loops over batch chunks; "
      f'blank for LDRL, whose feedback training is a loop).'
      + (' ' + '; '.join(speed_notes) + '.' if speed_notes else ''),
      '- paper: published test accuracy of Bao et al. (AAAI 2024) for TJML-DTP (Tables '
      '1-3); every other published cell is left blank, not guessed.',
      "- BP angle: the angle between each block's TP update and BP's gradient "
      '(tp_jax.diagnostics), after the last epoch, averaged over the blocks; blank for BP.',
      f'- accuracy against time: `table{table}_time.png`, test accuracy against training '
      'wall-clock seconds (evaluation excluded), every method of a column on one panel.',
      '',
      '| Model / data | Method | Trained | Train acc (%) | Test acc (%) | Paper test acc '
      '(%) | BP angle (°) | ms/step | GFLOP/step | s/epoch | Speed vs LDRL | Speed vs BP |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  text = '\n'.join(head + lines_rows)
  if targets:
    text += '\n\nPerformance targets'
    if profile.fast_compile:
      text += (
          ' — smoke profile: compiled without optimisations at batch 8, so these '
          'ratios are not measurements'
      )
    text += ':\n\n' + '\n'.join(targets)
  text += '\n'
  out = root.parent / f'table{table}.md'
  out.write_text(text)
  plot_curves(table, curves, root.parent / f'table{table}_curves.png')
  plot_time(table, curves, root.parent / f'table{table}_time.png')
  log(f'wrote {out}')
  return out


def _seed_series(result: dict, rows: list[dict], key: str, scale: float = 1.0) -> list[list]:
  """[seed][row] values of ``key`` in ``rows`` of ``result``'s run."""
  num_seeds = result['config'].get('num_seeds', 1)
  return [
      [scale * train.split_members(r, num_seeds)[s][key] for r in rows] for s in range(num_seeds)
  ]


def plot_curves(table: int, curves: dict[str, tuple[str, dict[str, dict]]], path: Path) -> None:
  """Test accuracy and training loss against epochs of data seen, per column (the
  mean over seeds, with their min-max band)."""
  columns = []
  for title, by_method in curves.values():
    lines = {'test_accuracy': [], 'train_loss': []}
    for label, result in by_method.items():
      n_train = data.info(result['config']['dataset']).num_examples['train']
      rows = result['history']
      x = [r['step'] * result['config']['batch_size'] / n_train for r in rows]
      for key, scale in (('test_accuracy', 100), ('train_loss', 1)):
        lines[key].append(plot.seed_line(label, x, _seed_series(result, rows, key, scale), 'o-'))
    seen = 'epochs of training data seen'
    columns.append(
        [
            plot.Panel(title, seen, 'test accuracy (%)', lines['test_accuracy']),
            plot.Panel('', seen, 'training loss (epoch mean)', lines['train_loss']),
        ]
    )
  grid = [list(row) for row in zip(*columns)]  # 2 rows: accuracy, loss
  plot.save_figure(grid, path, TABLE_TITLES[table], panel_size=(5, 3.5), dpi=100)


def time_points(result: dict) -> list[dict]:
  """The rows of ``result`` that say test accuracy at a training time, by step: its
  ``eval_every_steps`` evaluations and its epoch rows (a budget's last, partial epoch
  included)."""
  by_step = {r['step']: r for r in result['history'] if 'train_s' in r}
  by_step.update({r['step']: r for r in result.get('evals', ())})
  return [by_step[s] for s in sorted(by_step)]


def plot_time(table: int, curves: dict[str, tuple[str, dict[str, dict]]], path: Path) -> None:
  """Test accuracy against training wall-clock seconds (evaluation excluded), every
  method of a column on one panel (the mean over seeds, with their min-max band)."""
  panels = []
  for title, by_method in curves.values():
    lines = []
    for label, result in by_method.items():
      rows = time_points(result)
      if rows:
        x = [r['train_s'] for r in rows]
        lines.append(
            plot.seed_line(label, x, _seed_series(result, rows, 'test_accuracy', 100), 'o-')
        )
    panels.append(plot.Panel(title, 'training wall-clock (s)', 'test accuracy (%)', lines))
  plot.save_figure([panels], path, f'{TABLE_TITLES[table]}: accuracy against time', (5, 3.5), 100)
