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
PyTorch's step and to the fast BP step, and the GFLOP/s each step reaches: XLA's FLOP
count of the compiled step (XLA's own convolution, ``step_cost``) over the median time,
PyTorch's step counted as BP's (none for LDRL/DTP, whose loop body XLA counts once).

With ``--reference_dir=PATH`` (a local checkout of scalingDTP, ernoult/scalingDTP, with
torch and its requirements installed by the user; nothing of it is a dependency or
vendored) it prints one table instead: the reference's own LDRL (its ``DTP``) and BP
(``BaselineModel``) training steps, imported unchanged from PATH by
``experiments.scaling_dtp_reference``, interleaved in one ``timing.interleaved`` call
with our LDRL, BP and TJML-DTP steps, with the ratios ours / reference:

  python -m experiments.bench_cpu --reference_dir=PATH [--rounds=3] [--steps=3] \
      [--reference_iterations=41,51,24]

The setup is LeNet on one random batch of 256 images of 32×32×1 (MNIST zero-padded to
32×32: the reference's LeNet is hard-coded for 32×32 input), the same batch on both sides,
K = [41, 51, 24] and the reference's ``conf/model_network/dtp_lenet.yaml`` (ours: the same
values in ``experiments/configs/lenet_mnist.py``), both BPs with that config's forward SGD.
An LDRL step takes tens of seconds on CPU, so this mode has its own small plan: 3 rounds
(``--rounds`` when given), each one step of the two LDRLs and ``--steps`` steps of the
others, after one LDRL and two other warm-up steps (several minutes in all).
``--reference_iterations`` (smaller K, for both LDRLs) is for a quick check of the
machinery, not for figures. A PATH that is not a scalingDTP checkout, or a missing
requirement, is an ``app.UsageError`` naming what is missing.
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
import numpy as np

from experiments import scaling_dtp_reference
from experiments import synthetic
from experiments import timing
from experiments import torch_reference
from experiments.bench_step import CONFIGS, Steps, jax_step, step_cost
from tp_jax import algorithms
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
_REFERENCE_DIR = flags.DEFINE_string(
    'reference_dir',
    None,
    'A local checkout of scalingDTP (ernoult/scalingDTP): time its own LDRL and BP steps '
    "beside ours on LeNet, 32x32x1 (needs torch and the reference's requirements; see "
    'experiments/scaling_dtp_reference.py). Replaces the other tables.',
)
_REFERENCE_K = flags.DEFINE_list(
    'reference_iterations',
    None,
    'With --reference_dir: K per trained block of both LDRL steps (default the LeNet '
    "config's 41,51,24); smaller K for a quick check only.",
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
# --reference_dir: our config whose hyper-parameters are the reference's LeNet config
# (conf/model_network/dtp_lenet.yaml), and the input its LeNet is hard-coded for (dense
# 8*8*64 -> 512): MNIST's one channel at 32x32.
REFERENCE_MODEL = 'lenet_mnist'
REFERENCE_IMAGE = (32, 32, 1)
REFERENCE_ROUNDS = 3  # --reference_dir's rounds unless --rounds is given
REFERENCE_SLOW = ('reference ldrl', 'ldrl')  # one step per window, one warm-up step
# Rows of the --reference_dir table: (label, our variant, the reference's variant).
REFERENCE_ROWS = (
    ('LDRL', 'ldrl', 'reference ldrl'),
    ('BP', 'bp', 'reference bp'),
    ('TJML-DTP vs the reference LDRL', 'tjml_dtp', 'reference ldrl'),
    ('TJML-DTP vs the reference BP', 'tjml_dtp', 'reference bp'),
)


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
  cfg = CONFIGS[model]()
  if cfg.model not in torch_reference.MODELS:
    return None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch_reference.bp_step(cfg), torch.__version__


def reference_steps(
    path: str, iterations: tuple[int, ...] | None = None, conv_impl: str = 'fast'
) -> tuple[dict[str, Steps], scaling_dtp_reference.Reference, tuple[int, ...]]:
  """The reference's LDRL and BP steps (from its checkout at ``path``) and our LDRL, BP
  and TJML-DTP steps, all on LeNet and the same random batch of REFERENCE_IMAGE images
  (``REFERENCE_MODEL``'s config; K = ``iterations`` or the config's, for both LDRLs);
  also the loaded checkout and K.

  Raises:
    app.UsageError: ``path`` is not a scalingDTP checkout or its requirements are missing.
  """
  cfg = CONFIGS[REFERENCE_MODEL]()
  k = tuple(iterations or cfg.feedback.iterations)
  if len(k) != len(cfg.feedback.iterations) or not all(isinstance(v, int) and v > 0 for v in k):
    raise app.UsageError(
        f'--reference_iterations={",".join(map(str, k))}: want '
        f'{len(cfg.feedback.iterations)} positive integers (K per trained LeNet block)'
    )
  ref = scaling_dtp_reference.load(path)
  # The batch jax_step builds too (same seed and sizes), as NHWC arrays.
  ds = synthetic.dataset(cfg.dataset, cfg.batch_size, cfg.batch_size, image_shape=REFERENCE_IMAGE)
  x, y = np.asarray(ds.x_train), np.asarray(ds.y_train)
  steps: dict[str, Steps] = {
      'reference ldrl': scaling_dtp_reference.ldrl_step(ref, x, y, k),
      'reference bp': scaling_dtp_reference.bp_step(ref, x, y),
  }
  ours = (('ldrl', dict(feedback=dict(iterations=k))), ('bp', {}), ('tjml_dtp', {}))
  for method, overrides in ours:
    t0 = time.perf_counter()
    steps[method] = jax_step(REFERENCE_MODEL, method, conv_impl, REFERENCE_IMAGE, **overrides)
    print(f'compiled {method} / {conv_impl} in {time.perf_counter() - t0:.1f} s', file=sys.stderr)
  return steps, ref, k


def reference_report(times: dict[str, list[float]]) -> list[str]:
  """Rows 'step | reference ms | tp-jax ms | tp-jax / reference | ranges' of
  REFERENCE_ROWS (medians over windows)."""
  med = {n: statistics.median(v) for n, v in times.items()}
  span = lambda n: f'{min(times[n]):.1f}–{max(times[n]):.1f}'
  return [
      f'| {label} | {med[theirs]:.1f} | {med[ours]:.1f} | {med[ours] / med[theirs]:.3f} | '
      f'{span(theirs)} | {span(ours)} |'
      for label, ours, theirs in REFERENCE_ROWS
  ]


def reference_lines(path: str, iterations: tuple[int, ...] | None, hw: dict) -> list[str]:
  """The --reference_dir report: command, setup, and the table of ratios to the reference."""
  conv_impl = _IMPLS.value[0] if _IMPLS.value else 'fast'
  steps, ref, k = reference_steps(path, iterations, conv_impl)
  rounds = _ROUNDS.value if flags.FLAGS['rounds'].present else REFERENCE_ROUNDS
  plan = timing.Plan(rounds=rounds, steps=_STEPS.value, warmup=WARMUP, slow_steps=1, slow_warmup=1)
  load_before = os.getloadavg()[0]
  log = lambda s: print(s, file=sys.stderr)
  times = timing.interleaved(steps, plan, slow=REFERENCE_SLOW, log=log)
  cfg = CONFIGS[REFERENCE_MODEL]()
  opt = cfg.optimizer
  h, w, c = REFERENCE_IMAGE
  return [
      f'- command: `python -m experiments.bench_cpu {" ".join(sys.argv[1:])}`',
      f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}',
      f'- hardware: {hw["cpu_count"]} CPU cores visible, {hw["platform"]}; jax {hw["jax"]}, '
      f'{ref.versions}; load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after',
      f'- reference: scalingDTP checkout at {ref.path}, its own DTP (LDRL) and BaselineModel '
      '(BP) training steps, unchanged, in this process'
      + (f' (stand-in modules for the unused {", ".join(ref.stand_ins)})' if ref.stand_ins else ''),
      f'- setup: LeNet on one batch of {cfg.batch_size} random {h}×{w}×{c} images (the shape of '
      'MNIST zero-padded to 32×32, the input the reference LeNet is hard-coded for) and labels, '
      f"the same batch on both sides; K = {list(k)}; the reference's "
      f'{scaling_dtp_reference.LENET_CONFIG}, ours {REFERENCE_MODEL} (the same σ, β and SGD '
      f'settings, ours rounded to 4 digits); both BPs SGD lr {opt.lr} momentum {opt.momentum} weight decay '
      f'{opt.weight_decay}; ours with the {conv_impl} convolution, TJML-DTP with '
      f'feedback_act={cfg.feedback_act}',
      f'- timing: {rounds} rounds, each one step of each LDRL (reference first) then '
      f'{_STEPS.value} steps of each other variant in rotating order, after compilation and '
      f'warm-up (1 LDRL step, {WARMUP} other steps); median ms/step (range over rounds)',
      '',
      '| step | reference ms/step | tp-jax ms/step | tp-jax / reference | reference range '
      '| tp-jax range |',
      '|---|---|---|---|---|---|',
      *reference_report(times),
  ]


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


def report(
    model: str, times: dict[str, list[float]], batch: int, gflop: dict[str, float | None]
) -> list[str]:
  """Rows 'model | variant | ms | x PyTorch | x BP | GFLOP/s | range': GFLOP/s is XLA's
  FLOP count of the variant's step (``gflop``; PyTorch's step is BP's math) over its
  median time."""
  med = {n: statistics.median(v) for n, v in times.items()}
  torch_ms = med.get('pytorch bp')
  bp_ms = med.get('bp / fast')
  rate = lambda n, ms: f'{gflop[n] / ms * 1e3:.1f}' if gflop.get(n) else ''
  rows = [
      f'| {model} (batch {batch}) | {n} | {ms:.1f} | '
      f'{"" if not torch_ms else f"{ms / torch_ms:.2f}"} | '
      f'{"" if not bp_ms else f"{ms / bp_ms:.2f}"} | {rate(n, ms)} | '
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
  if _REFERENCE_DIR.value is not None:
    if _COST.value or _LAYER.value:
      raise app.UsageError('--reference_dir prints its own table: not with --cost or --layer')
    try:
      k = tuple(int(v) for v in _REFERENCE_K.value) if _REFERENCE_K.value else None
    except ValueError as e:
      raise app.UsageError(f'--reference_iterations: {e}') from e
    print('\n'.join(reference_lines(_REFERENCE_DIR.value, k, train.hardware())))
    return
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
    gflop: dict[str, float | None] = {}
    for spec in _METHODS.value:
      method, overrides = method_spec(spec)
      # XLA counts a feedback-training loop's body once: no FLOP figure for LDRL/DTP.
      spec_gflop = (
          None
          if algorithms.trains_feedback(method)
          else step_cost(model, method=method, **overrides)[0]
      )
      for impl in _IMPLS.value:
        gflop[f'{spec} / {impl}'] = spec_gflop
        t0 = time.perf_counter()
        steps[f'{spec} / {impl}'] = jax_step(model, method, impl, **overrides)
        print(
            f'{model}: compiled {spec} / {impl} in {time.perf_counter() - t0:.1f} s',
            file=sys.stderr,
        )
    if _TORCH.value and (ts := torch_step(model)):
      steps['pytorch bp'], torch_version = ts
      gflop['pytorch bp'] = step_cost(model, method='bp')[0]
    rows += report(model, timing.interleaved(steps, plan), CONFIGS[model]().batch_size, gflop)
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
        '| model | method / conv | ms/step | × PyTorch BP | × BP (fast conv) | GFLOP/s | range |',
        '|---|---|---|---|---|---|---|',
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
