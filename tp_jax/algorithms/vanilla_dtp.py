"""DTP (Lee et al. 2015): feedback trained on the reconstruction loss (eq. 6),

L_rec = || G(F(x + eps)) - (x + eps) ||^2,  eps ~ N(0, sigma^2)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tp_jax import network
from tp_jax.algorithms import feedback_training as fbt

HAS_FEEDBACK_WEIGHTS = fbt.HAS_FEEDBACK_WEIGHTS
TRAINS_FEEDBACK = fbt.TRAINS_FEEDBACK
feedback_mode = fbt.feedback_mode
validate = fbt.validate


def reconstruction_loss(net, n, p, b, x, y, ctx, key, sigma):
  del y, ctx
  x_noisy = x + sigma * jax.random.normal(key, x.shape, x.dtype)
  y_noisy, ctx_noisy = network.block_forward(net, n, p, x_noisy)
  err = fbt.learned_feedback(net, n, b, y_noisy, ctx_noisy) - x_noisy
  return jnp.sum(jnp.square(err)) / x.shape[0]


def make(net, cfg, tx, hparams):
  return fbt.make(net, cfg, tx, reconstruction_loss, hparams)
