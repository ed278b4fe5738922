r"""CPU speed of whole training steps: BP and TJML-DTP on LeNet and Simplified-VGG, with
tp_jax's fast convolution and with XLA's standard one, beside PyTorch's BP step of the
same architecture (when torch is installed); and, with ``--layer``, one convolution's
forward pass, input gradient and weight gradient under each implementation.

  python -m experiments.bench_cpu [--models=lenet,simple_vgg] [--rounds=7] [--steps=3]
  python -m experiments.bench_cpu --models= --layer [--layer_shape=128,32,128,128,3,1]

Every JAX step is the training loop's own compiled step (``tp_jax.train.setup``: batch
gather, augmentation, the method's step; the config of
``experiments/configs/{lenet,vgg}_cifar10.py``: batch, optimiser, beta) on one batch
of random CIFAR-shaped data held on the device; the PyTorch step is the same layers,
loss and SGD (momentum, weight decay) in NCHW (``experiments.torch_reference``).
Compilation and two warm-up steps per variant are not timed; then ``rounds`` rounds,
each timing ``steps`` consecutive steps of every variant in rotating order
(``experiments.timing``); the median over rounds is reported with the ratios to
PyTorch's step and to the fast BP step.
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import time
from typing import Callable

from absl import app
from absl import flags
import jax

from experiments import synthetic
from experiments import timing
from experiments import torch_reference
from experiments.configs import lenet_cifar10
from experiments.configs import vgg_cifar10
from tp_jax import conv
from tp_jax import train

_MODELS = flags.DEFINE_list('models', ['lenet', 'simple_vgg'], 'lenet and/or simple_vgg.')
_ROUNDS = flags.DEFINE_integer('rounds', 7, 'Timed rounds (the median is reported).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Consecutive steps per variant per round.')
_IMPLS = flags.DEFINE_list('conv_impls', ['fast', 'xla'], 'tp_jax.conv implementations.')
_METHODS = flags.DEFINE_list('methods', ['bp', 'tjml_dtp'], 'JAX methods to time.')
_TORCH = flags.DEFINE_bool('torch', True, "Time PyTorch's BP step when torch imports.")
_LAYER = flags.DEFINE_bool(
    'layer',
    False,
    'Also time one convolution layer: forward, '
    'input gradient, weight gradient, per implementation.',
)
_LAYER_SHAPE = flags.DEFINE_list(
    'layer_shape',
    ['128', '32', '128', '128', '3', '1'],
    'batch, image size, in channels, out channels, kernel '
    'size, stride of --layer (SAME padding).',
)

CONFIGS = {'lenet': lenet_cifar10.get_config, 'simple_vgg': vgg_cifar10.get_config}
WARMUP = 2
Steps = Callable[[int], object]  # k -> the loss (or output) after k steps, blocking


def jax_step(model: str, method: str, conv_impl: str, **overrides) -> Steps:
  """``method``'s training step on ``model`` (CIFAR shapes, one random batch), with
  the config's fields updated by ``overrides``."""
  cfg = CONFIGS[model]()
  with cfg.unlocked():
    cfg.method = method
    cfg.model_kwargs.conv_impl = conv_impl
    cfg.update(overrides)
  run = train.setup(cfg, synthetic.dataset(cfg.dataset, cfg.batch_size, cfg.batch_size))
  idx = train.epoch_indices(run, 0)
  box = [train.init_state(run)]

  def steps(k: int) -> float:
    for _ in range(k):
      box[0], metrics = run.train_step(box[0], run.x_train, run.y_train, idx, run.step_key)
    return float(metrics['loss'])

  return steps


def torch_step(model: str) -> tuple[Steps, str] | None:
  """PyTorch's BP step of the same architecture, loss and optimiser, or None."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch_reference.bp_step(model, CONFIGS[model]()), torch.__version__


def conv_layer_ops(
    batch: int, size: int, cin: int, cout: int, kernel: int, stride: int, impl: str
) -> dict[str, Steps]:
  """Forward, input gradient and weight gradient of one SAME convolution (``impl``)."""
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (batch, size, size, cin))
  w = jax.random.normal(k[1], (kernel, kernel, cin, cout)) * 0.05
  g = jax.random.normal(k[2], (batch, -(-size // stride), -(-size // stride), cout))
  f = lambda x, w: conv.conv2d(x, w, (stride, stride), 'SAME', impl=impl)
  ops = {
      'forward': jax.jit(f),
      'input-grad': jax.jit(lambda x, w: jax.vjp(lambda x: f(x, w), x)[1](g)[0]),
      'weight-grad': jax.jit(lambda x, w: jax.vjp(lambda w: f(x, w), w)[1](g)[0]),
  }

  def repeat(op):
    def steps(n: int) -> jax.Array:
      for _ in range(n):
        out = op(x, w)
      return jax.block_until_ready(out)

    return steps

  return {name: repeat(op) for name, op in ops.items()}


def report(model: str, times: dict[str, list[float]], batch: int) -> list[str]:
  med = {n: statistics.median(v) for n, v in times.items()}
  torch_ms = med.get('pytorch bp')
  bp_ms = med.get('bp / fast')
  rows = [
      f'| {model} (batch {batch}) | {n} | {ms:.1f} | '
      f'{"" if not torch_ms else f"{ms / torch_ms:.2f}"} | '
      f'{"" if not bp_ms else f"{ms / bp_ms:.2f}"} | '
      f'{min(times[n]):.1f}–{max(times[n]):.1f} |'
      for n, ms in med.items()
  ]
  return rows


def layer_report(what: str, times: dict[str, list[float]]) -> list[str]:
  """Rows 'op / impl': median ms, speed-up over the same op with XLA's convolution."""
  med = {n: statistics.median(v) for n, v in times.items()}

  def speedup(name: str) -> str:
    xla = med.get(name.split(' / ')[0] + ' / xla')
    return f'{xla / med[name]:.2f}' if xla else ''

  return [
      f'| {what} | {n} | {ms:.2f} | {speedup(n)} | ' f'{min(times[n]):.2f}–{max(times[n]):.2f} |'
      for n, ms in med.items()
  ]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for m in _MODELS.value:
    if m not in CONFIGS:
      raise app.UsageError(f'unknown model {m!r}; valid: {sorted(CONFIGS)}')
  hw = train.hardware()
  load_before = os.getloadavg()[0]
  plan = timing.Plan(rounds=_ROUNDS.value, steps=_STEPS.value, warmup=WARMUP)
  rows, layer_rows = [], []
  torch_version = None
  for model in _MODELS.value:
    steps: dict[str, Steps] = {}
    for method in _METHODS.value:
      for impl in _IMPLS.value:
        t0 = time.perf_counter()
        steps[f'{method} / {impl}'] = jax_step(model, method, impl)
        print(
            f'{model}: compiled {method} / {impl} in {time.perf_counter() - t0:.1f} s',
            file=sys.stderr,
        )
    if _TORCH.value and (ts := torch_step(model)):
      steps['pytorch bp'], torch_version = ts
    rows += report(model, timing.interleaved(steps, plan), CONFIGS[model]().batch_size)
  if _LAYER.value:
    b, s, ci, co, k, st = (int(v) for v in _LAYER_SHAPE.value)
    ops = {
        f'{op} / {impl}': fn
        for impl in _IMPLS.value
        for op, fn in conv_layer_ops(b, s, ci, co, k, st, impl).items()
    }
    layer_rows = layer_report(
        f'conv {k}x{k} {ci}->{co} on {s}x{s}, stride {st} (batch {b})',
        timing.interleaved(ops, plan),
    )
  lines = [
      f'- command: `python -m experiments.bench_cpu {" ".join(sys.argv[1:])}`',
      f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}',
      f'- hardware: {hw["cpu_count"]} CPU cores visible, {hw["platform"]}; jax {hw["jax"]}'
      + (f', torch {torch_version}' if torch_version else '')
      + f'; load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after',
      f'- timing: {_ROUNDS.value} rounds × {_STEPS.value} steps per variant, rotating '
      f'order, after compilation and {WARMUP} warm-up steps; median ms/step (range over '
      f'rounds)',
  ]
  if rows:
    lines += [
        '',
        '| model | method / conv | ms/step | × PyTorch BP | × BP (fast conv) | range |',
        '|---|---|---|---|---|---|',
        *rows,
    ]
  if layer_rows:
    lines += [
        '',
        '| layer | op / conv | ms | speed-up over xla | range |',
        '|---|---|---|---|---|',
        *layer_rows,
    ]
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
