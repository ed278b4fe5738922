"""Training algorithms, one small module each, looked up by name."""

from __future__ import annotations

import optax

from tp_jax import network
from tp_jax.algorithms import analytical_dtp
from tp_jax.algorithms import bp
from tp_jax.algorithms import fwdtp
from tp_jax.algorithms import ldrl
from tp_jax.algorithms import vanilla_dtp
from tp_jax.algorithms.common import Algorithm, TrainState, make_optimizer

_MODULES = {
    'bp': bp,
    'tjml_dtp': analytical_dtp,
    'ijml_dtp': analytical_dtp,
    'pjml_dtp': analytical_dtp,
    'ldrl': ldrl,
    'fwdtp': fwdtp,
    'dtp': vanilla_dtp,
}
METHODS = tuple(_MODULES)


def make(net: network.Net, cfg, tx: optax.GradientTransformation) -> Algorithm:
  """The algorithm ``cfg.method`` for ``net`` with forward optimiser ``tx``."""
  if cfg.method not in _MODULES:
    raise ValueError(f'unknown method {cfg.method!r}; valid methods: {sorted(_MODULES)}')
  return _MODULES[cfg.method].make(net, cfg, tx)


__all__ = ['Algorithm', 'TrainState', 'make', 'make_optimizer', 'METHODS']
