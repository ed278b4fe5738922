"""``config.num_seeds``: S seeds trained in one program equal S separate runs.

Seed s of a ``num_seeds`` run has the keys (init, data order, noise) of the separate
run with ``seed + s``, so its metrics rows, summary and final state must equal that
run's, to float32 tolerance (the vmapped step batches the same arithmetic), for every
method on the MLP and on LeNet; checkpoints and resume must keep that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import synthetic
from experiments.configs import lenet_mnist
from experiments.configs import mlp_mnist
from tp_jax import config as config_lib
from tp_jax import data
from tp_jax import diagnostics
from tp_jax import plot
from tp_jax import train

METHODS = ('bp', 'tjml_dtp', 'fwdtp', 'ldrl')
NUM_SEEDS = 3
FIRST_SEED = 5  # not 0: seed s must be FIRST_SEED + s, not s


def _dataset(n_train: int = 64, n_test: int = 16, seed: int = 0) -> data.Dataset:
  return synthetic.dataset('mnist', n_train, n_test, seed)


def _mlp(method: str):
  c = mlp_mnist.get_config()
  c.method, c.seed = method, FIRST_SEED
  c.model_kwargs.widths = (16, 16)
  c.batch_size, c.epochs, c.steps_per_epoch, c.eval_batch_size = 16, 2, 3, 16
  c.optimizer.lr = 0.05  # large enough that the parameters move visibly in 6 steps
  return c


def _lenet(method: str):
  c = lenet_mnist.get_config()
  c.method, c.seed = method, FIRST_SEED
  c.batch_size, c.epochs, c.steps_per_epoch, c.eval_batch_size = 16, 1, 2, 16
  c.feedback.iterations = (2,)  # LDRL's inner loops: the test is about seeds, not K
  return c


def _quiet(_):
  pass


def _without_timing(rows):
  return [{k: v for k, v in r.items() if k not in train.TIMING_KEYS} for r in rows]


# bp_angle's float32 floor: where a TP update equals BP's gradient (the head, LDRL's
# last block) the angle is rounding noise of about 1e-5 degrees, which summation order
# (vmapped or not) changes.
ANGLE_ATOL_DEGREES = 1e-4


def _assert_close(a, b, what, key=''):
  np.testing.assert_allclose(
      np.asarray(a, np.float64),
      np.asarray(b, np.float64),
      rtol=2e-5,
      atol=ANGLE_ATOL_DEGREES if key == 'bp_angle' else 1e-6,
      err_msg=what,
  )


def _assert_seeds_equal_separate_runs(cfg, dataset, tmp_path):
  """The ``num_seeds`` run of ``cfg`` against one separate run per seed."""
  cfg.num_seeds = NUM_SEEDS
  together = train.train_and_evaluate(cfg, tmp_path / 'together', dataset, log=_quiet)
  assert together['complete']
  rows = train.read_history(tmp_path / 'together' / 'metrics.jsonl')
  assert len(rows[-1]['test_accuracy']) == NUM_SEEDS
  states = train.member_states(together['state'], NUM_SEEDS)
  differ = False
  for s in range(NUM_SEEDS):
    one = cfg.copy_and_resolve_references()
    one.num_seeds, one.seed = 1, cfg.seed + s
    alone = train.train_and_evaluate(one, tmp_path / f'seed{s}', dataset, log=_quiet)
    mine = [train.split_members(r, NUM_SEEDS)[s] for r in rows]
    for got, want in zip(_without_timing(mine), _without_timing(alone['history']), strict=True):
      assert got.keys() == want.keys()
      for k in got:
        _assert_close(got[k], want[k], f'seed {s}, epoch {got["epoch"]}, {k}', k)
    for k in ('test_accuracy', 'train_accuracy', 'train_loss'):
      _assert_close(together[k][s], alone[k], f'seed {s}, {k}')
    for a, b in zip(jax.tree.leaves(states[s]), jax.tree.leaves(alone['state']), strict=True):
      _assert_close(a, b, f'seed {s}, final state')
    differ |= not all(
        np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(states[s].params), jax.tree.leaves(states[0].params))
    )
  assert differ, 'the seeds must differ, or equality says nothing about each seed'
  result = json.loads((tmp_path / 'together' / 'result.json').read_text())
  for k in ('test_accuracy', 'train_accuracy', 'train_loss'):
    assert len(result[k]) == NUM_SEEDS
    assert result[f'{k}_mean'] == pytest.approx(np.mean(result[k]))
    assert result[f'{k}_std'] == pytest.approx(np.std(result[k], ddof=1))  # sample std
  assert result['train_loss_std'] > 0  # the seeds differ: the std says which std it is


@pytest.mark.slow
@pytest.mark.parametrize('method', METHODS)
def test_mlp_seeds_equal_separate_runs(method, tmp_path):
  _assert_seeds_equal_separate_runs(_mlp(method), _dataset(), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize('method', METHODS)
def test_lenet_seeds_equal_separate_runs(method, tmp_path):
  _assert_seeds_equal_separate_runs(_lenet(method), _dataset(), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize('members_per_vmap', [1, 2])
@pytest.mark.parametrize('method', ['tjml_dtp', 'ldrl'])
def test_seeds_looped_in_chunks_equal_separate_runs(method, members_per_vmap, tmp_path):
  """The members run as a loop over chunks (one by one, or 2 + 1 of 3) in one program."""
  cfg = _mlp(method)
  cfg.members_per_vmap = members_per_vmap
  _assert_seeds_equal_separate_runs(cfg, _dataset(), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize('method', ['tjml_dtp', 'ldrl'])
def test_diagnostics_of_each_seed_are_its_separate_runs(method):
  """bp_angle, bp_norm_ratio and tjml of seed s of a num_seeds run (one vmapped
  program) are those of the separate run with seed ``seed + s``, at its state."""
  cfg, ds = _mlp(method), _dataset()
  cfg.num_seeds = 2
  run = train.setup(cfg, ds)
  state = train.init_state(run)
  for _ in range(2):  # away from the initial state, where the seeds are merely re-drawn
    state, _ = run.train_step(
        state, run.x_train, run.y_train, train.epoch_indices(run, 0), run.step_key
    )
  together = diagnostics.compile_for_run(run, state)(state, train.epoch_indices(run, 0))
  assert {k: len(v) for k, v in together.items()} == dict.fromkeys(diagnostics.FIRST_BLOCK, 2)
  for s in range(2):
    one = cfg.copy_and_resolve_references()
    one.num_seeds, one.seed = 1, cfg.seed + s
    alone = train.setup(one, ds)
    state_s = train.init_state(alone)
    for _ in range(2):
      state_s, _ = alone.train_step(
          state_s, alone.x_train, alone.y_train, train.epoch_indices(alone, 0), alone.step_key
      )
    want = diagnostics.compile_for_run(alone, state_s)(state_s, train.epoch_indices(alone, 0))
    for k in diagnostics.FIRST_BLOCK:
      _assert_close(together[k][s], want[k], f'seed {s}, {k}', k)
  assert together['bp_angle'][0] != together['bp_angle'][1]


def test_num_seeds_is_validated():
  cfg = _mlp('bp')
  for bad in (0, -1, 2.0, True):
    with cfg.ignore_type():
      cfg.num_seeds = bad
    with pytest.raises(config_lib.ConfigError, match='num_seeds must be a positive integer'):
      config_lib.validate(cfg)
  cfg = _mlp('bp')
  cfg.num_seeds, cfg.seed = 2, 2**32 - 1
  with pytest.raises(config_lib.ConfigError, match='exceeds 2\\*\\*32 - 1'):
    config_lib.validate(cfg)
  for bad in (-1, 1.5, True):
    cfg = _mlp('bp')
    with cfg.ignore_type():
      cfg.members_per_vmap = bad
    with pytest.raises(config_lib.ConfigError, match='members_per_vmap must be a non-negative'):
      config_lib.validate(cfg)


def test_merge_and_split_seeds_are_inverse():
  rows = [
      dict(
          epoch=1,
          step=3,
          train_loss=float(s),
          block_loss=[s, 2 * s],
          steps=3,
          epoch_train_s=0.5,
          ms_per_step=1.0,
          skipped_steps=s,
      )
      for s in range(3)
  ]
  merged = train.merge_members(rows)
  assert merged['train_loss'] == [0.0, 1.0, 2.0] and merged['epoch'] == 1
  assert merged['block_loss'] == [[0, 0], [1, 2], [2, 4]] and merged['steps'] == 3
  assert train.split_members(merged, 3) == rows
  assert train.merge_members(rows[:1]) is rows[0] and train.split_members(rows[0], 1) == rows[:1]


@pytest.mark.slow
def test_seed_runs_share_one_program():
  """The state has a leading seed axis, each seed's indices and keys its own run's."""
  cfg, ds = _mlp('ldrl'), _dataset()
  cfg.num_seeds = NUM_SEEDS
  run = train.setup(cfg, ds)
  state = train.init_state(run)
  assert {a.shape[0] for a in jax.tree.leaves(state)} == {NUM_SEEDS}
  idx = np.asarray(train.epoch_indices(run, 1))
  for s, state_s in enumerate(train.member_states(state, NUM_SEEDS)):
    one = cfg.copy_and_resolve_references()
    one.num_seeds, one.seed = 1, cfg.seed + s
    alone = train.setup(one, ds)
    np.testing.assert_array_equal(idx[s], np.asarray(train.epoch_indices(alone, 1)))
    for a, b in zip(jax.tree.leaves(state_s), jax.tree.leaves(train.init_state(alone))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(idx[0], idx[1])


def _resume_config():
  """LDRL (forward and feedback state, noise every step), checkpoints mid-epoch."""
  c = _mlp('ldrl')
  c.num_seeds, c.checkpoint_every_steps, c.check_every_steps = 2, 2, 1
  return c


@pytest.fixture(scope='module')
def uninterrupted_seeds(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('full')
  return train.train_and_evaluate(_resume_config(), workdir, _dataset(), log=_quiet), workdir


@pytest.mark.slow
@pytest.mark.parametrize('stop', [3, 4])  # after epoch 1; mid-epoch 2
def test_seeds_resume_equals_uninterrupted(uninterrupted_seeds, tmp_path, stop):
  ds, (full, _) = _dataset(), uninterrupted_seeds
  part = train.train_and_evaluate(
      _resume_config(), tmp_path / 'part', ds, log=_quiet, until_step=stop
  )
  assert not part['complete'] and part['step'] == stop
  logs = []
  res = train.train_and_evaluate(_resume_config(), tmp_path / 'part', ds, log=logs.append)
  assert f'resumed from checkpoint at step {stop}' in logs
  assert res['complete']
  assert _without_timing(res['history']) == _without_timing(full['history'])
  assert _without_timing(
      train.read_history(tmp_path / 'part' / 'metrics.jsonl')
  ) == _without_timing(full['history'])
  for k in ('test_accuracy', 'train_accuracy', 'train_loss', 'test_accuracy_std'):
    assert res[k] == full[k], k
  for a, b in zip(jax.tree.leaves(res['state']), jax.tree.leaves(full['state']), strict=True):
    assert a.shape[0] == 2
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_seed_line_is_the_mean_with_a_min_max_band():
  r = np.random.RandomState(0)
  per_seed = r.rand(3, 5)
  line = plot.seed_line('tp', range(5), per_seed.tolist())
  np.testing.assert_allclose(line.y, per_seed.mean(0))
  np.testing.assert_allclose(line.band, (per_seed.min(0), per_seed.max(0)))
  assert '3 seeds' in line.label
  one = plot.seed_line('tp', range(5), per_seed[:1].tolist())
  assert one.y == per_seed[0].tolist() and one.band is None and one.label == 'tp'


def test_plot_of_a_seeds_workdir(tmp_path):
  pytest.importorskip('matplotlib')
  rows = []
  for epoch in (1, 2):
    rows.append(
        train.merge_members(
            [
                dict(
                    epoch=epoch,
                    step=3 * epoch,
                    train_loss=2.0 / epoch + s,
                    train_accuracy=0.1 * s,
                    test_loss=2.0,
                    test_accuracy=0.1 * epoch + 0.01 * s,
                    epoch_train_s=1.0,
                    steps=3,
                    ms_per_step=1.0,
                    skipped_steps=0,
                    block_loss=[0.1 * s, 0.2 * epoch],
                )
                for s in range(NUM_SEEDS)
            ]
        )
    )
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  assert plot.num_seeds(rows) == NUM_SEEDS
  out = plot.plot_runs([tmp_path])
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_tensorboard_has_each_seed(uninterrupted_seeds):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  full, workdir = uninterrupted_seeds
  acc = event_accumulator.EventAccumulator(str(workdir))
  acc.Reload()
  tags = acc.Tags()['scalars']
  for s in range(2):
    seed = FIRST_SEED + s
    series = [e.value for e in acc.Scalars(f'test/accuracy/seed_{seed}')]
    assert series == pytest.approx([r['test_accuracy'][s] for r in full['history']])
    assert f'train/block_loss/block1/seed_{seed}' in tags
  assert 'test/accuracy' not in tags


# Run with 4 CPU devices (the device count is fixed when JAX starts): a 2-seed LDRL run
# through the training loop; its final state, and whether the compiled step holds each
# device's quarter of the batch for both seeds.
_MESH_WORKER = """
import json, sys, tempfile
import jax, numpy as np
import test_seeds as t
from tp_jax import train
cfg = t._mlp('ldrl')
cfg.num_seeds, cfg.epochs = 2, 1
res = train.train_and_evaluate(cfg, tempfile.mkdtemp(), t._dataset(), log=t._quiet)
hlo = train.setup(cfg, t._dataset()).train_step.as_text()
np.savez(sys.argv[1], *[np.asarray(a.addressable_data(0)) for a in jax.tree.leaves(res['state'])])
print(json.dumps(dict(devices=jax.device_count(),
                      seeds_local_batch=any(f'f32[2,4,{s}]' in hlo for s in ('28,28,1', '784')))))
"""


@pytest.mark.slow
def test_seeds_compose_with_the_data_mesh(tmp_path):
  """2 seeds on 4 devices: each seed's batch is split over the devices, and each seed
  reaches the parameters of its separate 1-device run."""
  root = Path(__file__).resolve().parents[1]
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=(
          os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
      ).strip(),
      PYTHONPATH=os.pathsep.join(
          [str(root / 'tests'), str(root), os.environ.get('PYTHONPATH', '')]
      ),
  )
  out = tmp_path / 'state.npz'
  proc = subprocess.run(
      [sys.executable, '-c', _MESH_WORKER, str(out)],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report == dict(devices=4, seeds_local_batch=True)
  on_mesh = np.load(out)
  on_mesh = [on_mesh[f'arr_{i}'] for i in range(len(on_mesh.files))]
  for s in range(2):
    cfg = _mlp('ldrl')
    cfg.epochs, cfg.seed = 1, FIRST_SEED + s
    alone = train.train_and_evaluate(cfg, tmp_path / f'seed{s}', _dataset(), log=_quiet)
    for a, b in zip(on_mesh, jax.tree.leaves(alone['state']), strict=True):
      _assert_close(a[s], b, f'seed {s} on 4 devices')
