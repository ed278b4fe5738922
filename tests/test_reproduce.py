"""experiments.reproduce: the smoke profile of every table
and a tiny Figure 2, in-process on synthetic data of the real shapes (no dataset files).

Checks the machinery, not accuracy or speed: every output file exists, each generated
table has one row per (column, method), the expected columns and finite numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import synthetic
from experiments.reproduce import accuracy
from experiments.reproduce import commands
from experiments.reproduce import figure2
from experiments.reproduce import report
from experiments.reproduce import speed
from experiments.reproduce import tables
from tp_jax import config as config_lib

REPO = Path(__file__).resolve().parents[1]
HEADER = [
    'Model / data',
    'Method',
    'Trained',
    'Train acc (%)',
    'Test acc (%)',
    'Paper test acc (%)',
    'BP angle (°)',
    'ms/step',
    'GFLOP/step',
    's/epoch',
    'Speed vs LDRL',
    'Speed vs BP',
]
NUMERIC = ['Train acc (%)', 'Test acc (%)', 'ms/step', 's/epoch', 'Speed vs LDRL', 'Speed vs BP']


def parse_table(text: str) -> list[dict[str, str]]:
  """The markdown table's rows as dicts keyed by the header's cells."""
  lines = [l for l in text.splitlines() if l.startswith('|')]
  assert len(lines) >= 3, text
  cells = lambda l: [c.strip() for c in l.strip().strip('|').split('|')]
  header = cells(lines[0])
  assert header == HEADER
  assert set(lines[1].replace('|', '').strip()) == {'-'}
  rows = [dict(zip(header, cells(l))) for l in lines[2:]]
  for r in rows:
    assert len(r) == len(header)
  return rows


def number(cell: str) -> float:
  m = re.match(r'^×?(-?[0-9.]+(?:e[-+]?\d+)?)', cell)
  assert m, f'not a number: {cell!r}'
  return float(m.group(1))


@pytest.fixture(scope='module')
def smoke_tables(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reproduce')
  paths = {
      t: commands.run_table(t, 'smoke', workdir, source='synthetic', log=lambda s: None)
      for t in tables.TABLES
  }
  return workdir, paths


@pytest.mark.slow
@pytest.mark.parametrize('table', sorted(tables.TABLES))
def test_smoke_table(smoke_tables, table):
  workdir, paths = smoke_tables
  path = paths[table]
  assert path == workdir / 'smoke' / f'table{table}.md'
  text = path.read_text()
  assert text.startswith(f'# Table {table}')
  for what in (
      'profile: `smoke`',
      'command:',
      'date:',
      'hardware:',
      'seeds: 0',
      'speed:',
      'paper:',
  ):
    assert what in text
  assert (workdir / 'smoke' / f'table{table}_curves.png').stat().st_size > 1000
  assert (workdir / 'smoke' / f'table{table}_time.png').stat().st_size > 1000

  cols = tables.TABLES[table]
  rows = parse_table(text)
  assert len(rows) == sum(len(c.methods) for c in cols)
  has_ldrl = any('ldrl' in c.methods for c in cols)
  i = 0
  for col in cols:
    block = rows[i : i + len(col.methods)]
    i += len(col.methods)
    assert [r['Method'] for r in block] == [col.label(m) for m in col.methods]
    assert {r['Model / data'] for r in block} == {col.title}
    for r in block:
      for c in NUMERIC:
        if c == 'Speed vs LDRL' and not has_ldrl:
          assert r[c] == ''
          continue
        v = number(r[c])
        assert math.isfinite(v) and v >= 0, (r, c)
      assert 0 <= number(r['Train acc (%)']) <= 100
      if r['Method'] == 'BP':  # BP has no TP update to compare
        assert r['BP angle (°)'] == ''
      else:
        assert 0 <= number(r['BP angle (°)']) <= 180
      if r['Method'] == 'LDRL':  # XLA would count its feedback loop body once
        assert r['GFLOP/step'] == ''
      else:
        assert number(r['GFLOP/step']) > 0
      assert r['Trained'] == '2 steps (0.00 ep)'
    by = {m: r for m, r in zip(col.methods, block)}
    if 'ldrl' in by:
      assert by['ldrl']['Speed vs LDRL'] == '×1.00'
      # speed vs LDRL = LDRL's time per epoch / the method's (same batch size here)
      ldrl_ms = number(by['ldrl']['ms/step'])
      for r in block:
        assert number(r['Speed vs LDRL']) == pytest.approx(
            ldrl_ms / number(r['ms/step']), rel=0.02, abs=0.01
        )
    if 'bp' in by:
      assert by['bp']['Speed vs BP'] == '×1.00'
    for m, r in by.items():
      paper = tables.PAPER_TEST_ACC.get((table, col.id, m))
      assert r['Paper test acc (%)'] == ('' if paper is None else f'{paper:.1f}')

    root = workdir / 'smoke' / f'table{table}'
    speed = json.loads((root / f'speed_{col.id}.json').read_text())
    assert set(speed['methods']) == set(col.methods)
    for m in col.methods:
      res = json.loads((accuracy.run_dir(root, col, m, [0]) / 'result.json').read_text())
      assert res['config']['method'] == m and res['config']['dataset'] == col.dataset
      assert res['config']['model'] == col.get_config().model
      assert res['steps_per_epoch'] == 2 and res['epochs'] == 1
      assert 0 <= res['test_accuracy'] <= 1
      assert [r['step'] for r in res['evals']] == [0, 1, 2]  # smoke: every step
  assert ('Performance targets' in text) == (table != 4)
  assert ('GFLOP ratio' in text) == (table != 4)
  if table in (1, 2, 3):
    assert [tables.PAPER_TEST_ACC[(table, c.id, 'tjml_dtp')] for c in cols] == {
        1: [99.3, 91.4, 76.7],
        2: [85.2],
        3: [56.9],
    }[table]


def test_step_gflop_counts_the_step():
  """An MLP's BP step: forward, weight and input gradients are 2 B d_in d_out FLOP each."""
  cfg = config_lib.default()
  cfg.model, cfg.method, cfg.batch_size = 'mlp', 'bp', 64
  cfg.model_kwargs = {'act': 'leaky_relu', 'widths': (256, 256)}
  dims = [(16 * 16, 256), (256, 256), (256, 10)]
  matmuls = 2 * cfg.batch_size * (3 * sum(a * b for a, b in dims) - dims[0][0] * dims[0][1])
  ds = synthetic.dataset(cfg.dataset, n_train=cfg.batch_size, n_test=8, image_shape=(16, 16, 1))
  assert speed.step_gflop(cfg, ds) == pytest.approx(matmuls / 1e9, rel=0.05)
  cfg.method = 'tjml_dtp'  # the same products: feedback W^T replaces the input gradients
  assert speed.step_gflop(cfg, ds) == pytest.approx(matmuls / 1e9, rel=0.05)
  cfg.method = 'ldrl'
  assert speed.step_gflop(cfg, ds) is None


def test_table4_rows():
  """Reversible Mixer (exact-inverse feedback) vs TJML-DTP and BP on the Mixer."""
  rev, mixer = tables.TABLES[4]
  assert (
      tables.make_config(rev, 'tjml_dtp', tables.PROFILES['paper'], 0).model == 'reversible_mixer'
  )
  cfg = tables.make_config(mixer, 'tjml_dtp', tables.PROFILES['paper'], 0)
  assert cfg.model == 'mlp_mixer' and mixer.methods == ('tjml_dtp', 'bp')
  assert rev.id != mixer.id  # separate run directories


@pytest.mark.slow
def test_table_regenerates_and_reuses_runs(smoke_tables):
  """--what=table rebuilds the table from the files alone; finished runs are reused."""
  workdir, paths = smoke_tables
  before = parse_table(paths[2].read_text())
  logs = []
  commands.run_table(2, 'smoke', workdir, what='accuracy', source='synthetic', log=logs.append)
  assert sum('reusing finished run' in l for l in logs) == 4
  assert [l.split(':')[0] for l in logs if ' run ' in l and 'training' in l] == [
      f'table 2 run {i}/4' for i in range(1, 5)
  ]  # progress: which run of how many
  after = parse_table(
      commands.run_table(2, 'smoke', workdir, what='table', log=logs.append).read_text()
  )
  assert after == before


def test_run_dir_with_other_config_is_refused(tmp_path):
  col = tables.TABLES[2][0]
  cfg = tables.make_config(col, 'bp', tables.PROFILES['smoke'], 0)
  d = tmp_path / 'run'
  d.mkdir()
  other = accuracy._jsonable(cfg)
  other['batch_size'] = 9
  (d / 'reproduce_config.json').write_text(json.dumps(other))
  with pytest.raises(RuntimeError, match='another config'):
    accuracy.train_one(cfg, d, None, log=lambda s: None)


def test_profiles_are_config_overrides():
  col = tables.TABLES[1][0]
  paper = tables.make_config(col, 'ldrl', tables.PROFILES['paper'], 3)
  ref = col.get_config()
  assert paper.seed == 3 and paper.method == 'ldrl'
  assert paper.epochs == ref.epochs and list(paper.feedback.iterations) == [41, 51, 24]
  assert paper.eval_every_steps == 0  # the epoch ends' evaluations only
  cpu = tables.make_config(col, 'ldrl', tables.PROFILES['cpu'], 0, 3, train_seconds=12.5)
  assert list(cpu.feedback.iterations) == [41, 51, 24]  # LDRL's K is never cut in cpu
  # The profile's description: LeNet 1 epoch; LDRL syncs (checks its budget) every step.
  assert (cpu.epochs, cpu.steps_per_epoch, cpu.train_seconds) == (1, 0, 12.5)
  assert (cpu.num_seeds, cpu.check_every_steps, cpu.eval_every_steps) == (3, 1, 10)
  assert tables.make_config(col, 'bp', tables.PROFILES['cpu'], 0).eval_every_steps == 234 // 4
  assert tables.PROFILES['cpu'].seeds == (0, 1, 2) and tables.PROFILES['cpu'].ldrl_budget
  smoke = tables.make_config(tables.TABLES[3][0], 'ldrl', tables.PROFILES['smoke'], 0)
  assert list(smoke.feedback.iterations) == [1] * 10
  assert tables.PROFILES['paper'].seeds == (0, 1, 2, 3, 4)


def test_cli_refuses_unknown_table(tmp_path):
  p = subprocess.run(
      [sys.executable, '-m', 'experiments.reproduce', '--table=6', f'--workdir={tmp_path}'],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert p.returncode != 0
  assert 'unknown table 6' in p.stderr
  assert not (tmp_path / 'smoke').exists()


def test_figure2(tmp_path):
  csv_path = commands.run_figure(2, 'smoke', tmp_path, sizes=(4, 8), log=lambda s: None)
  assert csv_path == tmp_path / 'smoke' / 'figure2.csv'
  with open(csv_path) as f:
    rows = list(csv.DictReader(f))
  assert [(int(r['n']), r['op']) for r in rows] == [(n, op) for n in (4, 8) for op in figure2.OPS]
  for r in rows:
    assert math.isfinite(float(r['median_ms'])) and float(r['median_ms']) > 0
    assert float(r['min_ms']) <= float(r['median_ms'])
    assert int(r['repeats']) >= 3
  assert (tmp_path / 'smoke' / 'figure2.png').stat().st_size > 1000
  md = (tmp_path / 'smoke' / 'figure2.md').read_text()
  assert md.startswith('# Figure 2') and '| 8 |' in md


def test_figure2_ops_are_what_they_claim():
  import jax.numpy as jnp
  import numpy as np

  a = jnp.asarray(np.random.default_rng(0).normal(size=(5, 5)) + 5 * np.eye(5), jnp.float32)
  np.testing.assert_allclose(figure2.OPS['inverse'](a) @ a, np.eye(5), atol=1e-4)
  np.testing.assert_allclose(figure2.OPS['pseudo-inverse'](a) @ a, np.eye(5), atol=1e-4)
  np.testing.assert_array_equal(figure2.OPS['transpose'](a), np.asarray(a).T)


@pytest.mark.slow
def test_a_diverged_run_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
  real_train = accuracy.train.train_and_evaluate

  def train_or_diverge(cfg, workdir, **kwargs):
    if cfg.method == 'ldrl':
      raise accuracy.train.DivergenceError(
          'training diverged at step 1: non-finite targets at ' 'block(s) [1]'
      )
    return real_train(cfg, workdir, **kwargs)

  monkeypatch.setattr(accuracy.train, 'train_and_evaluate', train_or_diverge)
  logs = []
  commands.run_table(3, 'smoke', tmp_path, what='accuracy', source='synthetic', log=logs.append)
  rows = {
      r['Method']: r
      for r in parse_table(
          commands.run_table(3, 'smoke', tmp_path, what='table', log=logs.append).read_text()
      )
  }
  assert rows['LDRL']['Trained'] == 'diverged: seed 0 at step 1'
  assert rows['LDRL']['BP angle (°)'] == ''
  assert rows['LDRL']['Test acc (%)'] == rows['LDRL']['Train acc (%)'] == ''
  for m in ('FWDTP', 'TJML-DTP', 'BP'):
    assert 0 <= number(rows[m]['Test acc (%)']) <= 100
  # The record is reused like a finished run: no second attempt.
  commands.run_table(3, 'smoke', tmp_path, what='accuracy', source='synthetic', log=logs.append)
  assert sum('reusing finished run' in l for l in logs) == 4


@pytest.mark.slow
def test_seeds_in_one_program_and_ldrl_on_tjml_dtps_budget(tmp_path):
  """Two seeds per row in one program (mean ± std cells), LDRL trained for TJML-DTP's
  measured training seconds, the time figure; one column, selected by name."""
  profile = dataclasses.replace(tables.PROFILES['smoke'], ldrl_budget=True)
  logs = []
  path = commands.run_table(
      1, profile, tmp_path, [3, 4], source='synthetic', log=logs.append, columns=['mnist']
  )
  text = path.read_text()
  assert 'seeds: 3, 4 in one program per row' in text
  rows = {r['Method']: r for r in parse_table(text)}
  assert {r['Model / data'] for r in rows.values()} == {'LeNet / MNIST'}  # the column asked for
  for m in ('LDRL', 'FWDTP', 'TJML-DTP', 'BP'):
    assert ' ± ' in rows[m]['Test acc (%)'] and ' ± ' in rows[m]['Train acc (%)'], rows[m]
  assert ' ± ' in rows['TJML-DTP']['BP angle (°)'] and rows['BP']['BP angle (°)'] == ''
  root = tmp_path / 'smoke' / 'table1'
  col = tables.TABLES[1][0]
  read = lambda m: json.loads((accuracy.run_dir(root, col, m, [3, 4]) / 'result.json').read_text())
  tjml, ldrl = read('tjml_dtp'), read('ldrl')
  assert tjml['config']['num_seeds'] == 2 and len(tjml['test_accuracy']) == 2
  assert tjml['config']['seed'] == 3 and tjml['config']['train_seconds'] == 0
  assert ldrl['config']['train_seconds'] == tjml['train_s'] > 0
  assert rows['LDRL']['Trained'].endswith(f'in a {tjml["train_s"]:.1f} s budget')
  assert 'at most 1 × 2 steps, stopped after a training budget of' in text
  runs = [l.split(': training ')[1] for l in logs if ': training ' in l]
  assert runs[0].startswith('LeNet/mnist tjml_dtp seeds 3, 4')  # before LDRL, whose budget it is
  assert (tmp_path / 'smoke' / 'table1_time.png').stat().st_size > 1000


def test_time_points_merge_evaluations_and_epoch_rows():
  result = dict(
      history=[
          dict(step=2, train_s=1.0, test_accuracy=0.5),
          dict(step=3, train_s=1.5, test_accuracy=0.6),
      ],
      evals=[
          dict(step=0, train_s=0.0, test_accuracy=0.1),
          dict(step=2, train_s=1.0, test_accuracy=0.5),
      ],
  )
  assert [r['step'] for r in report.time_points(result)] == [0, 2, 3]
  assert report.time_points(dict(history=[dict(step=1, test_accuracy=0.2)])) == []  # untimed


def test_seed_and_row_selection_is_checked():
  with pytest.raises(ValueError, match='consecutive'):
    accuracy.check_seeds([0, 2])
  with pytest.raises(ValueError, match='no column'):
    tables.select_columns(1, ['svhn'])
  with pytest.raises(ValueError, match='unknown methods'):
    tables.select_methods(tables.TABLES[1][0], ['sgd'])
  assert tables.select_methods(tables.TABLES[4][1], ['bp', 'ldrl']) == ('bp',)
  assert accuracy.run_order(['ldrl', 'fwdtp', 'tjml_dtp', 'bp']) == [
      'tjml_dtp',
      'ldrl',
      'fwdtp',
      'bp',
  ]
  assert accuracy.run_dir(Path('r'), tables.TABLES[1][0], 'bp', [0, 1, 2]) == Path(
      'r/mnist/bp/seeds0-2'
  )


def test_cells_of_a_seeds_run(tmp_path):
  """A num_seeds run's divergence names each seed that diverged; its angle cell is the
  per-seed mean over blocks."""
  col = tables.TABLES[1][0]
  d = accuracy.run_dir(tmp_path, col, 'ldrl', [3, 4, 5])
  d.mkdir(parents=True)
  msg = (
      'seed 3: training diverged at step 7: loss = nan; seed 5: training diverged at step 9: '
      'non-finite targets at block(s) [1]; no checkpoint was saved yet.'
  )
  (d / accuracy.DIVERGED).write_text(json.dumps({'diverged': msg}))
  assert report._diverged(tmp_path, col, 'ldrl', [3, 4, 5]) == [
      'seed 3 at step 7',
      'seed 5 at step 9',
  ]
  result = dict(config=dict(num_seeds=2), history=[dict(bp_angle=[[10.0, 20.0], [30.0, 50.0]])])
  assert report.final_bp_angle(result) == [15.0, 40.0]
  one = dict(config=dict(num_seeds=1), history=[dict(bp_angle=[10.0, 20.0])])
  assert report.final_bp_angle(one) == [15.0]
  assert report.final_bp_angle(dict(config={}, history=[dict(test_accuracy=0.5)])) is None


@pytest.mark.slow
def test_cli_num_seeds_and_columns(tmp_path):
  """--num_seeds counts from --seeds' first; --columns picks the rows shown; seeds that
  are not consecutive are refused before anything runs."""
  run = lambda *flags: subprocess.run(
      [sys.executable, '-m', 'experiments.reproduce', '--table=1', f'--workdir={tmp_path}', *flags],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  p = run('--what=table', '--seeds=5', '--num_seeds=2', '--columns=cifar10')
  assert p.returncode == 0, p.stderr[-2000:]
  text = (tmp_path / 'smoke' / 'table1.md').read_text()
  assert 'seeds: 5, 6 in one program per row' in text
  assert {r['Model / data'] for r in parse_table(text)} == {'LeNet / CIFAR-10'}
  p = run('--what=accuracy', '--seeds=0,2')
  assert p.returncode != 0 and 'consecutive' in p.stderr
