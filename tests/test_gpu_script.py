"""benchmarks/gpu.sh at its tiny setting (GPU_TINY=1: the smoke profile on synthetic
data, 2 seeds) on CPU: every phase runs and every file the GPU run hands back is there."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'benchmarks' / 'gpu.sh'


@pytest.mark.slow
def test_tiny_gpu_script_writes_every_file(tmp_path):
  out = tmp_path / 'out'
  env = dict(os.environ, GPU_TINY='1', OUT=str(out), PYTHON=sys.executable, JAX_PLATFORMS='cpu')
  p = subprocess.run(
      [str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800
  )
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  names = {f.name for f in out.iterdir() if f.is_file()}
  assert names == {
      'summary.md',
      'gpu.log',
      'table1.md',
      'table2.md',
      'table3.md',
      'table1_curves.png',
      'table1_time.png',
      'results.tar.gz',
  }  # what comes back from the GPU machine: 8 files at most, no folders needed
  summary = (out / 'summary.md').read_text()
  assert '- hardware: cpu' in summary and 'Table 1 columns: mnist,fashion_mnist,cifar10' in summary
  assert 'LDRL: a training budget of 1 s per dataset' in summary
  assert summary.count('TJML-DTP time per step / BP') == 4  # LeNet x2, VGG, Mixer
  table1 = (out / 'table1.md').read_text()
  assert 'seeds: 0, 1 in one program per row' in table1
  for dataset in ('MNIST', 'F-MNIST', 'CIFAR-10'):
    rows = [l for l in table1.splitlines() if l.startswith(f'| LeNet / {dataset} |')]
    assert len(rows) == 4 and all(' ± ' in l for l in rows), rows
    assert any('| LDRL |' in l and 'in a 1.0 s budget' in l for l in rows)
  with tarfile.open(out / 'results.tar.gz') as tar:
    results = [n for n in tar.getnames() if n.endswith('result.json')]
  assert len(results) == 12  # 3 datasets x 4 methods, one run each for both seeds
