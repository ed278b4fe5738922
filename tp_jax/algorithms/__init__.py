"""Training algorithms, one small module each, looked up by name."""

from __future__ import annotations

import optax

from tp_jax import config as config_lib
from tp_jax import layers
from tp_jax import network
from tp_jax.algorithms import analytical_dtp
from tp_jax.algorithms import bp
from tp_jax.algorithms import fwdtp
from tp_jax.algorithms import ldrl
from tp_jax.algorithms import vanilla_dtp
from tp_jax.algorithms import common
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


FEEDBACK_ACTS = analytical_dtp.FEEDBACK_ACTS  # the values of cfg.feedback_act


def _module(method: str):
  if method not in _MODULES:
    raise ValueError(f'unknown method {method!r}; valid methods: {sorted(_MODULES)}')
  return _MODULES[method]


def has_feedback_weights(method: str) -> bool:
  """Does ``method`` keep feedback weights of its own (trained, or fixed random)?"""
  return _module(method).HAS_FEEDBACK_WEIGHTS


def trains_feedback(method: str) -> bool:
  """Does ``method`` train its feedback (K iterations per block per batch)? Such methods
  read the per-block fields ``feedback.iterations``, ``feedback.noise``, ``feedback.lr``."""
  return _module(method).TRAINS_FEEDBACK


def feedback_mode(cfg) -> layers.FeedbackMode | None:
  """The feedback mode ``cfg.method`` propagates targets with; None for BP."""
  return _module(cfg.method).feedback_mode(cfg)


def validate(cfg, net: network.Net, input_shape: tuple[int, ...]) -> None:
  """Raises ConfigError for a field of ``cfg.method``'s own that cannot be right, or a
  feedback that one of net's layers refuses (traced on ``input_shape`` images)."""
  module = _module(cfg.method)
  mode = feedback_mode(cfg)
  if mode is not None:  # first: a model that cannot take the method at all says so
    common.check_feedback_defined(cfg.method, net, mode, input_shape)
  module.validate(cfg, net)
  if module.HAS_FEEDBACK_WEIGHTS:
    config_lib.check_number(cfg, 'feedback.init_scale', allow_zero=True)


def make(
    net: network.Net, cfg, tx: optax.GradientTransformation, hparams: common.HParams | None = None
) -> Algorithm:
  """The algorithm ``cfg.method`` for ``net`` with forward optimiser ``tx``; ``hparams``
  (a sweep member's traced values by config path) replace cfg's β and feedback fields."""
  return _module(cfg.method).make(net, cfg, tx, hparams or {})


__all__ = [
    'Algorithm',
    'TrainState',
    'make',
    'make_optimizer',
    'METHODS',
    'FEEDBACK_ACTS',
    'feedback_mode',
    'has_feedback_weights',
    'trains_feedback',
    'validate',
]
