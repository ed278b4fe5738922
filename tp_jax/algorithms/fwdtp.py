"""FWDTP (Shibuya et al. 2023): fixed random feedback weights, never trained, with
DTP's difference correction. B ~ U(-s, s) (the reference's default s = 1e-3)."""

from __future__ import annotations

import jax

from tp_jax import dtp
from tp_jax import layers
from tp_jax import network
from tp_jax.algorithms import common

HAS_FEEDBACK_WEIGHTS = True
TRAINS_FEEDBACK = False


def feedback_mode(cfg) -> layers.FeedbackMode:
  del cfg
  return layers.LEARNED


def validate(cfg, net) -> None:
  """FWDTP's only field of its own, ``feedback.init_scale``, is checked for every method
  with feedback weights (``algorithms.validate``)."""
  del cfg, net


def make(net, cfg, tx, hparams):
  beta = hparams.get('beta', cfg.beta)

  def init(key, x):
    k_fwd, k_fb = jax.random.split(key)
    state = common.init_forward(net, tx, k_fwd, x)
    scale = cfg.feedback.init_scale or None
    return state._replace(fb_params=network.init_feedback(state.params, k_fb, scale))

  def step(state, batch, key):
    del key
    x, labels = batch
    grads, metrics = dtp.local_grads(
        net, state.params, state.fb_params, layers.LEARNED, beta, x, labels
    )
    return common.finish_tp_step(tx, state, grads, metrics)

  return common.Algorithm(init, step)
