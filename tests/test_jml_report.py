"""experiments/jml_report.py on tiny generated batches (no dataset files needed)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from experiments import jml_report

FEEDBACKS = ('tjmc_integral', 'tjmc_hadamard', 'fwdtp_random')


@pytest.fixture(scope='module')
def lenet_rows():
  """The binary end to end (absl flags, main, run: models.lenet, network.init,
  init_feedback, jml.report, --json) on a synthetic 2x8x8x1 batch, rows parsed back from
  stdout. LeNet on 8x8 has blocks 64->512, 512->256, 256->512, 512->10; with
  --max_exact_size=40000 blocks 0 and 3 are exact, blocks 1 and 2 estimated."""
  argv = ['jml_report', '--model=lenet', '--dataset=synthetic', '--synthetic_shape=8,8,1',
          '--batch_size=2', '--json', '--num_probes=16', '--max_exact_size=40000']
  flags.FLAGS(argv)
  try:
    with contextlib.redirect_stdout(io.StringIO()) as out:
      jml_report.main([])
  finally:
    flags.FLAGS.unparse_flags()
  return [json.loads(line) for line in out.getvalue().splitlines()]


def test_lenet_rows_cover_every_block_and_feedback(lenet_rows):
  """A TJML row per block and feedback; PJML rows only for the exact blocks; no IJML
  (no block is square); error bars exactly on the estimated rows."""
  keys = {(r['block'], r['feedback'], r['kind']) for r in lenet_rows}
  expected = {(n, fb, 'tjml') for n in range(4) for fb in FEEDBACKS}
  expected |= {(n, fb, 'pjml') for n in (0, 3) for fb in FEEDBACKS}
  assert keys == expected and len(lenet_rows) == len(expected)
  shapes = {r['block']: r['shape'] for r in lenet_rows}
  assert shapes == {0: '8x8x1 -> 4x4x32', 1: '4x4x32 -> 2x2x64', 2: '2x2x64 -> 512',
                    3: '512 -> 10'}
  for r in lenet_rows:
    assert np.isfinite(r['absolute']) and np.isfinite(r['relative'])
    assert r['method'] == ('exact' if r['block'] in (0, 3) else 'estimated')
    if r['method'] == 'exact':
      assert r['stderr_absolute'] == 0.0 and r['num_probes'] == 0
    elif r['feedback'] == 'fwdtp_random':
      assert r['stderr_relative'] > 0 and r['num_probes'] == 16
    assert r['used_by_dtp'] == (r['block'] > 0)
  for r in lenet_rows:
    assert r['model'] == 'lenet' and r['dataset'] == 'synthetic' and r['batch_size'] == 2
  text = jml_report.jml.format_rows(lenet_rows)
  assert text.count('\n') == len(lenet_rows) + 1 and '+-' in text


def test_lenet_values_follow_theory(lenet_rows):
  """Hadamard TJMC is exact on every block (estimated ~0 too); the integral feedback is
  exact on the dense blocks and off only by the overlapping-pool varsigma effect (< 1)
  on the conv blocks; the fixed random feedback (kernels ~ U(-1e-3, 1e-3)) has relative
  TJML ~ 1 since ||J_G|| << ||J_F||; TJMC is not PJMC (its PJML is not 0)."""
  by = {(r['block'], r['feedback'], r['kind']): r for r in lenet_rows}
  for n in range(4):
    assert by[(n, 'tjmc_hadamard', 'tjml')]['relative'] < 1e-5
    rnd = by[(n, 'fwdtp_random', 'tjml')]
    assert abs(rnd['relative'] - 1.0) <= 1e-2 + 5 * rnd['stderr_relative']
  assert by[(3, 'tjmc_integral', 'tjml')]['relative'] < 1e-6
  assert by[(2, 'tjmc_integral', 'tjml')]['relative'] < 1e-5
  for n in (0, 1):
    assert by[(n, 'tjmc_integral', 'tjml')]['relative'] < 0.5
  assert by[(3, 'tjmc_hadamard', 'pjml')]['relative'] > 0.01


def test_fallback_idx_reader(tmp_path):
  images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
  header = b''.join(int(v).to_bytes(4, 'big') for v in (0x0803, 3, 4, 5))
  path = tmp_path / 'imgs-idx3-ubyte.gz'
  with gzip.open(path, 'wb') as fh:
    fh.write(header + images.tobytes())
  got = jml_report._read_idx_images(path, 2)
  assert got.shape == (2, 4, 5, 1) and np.array_equal(got[..., 0], images[:2])
  bad = tmp_path / 'bad.gz'
  with gzip.open(bad, 'wb') as fh:
    fh.write(b'\x00' * 16)
  with pytest.raises(ValueError, match='not an idx3'):
    jml_report._read_idx_images(bad, 1)
