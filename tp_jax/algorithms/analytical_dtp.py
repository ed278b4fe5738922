"""DTP with analytical feedback (Bao et al. 2024, Algorithm 2): no feedback training.

TJML-DTP uses G* with Jacobian (dF)^T; IJML-DTP and PJML-DTP use F's inverse and the
pseudo-inverse of its Jacobian, recomputed from the current weights at every step.
"""

from __future__ import annotations

import optax

from tp_jax import config as config_lib
from tp_jax import dtp
from tp_jax import jml
from tp_jax import layers
from tp_jax import network
from tp_jax.algorithms import common

MODES = {
    'tjml_dtp': {'integral': layers.TJMC, 'hadamard': layers.TJMC_HADAMARD},
    'ijml_dtp': {'integral': layers.IJMC},
    'pjml_dtp': {'integral': layers.PJMC},
}
FEEDBACK_ACTS = tuple(sorted({act for acts in MODES.values() for act in acts}))
HAS_FEEDBACK_WEIGHTS = False  # G is built from the forward weights
TRAINS_FEEDBACK = False


def feedback_mode(cfg) -> layers.FeedbackMode:
  if cfg.feedback_act not in MODES[cfg.method]:
    raise config_lib.ConfigError(
        f'{cfg.method} supports feedback_act in '
        f'{sorted(MODES[cfg.method])}, got {cfg.feedback_act!r}'
    )
  return MODES[cfg.method][cfg.feedback_act]


def validate(cfg, net) -> None:
  """The one field of its own, ``feedback_act``, is checked by ``feedback_mode``."""
  del cfg, net


def make(net: network.Net, cfg, tx: optax.GradientTransformation, hparams) -> common.Algorithm:
  mode = feedback_mode(cfg)
  beta = hparams.get('beta', cfg.beta)

  def step(state, batch, key):
    del key
    x, labels = batch
    grads, metrics = dtp.local_grads(net, state.params, None, mode, beta, x, labels)
    return common.finish_tp_step(tx, state, grads, metrics)

  def init(key, x):
    if mode == layers.PJMC:  # composed pseudo-inverses are not always the block's
      jml.check_pjmc_exact(net, x.shape)
    return common.init_forward(net, tx, key, x)

  return common.Algorithm(init, step)
