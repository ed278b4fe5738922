"""experiments.reproduce.scaling (``--figure=scaling``): the points and their configs (the
full-size ones validated, nothing compiled), the ResNet's ``stages``, the table and the
figure from given rows, and (slow) a tiny run end to end, in-process and on the command
line."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from experiments import bench_step
from experiments.configs import resnet18_cifar10
from experiments.configs import vgg_cifar10
from experiments.reproduce import commands
from experiments.reproduce import scaling
from tp_jax import config as config_lib
from tp_jax import models
from tp_jax import network
from tp_jax.algorithms import feedback_training

REPO = Path(__file__).resolve().parents[1]


def test_truncated_feedback_keeps_the_body_prefix_and_the_head():
  vgg = vgg_cifar10.get_config().feedback
  full = {f: tuple(vgg[f]) for f in ('iterations', 'noise', 'lr')}
  three = scaling.truncated_feedback(full, 3, None)  # 3 conv blocks + head: 3 trained
  assert three == dict(iterations=(20, 30, 20), noise=(0.4, 0.4, 0.08), lr=(1e-4, 3.5e-4, 0.18))
  assert scaling.truncated_feedback(full, 5, None) == full  # the full VGG: unchanged
  assert scaling.truncated_feedback(full, 2, 1)['iterations'] == (1, 1)


@pytest.mark.parametrize('profile', ['cpu', 'smoke'])
def test_every_point_is_a_valid_config_of_its_depth(profile):
  """Each point of the plan, under every method, passes the training loop's validation
  (per-block feedback lists fit the truncated net) and has the depth it claims; LDRL's
  K per block is the config's prefix and head (cpu) or 1 (smoke). Shapes only."""
  plan = scaling.PLANS[profile]
  pts = scaling.points(plan)
  assert [(p.part, p.value) for p in pts] == (
      [('vgg_depth', n) for n in plan.vgg_blocks]
      + [('resnet_depth', s) for s in plan.resnet_stages]
      + [('vgg_batch', b) for b in plan.batches]
  )
  resnet_k = tuple(resnet18_cifar10.get_config().feedback.iterations)
  for p in pts:
    for method in scaling.METHODS:
      cfg = bench_step.config(p.bench_model, 'auto', method=method, **p.overrides)
      config_lib.validate(cfg)
    net = models.for_config(cfg)  # the last method's: ldrl
    k = feedback_training.per_block(cfg, 'iterations', net)
    if p.part == 'vgg_depth':
      assert len(net) == p.value + 1 and cfg.model_kwargs.channels == plan.vgg_channels[: p.value]
      want_k = (20, 30, 35, 55)[: p.value - 1] + (20,)
    elif p.part == 'resnet_depth':
      assert len(net) == 2 * p.value + 2 and cfg.model_kwargs.width == plan.resnet_width
      want_k = resnet_k[: 2 * p.value] + resnet_k[-1:]
    else:
      assert cfg.batch_size == p.value and len(net) == len(plan.vgg_channels) + 1
      want_k = (20, 30, 35, 55, 20)
    assert tuple(k) == (want_k if plan.ldrl_k is None else (1,) * len(want_k)), p
    if p.axis == 'depth':
      assert cfg.batch_size == (plan.depth_batch or 128)


def test_resnet_stages_truncate_the_network():
  full = models.resnet18(width=8)
  assert [type(b).__name__ for b in models.resnet18(width=8, stages=4).blocks] == [
      type(b).__name__ for b in full.blocks
  ]
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  for s in (1, 2, 3):
    net = models.resnet18(width=8, stages=s)
    params = jax.eval_shape(lambda k, x: network.init(net, k, x), jax.random.key(0), x)
    hs = jax.eval_shape(lambda p, x: network.forward(net, p, x)[0], params, x)
    assert len(net) == 2 * s + 2
    side = 16 // 2 ** (s - 1)
    assert [h.shape for h in hs[-3:]] == [(1, side, side, 8 * 2 ** (s - 1))] * 2 + [(1, 10)]
  for bad in (0, 5, True):
    with pytest.raises(ValueError, match='stages must be 1, 2, 3 or 4'):
      models.resnet18(stages=bad)


def _rows():
  row = lambda value, method, ms, mib, gflop=None: dict(
      axis='depth',
      model='simple_vgg',
      value=value,
      method=method,
      ms_per_step=ms,
      peak_temp_mib=mib,
      gflop=gflop,
      batch=128,
      blocks=value + 1,
      k_total=0 if method != 'ldrl' else 40,
      windows=3,
      compile_s=1.0,
  )
  return [
      row(2, 'bp', 100.0, 50.0, 2.0),
      row(2, 'tjml_dtp', 110.0, 55.0, 2.0),
      row(2, 'ldrl', 5000.0, 200.0),
      row(3, 'bp', 200.0, 60.0, 3.0),
      row(3, 'tjml_dtp', 210.0, 61.0, 3.1),
      row(3, 'ldrl', 12000.0, 250.0),
  ]


def test_markdown_csv_and_plot_from_rows(tmp_path):
  rows = _rows()
  md = scaling.markdown(rows, '# header')
  assert md.startswith('# header')
  assert (
      '| depth | Simplified-VGG | 2 | 128 | 3 | TJML-DTP | 110.0 | 1.10 | 55.0 | 1.10 | 2.00 |'
      in md
  )
  assert (
      '| depth | Simplified-VGG | 3 | 128 | 4 | LDRL | 12000.0 | 60.00 | 250.0 | 4.17 |  | 40 |'
      in md
  )
  scaling.write_csv(rows, tmp_path / 'scaling.csv')
  assert scaling.read_csv(tmp_path / 'scaling.csv') == rows
  png = scaling.plot(rows, tmp_path / 'scaling.png')
  assert png.stat().st_size > 10_000


def test_bad_parts_and_methods_are_refused_before_anything_compiles(tmp_path):
  with pytest.raises(ValueError, match='unknown scaling parts'):
    scaling.run(tmp_path, scaling.PLANS['smoke'], parts=['vgg_width'])
  with pytest.raises(ValueError, match='give some of'):
    scaling.run(tmp_path, scaling.PLANS['smoke'], methods=['sgd'])
  assert not (tmp_path / 'scaling.csv').exists()


def test_cli_refuses_unknown_figure(tmp_path):
  p = subprocess.run(
      [sys.executable, '-m', 'experiments.reproduce', '--figure=3', f'--workdir={tmp_path}'],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert p.returncode != 0 and 'unknown figure 3' in p.stderr


@pytest.mark.slow
def test_tiny_scaling_run(tmp_path):
  """The smoke plan cut to two VGG depths, one ResNet stage and two batches, for BP,
  TJML-DTP and LDRL (K = 1): one CSV row per point and method with positive times and
  memory, GFLOP for all but LDRL, the markdown table and the PNG."""
  plan = dataclasses.replace(scaling.PLANS['smoke'], resnet_stages=(1,))
  methods = ('bp', 'tjml_dtp', 'ldrl')
  csv_path = commands.run_scaling(
      'smoke', tmp_path / 'out', methods, workdir=tmp_path, plan=plan, log=lambda s: None
  )
  assert csv_path == tmp_path / 'out' / 'scaling.csv'
  rows = scaling.read_csv(csv_path)
  want = [('depth', 'simple_vgg', n) for n in (2, 3)] + [('depth', 'resnet18_w8', 1)]
  want += [('batch', 'simple_vgg', b) for b in (4, 8)]
  assert [(r['axis'], r['model'], r['value'], r['method']) for r in rows] == [
      (*w, m) for w in want for m in methods
  ]
  for r in rows:
    assert math.isfinite(r['ms_per_step']) and r['ms_per_step'] > 0, r
    assert r['peak_temp_mib'] > 0, r
    assert r['windows'] == 1 and r['compile_s'] > 0, r
    if r['method'] == 'ldrl':
      assert r['gflop'] is None and r['k_total'] == r['blocks'] - 1, r  # K = 1 per block
    else:
      assert r['gflop'] > 0 and r['k_total'] == 0, r
    assert r['batch'] == (r['value'] if r['axis'] == 'batch' else 8), r
  md = (tmp_path / 'out' / 'scaling.md').read_text()
  assert md.startswith('# Scaling') and 'K = 1 for every block' in md
  assert md.count('| LDRL |') == 5
  assert (tmp_path / 'out' / 'scaling.png').stat().st_size > 10_000


@pytest.mark.slow
def test_cli_scaling_smoke_writes_under_the_workdir(tmp_path):
  """--figure=scaling with the smoke profile writes to <workdir>/smoke, never to
  benchmarks/; --methods and --scaling_parts select what runs."""
  before = (
      (REPO / 'benchmarks' / 'scaling.csv').stat().st_mtime_ns
      if (REPO / 'benchmarks' / 'scaling.csv').exists()
      else None
  )
  p = subprocess.run(
      [
          sys.executable,
          '-m',
          'experiments.reproduce',
          '--figure=scaling',
          '--methods=bp',
          '--scaling_parts=vgg_batch',
          '--scaling_steps=2',
          f'--workdir={tmp_path}',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert p.returncode == 0, p.stderr[-2000:]
  rows = scaling.read_csv(tmp_path / 'smoke' / 'scaling.csv')
  assert [(r['axis'], r['value'], r['method']) for r in rows] == [
      ('batch', 4, 'bp'),
      ('batch', 8, 'bp'),
  ]
  md = (tmp_path / 'smoke' / 'scaling.md').read_text()
  assert '--figure=scaling --methods=bp' in md and '1 window(s) of 2 step(s)' in md
  after = (
      (REPO / 'benchmarks' / 'scaling.csv').stat().st_mtime_ns
      if (REPO / 'benchmarks' / 'scaling.csv').exists()
      else None
  )
  assert after == before
