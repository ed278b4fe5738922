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


def mean_cross_entropy(
    net: network.Net, params: network.Params, x: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(the mean cross-entropy of the forward pass, which BP descends; the logits)."""
  logits = network.apply(net, params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits


def gradient(
    net: network.Net, params: network.Params, x: jax.Array, labels: jax.Array
) -> network.Params:
  """BP's gradient of the mean cross-entropy: what every TP update is compared with."""
  return jax.grad(lambda p: mean_cross_entropy(net, p, x, labels)[0])(params)


def make(net: network.Net, cfg, tx: optax.GradientTransformation, hparams) -> common.Algorithm:
  del cfg, hparams  # the optimiser's are in tx

  def step(state, batch, key):
    del key
    x, labels = batch
    (loss, logits), grads = jax.value_and_grad(
        lambda p: mean_cross_entropy(net, p, x, labels), has_aux=True
    )(state.params)
    params, opt_state = common.apply_grads(tx, state.params, state.opt_state, grads)
    metrics = dict(
        loss=loss,
        accuracy=jnp.mean(jnp.argmax(logits, -1) == labels),
        finite=jnp.isfinite(loss) & common.all_finite(params),
    )
    return state._replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return common.Algorithm(lambda key, x: common.init_forward(net, tx, key, x), step)
