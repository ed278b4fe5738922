"""experiments.bench_cpu: the timing loop, the report, and one real step per kind."""

from __future__ import annotations

import pytest

from experiments import bench_cpu


def test_time_interleaved_runs_every_variant_in_rotating_order():
  calls = []
  steps = {n: (lambda n=n: calls.append(n)) for n in 'abc'}
  times = bench_cpu.time_interleaved(steps, rounds=3, k=2)
  assert {n: len(v) for n, v in times.items()} == {'a': 3, 'b': 3, 'c': 3}
  timed = calls[6:]  # after 2 warm-up calls each
  firsts = [timed[6 * r] for r in range(3)]
  assert firsts == ['a', 'b', 'c'], timed


def test_report_ratios():
  rows = bench_cpu.report('lenet', {'bp / fast': [10.0, 12.0, 11.0], 'pytorch bp': [5.5]},
                          256)
  assert rows[0] == '| lenet (batch 256) | bp / fast | 11.0 | 2.00 | 1.00 | 10.0–12.0 |'
  assert rows[1].startswith('| lenet (batch 256) | pytorch bp | 5.5 | 1.00 | 0.50 |')


@pytest.mark.parametrize('method', ['bp', 'tjml_dtp'])
def test_jax_step_trains_on_its_batch(method):
  run = bench_cpu.jax_step('lenet', method, 'fast')
  losses = [run() for _ in range(3)]  # the same batch each step: the loss falls
  assert losses[2] < losses[0], losses


def test_torch_step_trains_on_its_batch():
  pytest.importorskip('torch')
  run, version = bench_cpu.torch_step('lenet')
  losses = [run() for _ in range(3)]
  assert losses[2] < losses[0], losses
  assert version
