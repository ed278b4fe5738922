"""The notebooks run headless, top to bottom, in their smoke setting (TP_JAX_NB_SMOKE=1),
and are committed without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))


def test_both_notebooks_exist():
  assert {p.name for p in NOTEBOOKS} >= {'quickstart.ipynb', 'feedback_anatomy.ipynb'}


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert (
          not cell.outputs and cell.execution_count is None
      ), f'{path.name} has outputs: clear them before committing'
  tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1 and 'TP_JAX_NB_SMOKE' in tagged[0].source


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_headless_in_smoke_mode(path, tmp_path, monkeypatch):
  monkeypatch.setenv('TP_JAX_NB_SMOKE', '1')
  monkeypatch.setenv('TP_JAX_NB_WORKDIR', str(tmp_path / 'runs'))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('PYTHONPATH', str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(ROOT)}}
  )
  client.execute()  # raises CellExecutionError, with the cell and traceback, on failure
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
  if path.stem == 'quickstart':
    assert (tmp_path / 'runs' / 'curves.png').exists()
    assert 'tjml_dtp' in text and 'bp' in text
    assert list((tmp_path / 'runs' / 'tjml_dtp').glob('events.out.tfevents.*'))
    assert 'tjmc_hadamard' in text or 'skipping the JML table' in text
  else:
    assert 'Dense 4->5' in text and 'LayerNorm' in text
    images = [
        o
        for c in nb.cells
        if c.cell_type == 'code'
        for o in c.outputs
        if 'image/png' in o.get('data', {})
    ]
    assert images, 'the Jacobian pictures were not drawn'
