"""Where the tests find the real datasets: through the loader's own lookup."""

import os
from pathlib import Path

import pytest

from tp_jax import data

# Resolved once, at collection, before any test scrubs $TP_JAX_DATA from its environment.
REAL_DATA_DIR = data.resolve_data_dir()


@pytest.fixture(scope='session')
def real_data_dir() -> Path:
  """The root of the official files ($TP_JAX_DATA, ./data, ../shared/data, ...).

  Where a file is absent the test fails under CI, which always has the data, and is
  skipped elsewhere.
  """
  missing = [
      p
      for name in data.DATASETS
      for split in data.SPLITS
      for p in data.expected_paths(name, split, REAL_DATA_DIR)
      if not p.is_file()
  ]
  if missing:
    message = f'{len(missing)} real data files missing under {REAL_DATA_DIR}, e.g. {missing[0]}'
    if os.environ.get('CI'):
      pytest.fail(message)
    pytest.skip(message)
  return REAL_DATA_DIR
