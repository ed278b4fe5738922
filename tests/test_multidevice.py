"""Data parallelism: 8 devices (and 2 processes) reach the parameters 1 device reaches.

The device count of a JAX process is fixed when JAX starts, so each configuration runs
in a subprocess: this file doubles as the worker (``python tests/test_multidevice.py
--out=...``), run with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (and, for
the multi-host test, ``JAX_COORDINATOR_ADDRESS`` / ``TP_JAX_PROCESS_ID``). Each worker
trains every method for 3 steps of a global batch of 16 through
``train.train_and_evaluate`` and saves the parameters; the 8-device worker also
inspects the compiled step to check that the batch really is split over the devices.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
BATCH = 16
# (name, method, model). BP and TJML-DTP on LeNet (conv, max-pool, dense, and their
# feedbacks); every method on a small MLP, whose steps compile in seconds (LDRL's and
# DTP's feedback iterations run inside the step; on LeNet LDRL alone would compile for
# minutes here, and its conv/pool feedback is TJML-DTP's with other weights).
RUNS = [('bp_lenet', 'bp', 'lenet'), ('tjml_dtp_lenet', 'tjml_dtp', 'lenet')] + [
    (f'{m}_mlp', m, 'mlp') for m in ('bp', 'tjml_dtp', 'ldrl', 'fwdtp', 'dtp', 'pjml_dtp')
]
LENET_RUNS = [r[0] for r in RUNS if r[2] == 'lenet']
# 2 processes x 2 devices.
MULTIHOST_RUNS = ['bp_mlp', 'tjml_dtp_mlp', 'dtp_mlp']


# --------------------------------------------------------------------------------------
# Worker (runs in a subprocess)


def _config(method: str, model: str):
  from tp_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  c = config_lib.default()
  c.method, c.model = method, model
  if model == 'mlp':
    c.model_kwargs = {'act': 'tanh', 'widths': (32, 32)}
  c.batch_size, c.epochs, c.steps_per_epoch = BATCH, 1, STEPS + 1
  c.check_every_steps = 0
  c.optimizer.lr = 0.01
  c.beta = 0.1  # DTP's targets overflow within 3 steps at beta 0.4655 on noise images
  n = 3 if model == 'lenet' else 2  # trained feedback blocks
  c.feedback.iterations = [2] * n
  c.feedback.noise = [0.1] * n
  c.feedback.lr = [1e-3] * n
  return c


def _dataset():
  """Host (numpy) arrays: no JAX call may precede jax.distributed.initialize."""
  from tp_jax import data  # pylint: disable=g-import-not-at-top

  r = np.random.RandomState(0)
  return data.Dataset(
      r.randn(80, 28, 28, 1).astype(np.float32),
      r.randint(0, 10, 80).astype(np.int32),
      r.randn(16, 28, 28, 1).astype(np.float32),
      r.randint(0, 10, 16).astype(np.int32),
      data.info('mnist'),
  )


def worker(out: Path, names: list[str], num_processes: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from tp_jax import train  # pylint: disable=g-import-not-at-top

  arrays, report = {}, {}
  ds = _dataset()
  for name, method, model in RUNS:
    if name not in names:
      continue
    t0 = time.time()
    cfg = _config(method, model)
    cfg.num_processes = num_processes
    # Every process must use the same workdir (Orbax coordinates the checkpoint writes).
    base = Path(out).parent / f'wd_{name}'
    res = train.train_and_evaluate(
        cfg, base / 'trained', ds, log=lambda s: None, until_step=STEPS, progress=False
    )
    init = train.train_and_evaluate(
        cfg, base / 'init', ds, log=lambda s: None, until_step=0, progress=False
    )
    for kind, state in (('final', res['state']), ('init', init['state'])):
      for i, leaf in enumerate(jax.tree.leaves((state.params, state.fb_params))):
        arrays[f'{name}/{kind}/{i}'] = np.asarray(leaf.addressable_data(0))
    # What the compiled step does with the batch.
    hlo = train.setup(cfg, ds).train_step.as_text()
    ndev = jax.device_count()
    local, full = BATCH // ndev, BATCH
    report[name] = dict(
        step=int(res['step']),
        compile_s=res['compile_s'],
        seconds=time.time() - t0,
        num_devices=ndev,
        num_processes=jax.process_count(),
        # The images of the batch, per device: NHWC (LeNet) or flattened (MLP).
        local_batch_in_hlo=f'f32[{local},28,28,1]' in hlo or f'f32[{local},784]' in hlo,
        full_batch_in_hlo=f'f32[{full},28,28,1]' in hlo or f'f32[{full},784]' in hlo,
        all_reduce_in_hlo='all-reduce' in hlo,
        state_replicated=all(l.sharding.is_fully_replicated for l in jax.tree.leaves(res['state'])),
    )
  if jax.process_index() == 0:
    np.savez(out, **arrays)
    Path(str(out) + '.json').write_text(json.dumps(report))


# --------------------------------------------------------------------------------------
# Tests


def _env(num_devices: int, **extra) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
      env.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={num_devices}'
  ).strip()
  env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  env.update(extra)
  return env


def _spawn(out: Path, num_devices: int, names, num_processes: int = 1, **env):
  cmd = [
      sys.executable,
      __file__,
      f'--out={out}',
      f'--names={",".join(names)}',
      f'--num_processes={num_processes}',
  ]
  return subprocess.Popen(
      cmd, env=_env(num_devices, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _wait(proc, what: str, timeout: float = 600) -> None:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, f'{what} worker failed:\n{out[-5000:]}'


def _load(out: Path):
  arrays = dict(np.load(out))
  return arrays, json.loads(Path(str(out) + '.json').read_text())


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Trains every method on 1 and on 8 devices (two subprocesses, in parallel)."""
  d = tmp_path_factory.mktemp('multidevice')
  names = [r[0] for r in RUNS]
  (d / 'one').mkdir()
  (d / 'eight').mkdir()
  one = _spawn(d / 'one' / 'out.npz', 1, names)
  eight = _spawn(d / 'eight' / 'out.npz', 8, names)
  _wait(one, '1-device')
  _wait(eight, '8-device')
  return _load(d / 'one' / 'out.npz'), _load(d / 'eight' / 'out.npz')


def _compare(a1: dict, a2: dict, name: str) -> float:
  keys = sorted(k for k in a1 if k.startswith(f'{name}/final/'))
  assert keys and keys == sorted(k for k in a2 if k.startswith(f'{name}/final/'))
  worst = 0.0
  for k in keys:
    np.testing.assert_allclose(a2[k], a1[k], rtol=1e-4, atol=2e-6, err_msg=k)
    worst = max(worst, float(np.max(np.abs(a2[k] - a1[k]))))
  # The comparison is not vacuous: training moved the parameters.
  moved = max(float(np.max(np.abs(a1[k] - a1[k.replace('/final/', '/init/')]))) for k in keys)
  assert moved > 100 * max(worst, 1e-7), (name, moved, worst)
  return worst


@pytest.mark.parametrize('name', [r[0] for r in RUNS])
def test_eight_devices_match_one(runs, name):
  (a1, r1), (a8, r8) = runs
  assert r1[name]['num_devices'] == 1 and r8[name]['num_devices'] == 8
  assert r1[name]['step'] == r8[name]['step'] == STEPS
  _compare(a1, a8, name)


@pytest.mark.parametrize('name', LENET_RUNS)
def test_batch_is_sharded_over_devices(runs, name):
  """The compiled 8-device step works on 2 examples per device and all-reduces; the
  1-device step on all 16. The state stays replicated."""
  (_, r1), (_, r8) = runs
  assert r8[name]['local_batch_in_hlo'], r8[name]
  assert r8[name]['all_reduce_in_hlo'], r8[name]
  assert r8[name]['state_replicated'], r8[name]
  assert r1[name]['full_batch_in_hlo'] and not r1[name]['all_reduce_in_hlo'], r1[name]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_device(runs, tmp_path):
  """2 processes x 2 CPU devices on localhost (gloo collectives): jax.distributed is
  initialised from config.num_processes, each host feeds its half of every batch."""
  (a1, _), _ = runs
  addr = f'127.0.0.1:{_free_port()}'
  out = tmp_path / 'out.npz'
  procs = [
      _spawn(
          out,
          2,
          MULTIHOST_RUNS,
          num_processes=2,
          JAX_COORDINATOR_ADDRESS=addr,
          TP_JAX_PROCESS_ID=str(p),
      )
      for p in range(2)
  ]
  try:
    for p, proc in enumerate(procs):
      _wait(proc, f'process {p}')
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  a2, r2 = _load(out)
  for name in MULTIHOST_RUNS:
    assert r2[name]['num_processes'] == 2 and r2[name]['num_devices'] == 4, r2[name]
    assert r2[name]['local_batch_in_hlo'] and r2[name]['all_reduce_in_hlo'], r2[name]
    _compare(a1, a2, name)


if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  parser.add_argument('--names', required=True)
  parser.add_argument('--num_processes', type=int, default=1)
  args = parser.parse_args()
  worker(Path(args.out), args.names.split(','), args.num_processes)
