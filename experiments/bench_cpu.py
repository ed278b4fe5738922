r"""CPU speed of whole training steps: BP and TJML-DTP on LeNet and Simplified-VGG, with
tp_jax's fast convolution and with XLA's standard one, beside PyTorch's BP step of the
same architecture (when torch is installed).

  python -m experiments.bench_cpu [--models=lenet,simple_vgg] [--rounds=7] [--steps=3]

Every JAX step is the library's own jitted algorithm step (``tp_jax.algorithms``, the
config of ``experiments/configs/{lenet,vgg}_cifar10.py``: batch, optimiser, beta) on
random CIFAR-shaped data held on the device; the PyTorch step is the same layers, loss
and SGD (momentum, weight decay) in NCHW. Compilation and two warm-up steps per variant
are not timed; then ``rounds`` rounds, each timing ``steps`` consecutive steps of every
variant in rotating order; the median over rounds is reported with the ratios to
PyTorch's step (issue 7's target: <= 1.2) and to the fast BP step.
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
import numpy as np

from experiments.configs import lenet_cifar10
from experiments.configs import vgg_cifar10
from tp_jax import algorithms
from tp_jax import models
from tp_jax import train

_MODELS = flags.DEFINE_list('models', ['lenet', 'simple_vgg'], 'lenet and/or simple_vgg.')
_ROUNDS = flags.DEFINE_integer('rounds', 7, 'Timed rounds (the median is reported).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Consecutive steps per variant per round.')
_IMPLS = flags.DEFINE_list('conv_impls', ['fast', 'xla'], 'tp_jax.conv implementations.')
_METHODS = flags.DEFINE_list('methods', ['bp', 'tjml_dtp'], 'JAX methods to time.')
_TORCH = flags.DEFINE_bool('torch', True, "Time PyTorch's BP step when torch imports.")

CONFIGS = {'lenet': lenet_cifar10.get_config, 'simple_vgg': vgg_cifar10.get_config}
Step = Callable[[], float]  # one training step, blocking until done; -> the loss


def jax_step(model: str, method: str, conv_impl: str) -> Step:
  """One jitted training step of ``method`` on ``model`` (CIFAR shapes, random data)."""
  cfg = CONFIGS[model]()
  net = models.get(model, **dict(cfg.model_kwargs, conv_impl=conv_impl))
  with cfg.unlocked():
    cfg.method = method
  algo = algorithms.make(net, cfg, algorithms.make_optimizer(cfg.optimizer, 1000))
  r = np.random.RandomState(0)
  x = jax.device_put(r.randn(cfg.batch_size, 32, 32, 3).astype(np.float32))
  y = jax.device_put(r.randint(0, 10, cfg.batch_size).astype(np.int32))
  state = jax.jit(algo.init)(jax.random.key(0), x)
  step = jax.jit(algo.step).lower(state, (x, y), jax.random.key(1)).compile()
  box = [state]

  def run():
    box[0], metrics = step(box[0], (x, y), jax.random.key(1))
    return float(metrics['loss'])
  return run


def torch_step(model: str) -> tuple[Step, str] | None:
  """PyTorch's BP step of the same architecture, loss and optimiser, or None."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  nn = torch.nn
  torch.set_num_threads(os.cpu_count() or 1)
  cfg = CONFIGS[model]()
  if model == 'lenet':
    layers = [nn.Conv2d(3, 32, 5, padding=2), nn.ELU(), nn.MaxPool2d(3, 2, 1),
              nn.Conv2d(32, 64, 5, padding=2), nn.ELU(), nn.MaxPool2d(3, 2, 1),
              nn.Flatten(), nn.Linear(64 * 8 * 8, 512), nn.ELU(), nn.Linear(512, 10)]
  else:
    layers, c = [], 3
    for co in (128, 128, 256, 256, 512):
      layers += [nn.Conv2d(c, co, 3, padding=1), nn.ELU(), nn.MaxPool2d(2)]
      c = co
    layers += [nn.Flatten(), nn.Linear(512, 10)]
  net = nn.Sequential(*layers)
  opt = torch.optim.SGD(net.parameters(), lr=cfg.optimizer.lr,
                        momentum=cfg.optimizer.momentum,
                        weight_decay=cfg.optimizer.weight_decay)
  x = torch.randn(cfg.batch_size, 3, 32, 32)
  y = torch.randint(0, 10, (cfg.batch_size,))
  loss_fn = nn.CrossEntropyLoss()

  def run():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net(x), y)
    loss.backward()
    opt.step()
    return loss.item()
  return run, torch.__version__


def time_interleaved(steps: dict[str, Step], rounds: int, k: int) -> dict[str, list[float]]:
  """ms/step of each variant per round; the order rotates between rounds."""
  for run in steps.values():  # warm-up: caches, page faults, thread pools
    run(), run()
  names, out = list(steps), {n: [] for n in steps}
  for rnd in range(rounds):
    for n in names[rnd % len(names):] + names[:rnd % len(names)]:
      t0 = time.perf_counter()
      for _ in range(k):
        steps[n]()
      out[n].append(1e3 * (time.perf_counter() - t0) / k)
  return out


def report(model: str, times: dict[str, list[float]], batch: int) -> list[str]:
  med = {n: statistics.median(v) for n, v in times.items()}
  torch_ms = med.get('pytorch bp')
  bp_ms = med.get('bp / fast')
  rows = [f'| {model} (batch {batch}) | {n} | {ms:.1f} | '
          f'{"" if not torch_ms else f"{ms / torch_ms:.2f}"} | '
          f'{"" if not bp_ms else f"{ms / bp_ms:.2f}"} | '
          f'{min(times[n]):.1f}–{max(times[n]):.1f} |' for n, ms in med.items()]
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for m in _MODELS.value:
    if m not in CONFIGS:
      raise app.UsageError(f'unknown model {m!r}; valid: {sorted(CONFIGS)}')
  hw = train.hardware()
  load_before = os.getloadavg()[0]
  rows = []
  torch_version = None
  for model in _MODELS.value:
    steps: dict[str, Step] = {}
    for method in _METHODS.value:
      for impl in _IMPLS.value:
        t0 = time.perf_counter()
        steps[f'{method} / {impl}'] = jax_step(model, method, impl)
        print(f'{model}: compiled {method} / {impl} in {time.perf_counter() - t0:.1f} s',
              file=sys.stderr)
    if _TORCH.value and (ts := torch_step(model)):
      steps['pytorch bp'], torch_version = ts
    rows += report(model, time_interleaved(steps, _ROUNDS.value, _STEPS.value),
                   CONFIGS[model]().batch_size)
  print('\n'.join([
      f'- command: `python -m experiments.bench_cpu {" ".join(sys.argv[1:])}`',
      f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}',
      f'- hardware: {hw["cpu_count"]} CPU cores visible, {hw["platform"]}; jax {hw["jax"]}'
      + (f', torch {torch_version}' if torch_version else '')
      + f'; load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after',
      f'- timing: {_ROUNDS.value} rounds × {_STEPS.value} steps per variant, rotating '
      f'order, after compilation and 2 warm-up steps; median ms/step (range over rounds)',
      '',
      '| model | method / conv | ms/step | × PyTorch BP | × BP (fast conv) | range |',
      '|---|---|---|---|---|---|', *rows]))


if __name__ == '__main__':
  app.run(main)
