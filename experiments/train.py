r"""Trains a model with one of the TP methods or backprop.

  python -m experiments.train --config=experiments/configs/lenet_mnist.py \
      --config.method=tjml_dtp --workdir=runs/lenet_mnist_tjml

Any config field can be overridden (``--config.optimizer.lr=0.01``). The run resumes
from the newest checkpoint in --workdir; metrics.jsonl and result.json land there.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from tp_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/lenet_mnist.py',
                                          'Training config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Where metrics, result.json and '
                               'checkpoints are written.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Dataset root (overrides '
                                'config.data_dir and $TP_JAX_DATA).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cfg = _CONFIG.value
  if _DATA_DIR.value:
    with cfg.unlocked():
      cfg.data_dir = _DATA_DIR.value
  result = train.train_and_evaluate(cfg, _WORKDIR.value)
  print(f'test accuracy {100 * result["test_accuracy"]:.2f}%  train accuracy '
        f'{100 * result["train_accuracy"]:.2f}%  {result["ms_per_step"]:.1f} ms/step  '
        f'-> {_WORKDIR.value}/result.json')


if __name__ == '__main__':
  app.run(main)
