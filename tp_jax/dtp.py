"""Difference target propagation: the equations every TP method here shares.

  t_N     = h_N - beta * dL/dh_N                          (first target)
  t_{n-1} = G_n(t_n) + h_{n-1} - G_n(h_n),  n = N..2      (difference correction)
  loss    = sum_n 1/2 ||h_n - t_n||^2, t_n held fixed       (block-local losses)

Sums run over features; losses are averaged over the batch. G_n is whatever feedback
the method uses: TJMC (the forward parameters), IJMC/PJMC, or learned/fixed weights.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from tp_jax import layers
from tp_jax import network

Array = jax.Array
sg = jax.lax.stop_gradient


def cross_entropy_sum(logits: Array, labels: Array) -> Array:
  """Summed over the batch, so that beta is a per-example step size."""
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def first_target(
    h_N: Array,
    labels: Array,
    beta: float,
    loss_fn: Callable[[Array, Array], Array] = cross_entropy_sum,
) -> Array:
  """t_N = h_N - beta * dL/dh_N."""
  return h_N - beta * jax.grad(loss_fn)(h_N, labels)


def propagate_targets(
    net: network.Net,
    fb_params: network.Params,
    hs: tuple[Array, ...],
    ctxs: tuple[Any, ...],
    t_N: Array,
    mode: layers.FeedbackMode,
) -> tuple[Array, ...]:
  """(t_1, ..., t_N) by difference correction through the feedback G_n.

  Everything here is a fixed target: gradients are stopped. Block 1's feedback G_1
  is never needed (its target t_1 is the last one computed).
  """
  hs, ctxs, fb_params = sg(hs), sg(ctxs), sg(fb_params)
  targets = [sg(t_N)]
  for n in range(len(net) - 1, 0, -1):
    targets.append(
        hs[n - 1]
        + network.block_feedback_difference(net, n, fb_params[n], targets[-1], hs[n], ctxs[n], mode)
    )
  return tuple(reversed(targets))


def local_loss(hs: tuple[Array, ...], targets: tuple[Array, ...]) -> tuple[Array, Array]:
  """(sum of block losses, per-block losses). Targets are held fixed."""
  per_block = jnp.stack(
      [
          0.5 * jnp.mean(jnp.sum(jnp.square(h - sg(t)).reshape(h.shape[0], -1), axis=1))
          for h, t in zip(hs, targets)
      ]
  )
  return jnp.sum(per_block), per_block


def targets_finite(targets: tuple[Array, ...]) -> Array:
  """One bool per block: are all of its targets finite? (checked on the host)."""
  return jnp.stack([jnp.all(jnp.isfinite(t)) for t in targets])


def local_grads(
    net: network.Net,
    params: network.Params,
    fb_params: network.Params,
    mode: layers.FeedbackMode,
    beta: float,
    x: Array,
    labels: Array,
) -> tuple[network.Params, dict[str, Array]]:
  """One DTP forward update's gradients: every block trained on its own local loss.

  One forward pass (detached between blocks), the targets through the feedback, and
  one backward pass of the summed block losses: each block's gradient is exactly the
  gradient of its own loss, at BP's cost plus the feedback pass. ``fb_params`` is the
  forward ``params`` for the analytical methods and the feedback weights otherwise.
  """

  def loss_fn(p):
    hs, ctxs = network.forward(net, p, x, detach=True)
    t_N = first_target(sg(hs[-1]), labels, beta)
    fb = p if fb_params is None else fb_params
    targets = propagate_targets(net, fb, hs, ctxs, t_N, mode)
    total, per_block = local_loss(hs, targets)
    return total, (hs[-1], per_block, targets_finite(targets))

  (_, (logits, per_block, finite)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  ce = cross_entropy_sum(logits, labels) / labels.shape[0]
  metrics = dict(
      loss=ce,
      accuracy=jnp.mean(jnp.argmax(logits, -1) == labels),
      block_loss=per_block,
      targets_finite=finite,
  )
  return grads, metrics
