"""Training feedback weights on a local loss, per block, from one batch's activations.

Shared by LDRL and vanilla DTP. Given the activations, the blocks' feedback trainings
are independent, so ``order='parallel'`` runs them all inside one ``lax.scan`` over
iterations (block n stops after K_n, via ``lax.cond``); ``'sequential'`` runs them
block after block as the reference code does. Both draw the same noise for (block n,
iteration i), so they give the same result. Block 1's feedback is never trained: its
target is never propagated further.

The per-block fields ``feedback.iterations`` (K), ``feedback.noise`` (sigma) and
``feedback.lr`` hold one value per trained block (blocks 2..N), or one value for all.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from tp_jax import config as config_lib
from tp_jax import dtp
from tp_jax import layers
from tp_jax import network
from tp_jax.algorithms import common

Array = jax.Array
# loss(net, n, fwd_params_n, fb_params_n, x_in, y_out, ctx, key, sigma) -> scalar
FeedbackLoss = Callable[..., Array]
PER_BLOCK = ('iterations', 'noise', 'lr')
HAS_FEEDBACK_WEIGHTS = True
TRAINS_FEEDBACK = True


def feedback_mode(cfg) -> layers.FeedbackMode:
  del cfg
  return layers.LEARNED


def per_block(cfg, field: str, net: network.Net, hparams: common.HParams | None = None) -> tuple:
  """``cfg.feedback.<field>`` with one value per trained block: one value is broadcast.
  A sweep member's traced values (``hparams['feedback.<field>']``) replace cfg's."""
  values = (hparams or {}).get(f'feedback.{field}', cfg.feedback[field])
  values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
  return values * (len(net) - 1) if len(values) == 1 else values


def validate(cfg, net: network.Net) -> None:
  """The per-block fields fit net's trained blocks; ``feedback.order`` is known."""
  n = len(net) - 1
  for field in PER_BLOCK:
    given = cfg.feedback[field]
    if isinstance(given, (list, tuple)) and len(given) not in (1, n):
      # The reference code silently truncated mismatched lists; we refuse.
      raise config_lib.ConfigError(
          f'feedback.{field} has {len(given)} entries but {cfg.model} has {n} blocks '
          f'whose feedback is trained (blocks 2..{n + 1}); give {n} values, one per '
          f'block, or one value for all of them'
      )
    integer = field == 'iterations'
    for i, v in enumerate(per_block(cfg, field, net)):
      if isinstance(v, bool) or not (
          isinstance(v, int) and v >= 1 if integer else isinstance(v, (int, float)) and v > 0
      ):
        raise config_lib.ConfigError(
            f'feedback.{field}[{i}] must be a positive '
            f'{"integer" if integer else "number"} (the value for block {i + 2}), got {v!r}'
        )
  if cfg.feedback.order not in ('parallel', 'sequential'):
    raise config_lib.ConfigError(
        f"feedback.order must be 'parallel' or 'sequential', " f'got {cfg.feedback.order!r}'
    )


def optimizers(
    cfg, net: network.Net, hparams: common.HParams | None = None
) -> tuple[optax.GradientTransformation, ...]:
  """One SGD-momentum optimiser per trained block (blocks 2..N); a sweep member's traced
  lr and momentum (``hparams``) replace cfg's (a traced momentum keeps its state)."""
  momentum = (hparams or {}).get('feedback.momentum', cfg.feedback.momentum or None)
  return tuple(optax.sgd(lr, momentum=momentum) for lr in per_block(cfg, 'lr', net, hparams))


def init_state(fb_params: network.Params, txs) -> tuple:
  """Optimiser states: () for block 1, then one per trained block."""
  return ((),) + tuple(tx.init(b) for tx, b in zip(txs, fb_params[1:]))


def learned_feedback(net, n, b, t, ctx):
  return network.block_feedback(net, n, b, t, ctx, layers.LEARNED)


def train(
    net: network.Net,
    loss_fn: FeedbackLoss,
    cfg,
    txs,
    params,
    fb_params,
    fb_opt_state,
    x: Array,
    hs,
    ctxs,
    key: Array,
    hparams: common.HParams | None = None,
):
  """K_n optimiser steps on block n's feedback weights, for n = 2..N (σ_n from
  ``hparams`` where a sweep member holds its own).

  Returns (fb_params, fb_opt_state, final loss per trained block).
  """
  ins = (x,) + tuple(jax.lax.stop_gradient(hs[:-1]))
  hs, ctxs = jax.lax.stop_gradient((hs, ctxs))
  iters = per_block(cfg, 'iterations', net)
  sigmas = per_block(cfg, 'noise', net, hparams)

  def update(n, b, s, i):
    k = jax.random.fold_in(jax.random.fold_in(key, n), i)
    loss, g = jax.value_and_grad(
        lambda b: loss_fn(net, n, params[n], b, ins[n], hs[n], ctxs[n], k, sigmas[n - 1])
    )(b)
    upd, s = txs[n - 1].update(g, s, b)
    return optax.apply_updates(b, upd), s, loss

  fbs, states = list(fb_params), list(fb_opt_state)
  losses = [jnp.zeros(())] * (len(net) - 1)
  if cfg.feedback.order == 'sequential':
    for n in range(1, len(net)):

      def body(i, c, n=n):
        return update(n, *c[:2], i)

      fbs[n], states[n], losses[n - 1] = jax.lax.fori_loop(
          0, iters[n - 1], body, (fbs[n], states[n], losses[n - 1])
      )
  else:

    def body(carry, i):
      fbs, states, losses = (list(c) for c in carry)
      for n in range(1, len(net)):
        keep = lambda c: c
        fbs[n], states[n], losses[n - 1] = jax.lax.cond(
            i < iters[n - 1],
            lambda c, n=n: update(n, c[0], c[1], i),
            keep,
            (fbs[n], states[n], losses[n - 1]),
        )
      return (tuple(fbs), tuple(states), tuple(losses)), None

    (fbs, states, losses), _ = jax.lax.scan(
        body, (tuple(fbs), tuple(states), tuple(losses)), jnp.arange(max(iters))
    )
  return tuple(fbs), tuple(states), jnp.stack(losses)


def make(net, cfg, tx, loss_fn: FeedbackLoss, hparams: common.HParams) -> common.Algorithm:
  """A method that trains its feedback on ``loss_fn`` before each forward update
  (``hparams``: a sweep member's traced β, σ, feedback lr and momentum)."""
  validate(cfg, net)
  txs = optimizers(cfg, net, hparams)
  beta = hparams.get('beta', cfg.beta)

  def init(key, x):
    k_fwd, k_fb = jax.random.split(key)
    state = common.init_forward(net, tx, k_fwd, x)
    fb_params = network.init_feedback(state.params, k_fb, cfg.feedback.init_scale or None)
    return state._replace(fb_params=fb_params, fb_opt_state=init_state(fb_params, txs))

  def step(state, batch, key):
    x, labels = batch
    hs, ctxs = network.forward(net, state.params, x)
    fb_params, fb_opt_state, fb_loss = train(
        net,
        loss_fn,
        cfg,
        txs,
        state.params,
        state.fb_params,
        state.fb_opt_state,
        x,
        hs,
        ctxs,
        key,
        hparams,
    )
    grads, metrics = dtp.local_grads(net, state.params, fb_params, layers.LEARNED, beta, x, labels)
    metrics['feedback_loss'] = fb_loss
    return common.finish_tp_step(
        tx, state, grads, metrics, fb_params=fb_params, fb_opt_state=fb_opt_state
    )

  return common.Algorithm(init, step)
