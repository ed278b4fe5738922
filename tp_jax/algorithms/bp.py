"""Backprop: the baseline row of every table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tp_jax import network
from tp_jax.algorithms import common

HAS_FEEDBACK_WEIGHTS = False
TRAINS_FEEDBACK = False


def feedback_mode(cfg) -> None:
  """BP propagates no targets."""
  del cfg


def validate(cfg, net) -> None:
  """BP reads no config field of its own."""
  del cfg, net


def make(net: network.Net, cfg, tx: optax.GradientTransformation, hparams) -> common.Algorithm:
  del cfg, hparams  # the optimiser's are in tx

  def loss_fn(params, x, labels):
    logits = network.apply(net, params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  def step(state, batch, key):
    del key
    x, labels = batch
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, x, labels)
    params, opt_state = common.apply_grads(tx, state.params, state.opt_state, grads)
    metrics = dict(
        loss=loss,
        accuracy=jnp.mean(jnp.argmax(logits, -1) == labels),
        finite=jnp.isfinite(loss) & common.all_finite(params),
    )
    return state._replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return common.Algorithm(lambda key, x: common.init_forward(net, tx, key, x), step)
