"""Training feedback weights on a local loss, per block, from one batch's activations.

Shared by LDRL and vanilla DTP. Given the activations, the blocks' feedback trainings
are independent, so ``order='parallel'`` runs them all inside one ``lax.scan`` over
iterations (block n stops after K_n, via ``lax.cond``); ``'sequential'`` runs them
block after block as the reference code does. Both draw the same noise for (block n,
iteration i), so they give the same result. Block 1's feedback is never trained: its
target is never propagated further.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from tp_jax import dtp
from tp_jax import layers
from tp_jax import network
from tp_jax.algorithms import common

Array = jax.Array
# loss(net, n, fwd_params_n, fb_params_n, x_in, y_out, ctx, key, sigma) -> scalar
FeedbackLoss = Callable[..., Array]


def optimizers(cfg) -> tuple[optax.GradientTransformation, ...]:
  """One SGD-momentum optimiser per trained block (blocks 2..N)."""
  return tuple(optax.sgd(lr, momentum=cfg.feedback.momentum or None)
               for lr in cfg.feedback.lr)


def init_state(fb_params: network.Params, txs) -> tuple:
  """Optimiser states: () for block 1, then one per trained block."""
  return ((),) + tuple(tx.init(b) for tx, b in zip(txs, fb_params[1:]))


def learned_feedback(net, n, b, t, ctx):
  return network.block_feedback(net, n, b, t, ctx, layers.LEARNED)


def train(net: network.Net, loss_fn: FeedbackLoss, cfg, txs, params, fb_params,
          fb_opt_state, x: Array, hs, ctxs, key: Array):
  """K_n optimiser steps on block n's feedback weights, for n = 2..N.

  Returns (fb_params, fb_opt_state, final loss per trained block).
  """
  ins = (x,) + tuple(jax.lax.stop_gradient(hs[:-1]))
  hs, ctxs = jax.lax.stop_gradient((hs, ctxs))
  iters = tuple(cfg.feedback.iterations)
  sigmas = tuple(cfg.feedback.noise)

  def update(n, b, s, i):
    k = jax.random.fold_in(jax.random.fold_in(key, n), i)
    loss, g = jax.value_and_grad(lambda b: loss_fn(
        net, n, params[n], b, ins[n], hs[n], ctxs[n], k, sigmas[n - 1]))(b)
    upd, s = txs[n - 1].update(g, s, b)
    return optax.apply_updates(b, upd), s, loss

  fbs, states = list(fb_params), list(fb_opt_state)
  losses = [jnp.zeros(())] * (len(net) - 1)
  if cfg.feedback.order == 'sequential':
    for n in range(1, len(net)):
      def body(i, c, n=n):
        return update(n, *c[:2], i)
      fbs[n], states[n], losses[n - 1] = jax.lax.fori_loop(
          0, iters[n - 1], body, (fbs[n], states[n], losses[n - 1]))
  else:
    def body(carry, i):
      fbs, states, losses = (list(c) for c in carry)
      for n in range(1, len(net)):
        keep = lambda c: c
        fbs[n], states[n], losses[n - 1] = jax.lax.cond(
            i < iters[n - 1], lambda c, n=n: update(n, c[0], c[1], i), keep,
            (fbs[n], states[n], losses[n - 1]))
      return (tuple(fbs), tuple(states), tuple(losses)), None
    (fbs, states, losses), _ = jax.lax.scan(
        body, (tuple(fbs), tuple(states), tuple(losses)), jnp.arange(max(iters)))
  return tuple(fbs), tuple(states), jnp.stack(losses)


def make(net, cfg, tx, loss_fn: FeedbackLoss) -> common.Algorithm:
  """A method that trains its feedback on ``loss_fn`` before each forward update."""
  txs = optimizers(cfg)

  def init(key, x):
    k_fwd, k_fb = jax.random.split(key)
    state = common.init_forward(net, tx, k_fwd, x)
    fb_params = network.init_feedback(state.params, k_fb, cfg.feedback.init_scale or None)
    return state._replace(fb_params=fb_params, fb_opt_state=init_state(fb_params, txs))

  def step(state, batch, key):
    x, labels = batch
    hs, ctxs = network.forward(net, state.params, x)
    fb_params, fb_opt_state, fb_loss = train(
        net, loss_fn, cfg, txs, state.params, state.fb_params, state.fb_opt_state, x, hs,
        ctxs, key)
    grads, metrics = dtp.local_grads(net, state.params, fb_params, layers.LEARNED,
                                     cfg.beta, x, labels)
    metrics['feedback_loss'] = fb_loss
    return common.finish_tp_step(tx, state, grads, metrics, fb_params=fb_params,
                                 fb_opt_state=fb_opt_state)

  return common.Algorithm(init, step)
