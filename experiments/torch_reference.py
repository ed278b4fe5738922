"""PyTorch twins of tp_jax's benchmark models, for the benches' reference BP steps.

Same layers as ``tp_jax.models`` (NCHW): ``lenet`` (conv5x5 32 and 64, ELU, 3x3/2
max-pool, dense 512, dense 10) and ``simple_vgg`` (conv3x3 128-128-256-256-512, ELU,
2x2 max-pool after each, dense 10), trained by cross-entropy and SGD with the config's
momentum and weight decay.
"""

from __future__ import annotations

import os
from typing import Callable

import ml_collections

from tp_jax import models

MODELS = ('lenet', 'simple_vgg')  # tp_jax model names; bench_cpu's keys map onto them


def _pooled(n: int) -> int:
  return (n + 2 - 3) // 2 + 1  # a 3x3/2 max-pool with padding 1


def model(name: str, image_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10):
  """The ``torch.nn.Sequential`` of ``name`` for HxWxC images (``image_shape``)."""
  from torch import nn  # pylint: disable=g-import-not-at-top

  h, w, c = image_shape
  if name == 'lenet':
    return nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2),
        nn.ELU(),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ELU(),
        nn.MaxPool2d(3, 2, 1),
        nn.Flatten(),
        nn.Linear(64 * _pooled(_pooled(h)) * _pooled(_pooled(w)), 512),
        nn.ELU(),
        nn.Linear(512, num_classes),
    )
  if name == 'simple_vgg':
    layers = []
    for co in (128, 128, 256, 256, 512):
      layers += [nn.Conv2d(c, co, 3, padding=1), nn.ELU(), nn.MaxPool2d(2)]
      c = co
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * (h // 32) * (w // 32), num_classes))
  raise ValueError(f'no PyTorch reference for {name!r}; valid: {list(MODELS)}')


def bp_step(cfg: ml_collections.ConfigDict, seed: int = 0) -> Callable[[int], float]:
  """k -> the loss after k BP steps of ``cfg.model`` on one random batch of
  ``cfg.batch_size`` images of ``cfg``'s input shape, with ``cfg.optimizer``'s SGD; uses
  every CPU core."""
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(seed)
  h, w, c = models.input_shape(cfg)
  net = model(cfg.model, (h, w, c))
  opt = torch.optim.SGD(
      net.parameters(),
      lr=cfg.optimizer.lr,
      momentum=cfg.optimizer.momentum,
      weight_decay=cfg.optimizer.weight_decay,
  )
  x = torch.randn(cfg.batch_size, c, h, w)
  y = torch.randint(0, 10, (cfg.batch_size,))
  loss_fn = torch.nn.CrossEntropyLoss()

  def steps(k: int) -> float:
    for _ in range(k):
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(net(x), y)
      loss.backward()
      opt.step()
    return loss.item()

  return steps
