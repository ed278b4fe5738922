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
)
from tp_jax import data
from tp_jax import plot
from tp_jax import train

Log = Callable[[str], None]


def _fmt_acc(values: list[float]) -> str:
  if not values:
    return ''
  pct = [100 * v for v in values]
  if len(pct) == 1:
    return f'{pct[0]:.2f}'
  return f'{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}'


def _results(root: Path, col: Column, method: str, seeds: Sequence[int]) -> list[dict]:
  out = []
  for s in seeds:
    f = run_dir(root, col, method, s) / 'result.json'
    if f.exists():
      out.append(json.loads(f.read_text()))
  return out


def _diverged(root: Path, col: Column, method: str, seeds: Sequence[int]) -> list[str]:
  """'seed S at step N' for each seed whose run diverged."""
  out = []
  for s in seeds:
    f = run_dir(root, col, method, s) / DIVERGED
    if f.exists():
      step = re.search(r'at step (\d+)', json.loads(f.read_text())['diverged'])
      out.append(f'seed {s} at step {step.group(1) if step else "?"}')
  return out


def _trained(results: list[dict], col: Column, diverged: Sequence[str] = ()) -> str:
  """How much training the accuracy reflects: epochs, or steps when partial; and which
  seeds diverged (their runs have no accuracy)."""
  if diverged:
    done = f'{_trained(results, col)}; ' if results else ''
    return f'{done}diverged: {", ".join(diverged)}'
  if not results:
    return ''
  r = results[0]
  steps = r['steps_per_epoch'] * r['epochs']
  full = full_epoch_steps(col.dataset, r['config']['batch_size'])
  if r['steps_per_epoch'] >= full:
    return f'{r["epochs"]} ep'
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
    table: int, profile: Profile, root: Path, seeds: Sequence[int], command: str, log: Log
) -> Path:
  cols = TABLES[table]
  speeds = _speeds(root, table)
  lines_rows = []
  curves: dict[str, tuple[str, dict[str, list[dict]]]] = {}
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
      res = _results(root, col, method, seeds)
      curves[col.id][1][col.label(method)] = res
      paper = PAPER_TEST_ACC.get((table, col.id, method))
      row = [
          col.title,
          col.label(method),
          _trained(res, col, _diverged(root, col, method, seeds)),
          _fmt_acc([r['train_accuracy'] for r in res if 'train_accuracy' in r]),
          _fmt_acc([r['test_accuracy'] for r in res]),
          f'{paper:.1f}' if paper is not None else '',
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
      cfg = make_config(col, method, profile, seeds[0])
      spe = full_epoch_steps(col.dataset, cfg.batch_size)
      steps = min(cfg.steps_per_epoch or spe, spe)
      what = f'{cfg.epochs} ep' if steps == spe else f'{cfg.epochs} × {steps} steps'
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
      f'- seeds: {", ".join(map(str, seeds))} (accuracy: mean ± sample std over seeds '
      f'when more than one)',
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
      f"the method's (LDRL ×1.00, BP ×1.00 in their own rows); GFLOP/step = XLA's "
      f"cost analysis of the same step compiled with XLA's own convolution (XLA counts a "
      f"loop body once: the fast convolution's weight gradient loops over batch chunks; "
      f'blank for LDRL, whose feedback training is a loop).'
      + (' ' + '; '.join(speed_notes) + '.' if speed_notes else ''),
      '- paper: published test accuracy of Bao et al. (AAAI 2024) for TJML-DTP (Tables '
      '1-3); every other published cell is left blank, not guessed.',
      '',
      '| Model / data | Method | Trained | Train acc (%) | Test acc (%) | Paper test acc '
      '(%) | ms/step | GFLOP/step | s/epoch | Speed vs LDRL | Speed vs BP |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
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
  log(f'wrote {out}')
  return out


def plot_curves(
    table: int, curves: dict[str, tuple[str, dict[str, list[dict]]]], path: Path
) -> None:
  """Test accuracy and training loss against epochs of data seen, per column (the
  mean over seeds)."""
  columns = []
  for title, by_method in curves.values():
    lines = {'test_accuracy': [], 'train_loss': []}
    for label, results in by_method.items():
      if not results:
        continue
      n_train = data.info(results[0]['config']['dataset']).num_examples['train']
      by_step: dict[int, list[dict]] = {}
      for r in results:
        bs = r['config']['batch_size']
        for row in r['history']:
          by_step.setdefault(row['step'], []).append(row)
      steps = sorted(by_step)
      x = [s * bs / n_train for s in steps]
      for key, scale in (('test_accuracy', 100), ('train_loss', 1)):
        y = [scale * statistics.mean(row[key] for row in by_step[s]) for s in steps]
        lines[key].append(plot.Line(label, x, y, 'o-'))
    seen = 'epochs of training data seen'
    columns.append(
        [
            plot.Panel(title, seen, 'test accuracy (%)', lines['test_accuracy']),
            plot.Panel('', seen, 'training loss (epoch mean)', lines['train_loss']),
        ]
    )
  grid = [list(row) for row in zip(*columns)]  # 2 rows: accuracy, loss
  plot.save_figure(grid, path, TABLE_TITLES[table], panel_size=(5, 3.5), dpi=100)
