"""experiments/jml_report.py on tiny generated batches (no dataset files needed)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from absl import flags

from experiments import jml_report
from tp_jax import data

FEEDBACKS = ('tjmc_integral', 'tjmc_hadamard', 'fwdtp_random', 'pjmc')


@pytest.fixture(scope='module')
def rows():
  """The binary end to end (absl flags, main, run: models.mlp, network.init,
  init_feedback, jml.report, --json) on a synthetic 2x4x4x1 batch, rows parsed back
  from stdout. The FWDTP MLP on 4x4x1 has blocks 16->256, 4 x 256->256 (tanh), 256->10;
  with --max_exact_size=65535 blocks 0 and 5 are exact, blocks 1-4 (65536) estimated.
  (A small MLP keeps this fast; LeNet-like report rows are checked in tests/test_jml.py.)"""
  argv = [
      'jml_report',
      '--model=mlp',
      '--dataset=synthetic',
      '--synthetic_shape=4,4,1',
      '--batch_size=2',
      '--json',
      '--num_probes=16',
      '--max_exact_size=65535',
  ]
  flags.FLAGS(argv)
  try:
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
      # -O0: the run compiles many tiny programs once each (compile time dominates).
      mp.setattr(jml_report.jml, 'COMPILER_OPTIONS', {'xla_backend_optimization_level': 0})
      jml_report.main([])
  finally:
    flags.FLAGS.unparse_flags()
  return [json.loads(line) for line in out.getvalue().splitlines()]


EXACT_BLOCKS = (0, 5)


@pytest.mark.slow
def test_rows_cover_every_block_and_feedback(rows):
  """A TJML row per block and feedback; PJML rows only for the exact blocks; no IJML
  (the square blocks are estimated: IJML has no matrix-free form); error bars exactly
  on the estimated rows."""
  keys = {(r['block'], r['feedback'], r['kind']) for r in rows}
  expected = {(n, fb, 'tjml') for n in range(6) for fb in FEEDBACKS}
  expected |= {(n, fb, 'pjml') for n in EXACT_BLOCKS for fb in FEEDBACKS}
  assert keys == expected and len(rows) == len(expected)
  shapes = {r['block']: r['shape'] for r in rows}
  assert shapes == {0: '4x4x1 -> 256', **{n: '256 -> 256' for n in range(1, 5)}, 5: '256 -> 10'}
  for r in rows:
    assert r['model'] == 'mlp' and r['dataset'] == 'synthetic' and r['batch_size'] == 2
    assert np.isfinite(r['absolute']) and np.isfinite(r['relative'])
    assert r['method'] == ('exact' if r['block'] in EXACT_BLOCKS else 'estimated')
    if r['method'] == 'exact':
      assert r['stderr_absolute'] == 0.0 and r['num_probes'] == 0
    elif r['feedback'] == 'fwdtp_random':
      assert r['stderr_relative'] > 0 and r['num_probes'] == 16
    assert r['used_by_dtp'] == (r['block'] > 0)
    # Block 0 (16 -> 256, tanh) is a tall dense followed by an activation.
    assert r['pjmc_exact'] == (r['block'] > 0 if r['feedback'] == 'pjmc' else None)
  text = jml_report.jml.format_rows(rows)
  assert text.count('\n') == len(rows) + 1 and '+-' in text
  assert 'pjmc exact?' in text and ' NO ' in text and ' yes ' in text
  assert '[Reshape(-1,), Dense(256), tanh] 4x4x1 -> 256' in text


def test_values_follow_theory(rows):
  """TJMC, integral and Hadamard, is exact on every block (one tanh per block, last in
  it: varsigma' = 1 - y^2 = tanh'(a) at y = tanh(a)); estimated values are ~0 too.
  The fixed random feedback (kernels ~ U(-1e-3, 1e-3)) has relative TJML ~ 1 since
  ||J_G|| << ||J_F||; TJMC is not PJMC (its PJML is not 0). PJMC's PJML is 0 where
  the report flags it exact (the head) and not on the tall dense + tanh block 0."""
  by = {(r['block'], r['feedback'], r['kind']): r for r in rows}
  for n in range(6):
    for fb in ('tjmc_integral', 'tjmc_hadamard'):
      assert by[(n, fb, 'tjml')]['relative'] < 1e-5, (n, fb)
    rnd = by[(n, 'fwdtp_random', 'tjml')]
    assert abs(rnd['relative'] - 1.0) <= 1e-2 + 5 * rnd['stderr_relative']
  assert by[(5, 'tjmc_hadamard', 'pjml')]['relative'] > 0.01
  assert by[(5, 'pjmc', 'pjml')]['relative'] < 1e-5
  assert by[(0, 'pjmc', 'pjml')]['relative'] > 0.01


def test_load_batch_goes_through_tp_jax_data():
  """Real batches come from ``tp_jax.data.load``'s own lookup ($TP_JAX_DATA, ...),
  normalised with the dataset's statistics; the class count is the dataset's."""
  x, source = jml_report.load_batch('mnist', 3)
  images, _ = data.load('mnist', 'test')
  np.testing.assert_array_equal(np.asarray(x), np.asarray(data.normalise(images[:3], 'mnist')))
  assert source.startswith(str(data.resolve_data_dir()))
  assert jml_report.num_classes('cifar10') == data.info('cifar10').num_classes
  assert jml_report.num_classes('synthetic') == 10
