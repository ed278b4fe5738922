"""Sweeps (``tp_jax.sweep``, ``experiments.sweep``): the grid's syntax and checks, the
member axis of settings x seeds, each member against its separate run, and the binary's
table, best config and figure."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import test_seeds
from experiments import sweep as sweep_binary
from tp_jax import algorithms
from tp_jax import config as config_lib
from tp_jax import models
from tp_jax import sweep
from tp_jax import train

ROOT = Path(__file__).resolve().parents[1]


def _mlp(method: str, grid: str = ''):
  cfg = test_seeds._mlp(method)
  cfg.sweep = grid
  return cfg


def test_parse_reads_the_issue_syntax_and_round_trips():
  grid = sweep.parse("optimizer.lr=[0.01, 0.03,0.1]  beta=[0.3,0.5] method=[tjml_dtp,'ldrl']")
  assert grid == {
      'optimizer.lr': (0.01, 0.03, 0.1),
      'beta': (0.3, 0.5),
      'method': ('tjml_dtp', 'ldrl'),
  }
  assert list(grid) == ['optimizer.lr', 'beta', 'method']  # the order given
  assert sweep.parse('feedback.noise=[0.1,(0.2,0.3)]') == {'feedback.noise': (0.1, (0.2, 0.3))}
  assert sweep.parse(sweep.text(grid)) == grid
  settings = sweep.settings({'a': (1, 2), 'b': (3, 4, 5)})
  assert settings[:4] == [dict(a=1, b=3), dict(a=1, b=4), dict(a=1, b=5), dict(a=2, b=3)]
  assert len(settings) == 6


@pytest.mark.parametrize(
    'text, message',
    [
        ('', 'the sweep grid is empty'),
        ('   ', 'the sweep grid is empty'),
        ('beta=[]', "sweep field 'beta' has no values"),
        ('beta=0.3', 'cannot read the sweep at'),
        ('beta=[0.3] beta=[0.5]', "sweep field 'beta' is given twice"),
        ('beta=[0.3,(0.5]', 'unclosed'),
        ('beta=[0.3,#]', "cannot read the value '#'"),
    ],
)
def test_parse_refuses_bad_syntax(text, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    sweep.parse(text)


@pytest.mark.parametrize(
    'method, grid, message',
    [
        ('tjml_dtp', 'optimiser.lr=[0.1]', "unknown sweep field 'optimiser.lr'; did you mean "),
        ('tjml_dtp', 'beta=[0.3,fast]', "'beta' is trained in one program, so each value must be"),
        ('tjml_dtp', 'optimizer.lr=[True]', 'must be a number'),
        ('tjml_dtp', 'seed=[0.5]', 'must be an integer'),
        ('ldrl', "feedback.noise=[(0.1,'x')]", 'or a tuple of numbers'),
        ('tjml_dtp', 'beta=[-0.3]', 'beta must be a positive number'),
        ('tjml_dtp', 'batch_size=[0]', 'batch_size must be a positive number'),
        ('tjml_dtp', "epochs=['ten']", "sweep field 'epochs' cannot take 'ten'"),
        ('tjml_dtp', 'sweep=["beta=[1]"]', 'cannot sweep its own field'),
        ('bp', 'beta=[0.3,0.5]', "method='bp' with optimizer 'sgd' does not read \\['beta'\\]"),
        ('tjml_dtp', 'feedback.noise=[0.1]', 'does not read'),
    ],
)
def test_bad_grids_are_refused_before_anything_compiles(method, grid, message, monkeypatch):
  def no_compile(*args, **kwargs):
    raise AssertionError('compiled before the grid was checked')

  monkeypatch.setattr(train, 'setup', no_compile)
  with pytest.raises(config_lib.ConfigError, match=message):
    sweep_binary.run(_mlp(method, grid), '/nonexistent/never_written')


def test_one_program_refuses_structural_fields(tmp_path):
  cfg = _mlp('tjml_dtp', 'batch_size=[8,16] beta=[0.3,0.5]')
  with pytest.raises(config_lib.ConfigError, match=r"\['batch_size'\] change the program"):
    train.train_and_evaluate(cfg, tmp_path, test_seeds._dataset())
  assert not (tmp_path / 'checkpoints').exists()


def test_members_are_settings_times_seeds():
  cfg = _mlp('ldrl', 'beta=[0.3,0.6] feedback.noise=[0.1,(0.2,0.3)]')
  cfg.num_seeds = 2
  members = sweep.members(cfg)
  first = test_seeds.FIRST_SEED
  assert [m.seed for m in members] == [first, first + 1] * 4  # seeds fastest
  assert members[2] == sweep.Member(first, {'beta': 0.3, 'feedback.noise': (0.2, 0.3)})
  assert members[2].label == f'beta=0.3,feedback.noise=(0.2, 0.3) seed {first}'
  one = sweep.member_config(cfg, members[3])
  assert (one.beta, one.feedback.noise, one.seed, one.num_seeds, one.sweep) == (
      0.3,
      (0.2, 0.3),
      first + 1,
      1,
      '',
  )
  hp = sweep.hyper_parameters(cfg, models.for_config(cfg))
  np.testing.assert_array_equal(hp['beta'], np.float32([0.3] * 4 + [0.6] * 4))
  assert len(hp['feedback.noise']) == 2  # one [M] array per trained block
  np.testing.assert_array_equal(hp['feedback.noise'][1], np.float32([0.1, 0.1, 0.3, 0.3] * 2))
  assert train._member_suffix(cfg, 3) == f'/beta=0.3,feedback.noise=(0.2, 0.3)/seed_{first + 1}'


def test_seeds_alone_are_the_seed_axis():
  """A grid of seeds trains what num_seeds trains: the same keys, no hyper-parameters."""
  swept = _mlp('tjml_dtp', 'seed=[3,4,5]')
  seeds = _mlp('tjml_dtp')
  seeds.seed, seeds.num_seeds = 3, 3
  assert [m.seed for m in sweep.members(swept)] == [m.seed for m in sweep.members(seeds)]
  net = models.for_config(seeds)
  assert sweep.hyper_parameters(swept, net) == {} == sweep.hyper_parameters(seeds, net)
  assert sweep.members(_mlp('tjml_dtp')) == [sweep.Member(test_seeds.FIRST_SEED, {})]
  assert train._member_suffix(seeds, 1) == '/seed_4'


def test_structural_fields_make_one_program_each():
  cfg = _mlp('ldrl', 'feedback.iterations=[1,2] beta=[0.3,0.5] batch_size=[8,16]')
  programs = sweep.programs(cfg)
  assert [s for s, _ in programs] == sweep.settings(
      {'feedback.iterations': (1, 2), 'batch_size': (8, 16)}
  )
  for setting, program in programs:
    assert program.sweep == 'beta=[0.3,0.5]'
    assert (program.feedback.iterations, program.batch_size) == (
        (setting['feedback.iterations'],),
        setting['batch_size'],
    )


@pytest.mark.parametrize('schedule', ['constant', 'cosine'])
@pytest.mark.parametrize('name', ['sgd', 'adam'])
def test_optimizer_takes_traced_values(name, schedule):
  """A member's traced lr, momentum and weight decay update as the config's values do."""
  cfg = config_lib.default()
  opt = cfg.optimizer
  opt.name, opt.schedule, opt.lr, opt.momentum, opt.weight_decay = name, schedule, 0.1, 0.5, 0.01
  hp = {'optimizer.lr': 0.1, 'optimizer.weight_decay': 0.01}
  if name == 'sgd':
    hp['optimizer.momentum'] = 0.5
  params = {'w': jnp.arange(3.0)}
  grads = {'w': jnp.array([1.0, -2.0, 0.5])}

  def three_steps(hparams):
    tx = algorithms.make_optimizer(opt, 10, hparams)
    p, s = params, tx.init(params)
    for _ in range(3):
      p, s = algorithms.common.apply_grads(tx, p, s, grads)
    return p

  run_traced = jax.jit(lambda h: three_steps(jax.tree.map(jnp.float32, h)))
  traced = run_traced(hp)
  np.testing.assert_allclose(traced['w'], three_steps(None)['w'], rtol=1e-6)
  other = {'optimizer.lr': 0.2, 'optimizer.weight_decay': 5.0, 'optimizer.momentum': 0.9}
  for k in hp:  # each traced value is the one the update reads
    assert not np.allclose(run_traced({**hp, k: other[k]})['w'], traced['w']), k


def _assert_members_equal_separate_runs(cfg, tmp_path):
  """Every member of ``cfg``'s program against its separate run: metrics rows, final
  accuracies, parameters; and the settings must differ."""
  dataset = test_seeds._dataset()
  together = train.train_and_evaluate(cfg, tmp_path / 'together', dataset, log=test_seeds._quiet)
  members = sweep.members(cfg)
  assert together['members'] == [m.label for m in members]
  rows = train.read_history(tmp_path / 'together' / 'metrics.jsonl')
  states = train.member_states(together['state'], len(members))
  for i, member in enumerate(members):
    one = sweep.member_config(cfg, member)
    one.diagnostics = False  # a sweep's program has none
    alone = train.train_and_evaluate(one, tmp_path / str(i), dataset, log=test_seeds._quiet)
    mine = [train.split_members(r, len(members))[i] for r in rows]
    for got, want in zip(
        test_seeds._without_timing(mine), test_seeds._without_timing(alone['history']), strict=True
    ):
      assert got.keys() == want.keys()
      for k in got:
        test_seeds._assert_close(got[k], want[k], f'{member.label}, epoch {got["epoch"]}, {k}', k)
    for k in ('test_accuracy', 'train_accuracy', 'train_loss'):
      test_seeds._assert_close(together[k][i], alone[k], f'{member.label}, {k}')
    for part in ('params', 'fb_params'):
      mine, theirs = getattr(states[i], part), getattr(alone['state'], part)
      for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs), strict=True):
        test_seeds._assert_close(a, b, f'{member.label}, final {part}')
  loss = np.asarray(together['train_loss'])
  assert len(set(loss.round(6))) == len(members), 'each setting must train a different run'


@pytest.mark.slow
def test_tjml_dtp_members_equal_separate_runs(tmp_path):
  cfg = _mlp(
      'tjml_dtp',
      'beta=[0.3,0.6] optimizer.lr=[0.02,0.05] optimizer.momentum=[0,0.9] '
      'optimizer.weight_decay=[0.001]',
  )
  _assert_members_equal_separate_runs(cfg, tmp_path)


@pytest.mark.slow
def test_ldrl_members_equal_separate_runs(tmp_path):
  cfg = _mlp(
      'ldrl',
      'feedback.noise=[0.1,(0.3,0.5)] feedback.lr=[0.01,0.1] feedback.momentum=[0.5] beta=[0.4]',
  )
  cfg.feedback.iterations = (3,)
  cfg.num_seeds = 2
  _assert_members_equal_separate_runs(cfg, tmp_path)


@pytest.mark.slow
def test_sweep_resumes_as_uninterrupted(tmp_path):
  cfg = _mlp('ldrl', 'beta=[0.3,0.6] feedback.lr=[0.01,0.1]')
  cfg.checkpoint_every_steps, cfg.check_every_steps = 2, 1
  ds = test_seeds._dataset()
  full = train.train_and_evaluate(cfg, tmp_path / 'full', ds, log=test_seeds._quiet)
  train.train_and_evaluate(cfg, tmp_path / 'part', ds, log=test_seeds._quiet, until_step=4)
  logs = []
  res = train.train_and_evaluate(cfg, tmp_path / 'part', ds, log=logs.append)
  assert 'resumed from checkpoint at step 4' in logs
  assert test_seeds._without_timing(res['history']) == test_seeds._without_timing(full['history'])
  for a, b in zip(jax.tree.leaves(res['state']), jax.tree.leaves(full['state']), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _parse_config_file(path: Path):
  """The config ``experiments.train --config=path`` reads."""
  argv = ['train', f'--config={path}']
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      'config', str(path), flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return holder.value


@pytest.mark.slow
def test_binary_runs_a_2x3_grid_on_the_mlp(tmp_path):
  """CI's smoke sweep: 6 settings in one program on generated data; the table ranks
  them, the best config is the best setting's, the figure is drawn."""
  grid = 'beta=[0.3,0.5] optimizer.lr=[0.01,0.03,0.1]'
  workdir = tmp_path / 'sweep'
  cmd = [
      sys.executable,
      '-m',
      'experiments.sweep',
      '--config=experiments/configs/mlp_mnist.py',
      '--config.model_kwargs.widths=(16,16)',
      '--config.batch_size=16',
      '--config.epochs=1',
      '--config.steps_per_epoch=4',
      '--config.eval_batch_size=64',
      f'--sweep={grid}',
      f'--workdir={workdir}',
      '--synthetic',
  ]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr
  assert 'program 1/1' in p.stdout and '6 members of a sweep in one program' in p.stdout
  with open(workdir / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['rank'] for r in rows] == ['1', '2', '3', '4', '5', '6']
  assert {(r['beta'], r['optimizer.lr']) for r in rows} == {
      (b, lr) for b in ('0.3', '0.5') for lr in ('0.01', '0.03', '0.1')
  }
  keys = [(float(r['test_accuracy']), float(r['train_accuracy'])) for r in rows]
  assert keys == sorted(keys, reverse=True)
  result = json.loads((workdir / 'programs' / '0' / 'result.json').read_text())
  assert float(rows[0]['test_accuracy']) == max(result['test_accuracy'])
  md = (workdir / 'results.md').read_text()
  assert md.count('\n| ') == 7 and f'`{grid}`' in md
  best = _parse_config_file(workdir / 'best_config.py')
  config_lib.validate(best)
  assert (best.beta, best.optimizer.lr, best.sweep) == (
      float(rows[0]['beta']),
      float(rows[0]['optimizer.lr']),
      '',
  )
  assert best.model_kwargs.widths == (16, 16) and best.steps_per_epoch == 4
  assert (workdir / 'test_accuracy.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_structural_programs_and_the_sequential_comparison(tmp_path):
  """batch_size changes the program: two programs in turn, then each of the 4 members as
  its own program; both ways give the same accuracies."""
  cfg = _mlp('tjml_dtp', 'batch_size=[8,16] beta=[0.3,0.6]')
  cfg.epochs = 1
  logs = []
  out = sweep_binary.compare_sequential(cfg, tmp_path, test_seeds._dataset(), logs.append)
  assert out['members'] == 4 and len(out['sequential']) == 4
  assert all(v > 0 for v in out['per_member'].values())
  assert any(line.startswith('hardware: cpu') for line in logs)
  assert sum('per member: one program' in line for line in logs) == 2
  assert json.loads((tmp_path / 'compare_sequential.json').read_text())['members'] == 4
  assert sorted(os.listdir(tmp_path / 'together' / 'programs')) == ['0', '1']
  rows = json.loads((tmp_path / 'together' / 'sweep.json').read_text())['rows']
  for row in rows:
    i = 2 * (row['setting']['batch_size'] == 16) + (row['setting']['beta'] == 0.6)
    alone = json.loads((tmp_path / 'sequential' / f'{i // 2}_{i % 2}' / 'result.json').read_text())
    assert (alone['config']['batch_size'], alone['config']['beta']) == (
        row['setting']['batch_size'],
        row['setting']['beta'],
    )
    test_seeds._assert_close(row['test_accuracy'], alone['test_accuracy'], str(row['setting']))
    test_seeds._assert_close(row['train_accuracy'], alone['train_accuracy'], str(row['setting']))
