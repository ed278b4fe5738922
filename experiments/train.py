r"""Trains a model with one of the TP methods or backprop.

  python -m experiments.train --config=experiments/configs/lenet_mnist.py \
      --config.method=tjml_dtp --workdir=runs/lenet_mnist_tjml

Any config field can be overridden (``--config.optimizer.lr=0.01``). The run resumes
from the newest checkpoint in --workdir; metrics.jsonl and result.json land there. A bad
config, missing or corrupt data, an unwritable workdir or a diverged run ends with one
``error: ...`` line on stderr and exit status 1 (the last good checkpoint is kept).

At the default verbosity it prints the start line, one line per epoch (and a progress
bar on a terminal) and the result; ``--verbosity=0`` (absl INFO) or higher brings back
the libraries' log lines (Orbax's checkpoint manager, JAX's backend search).
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from tp_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'experiments/configs/lenet_mnist.py', 'Training config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    'workdir', 'runs/default', 'Where metrics, result.json and ' 'checkpoints are written.'
)
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'Dataset root (overrides ' 'config.data_dir and $TP_JAX_DATA).'
)


def quiet_unless_asked() -> None:
  """Absl WARNING unless ``--verbosity``/``-v`` was given: Orbax and JAX log at INFO."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_unless_asked()
  cfg = _CONFIG.value
  if _DATA_DIR.value:
    with cfg.unlocked():
      cfg.data_dir = _DATA_DIR.value
  try:
    result = train.train_and_evaluate(cfg, _WORKDIR.value)
  except train.REPORTED_ERRORS as e:
    # The run's own diagnoses already name the problem: one line, no traceback.
    print(f'error: {type(e).__name__}: {e}', file=sys.stderr)
    return 1
  mean = lambda k: float(np.mean(result[k]))  # over the members (seeds, a sweep's settings)
  members = np.size(result['test_accuracy'])
  print(
      f'test accuracy {100 * mean("test_accuracy"):.2f}%  train accuracy '
      f'{100 * mean("train_accuracy"):.2f}%  {result["ms_per_step"]:.1f} ms/step  '
      + (f'(means of {members} members)  ' if members > 1 else '')
      + f'-> {_WORKDIR.value}/result.json'
  )


if __name__ == '__main__':
  app.run(main)
