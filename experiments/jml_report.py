r"""Jacobian matching losses of every DTP block of a model on a real batch.

  python -m experiments.jml_report --model=lenet --dataset=mnist [--batch_size=32]
      [--json] [--data_dir=...] [--seed=0] [--num_probes=32] [--max_exact_size=...]

Initialises the model (seeded), runs the batch forward, and for each block n reports
TJML = ||J_G - J_F^T||_F (and IJML = ||J_G - J_F^-1||_F for square blocks, PJML =
||J_G - J_F^+||_F where the Jacobian fits) of four feedbacks G:

  tjmc_integral   the analytical feedback G*, activations fed back through
                  varsigma = int sigma'(sigma^-1) (FeedbackMode TJMC)
  tjmc_hadamard   G* with the Hadamard activation feedback sigma'(x) * t
  fwdtp_random    a fixed random feedback, kernels ~ U(-1e-3, 1e-3) (FWDTP), LEARNED mode
  pjmc            the layers' pseudo-inverses composed (PJMC; rows only for blocks
                  that do not refuse it: dense, activations, reshapes). Its column
                  "pjmc exact?" says whether that composition is the block's J_F^+
                  (``jml.pjmc_inexact_reason``): PJML-DTP refuses blocks where it is not

with absolute and relative (/ ||target||_F) values, batch means of per-example values.
Blocks whose n_in * n_out exceeds --max_exact_size use the matrix-free estimate
(TJML only; the error bar is the Monte-Carlo standard error of the probes).
``--dataset=synthetic`` uses a Gaussian batch (``--synthetic_shape``, default MNIST's
28,28,1) and needs no files.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from tp_jax import data
from tp_jax import jml
from tp_jax import layers
from tp_jax import models
from tp_jax import network

FLAGS = flags.FLAGS
flags.DEFINE_string('model', 'lenet', f'one of {sorted(models.MODELS)}')
flags.DEFINE_string('dataset', 'mnist', f'one of {sorted(data.DATASETS)} or synthetic')
flags.DEFINE_list('synthetic_shape', ['28', '28', '1'], 'H,W,C of --dataset=synthetic')
flags.DEFINE_string('split', 'test', 'dataset split the batch is taken from')
flags.DEFINE_integer('batch_size', 32, 'examples in the batch (the first ones of the split)')
flags.DEFINE_string('data_dir', None, 'dataset root (default: tp_jax.data resolution)')
flags.DEFINE_integer('seed', 0, 'seed of the model init, random feedback and probes')
flags.DEFINE_string('act', None, "the model's activation (default: the model's own)")
flags.DEFINE_integer('num_probes', 32, 'Gaussian probes per example for estimated TJML')
flags.DEFINE_integer(
    'max_exact_size',
    2**22,
    'largest n_in*n_out per example computed exactly (time, not memory, '
    'bound: LeNet block 0 is 4.9M and takes ~1.5 s/example exactly on a '
    'CPU core)',
)
flags.DEFINE_list('kinds', list(jml.KINDS), 'subset of tjml,ijml,pjml')
flags.DEFINE_float('fb_scale', 1e-3, 'U(-scale, scale) of the fixed random feedback')
flags.DEFINE_bool('json', False, 'print one JSON object per row instead of a table')


def load_batch(
    dataset: str,
    batch_size: int,
    data_dir: str | None = None,
    split: str = 'test',
    seed: int = 0,
    synthetic_shape: tuple[int, int, int] = (28, 28, 1),
) -> tuple[jax.Array, str]:
  """A normalised float32 NHWC batch (the first ``batch_size`` examples of the split,
  found by ``tp_jax.data.load``'s own lookup) and a note on where it came from."""
  if dataset == 'synthetic':
    shape = (batch_size, *synthetic_shape)
    x = np.random.default_rng(seed + 1).standard_normal(shape).astype(np.float32)
    return jnp.asarray(x), f'synthetic N(0, 1) batch of shape {shape}'
  images, _ = data.load(dataset, split, data_dir)
  return (
      data.normalise(images[:batch_size], dataset),
      f'{data.resolve_data_dir(data_dir) / dataset}, {split} split',
  )


def num_classes(dataset: str) -> int:
  """The dataset's classes (``tp_jax.data.info``); the synthetic batch uses 10."""
  return 10 if dataset == 'synthetic' else data.info(dataset).num_classes


def build_model(
    name: str, x: jax.Array, num_classes: int = 10, act: str | None = None
) -> network.Net:
  kwargs = dict(num_classes=num_classes)
  if act is not None:
    kwargs['act'] = act
  if name == 'mlp_mixer':
    kwargs['image_hw'] = tuple(x.shape[1:3])
  return models.get(name, **kwargs)


def feedbacks(params: network.Params, key: jax.Array, fb_scale: float = 1e-3) -> dict:
  """The feedbacks of the report: name -> (feedback params, mode)."""
  return {
      'tjmc_integral': (params, layers.TJMC),
      'tjmc_hadamard': (params, layers.TJMC_HADAMARD),
      'fwdtp_random': (
          jax.jit(lambda p, k: network.init_feedback(p, k, scale=fb_scale))(params, key),
          layers.LEARNED,
      ),
      # Last: the probes of the estimated rows above stay those of earlier reports.
      'pjmc': (params, layers.PJMC),
  }


def run(
    model: str,
    x: jax.Array,
    seed: int = 0,
    num_classes: int = 10,
    act: str | None = None,
    num_probes: int = 32,
    max_exact_size: int = 2**22,
    kinds=jml.KINDS,
    fb_scale: float = 1e-3,
) -> list[dict]:
  """Builds and initialises the model on x and returns ``jml.report`` rows."""
  net = build_model(model, x, num_classes, act)
  k_init, k_fb, k_probe = jax.random.split(jax.random.PRNGKey(seed), 3)
  # Jitted: one compile for all initialisers instead of one per kernel shape.
  params = jax.jit(lambda k, h: network.init(net, k, h))(k_init, x)
  return jml.report(
      net,
      params,
      feedbacks(params, k_fb, fb_scale),
      x,
      kinds=tuple(kinds),
      num_probes=num_probes,
      key=k_probe,
      max_exact_size=max_exact_size,
  )


def main(argv):
  del argv
  start = time.time()
  x, source = load_batch(
      FLAGS.dataset,
      FLAGS.batch_size,
      FLAGS.data_dir,
      FLAGS.split,
      FLAGS.seed,
      tuple(int(d) for d in FLAGS.synthetic_shape),
  )
  rows = run(
      FLAGS.model,
      x,
      FLAGS.seed,
      num_classes(FLAGS.dataset),
      FLAGS.act,
      FLAGS.num_probes,
      FLAGS.max_exact_size,
      FLAGS.kinds,
      FLAGS.fb_scale,
  )
  if FLAGS.json:
    for r in rows:
      print(
          json.dumps(
              dict(
                  r,
                  model=FLAGS.model,
                  dataset=FLAGS.dataset,
                  batch_size=int(x.shape[0]),
                  seed=FLAGS.seed,
              )
          )
      )
  else:
    print(
        f'# {FLAGS.model} on {FLAGS.dataset} ({source}), batch {x.shape[0]}, '
        f'seed {FLAGS.seed}; block indices are 0-based, block 0 feedback unused by DTP'
    )
    print(jml.format_rows(rows))
    print(f'# {time.time() - start:.1f} s', file=sys.stderr)


if __name__ == '__main__':
  app.run(main)
