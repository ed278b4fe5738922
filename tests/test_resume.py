"""Checkpoints and resume: a resumed run equals the uninterrupted one, bit for bit.

In-process: a short LDRL run (forward and feedback parameters, both optimiser states,
per-step noise) stopped after one epoch, or mid-epoch, and resumed, against the
uninterrupted run. End to end: ``python -m experiments.train`` on a tiny
MNIST-format dataset, killed with SIGKILL at random steps and while a checkpoint is
being written, restarted with the same command until it completes.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors as tb_errors
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as tb_records

from experiments import synthetic
from tp_jax import config as config_lib
from tp_jax import data
from tp_jax import metrics_writer
from tp_jax import train

ROOT = Path(__file__).resolve().parents[1]


def _dataset(n_train: int = 96, n_test: int = 32, seed: int = 0) -> data.Dataset:
  return synthetic.dataset('mnist', n_train, n_test, seed)


def _config(method: str = 'ldrl'):
  """LDRL (the most state: forward and feedback parameters, two optimiser states, noise
  drawn every step) on a small MLP: its step compiles in seconds. The end-to-end test
  below runs LeNet."""
  c = config_lib.default()
  c.method, c.model = method, 'mlp'
  c.model_kwargs = {'act': 'tanh', 'widths': (32, 32)}
  c.batch_size, c.epochs, c.steps_per_epoch = 16, 2, 6
  c.checkpoint_every_steps, c.check_every_steps = 4, 2
  c.beta, c.optimizer.lr = 0.1, 0.01
  c.feedback.iterations, c.feedback.noise, c.feedback.lr = [2, 2], [0.1] * 2, [1e-3] * 2
  c.eval_batch_size = 32
  return c


def _metrics(history):
  return [{k: v for k, v in r.items() if k not in train.TIMING_KEYS} for r in history]


def _leaves(state):
  return [np.asarray(a) for a in jax.tree.leaves(state)]


def _quiet(_):
  pass


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  wd = tmp_path_factory.mktemp('full')
  return train.train_and_evaluate(_config(), wd, _dataset(), log=_quiet), wd


@pytest.mark.slow
@pytest.mark.parametrize('stop', [6, 9])  # after epoch 1; mid-epoch 2 (no checkpoint due)
def test_resumed_run_equals_uninterrupted(uninterrupted, tmp_path, stop):
  full, _ = uninterrupted
  part = train.train_and_evaluate(_config(), tmp_path, _dataset(), log=_quiet, until_step=stop)
  assert not part['complete'] and part['step'] == stop
  assert train.Checkpointer(tmp_path, 2).latest_step() == stop
  logs = []
  res = train.train_and_evaluate(_config(), tmp_path, _dataset(), log=logs.append)
  assert f'resumed from checkpoint at step {stop}' in logs
  assert res['complete'] and res['step'] == 12
  assert _metrics(res['history']) == _metrics(full['history'])
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert _metrics(rows) == _metrics(full['history'])
  for k in ('train_loss', 'train_accuracy', 'test_accuracy'):
    assert res[k] == full[k], k
  a, b = _leaves(res['state']), _leaves(full['state'])
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
  # Sanity: the run did move (LDRL's feedback weights too), so equality means something.
  assert res['state'].fb_params and not all(
      np.array_equal(x, y)
      for x, y in zip(
          jax.tree.leaves(res['state'].fb_params), jax.tree.leaves(part['state'].fb_params)
      )
  )


@pytest.mark.slow
def test_rows_and_events_past_the_checkpoint_are_dropped(uninterrupted, tmp_path):
  """A killed run may have logged past its last checkpoint: those rows and events
  must not appear twice (or at all, if the resumed run computes different values)."""
  full, full_wd = uninterrupted
  train.train_and_evaluate(_config(), tmp_path, _dataset(), log=_quiet, until_step=6)
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps(dict(full['history'][0], epoch=2, step=12, train_loss=-1.0)) + '\n')
  with metrics_writer.EventWriter(tmp_path) as w:
    w.scalars(12, {'train/loss': -1.0})
  res = train.train_and_evaluate(_config(), tmp_path, _dataset(), log=_quiet)
  assert _metrics(res['history']) == _metrics(full['history'])
  series = _tensorboard_scalars(tmp_path)
  assert series['train/loss'] == _tensorboard_scalars(full_wd)['train/loss']
  assert [s for s, _ in series['train/loss']] == [6, 12]


@pytest.mark.slow
def test_resume_refuses_a_different_config(uninterrupted, tmp_path):
  train.train_and_evaluate(_config(), tmp_path, _dataset(), log=_quiet, until_step=2)
  cfg = _config()
  cfg.beta = 0.2
  with pytest.raises(config_lib.ConfigError, match=r'beta: 0\.1 -> 0\.2'):
    train.train_and_evaluate(cfg, tmp_path, _dataset(), log=_quiet)
  # Fields that change nothing computed may differ.
  cfg = _config()
  cfg.check_every_steps, cfg.keep_checkpoints, cfg.checkpoint_every_steps = 1, 3, 5
  res = train.train_and_evaluate(cfg, tmp_path, _dataset(), log=_quiet)
  assert res['complete'] and _metrics(res['history']) == _metrics(uninterrupted[0]['history'])


@pytest.mark.slow
def test_restart_of_a_finished_run_changes_nothing(uninterrupted):
  full, wd = uninterrupted
  before = (wd / 'metrics.jsonl').read_text()
  res = train.train_and_evaluate(_config(), wd, _dataset(), log=_quiet)
  assert (wd / 'metrics.jsonl').read_text() == before
  assert _metrics(res['history']) == _metrics(full['history'])
  assert res['train_loss'] == full['train_loss']


# --------------------------------------------------------------------------------------
# SIGKILL, end to end through the binary


def write_fake_mnist(root: Path, n_train: int = 96, n_test: int = 32, seed: int = 0) -> Path:
  """MNIST-format idx.gz files with random pixels (checksums will not match: run with
  verify_checksums=False)."""
  r = np.random.RandomState(seed)
  d = root / 'mnist'
  d.mkdir(parents=True, exist_ok=True)
  for n, (images, labels) in (
      (n_train, data.DATASETS['mnist'].files['train']),
      (n_test, data.DATASETS['mnist'].files['test']),
  ):
    x = r.randint(0, 256, (n, 28, 28), dtype=np.uint8)
    y = r.randint(0, 10, n).astype(np.uint8)
    with gzip.open(d / images, 'wb') as f:
      f.write(
          (0x803).to_bytes(4, 'big')
          + b''.join(v.to_bytes(4, 'big') for v in (n, 28, 28))
          + x.tobytes()
      )
    with gzip.open(d / labels, 'wb') as f:
      f.write((0x801).to_bytes(4, 'big') + n.to_bytes(4, 'big') + y.tobytes())
  return root


STEPS = 12  # 2 epochs x 6 steps; a checkpoint every 2 steps


def binary_command(workdir: Path, data_dir: Path) -> list[str]:
  return [
      sys.executable,
      '-m',
      'experiments.train',
      '--config=experiments/configs/lenet_mnist.py',
      f'--workdir={workdir}',
      f'--data_dir={data_dir}',
      '--config.verify_checksums=False',
      '--config.batch_size=16',
      '--config.epochs=2',
      '--config.steps_per_epoch=6',
      '--config.checkpoint_every_steps=2',
      '--config.check_every_steps=1',
      '--config.log_every_steps=1',
      '--config.beta=0.1',
      '--config.optimizer.lr=0.01',
      '--config.eval_batch_size=32',
  ]


# Kills the process inside Orbax's commit of the n-th checkpoint: every file is written
# into the temporary directory, which is not yet renamed. The most dangerous moment:
# a complete-looking checkpoint that was never committed.
_KILL_IN_COMMIT = r"""
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity
n, calls = int(os.environ['TP_JAX_TEST_KILL_AT_SAVE']), [0]
orig = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *args, **kwargs):
  calls[0] += 1
  if calls[0] == n:
    os.kill(os.getpid(), signal.SIGKILL)
  return await orig(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv[0] = 'experiments.train'
runpy.run_module('experiments.train', run_name='__main__', alter_sys=True)
"""


def _env(cache: Path) -> dict:
  env = dict(os.environ)
  env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  # Restarts load the compiled step instead of compiling it again.
  env['JAX_COMPILATION_CACHE_DIR'] = str(cache)
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  return env


class Run:
  """A training subprocess whose output lines are collected by a thread."""

  def __init__(self, cmd, env):
    self.proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    self.lines: list[str] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line.rstrip('\n'))

  def wait_for(self, pred, timeout=300.0) -> bool:
    """Waits until pred() or the process ends; True iff pred() held first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
      if pred():
        return True
      if self.proc.poll() is not None:
        return bool(pred())
      time.sleep(0.0005)
    raise TimeoutError('training subprocess stalled:\n' + '\n'.join(self.lines[-30:]))

  def kill(self) -> None:
    self.proc.send_signal(signal.SIGKILL)

  def finish(self, timeout=300.0) -> int:
    rc = self.proc.wait(timeout=timeout)
    self._reader.join(timeout=10)
    return rc

  def text(self) -> str:
    return '\n'.join(self.lines)


def _steps_seen(run: Run) -> int:
  return sum(1 for l in run.lines if l.startswith('step '))


def _committed(ckpt_dir: Path) -> list[int]:
  return sorted(int(p.name) for p in ckpt_dir.glob('*') if p.name.isdigit())


def _uncommitted(ckpt_dir: Path) -> list[str]:
  return sorted(p.name for p in ckpt_dir.glob('*') if 'tmp' in p.name)


def _final(workdir: Path) -> dict:
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  result = json.loads((workdir / 'result.json').read_text())
  return dict(
      rows=_metrics(rows),
      **{k: result[k] for k in ('train_loss', 'train_accuracy', 'test_accuracy', 'skipped_steps')},
  )


def _resumed_step(run: Run) -> int:
  found = [
      int(l.rsplit(' ', 1)[1]) for l in run.lines if l.startswith('resumed from checkpoint at step')
  ]
  return found[0] if found else 0


@pytest.mark.slow
def test_sigkill_at_random_points_then_restart(tmp_path):
  seed = int(os.environ.get('TP_JAX_KILL_SEED', time.time_ns() % 2**31))
  rng = random.Random(seed)
  data_dir = write_fake_mnist(tmp_path / 'data')
  env = _env(tmp_path / 'jax_cache')
  ref = tmp_path / 'reference'
  run = Run(binary_command(ref, data_dir), env)
  assert run.finish() == 0, run.text()
  expected = _final(ref)

  wd = tmp_path / 'killed'
  cmd = binary_command(wd, data_dir)
  ckpt = wd / 'checkpoints'
  trials = []

  # 1. Mid-epoch, at a random step (and a random fraction of the next one).
  kill_after = rng.randint(1, STEPS - 2)
  run = Run(cmd, env)
  killed = run.wait_for(lambda: _steps_seen(run) >= kill_after)
  time.sleep(rng.uniform(0, 0.05))
  run.kill()
  run.finish()
  trials.append(('random step', kill_after, killed, _committed(ckpt), _uncommitted(ckpt)))

  # 2. Inside the commit of a checkpoint: its files are written, the rename is not.
  before = _committed(ckpt)
  env_hook = dict(env, TP_JAX_TEST_KILL_AT_SAVE=str(rng.randint(1, 2)))
  run = Run([sys.executable, '-c', _KILL_IN_COMMIT] + cmd[3:], env_hook)
  rc = run.finish()
  assert rc == -signal.SIGKILL, run.text()
  half_written = _uncommitted(ckpt)
  assert half_written, 'the kill left no uncommitted checkpoint'
  trials.append(
      ('in commit', env_hook['TP_JAX_TEST_KILL_AT_SAVE'], True, _committed(ckpt), half_written)
  )
  latest = max(_committed(ckpt), default=0)
  assert latest >= max(before, default=0)

  # 3. Restart; kill as soon as a checkpoint directory is being written (random point
  #    of the write: the poll runs every 0.5 ms), after a random number of saves.
  stale = set(half_written)  # the restart deletes it (asynchronously)
  run = Run(cmd, env)
  skip_saves = rng.randint(0, 1)
  seen: set[str] = set()

  def writing():
    tmp = set(_uncommitted(ckpt))
    if stale:
      stale.intersection_update(tmp)  # still being deleted
      return False
    seen.update(tmp)
    return bool(tmp) and len(seen) > skip_saves

  killed = run.wait_for(writing)
  run.kill()
  run.finish()
  resumed = _resumed_step(run)
  assert resumed == latest, (resumed, latest, run.text())  # not the half-written one
  trials.append(('while writing', skip_saves, killed, _committed(ckpt), _uncommitted(ckpt)))

  # 4. Restart and run to the end.
  latest = max(_committed(ckpt), default=0)
  run = Run(cmd, env)
  assert run.finish() == 0, run.text()
  assert _resumed_step(run) == latest, (latest, run.text())
  assert not _uncommitted(ckpt), 'a half-written checkpoint was left behind'
  got = _final(wd)
  msg = f'seed {seed}, trials {trials}'
  assert got == expected, msg
  print(f'kill/resume trials (seed {seed}): {trials}')


# --------------------------------------------------------------------------------------
# TensorBoard event files


def _tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value), ...] as TensorBoard shows them: its own reader, which reads
  the files in name order and applies the SessionLog(START) purge rule."""
  acc = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.SCALARS: 0}
  )
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def _events(path: Path) -> list[event_pb2.Event]:
  """The events of one file through tensorboard's record reader (CRCs checked)."""
  reader, events = tb_records.PyRecordReader_New(str(path)), []
  while True:
    try:
      reader.GetNext()
    except tb_errors.OutOfRangeError:
      return events
    events.append(event_pb2.Event.FromString(reader.record()))


def test_event_files_round_trip_and_purge_on_resume(tmp_path):
  with metrics_writer.EventWriter(tmp_path) as w:
    for s in range(1, 5):
      w.scalars(s, {'loss': 1.0 / s, 'block/1': float(s)})
  time.sleep(0.001)
  with metrics_writer.EventWriter(tmp_path, start_step=2) as w:  # resumed at step 2
    w.scalars(3, {'loss': 30.0})
  w.close()  # closing twice is harmless; writing after closing is not
  with pytest.raises(ValueError, match='is closed'):
    w.scalars(4, {'loss': 40.0})
  series = _tensorboard_scalars(tmp_path)
  assert series['loss'] == [(1, 1.0), (2, 0.5), (3, 30.0)]
  assert series['block/1'] == [(1, 1.0), (2, 2.0)]
  first, resumed = sorted(tmp_path.glob('events.out.tfevents.*'))
  assert _events(first)[0].file_version == 'brain.Event:2' and len(_events(first)) == 5
  start = _events(resumed)[1]
  assert (start.step, start.session_log.status) == (3, event_pb2.SessionLog.START)
  # A record cut short by a kill is ignored, as it is while a writer is still appending;
  # a corrupt one fails its CRC check and is not shown either.
  blob = resumed.read_bytes()
  resumed.write_bytes(blob[:-3])
  assert _tensorboard_scalars(tmp_path)['loss'][-1] == (2, 0.5)
  resumed.write_bytes(blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:])
  assert _tensorboard_scalars(tmp_path)['loss'][-1] == (2, 0.5)
  with pytest.raises(tb_errors.DataLossError, match='failed event crc32 check'):
    _events(resumed)


def test_event_writer_needs_no_tensorflow(tmp_path):
  """Writes and reads event files in a process where ``import tensorflow`` fails."""
  script = (
      'import sys; sys.modules["tensorflow"] = None\n'
      'from tp_jax import metrics_writer\n'
      'from tensorboard.backend.event_processing import event_accumulator as ea\n'
      f'with metrics_writer.EventWriter({str(tmp_path)!r}) as w:\n'
      '  w.scalars(7, {"loss": 0.25})\n'
      f'acc = ea.EventAccumulator({str(tmp_path)!r}); acc.Reload()\n'
      'print([(e.step, e.value) for e in acc.Scalars("loss")])\n'
  )
  out = subprocess.run(
      [sys.executable, '-c', script],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=True,
      timeout=120,
  )
  assert out.stdout.strip() == '[(7, 0.25)]'


@pytest.mark.slow
def test_training_writes_event_files(uninterrupted):
  full, wd = uninterrupted
  series = _tensorboard_scalars(wd)
  assert [s for s, _ in series['test/accuracy']] == [6, 12]
  assert [v for _, v in series['test/accuracy']] == pytest.approx(
      [r['test_accuracy'] for r in full['history']]
  )
  assert {f'train/block_loss/block{n}' for n in range(1, 4)} <= set(series)
