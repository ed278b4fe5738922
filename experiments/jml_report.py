r"""Jacobian matching losses of every DTP block of a model on a real batch.

  python -m experiments.jml_report --model=lenet --dataset=mnist [--batch_size=32]
      [--json] [--data_dir=...] [--seed=0] [--num_probes=32] [--max_exact_size=...]

Initialises the model (seeded), runs the batch forward, and for each block n reports
TJML = ||J_G - J_F^T||_F (and IJML = ||J_G - J_F^-1||_F for square blocks, PJML =
||J_G - J_F^+||_F where the Jacobian fits) of three feedbacks G:

  tjmc_integral   the analytical feedback G*, activations fed back through
                  varsigma = int sigma'(sigma^-1) (FeedbackMode TJMC)
  tjmc_hadamard   G* with the Hadamard activation feedback sigma'(x) * t
  fwdtp_random    a fixed random feedback, kernels ~ U(-1e-3, 1e-3) (FWDTP), LEARNED mode

with absolute and relative (/ ||target||_F) values, batch means of per-example values.
Blocks whose n_in * n_out exceeds --max_exact_size use the matrix-free estimate
(TJML only; the error bar is the Monte-Carlo standard error of the probes).
``--dataset=synthetic`` uses a Gaussian batch (``--synthetic_shape``, default MNIST's
28,28,1) and needs no files.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from tp_jax import jml
from tp_jax import layers
from tp_jax import models
from tp_jax import network

FLAGS = flags.FLAGS
flags.DEFINE_string('model', 'lenet', f'one of {sorted(models.MODELS)}')
flags.DEFINE_string('dataset', 'mnist', 'mnist, fashion_mnist, cifar10 or synthetic')
flags.DEFINE_list('synthetic_shape', ['28', '28', '1'], 'H,W,C of --dataset=synthetic')
flags.DEFINE_string('split', 'test', 'dataset split the batch is taken from')
flags.DEFINE_integer('batch_size', 32, 'examples in the batch (the first ones of the split)')
flags.DEFINE_string('data_dir', None, 'dataset root (default: tp_jax.data resolution)')
flags.DEFINE_integer('seed', 0, 'seed of the model init, random feedback and probes')
flags.DEFINE_string('act', None, "the model's activation (default: the model's own)")
flags.DEFINE_integer('num_probes', 32, 'Gaussian probes per example for estimated TJML')
flags.DEFINE_integer('max_exact_size', 2 ** 22,
                     'largest n_in*n_out per example computed exactly (time, not memory, '
                     'bound: LeNet block 0 is 4.9M and takes ~1.5 s/example exactly on a '
                     'CPU core)')
flags.DEFINE_list('kinds', list(jml.KINDS), 'subset of tjml,ijml,pjml')
flags.DEFINE_float('fb_scale', 1e-3, 'U(-scale, scale) of the fixed random feedback')
flags.DEFINE_bool('json', False, 'print one JSON object per row instead of a table')

NUM_CLASSES = {'mnist': 10, 'fashion_mnist': 10, 'cifar10': 10, 'synthetic': 10}
MNIST_STATS = {'mnist': (0.1307, 0.3081), 'fashion_mnist': (0.2860, 0.3530)}
FALLBACK_ROOT = Path('/work/shared/data')


def _read_idx_images(path: Path, n: int) -> np.ndarray:
  """The first n images of an idx3 gz file as uint8 NHWC (fallback reader)."""
  with gzip.open(path, 'rb') as fh:
    raw = fh.read()
  if int.from_bytes(raw[:4], 'big') != 0x0803:
    raise ValueError(f'{path}: not an idx3 ubyte file')
  count, h, w = (int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(3))
  n = min(n, count)
  return np.frombuffer(raw, np.uint8, n * h * w, 16).reshape(n, h, w, 1)


def load_batch(dataset: str, batch_size: int, data_dir: str | None = None,
               split: str = 'test', seed: int = 0,
               synthetic_shape: tuple[int, int, int] = (28, 28, 1)) -> tuple[jax.Array, str]:
  """A normalised float32 NHWC batch and a note on where it came from.

  Uses ``tp_jax.data.load`` / ``normalise`` when that module is importable; otherwise
  reads MNIST / Fashion-MNIST idx gz files directly (``data_dir`` or
  /work/shared/data) and normalises with the usual mean/std.
  """
  if dataset == 'synthetic':
    shape = (batch_size, *synthetic_shape)
    x = np.random.default_rng(seed + 1).standard_normal(shape).astype(np.float32)
    return jnp.asarray(x), f'synthetic N(0, 1) batch of shape {shape}'
  try:
    from tp_jax import data  # pylint: disable=import-outside-toplevel
  except ImportError:
    data = None
  if data is not None:
    images, _ = data.load(dataset, split, data_dir)
    return data.normalise(images[:batch_size], dataset), f'tp_jax.data.load({dataset!r}, {split!r})'
  if dataset not in MNIST_STATS:
    raise ValueError(f'tp_jax.data is unavailable and the fallback reader only knows '
                     f'{sorted(MNIST_STATS)}, not {dataset!r}')
  prefix = 't10k' if split == 'test' else 'train'
  path = Path(data_dir or FALLBACK_ROOT / dataset) / f'{prefix}-images-idx3-ubyte.gz'
  mean, std = MNIST_STATS[dataset]
  x = (_read_idx_images(path, batch_size).astype(np.float32) / 255.0 - mean) / std
  return jnp.asarray(x), f'fallback idx reader: {path}'


def build_model(name: str, x: jax.Array, num_classes: int = 10, act: str | None = None
                ) -> network.Net:
  kwargs = dict(num_classes=num_classes)
  if act is not None:
    kwargs['act'] = act
  if name == 'mlp_mixer':
    kwargs['image_hw'] = tuple(x.shape[1:3])
  return models.get(name, **kwargs)


def feedbacks(params: network.Params, key: jax.Array, fb_scale: float = 1e-3) -> dict:
  """The three feedbacks of the report: name -> (feedback params, mode)."""
  return {
      'tjmc_integral': (params, layers.TJMC),
      'tjmc_hadamard': (params, layers.TJMC_HADAMARD),
      'fwdtp_random': (jml.jit(lambda p, k: network.init_feedback(p, k, scale=fb_scale))(
          params, key), layers.LEARNED),
  }


def run(model: str, x: jax.Array, seed: int = 0, num_classes: int = 10,
        act: str | None = None, num_probes: int = 32, max_exact_size: int = 2 ** 22,
        kinds=jml.KINDS, fb_scale: float = 1e-3) -> list[dict]:
  """Builds and initialises the model on x and returns ``jml.report`` rows."""
  net = build_model(model, x, num_classes, act)
  k_init, k_fb, k_probe = jax.random.split(jax.random.PRNGKey(seed), 3)
  # Jitted: one compile for all initialisers instead of one per kernel shape.
  params = jml.jit(lambda k, h: network.init(net, k, h))(k_init, x)
  return jml.report(net, params, feedbacks(params, k_fb, fb_scale), x, kinds=tuple(kinds),
                    num_probes=num_probes, key=k_probe, max_exact_size=max_exact_size)


def main(argv):
  del argv
  start = time.time()
  x, source = load_batch(FLAGS.dataset, FLAGS.batch_size, FLAGS.data_dir, FLAGS.split,
                         FLAGS.seed, tuple(int(d) for d in FLAGS.synthetic_shape))
  rows = run(FLAGS.model, x, FLAGS.seed, NUM_CLASSES.get(FLAGS.dataset, 10), FLAGS.act,
             FLAGS.num_probes, FLAGS.max_exact_size, FLAGS.kinds, FLAGS.fb_scale)
  if FLAGS.json:
    for r in rows:
      print(json.dumps(dict(r, model=FLAGS.model, dataset=FLAGS.dataset,
                            batch_size=int(x.shape[0]), seed=FLAGS.seed)))
  else:
    print(f'# {FLAGS.model} on {FLAGS.dataset} ({source}), batch {x.shape[0]}, '
          f'seed {FLAGS.seed}; block indices are 0-based, block 0 feedback unused by DTP')
    print(jml.format_rows(rows))
    print(f'# {time.time() - start:.1f} s', file=sys.stderr)


if __name__ == '__main__':
  app.run(main)
