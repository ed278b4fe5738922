r"""Learning curves of one or more training runs as a PNG (``tp_jax.plot.plot_runs``).

  python -m experiments.plot --workdir=runs/lenet_mnist_tjml [--workdir=runs/lenet_bp ...]
      [--out=curves.png]

Reads each workdir's metrics.jsonl (one row per epoch, written by tp_jax.train) and
draws train/test accuracy, train/test loss, and, where the rows have them, the
per-block local losses of the TP methods and the feedback losses of LDRL/DTP. Several
workdirs are overlaid, labelled by their method (from result.json) or directory name.
Default output: <first workdir>/curves.png.
"""

from absl import app
from absl import flags

from tp_jax import plot

_WORKDIR = flags.DEFINE_multi_string(
    'workdir', None, 'Run directory holding metrics.jsonl; ' 'repeat to overlay runs.'
)
_OUT = flags.DEFINE_string('out', None, 'PNG path (default: <first workdir>/curves.png).')
_TITLE = flags.DEFINE_string('title', None, 'Figure title.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  out = plot.plot_runs(_WORKDIR.value, _OUT.value, _TITLE.value)
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
