"""experiments.bench_cpu: the reports, and one real step per kind."""

from __future__ import annotations

import numpy as np
import pytest
from absl import app

from experiments import bench_cpu

pytestmark = pytest.mark.slow


def test_report_ratios():
  rows = bench_cpu.report('lenet', {'bp / fast': [10.0, 12.0, 11.0], 'pytorch bp': [5.5]}, 256)
  assert rows[0] == '| lenet (batch 256) | bp / fast | 11.0 | 2.00 | 1.00 | 10.0–12.0 |'
  assert rows[1].startswith('| lenet (batch 256) | pytorch bp | 5.5 | 1.00 | 0.50 |')


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
