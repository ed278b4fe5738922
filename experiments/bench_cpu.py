r"""CPU speed of whole training steps: BP and TJML-DTP on LeNet and Simplified-VGG, with
tp_jax's fast convolution and with XLA's standard one, beside PyTorch's BP step of the
same architecture (when torch is installed); and, with ``--layer``, one convolution's
forward pass, input gradient and weight gradient under each implementation.

  python -m experiments.bench_cpu [--models=lenet,simple_vgg] [--rounds=7] [--steps=3]
  python -m experiments.bench_cpu --models= --layer [--layer_shape=128,32,128,128,3,1]
  python -m experiments.bench_cpu --cost \
      --models=lenet_mnist,simple_vgg,mlp_mixer,resnet18_w16,resnet18

With ``--cost`` nothing is timed: for each model it prints XLA's FLOP count
(``compiled.cost_analysis()``) and peak temporary memory (``memory_analysis()``) of the
compiled BP step and the TJML-DTP steps under the varsigma and the Hadamard activation
feedback, deterministic figures that a busy machine does not change.

Every JAX step is the training loop's own compiled step (``experiments.bench_step``, which
builds it with ``tp_jax.train.setup``: batch
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
from typing import Any

from absl import app
from absl import flags
import jax

from experiments import timing
from experiments import torch_reference
from experiments.bench_step import CONFIGS, Steps, jax_step, step_cost
from tp_jax import conv
from tp_jax import train

_MODELS = flags.DEFINE_list('models', ['lenet', 'simple_vgg'], 'Models (keys of CONFIGS).')
_ROUNDS = flags.DEFINE_integer('rounds', 7, 'Timed rounds (the median is reported).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Consecutive steps per variant per round.')
_IMPLS = flags.DEFINE_list('conv_impls', ['fast', 'xla'], 'tp_jax.conv implementations.')
_METHODS = flags.DEFINE_list(
    'methods',
    ['bp', 'tjml_dtp'],
    'JAX methods to time, each optionally with its feedback_act and ":derived" (every '
    "block's feedback derived by autodiff, config derived_feedback): tjml_dtp:hadamard, "
    'tjml_dtp:hadamard:derived.',
)
_TORCH = flags.DEFINE_bool('torch', True, "Time PyTorch's BP step when torch imports.")
_COST = flags.DEFINE_bool(
    'cost',
    False,
    "Print XLA's FLOP count and peak temporary memory of the compiled BP and TJML-DTP "
    'steps of --models instead of timing anything.',
)
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


# The steps --cost compares: (label, config overrides).
COST_STEPS = (
    ('BP', dict(method='bp')),
    ('TJML-DTP, varsigma', dict(method='tjml_dtp', feedback_act='integral')),
    ('TJML-DTP, Hadamard', dict(method='tjml_dtp', feedback_act='hadamard')),
)
WARMUP = 2


def method_spec(spec: str) -> tuple[str, dict[str, Any]]:
  """A --methods entry 'method[:feedback_act][:derived]' as (method, config overrides)."""
  method, *options = spec.split(':')
  overrides: dict[str, Any] = {}
  if options and options[-1] == 'derived':
    overrides['derived_feedback'] = True
    options.pop()
  if len(options) > 1:
    raise app.UsageError(f'--methods entry {spec!r}: want method[:feedback_act][:derived]')
  if options:
    overrides['feedback_act'] = options[0]
  return method, overrides


def cost_report(model: str, batch: int, costs: dict[str, tuple[float, float]]) -> list[str]:
  """Rows 'model | step | GFLOP | x BP | peak temp MiB' (the first entry is BP)."""
  bp_gflop = next(iter(costs.values()))[0]
  return [
      f'| {model} (batch {batch}) | {step} | {gflop:.2f} | {gflop / bp_gflop:.2f} | {mib:.0f} |'
      for step, (gflop, mib) in costs.items()
  ]


def torch_step(model: str) -> tuple[Steps, str] | None:
  """PyTorch's BP step of the same architecture, loss and optimiser, or None (no
  torch, or a model without a PyTorch twin)."""
  if model not in torch_reference.MODELS:
    return None
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


def cost_lines(model_names: list[str], hw: dict) -> list[str]:
  """The --cost report: command, date, hardware and one table of every model's steps."""
  rows = []
  for model in model_names:
    costs = {}
    for step, overrides in COST_STEPS:
      t0 = time.perf_counter()
      costs[step] = step_cost(model, **overrides)
      print(f'{model}: {step} built in {time.perf_counter() - t0:.1f} s', file=sys.stderr)
    rows += cost_report(model, CONFIGS[model]().batch_size, costs)
  return [
      f'- command: `python -m experiments.bench_cpu {" ".join(sys.argv[1:])}`',
      f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}',
      f'- hardware: {hw["cpu_count"]} CPU cores visible, {hw["platform"]}; jax {hw["jax"]}',
      "- XLA's cost and memory analysis of each compiled training step (XLA's own "
      'convolution); not timed',
      '',
      '| model | step | GFLOP/step | × BP | peak temp MiB |',
      '|---|---|---|---|---|',
      *rows,
  ]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for m in _MODELS.value:
    if m not in CONFIGS:
      raise app.UsageError(f'unknown model {m!r}; valid: {sorted(CONFIGS)}')
  hw = train.hardware()
  if _COST.value:
    print('\n'.join(cost_lines(_MODELS.value, hw)))
    return
  load_before = os.getloadavg()[0]
  plan = timing.Plan(rounds=_ROUNDS.value, steps=_STEPS.value, warmup=WARMUP)
  rows, layer_rows = [], []
  torch_version = None
  for model in _MODELS.value:
    steps: dict[str, Steps] = {}
    for spec in _METHODS.value:
      method, overrides = method_spec(spec)
      for impl in _IMPLS.value:
        t0 = time.perf_counter()
        steps[f'{spec} / {impl}'] = jax_step(model, method, impl, **overrides)
        print(
            f'{model}: compiled {spec} / {impl} in {time.perf_counter() - t0:.1f} s',
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
