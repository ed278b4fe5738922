"""Faults: unwritable or full workdir, divergence (stop or skip), determinism."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import synthetic
from tp_jax import config as config_lib
from tp_jax import data
from tp_jax import train

ROOT = Path(__file__).resolve().parents[1]


def _dataset(n_train=64, n_test=16, seed=0, poison=()):
  ds = synthetic.dataset('mnist', n_train, n_test, seed)
  return ds._replace(x_train=ds.x_train.at[np.asarray(poison, int)].set(jnp.inf))


def _mlp(method='tjml_dtp'):
  c = config_lib.default()
  c.model, c.method = 'mlp', method
  c.model_kwargs = {'act': 'tanh', 'widths': (32, 32)}
  c.batch_size, c.epochs, c.steps_per_epoch = 16, 1, 4
  c.check_every_steps, c.checkpoint_every_steps = 1, 2
  c.beta, c.optimizer.lr = 0.1, 0.01
  c.eval_batch_size = 16
  return c


def _quiet(_):
  pass


# --------------------------------------------------------------------------------------
# Workdir


def test_unwritable_workdir_fails_before_training(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  cfg = _mlp()
  cfg.data_dir = str(tmp_path / 'no_data_here')  # loading would fail: we must fail first
  logs = []
  with pytest.raises(train.WorkdirError, match='not writable') as e:
    train.train_and_evaluate(cfg, blocker / 'run', log=logs.append)
  assert str(blocker / 'run') in str(e.value)
  assert not logs


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only directories')
def test_read_only_workdir_fails_before_training(tmp_path):
  ro = tmp_path / 'ro'
  ro.mkdir()
  ro.chmod(0o500)
  try:
    with pytest.raises(train.WorkdirError, match='not writable'):
      train.train_and_evaluate(_mlp(), ro / 'run', log=_quiet)
  finally:
    ro.chmod(0o700)


def test_disk_full_fails_before_training(tmp_path, monkeypatch):
  real = Path.write_bytes

  def no_space(self, payload):
    if self.name.startswith('.write_probe'):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return real(self, payload)

  monkeypatch.setattr(Path, 'write_bytes', no_space)
  with pytest.raises(train.WorkdirError, match='No space left on device'):
    train.train_and_evaluate(_mlp(), tmp_path / 'run', _dataset(), log=_quiet)


def test_too_little_space_for_checkpoints_fails_before_training(tmp_path, monkeypatch):
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(train.shutil, 'disk_usage', lambda p: usage._replace(free=1 << 20))
  compiled = []
  make_train_step = train.make_train_step
  monkeypatch.setattr(
      train, 'make_train_step', lambda *a, **k: compiled.append(a) or make_train_step(*a, **k)
  )
  logs = []
  with pytest.raises(train.WorkdirError, match=r'1\.0 MiB free but the checkpoints need'):
    train.train_and_evaluate(_mlp(), tmp_path / 'run', _dataset(), log=logs.append)
  assert not logs and not (tmp_path / 'run' / 'metrics.jsonl').exists()
  assert not compiled, 'it compiled before checking'


# --------------------------------------------------------------------------------------
# Divergence


def _poison_step(cfg, n_train: int, step: int) -> int:
  """The index of an example drawn in (1-based) ``step`` of epoch 1."""
  idx = data.batches(
      jax.random.fold_in(train._keys(cfg.seed)[1], 0),
      n_train,  # pylint: disable=protected-access
      cfg.batch_size,
  )
  return int(idx[step - 1][0])


@pytest.mark.slow
@pytest.mark.parametrize('method', ['tjml_dtp', 'bp'])
def test_divergence_names_step_and_block_and_keeps_last_checkpoint(tmp_path, method):
  cfg = _mlp(method)
  ds = _dataset(poison=[_poison_step(cfg, 64, 3)])  # an inf pixel in step 3's batch
  with pytest.raises(train.DivergenceError) as e:
    train.train_and_evaluate(cfg, tmp_path, ds, log=_quiet)
  msg = str(e.value)
  assert 'diverged at step 3' in msg
  assert 'loss = nan' in msg
  if method == 'tjml_dtp':  # the targets of every block below the output are NaN
    assert 'non-finite targets at block(s) [1, 2, 3]' in msg
  assert 'non-finite parameters at block(s)' in msg
  assert 'last good checkpoint (step 2)' in msg
  like = train.train_and_evaluate(cfg, tmp_path / 'fresh', _dataset(), log=_quiet, until_step=0)[
      'state'
  ]
  ckpt = train.Checkpointer(tmp_path, 2)
  assert ckpt.latest_step() == 2
  state = ckpt.restore(2, like)
  ckpt.close()
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(state.params))
  assert not (tmp_path / 'result.json').exists()


@pytest.mark.slow
def test_skip_nonfinite_skips_and_counts(tmp_path):
  cfg = _mlp()
  cfg.skip_nonfinite = True
  cfg.epochs = 2
  bad = _poison_step(cfg, 64, 3)
  res = train.train_and_evaluate(cfg, tmp_path, _dataset(poison=[bad]), log=_quiet)
  assert res['complete']
  # Epoch 1 step 3 holds the example; epoch 2 draws another permutation.
  idx2 = data.batches(jax.random.fold_in(train._keys(cfg.seed)[1], 1), 64, 16)[:4]  # pylint: disable=protected-access
  expected2 = int(np.any(np.asarray(idx2) == bad))
  assert [r['skipped_steps'] for r in res['history']] == [1, expected2]
  # Epoch means leave the skipped steps out.
  assert all(
      np.isfinite(r['train_loss']) and np.all(np.isfinite(r['block_loss'])) for r in res['history']
  )
  assert res['skipped_steps'] == 1 + expected2
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(res['state']))
  assert res['state'].step == 8


def _fake_mnist(root: Path) -> Path:
  """A data root whose MNIST files hold 64 training and 16 test random images."""
  d = root / 'mnist'
  d.mkdir(parents=True)
  r = np.random.RandomState(0)
  for n, (images, labels) in (
      (64, data.DATASETS['mnist'].files['train']),
      (16, data.DATASETS['mnist'].files['test']),
  ):
    with gzip.open(d / images, 'wb') as f:
      f.write(
          b'\0\0\x08\x03'
          + b''.join(v.to_bytes(4, 'big') for v in (n, 28, 28))
          + r.randint(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()
      )
    with gzip.open(d / labels, 'wb') as f:
      f.write(
          b'\0\0\x08\x01' + n.to_bytes(4, 'big') + r.randint(0, 10, n, dtype=np.uint8).tobytes()
      )
  return root


@pytest.mark.slow
def test_binary_prints_start_epoch_and_result_lines_only(tmp_path):
  """Default verbosity: no library log lines (Orbax, JAX); --verbosity=0 brings them."""
  _fake_mnist(tmp_path / 'data')
  cmd = [
      sys.executable,
      '-m',
      'experiments.train',
      '--config=experiments/configs/mlp_mnist.py',
      '--config.batch_size=16',
      '--config.steps_per_epoch=2',
      '--config.epochs=2',
      '--config.eval_batch_size=16',
      f'--data_dir={tmp_path / "data"}',
      '--config.verify_checksums=False',
  ]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  p = subprocess.run(
      cmd + [f'--workdir={tmp_path / "run"}'],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert p.returncode == 0, p.stdout + p.stderr
  lines = (p.stdout + p.stderr).splitlines()
  assert len(lines) == 4, lines
  assert ' on mlp/mnist: 64 training examples' in lines[0], lines
  assert [l.split()[:2] for l in lines[1:]] == [
      ['epoch', '1/2'],
      ['epoch', '2/2'],
      ['test', 'accuracy'],
  ], lines
  p = subprocess.run(
      cmd + [f'--workdir={tmp_path / "verbose"}', '--verbosity=0'],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert p.returncode == 0, p.stdout + p.stderr
  assert 'CheckpointManager' in p.stderr, p.stderr[-3000:]


@pytest.mark.slow
def test_binary_exits_nonzero_on_divergence(tmp_path):
  _fake_mnist(tmp_path / 'data')
  cmd = [
      sys.executable,
      '-m',
      'experiments.train',
      '--config=experiments/configs/mlp_mnist.py',
      # beta = 1e30: the first target is ~1e30 away, its squared distance overflows.
      '--config.method=tjml_dtp',
      '--config.beta=1e30',
      '--config.batch_size=16',
      '--config.steps_per_epoch=4',
      '--config.epochs=1',
      '--config.check_every_steps=1',
      f'--workdir={tmp_path / "run"}',
      f'--data_dir={tmp_path / "data"}',
      '--config.verify_checksums=False',
  ]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 1, p.stdout + p.stderr
  assert 'error: DivergenceError: training diverged at step' in p.stderr, p.stderr[-3000:]
  assert 'Traceback' not in p.stderr, p.stderr[-3000:]
  assert 'block(s)' in p.stderr
  assert not (tmp_path / 'run' / 'result.json').exists()


@pytest.mark.parametrize(
    'flag, message',
    [
        ('--config.model=resnet', "error: ConfigError: unknown model 'resnet'"),
        ('--data_dir=/nonexistent/tp_jax_data', 'error: DataError: '),
    ],
)
@pytest.mark.slow
def test_binary_reports_bad_input_in_one_line(tmp_path, flag, message):
  cmd = [
      sys.executable,
      '-m',
      'experiments.train',
      '--config=experiments/configs/mlp_mnist.py',
      f'--workdir={tmp_path / "run"}',
      flag,
  ]
  # No data anywhere, and a mirror nothing listens on: no download leaves this machine.
  env = dict(
      os.environ,
      PYTHONPATH=str(ROOT),
      JAX_PLATFORMS='cpu',
      TP_JAX_DATA='',
      TP_JAX_MIRROR_MNIST='http://127.0.0.1:9/mnist/',
  )
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 1, p.stdout + p.stderr
  assert message in p.stderr, p.stderr[-3000:]
  assert 'Traceback' not in p.stderr, p.stderr[-3000:]


# --------------------------------------------------------------------------------------
# Determinism


def _lenet(seed):
  c = config_lib.default()
  c.seed, c.augment = seed, True  # augmentation draws random crops and flips
  c.batch_size, c.epochs, c.steps_per_epoch = 16, 1, 3
  c.beta, c.optimizer.lr, c.eval_batch_size = 0.1, 0.01, 16
  return c


@pytest.mark.slow
def test_same_seed_bit_identical_different_seed_different(tmp_path):
  runs = []
  # The runs share one executable (the seed is an input). Separate processes agreeing
  # bit for bit is checked by test_resume's SIGKILL test (reference vs killed runs).
  for i, seed in enumerate([0, 0, 1]):
    res = train.train_and_evaluate(_lenet(seed), tmp_path / str(i), _dataset(), log=_quiet)
    rows = (tmp_path / str(i) / 'metrics.jsonl').read_text().splitlines()
    rows = [{k: v for k, v in json.loads(l).items() if k not in train.TIMING_KEYS} for l in rows]
    runs.append((rows, [np.asarray(a) for a in jax.tree.leaves(res['state'].params)]))
  (rows0, p0), (rows1, p1), (rows2, p2) = runs
  assert rows0 == rows1
  assert all(np.array_equal(a, b) for a, b in zip(p0, p1))
  assert rows0[0]['train_loss'] != rows2[0]['train_loss']
  assert not any(np.array_equal(a, b) for a, b in zip(p0, p2))
