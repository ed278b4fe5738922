"""DTP with analytical feedback (Bao et al. 2024, Algorithm 2): no feedback training.

TJML-DTP uses G* with Jacobian (dF)^T; IJML-DTP and PJML-DTP use F's inverse and the
pseudo-inverse of its Jacobian, recomputed from the current weights at every step.
"""

from __future__ import annotations

import optax

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


def feedback_mode(method: str, feedback_act: str) -> layers.FeedbackMode:
  if feedback_act not in MODES[method]:
    raise ValueError(f'{method} supports feedback_act in {sorted(MODES[method])}, got '
                     f'{feedback_act!r}')
  return MODES[method][feedback_act]


def make(net: network.Net, cfg, tx: optax.GradientTransformation) -> common.Algorithm:
  mode = feedback_mode(cfg.method, cfg.feedback_act)

  def step(state, batch, key):
    del key
    x, labels = batch
    grads, metrics = dtp.local_grads(net, state.params, None, mode, cfg.beta, x, labels)
    return common.finish_tp_step(tx, state, grads, metrics)

  def init(key, x):
    if mode == layers.PJMC:  # composed pseudo-inverses are not always the block's
      jml.check_pjmc_exact(net, x.shape)
    return common.init_forward(net, tx, key, x)

  return common.Algorithm(init, step)
