"""experiments.bench_cpu: the reports, and one real step per kind."""

from __future__ import annotations

import os

import numpy as np
import pytest
from absl import app
from absl import flags

from experiments import bench_cpu
from experiments import scaling_dtp_reference
from experiments import torch_reference
from tp_jax import models

# A local checkout of scalingDTP (ernoult/scalingDTP), for the test that runs its steps.
SCALINGDTP_DIR = os.environ.get('TP_JAX_SCALINGDTP_DIR')

pytestmark = pytest.mark.slow


def test_report_ratios():
  times = {'bp / fast': [10.0, 12.0, 11.0], 'pytorch bp': [5.5], 'fwdtp / fast': [4.0]}
  gflop = {'bp / fast': 2.2, 'pytorch bp': 2.2, 'fwdtp / fast': None}
  rows = bench_cpu.report('lenet', times, 256, gflop)
  assert rows[0] == '| lenet (batch 256) | bp / fast | 11.0 | 2.00 | 1.00 | 200.0 | 10.0–12.0 |'
  assert rows[1].startswith('| lenet (batch 256) | pytorch bp | 5.5 | 1.00 | 0.50 | 400.0 |')
  assert rows[2].startswith('| lenet (batch 256) | fwdtp / fast | 4.0 | 0.73 | 0.36 |  |')


def test_layer_report_speedup_over_xla():
  rows = bench_cpu.layer_report(
      'conv', {'forward / xla': [4.0, 6.0, 5.0], 'forward / fast': [2.0, 3.0, 2.5]}
  )
  assert rows == [
      '| conv | forward / xla | 5.00 | 1.00 | 4.00–6.00 |',
      '| conv | forward / fast | 2.50 | 2.00 | 2.00–3.00 |',
  ]


@pytest.mark.parametrize(
    'spec, method, overrides',
    [
        ('bp', 'bp', {}),
        ('tjml_dtp:hadamard', 'tjml_dtp', {'feedback_act': 'hadamard'}),
        ('tjml_dtp:derived', 'tjml_dtp', {'derived_feedback': True}),
        (
            'tjml_dtp:hadamard:derived',
            'tjml_dtp',
            {'feedback_act': 'hadamard', 'derived_feedback': True},
        ),
    ],
)
def test_method_spec(spec, method, overrides):
  assert bench_cpu.method_spec(spec) == (method, overrides)


def test_method_spec_refuses_extra_parts():
  with pytest.raises(app.UsageError, match='method\\[:feedback_act\\]\\[:derived\\]'):
    bench_cpu.method_spec('tjml_dtp:hadamard:integral')


@pytest.mark.parametrize('method', ['bp', 'tjml_dtp'])
def test_jax_step_trains_on_its_batch(method):
  run = bench_cpu.jax_step('lenet', method, 'fast', augment=False)
  losses = [run(1) for _ in range(3)]  # the same batch each step: the loss falls
  assert losses[2] < losses[0], losses


def test_conv_layer_ops_agree_across_implementations():
  shape = dict(batch=2, size=8, cin=3, cout=4, kernel=3, stride=2)
  fast = bench_cpu.conv_layer_ops(**shape, impl='fast')
  xla = bench_cpu.conv_layer_ops(**shape, impl='xla')
  assert set(fast) == set(xla) == {'forward', 'input-grad', 'weight-grad'}
  for op in fast:
    np.testing.assert_allclose(fast[op](2), xla[op](2), rtol=1e-4, atol=1e-4)


def test_torch_step_trains_on_its_batch():
  pytest.importorskip('torch')
  run, version = bench_cpu.torch_step('lenet')
  losses = [run(1) for _ in range(3)]
  assert losses[2] < losses[0], losses
  assert version


def test_step_cost_counts_a_tjml_dtp_step_near_bp():
  """A tiny LeNet and Mixer: FLOPs and temporary memory are positive, and a Hadamard
  TJML-DTP step of LeNet (every block after the first fused) counts as many FLOPs as
  BP's to within 5%; the Mixer (no conv_impl argument) builds too."""
  bp = bench_cpu.step_cost('lenet_mnist', method='bp', batch_size=8)
  tjml = bench_cpu.step_cost(
      'lenet_mnist', method='tjml_dtp', feedback_act='hadamard', batch_size=8
  )
  assert bp[0] > 0 and bp[1] > 0 and tjml[1] > 0, (bp, tjml)
  assert 0.95 < tjml[0] / bp[0] < 1.05, (bp, tjml)
  mixer = bench_cpu.step_cost(
      'mlp_mixer', method='bp', batch_size=4, model_kwargs=dict(num_blocks=1, hidden=8)
  )
  assert mixer[0] > 0, mixer


def test_cost_lines_tabulate_every_step_against_bp(monkeypatch):
  fake = {
      ('bp', None): (2.0, 100.0),
      ('tjml_dtp', 'integral'): (2.5, 110.0),
      ('tjml_dtp', 'hadamard'): (3.0, 120.4),
  }
  monkeypatch.setattr(
      bench_cpu, 'step_cost', lambda model, method, feedback_act=None: fake[method, feedback_act]
  )
  lines = bench_cpu.cost_lines(['lenet_mnist'], dict(cpu_count=2, platform='linux', jax='0'))
  assert lines[-4:] == [
      '|---|---|---|---|---|',
      '| lenet_mnist (batch 256) | BP | 2.00 | 1.00 | 100 |',
      '| lenet_mnist (batch 256) | TJML-DTP, varsigma | 2.50 | 1.25 | 110 |',
      '| lenet_mnist (batch 256) | TJML-DTP, Hadamard | 3.00 | 1.50 | 120 |',
  ]


def test_reference_report_ratios_ours_over_theirs():
  times = {
      'reference ldrl': [30000.0, 32000.0, 31000.0],
      'reference bp': [300.0, 320.0],
      'ldrl': [15500.0],
      'bp': [240.0, 270.0, 255.0],
      'tjml_dtp': [310.0],
  }
  assert bench_cpu.reference_report(times) == [
      '| LDRL | 31000.0 | 15500.0 | 0.500 | 30000.0–32000.0 | 15500.0–15500.0 |',
      '| BP | 310.0 | 255.0 | 0.823 | 300.0–320.0 | 240.0–270.0 |',
      '| TJML-DTP vs the reference LDRL | 31000.0 | 310.0 | 0.010 | 30000.0–32000.0 | '
      '310.0–310.0 |',
      '| TJML-DTP vs the reference BP | 310.0 | 310.0 | 1.000 | 300.0–320.0 | 310.0–310.0 |',
  ]


def _main_with(*argv: str) -> None:
  flags.FLAGS(['bench_cpu', *argv])
  try:
    bench_cpu.main(['bench_cpu'])
  finally:
    flags.FLAGS.unparse_flags()


def test_reference_dir_refuses_what_is_not_a_checkout(tmp_path):
  """Through the flag: a missing directory, and one that lacks the files of a checkout
  (named), fail before anything is built."""
  with pytest.raises(app.UsageError, match='not a directory'):
    _main_with(f'--reference_dir={tmp_path / "absent"}')
  (tmp_path / 'target_prop' / 'models').mkdir(parents=True)
  (tmp_path / 'target_prop' / 'models' / 'dtp.py').touch()
  with pytest.raises(
      app.UsageError,
      match='does not look like a scalingDTP checkout.*: missing target_prop/models/baseline.py, '
      'target_prop/networks/lenet.py, conf/model_network/dtp_lenet.yaml$',
  ):
    _main_with(f'--reference_dir={tmp_path}')


def test_reference_dir_names_missing_requirements(tmp_path, monkeypatch):
  for f in scaling_dtp_reference.CHECKOUT_FILES:
    (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / f).touch()
  monkeypatch.setitem(scaling_dtp_reference.REQUIREMENTS, 'tp_jax_absent_module', 'absent-dist==1')
  with pytest.raises(
      app.UsageError, match='requirements; not installed: .*tp_jax_absent_module .*absent-dist==1'
  ):
    scaling_dtp_reference.load(tmp_path)


def test_reference_iterations_want_one_k_per_trained_block():
  with pytest.raises(app.UsageError, match='want 3 positive integers'):
    bench_cpu.reference_steps('/nonexistent', (41, 51))
  with pytest.raises(app.UsageError, match='--reference_iterations: invalid literal'):
    _main_with('--reference_dir=/nonexistent', '--reference_iterations=1,a,1')


@pytest.mark.skipif(
    not SCALINGDTP_DIR, reason='TP_JAX_SCALINGDTP_DIR (a scalingDTP checkout) is not set'
)
def test_reference_steps_run_their_bp_and_ldrl():
  """The checkout's own BP step (3 steps on one batch: the loss falls) and one LDRL step
  with K = 1 per block (finite loss), on LeNet's 32x32x1 input."""
  pytest.importorskip('torch')
  ref = scaling_dtp_reference.load(SCALINGDTP_DIR)
  assert ref.path.joinpath('target_prop').is_dir() and 'torch' in ref.versions
  assert set(ref.stand_ins) <= set(scaling_dtp_reference.STAND_INS)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((32, 32, 32, 1), np.float32)
  y = rng.integers(0, 10, 32)
  bp = scaling_dtp_reference.bp_step(ref, x, y)
  losses = [bp(1) for _ in range(3)]
  assert losses[2] < losses[0], losses
  assert scaling_dtp_reference.dtp_hparams(ref).feedback_training_iterations == [41, 51, 24]
  ldrl = scaling_dtp_reference.ldrl_step(ref, x, y, iterations=(1, 1, 1))
  assert np.isfinite(ldrl(1))


@pytest.mark.parametrize('model', ['lenet', 'lenet_mnist', 'simple_vgg'])
def test_torch_twin_takes_the_configs_input_shape(model):
  torch = pytest.importorskip('torch')
  cfg = bench_cpu.CONFIGS[model]()
  h, w, c = models.input_shape(cfg)
  out = torch_reference.model(cfg.model, (h, w, c))(torch.zeros(2, c, h, w))
  assert tuple(out.shape) == (2, 10)
  assert bench_cpu.torch_step(model) is not None
