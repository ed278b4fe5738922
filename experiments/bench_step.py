"""One training step of a named config on one synthetic batch: the training loop's own
compiled step (``tp_jax.train.setup``), stepped and costed. Shared by the benches
(``experiments.bench_cpu``, ``experiments.reproduce.scaling``); it defines no flags, so
any binary can import it.
"""

from __future__ import annotations

import inspect
from typing import Callable

import ml_collections

from experiments import synthetic
from experiments.configs import lenet_cifar10
from experiments.configs import lenet_mnist
from experiments.configs import mixer_cifar10
from experiments.configs import resnet18_cifar10
from experiments.configs import vgg_cifar10
from experiments.reproduce import speed
from tp_jax import models
from tp_jax import train

Steps = Callable[[int], object]  # k -> the loss (or output) after k steps, blocking


def _resnet18_w16():
  cfg = resnet18_cifar10.get_config()
  cfg.model_kwargs.width = 16
  return cfg


CONFIGS = {
    'lenet': lenet_cifar10.get_config,
    'lenet_mnist': lenet_mnist.get_config,
    'simple_vgg': vgg_cifar10.get_config,
    'mlp_mixer': mixer_cifar10.get_config,
    'resnet18_w16': _resnet18_w16,
    'resnet18': resnet18_cifar10.get_config,
}


def config(model: str, conv_impl: str, **overrides) -> ml_collections.ConfigDict:
  """``model``'s config (a key of CONFIGS) with ``overrides`` (nested dicts update
  nested fields) and ``conv_impl`` for the models that take one."""
  cfg = CONFIGS[model]()
  with cfg.unlocked():
    if 'conv_impl' in inspect.signature(models.MODELS[cfg.model]).parameters:
      cfg.model_kwargs.conv_impl = conv_impl
    cfg.update(overrides)
  return cfg


def setup(
    model: str, conv_impl: str, image_shape: tuple[int, ...] | None = None, **overrides
) -> train.Run:
  """``config(model, conv_impl, **overrides)`` built by the training loop on one random
  batch of its dataset's shapes (or ``image_shape``)."""
  cfg = config(model, conv_impl, **overrides)
  return train.setup(
      cfg, synthetic.dataset(cfg.dataset, cfg.batch_size, cfg.batch_size, image_shape=image_shape)
  )


def stepper(run: train.Run) -> Steps:
  """k -> ``run``'s training step applied k times to its one batch (the state carried
  from call to call), returning the last loss (blocking)."""
  idx = train.epoch_indices(run, 0)
  box = [train.init_state(run)]

  def steps(k: int) -> float:
    for _ in range(k):
      box[0], metrics = run.train_step(box[0], run.x_train, run.y_train, idx, run.step_key)
    return float(metrics['loss'])

  return steps


def jax_step(
    model: str, method: str, conv_impl: str, image_shape: tuple[int, ...] | None = None, **overrides
) -> Steps:
  """``method``'s training step on ``model`` (one random batch of its dataset's shapes, or
  ``image_shape``), with the config's fields updated by ``overrides``."""
  return stepper(setup(model, conv_impl, image_shape, method=method, **overrides))


def temp_mib(compiled) -> float:
  """Peak temporary memory of a compiled program (XLA's memory analysis), in MiB."""
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def step_cost(model: str, **overrides) -> tuple[float, float]:
  """(GFLOP, peak temporary MiB) of ``model``'s compiled training step with
  ``overrides``, by XLA's cost and memory analysis. Built with XLA's own convolution,
  as ``experiments.reproduce.speed.step_gflop`` counts (XLA counts a loop body once,
  and the fast convolution's weight gradient is a loop over batch chunks)."""
  compiled = setup(model, 'xla', **overrides).train_step
  return speed.compiled_gflop(compiled), temp_mib(compiled)
