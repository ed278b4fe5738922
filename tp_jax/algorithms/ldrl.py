"""L-DRL (Ernoult et al. 2022): feedback trained with the local difference
reconstruction loss for K_n noisy iterations per block per batch, then one DTP
forward update through the learned feedback.

  r = G(y),  dr = G(F(x + dx)) - r,  dr_y = G(y + dy) - r,  dx, dy ~ N(0, sigma^2)
  LDRL = -2 <dx, dr> + ||dr_y||^2        (summed over features, batch mean)

G(F(x + dx)) unpools at the noisy input's argmax, the other two at the clean one's,
as in the reference code. Every other part of G's ctx (a LayerNorm's frozen s, a
derived block's linearisation point) is the clean input's in all three, so that they
go through one G (``Layer.noisy_reconstruction_ctx``: with the noisy point's, the
ResNet's feedback weights grew without bound; BUILD_NOTES). The reference calls G three
times. Here G(y) goes only through the parameter-free first maps of G (unpool,
activation; ``network.block_feedback_differences``), and where G's weights enter only
through its last, linear map (the transposed conv or dense) <dx, dr> is computed from
that map's weight gradient alone (``network.block_feedback_pairing``), so dr is never
formed. ``tests/test_ldrl.py`` keeps the loss and its gradient equal to the three calls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tp_jax import layers
from tp_jax import network
from tp_jax.algorithms import feedback_training as fbt

HAS_FEEDBACK_WEIGHTS = fbt.HAS_FEEDBACK_WEIGHTS
TRAINS_FEEDBACK = fbt.TRAINS_FEEDBACK
feedback_mode = fbt.feedback_mode
validate = fbt.validate


def ldrl_loss(net, n, p, b, x, y, ctx, key, sigma):
  k_x, k_y = jax.random.split(key)
  dx = sigma * jax.random.normal(k_x, x.shape, x.dtype)
  dy = sigma * jax.random.normal(k_y, y.shape, y.dtype)
  y_noisy, ctx_noisy = network.block_forward(net, n, p, x + dx)
  ctx_noisy = network.block_noisy_reconstruction_ctx(net, n, ctx, ctx_noisy)
  dx_dr = network.block_feedback_pairing(net, n, b, dx, y_noisy, ctx_noisy, y, ctx, layers.LEARNED)
  (dr_y,) = network.block_feedback_differences(net, n, b, (y + dy,), (ctx,), y, ctx, layers.LEARNED)
  return (-2.0 * dx_dr + jnp.sum(jnp.square(dr_y))) / x.shape[0]


def make(net, cfg, tx, hparams):
  return fbt.make(net, cfg, tx, ldrl_loss, hparams)
