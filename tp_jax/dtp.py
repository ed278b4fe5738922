"""Difference target propagation: the equations every TP method here shares.

  t_N     = h_N - beta * dL/dh_N                          (first target)
  t_{n-1} = G_n(t_n) + h_{n-1} - G_n(h_n),  n = N..2      (difference correction)
  loss    = sum_n 1/2 ||h_n - t_n||^2, t_n held fixed       (block-local losses)

Sums run over features; losses are averaged over the batch. G_n is whatever feedback
the method uses: TJMC (the forward parameters), IJMC/PJMC, or learned/fixed weights.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

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


def block_loss(h: Array, t: Array) -> Array:
  """1/2 ||h - t||^2, summed over features, averaged over the batch."""
  return 0.5 * jnp.mean(jnp.sum(jnp.square(h - t).reshape(h.shape[0], -1), axis=1))


def local_loss(hs: tuple[Array, ...], targets: tuple[Array, ...]) -> tuple[Array, Array]:
  """(sum of block losses, per-block losses). Targets are held fixed."""
  per_block = jnp.stack([block_loss(h, sg(t)) for h, t in zip(hs, targets)])
  return jnp.sum(per_block), per_block


def targets_finite(targets: tuple[Array, ...]) -> Array:
  """One bool per block: are all of its targets finite? (checked on the host)."""
  return jnp.stack([jnp.all(jnp.isfinite(t)) for t in targets])


def fused_blocks(net: network.Net, mode: layers.FeedbackMode) -> tuple[bool, ...]:
  """Per block: does the vjp of its block loss give the next target, with feedback built
  from the forward parameters in ``mode``? True where the block declares its feedback
  difference exactly J^T (t - h) (``Layer.feedback_is_vjp``); block 1 passes no target."""
  return tuple(n > 0 and block.feedback_is_vjp(mode) for n, block in enumerate(net.blocks))


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

  Where a block's feedback difference is exactly its transposed Jacobian applied to
  t_n - h_n (``fused_blocks``) and G is built from the forward params (``fb_params``
  None), the block loss's backward with cotangent (h_n - t_n)/B already computes it:
  one vjp of the block w.r.t. its params and input gives its gradient and
  t_{n-1} = h_{n-1} - B * (input cotangent), at BP's cost (``fused_sweep``). A block
  whose last layers alone are exact shares those (``shared_heads``). With no such
  block the step is the one value_and_grad below.
  """
  if fb_params is None and any(fused_blocks(net, mode) + shared_heads(net, params, mode)):
    grads, logits, per_block, targets = fused_sweep(net, params, mode, beta, x, labels)
    return grads, _metrics(logits, labels, per_block, targets_finite(targets))

  def loss_fn(p):
    hs, ctxs = network.forward(net, p, x, detach=True)
    t_N = first_target(sg(hs[-1]), labels, beta)
    fb = p if fb_params is None else fb_params
    targets = propagate_targets(net, fb, hs, ctxs, t_N, mode)
    total, per_block = local_loss(hs, targets)
    return total, (hs[-1], per_block, targets_finite(targets))

  (_, (logits, per_block, finite)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, _metrics(logits, labels, per_block, finite)


def _metrics(logits: Array, labels: Array, per_block: Array, finite: Array) -> dict[str, Array]:
  return dict(
      loss=cross_entropy_sum(logits, labels) / labels.shape[0],
      accuracy=jnp.mean(jnp.argmax(logits, -1) == labels),
      block_loss=per_block,
      targets_finite=finite,
  )


def _sequence(block: layers.Layer) -> tuple[Sequence[layers.Layer], bool] | None:
  """(its layers, whether an identity skip is added) of a Sequential or a Residual
  around one; None for other blocks."""
  if isinstance(block, layers.Residual) and isinstance(block.inner, layers.Sequential):
    return block.inner.layers, True
  if isinstance(block, layers.Sequential):
    return block.layers, False
  return None


def _head_size(block: layers.Layer, mode: layers.FeedbackMode) -> int:
  """(Bound.) The trailing layers of ``block`` whose feedback is exactly their vjp, less
  the parameter-free ones at its bottom (pooling, a mean: sharing them would save no
  product), and fewer than all of them (else the whole block fuses)."""
  parts = _sequence(block)
  if parts is None:
    return 0
  seq = parts[0]
  k = 0
  while k < len(seq) - 1 and seq[len(seq) - 1 - k].feedback_is_vjp(mode):
    k += 1
  while k and not seq[len(seq) - k].variables.get('params'):
    k -= 1
  return k


def shared_heads(
    net: network.Net, params: network.Params, mode: layers.FeedbackMode
) -> tuple[int, ...]:
  """Per block that does not fuse (``fused_blocks``), how many of its last layers form a
  head whose feedback is exactly its vjp (a Sequential, or a Residual around one).

  Under varsigma the feedback sends t and h separately through such a head, up to the
  first nonlinear feedback layer; the block loss's backward computes the head's vjp of
  (h - t)/B on its way to the lower layers' parameters, which is -(G(t) - G(h))/B at the
  head's input. So the head's feedback is applied to h only, and the t image is h's plus
  that difference: one transposed product fewer per weight layer in the head (a ResNet
  unit's second conv, a Mixer channel unit's second dense). Where the feedback below the
  head is linear (Hadamard, with a LayerNorm inexact), the difference goes on alone and
  the head's feedback is not applied at all."""
  fused = fused_blocks(net, mode)
  return tuple(
      0 if n == 0 or fused[n] else block.apply({'params': params[n]}, mode, method=_head_size)
      for n, block in enumerate(net.blocks)
  )


def _add_trees(a, b):
  return jax.tree_util.tree_map(jnp.add, a, b)


def _block_pass(net, n, p, x, fused, head):
  """Block n's forward at x, its ctx and its backward: cotangent -> (param grads, the
  cotangent at its input (fused), at its head's input (head > 0) or None)."""
  block = net.blocks[n]
  if fused:
    h, vjp, ctx = jax.vjp(functools.partial(network.block_forward, net, n), p, x, has_aux=True)
    return h, ctx, vjp
  if not head:
    h, vjp, ctx = jax.vjp(functools.partial(network.block_forward, net, n, h=x), p, has_aux=True)
    return h, ctx, lambda cotangent: (vjp(cotangent)[0], None)

  def lower(m, x):
    return layers.sequence_fwd(_sequence(m)[0][:-head], x)

  def upper(m, mid):
    seq, skip = _sequence(m)
    y, ctx = layers.sequence_fwd(seq[-head:], mid)
    return (y + x if skip else y), ctx

  mid, vjp_lower, ctx_lower = jax.vjp(
      lambda p: block.apply({'params': p}, x, method=lower), p, has_aux=True
  )
  h, vjp_upper, ctx_upper = jax.vjp(
      lambda p, mid: block.apply({'params': p}, mid, method=upper), p, mid, has_aux=True
  )

  def backward(cotangent):
    grads_upper, at_head = vjp_upper(cotangent)
    return _add_trees(grads_upper, vjp_lower(at_head)[0]), at_head

  return h, ctx_lower + ctx_upper, backward


def _head_difference(m, t, h, head_difference, ctx, mode, head):
  """(Bound.) G(t) - G(h) of a block with a shared head, given the head's J^T (t - h)."""
  seq, skip = _sequence(m)
  rest, rest_ctx = seq[:-head], ctx[:-head]
  if all(layer.feedback_is_linear(mode) for layer in rest):  # the difference alone goes on
    d = layers.sequence_feedback(rest, rest_ctx, head_difference, mode)
  else:  # t's image at the head's input is h's plus the difference
    h_mid = layers.sequence_feedback(seq[-head:], ctx[-head:], h, mode)
    d = layers.sequence_feedback_difference(rest, rest_ctx, h_mid + head_difference, h_mid, mode)
  return d + (t - h) if skip else d


def fused_sweep(
    net: network.Net,
    params: network.Params,
    mode: layers.FeedbackMode,
    beta: float,
    x: Array,
    labels: Array,
) -> tuple[network.Params, Array, Array, tuple[Array, ...]]:
  """``local_grads`` with G built from ``params``, as a backward sweep of per-block vjps:
  a ``fused_blocks`` block's vjp is taken w.r.t. (params, input) and gives its next
  target; a block with a ``shared_heads`` head gives the head's part of it; the others'
  targets come from the feedback pass alone. Returns (grads, logits, per-block losses,
  targets t_1..t_N)."""
  if len(params) != len(net):
    raise ValueError(f'{net.name} has {len(net)} blocks but params has {len(params)} entries')
  fused, heads = fused_blocks(net, mode), shared_heads(net, params, mode)
  hs, ctxs, backwards = [], [], []
  h = x
  for n, p in enumerate(params):
    h, ctx, backward = _block_pass(net, n, p, h, fused[n], heads[n])
    hs.append(h)
    ctxs.append(ctx)
    backwards.append(backward)
  t = first_target(hs[-1], labels, beta)
  targets, losses, grads = [t], [], [None] * len(net)
  loss, cotangent = jax.value_and_grad(block_loss)(hs[-1], t)
  for n in range(len(net) - 1, -1, -1):
    losses.append(loss)
    grads[n], shared = backwards[n](cotangent)
    if n == 0:
      break
    batch = hs[n].shape[0]  # J^T (t - h) = -B * J^T ((h - t) / B)
    if fused[n]:
      t = hs[n - 1] - batch * shared
    elif heads[n]:
      t = hs[n - 1] + net.blocks[n].apply(
          {'params': params[n]},
          t,
          hs[n],
          -batch * shared,
          ctxs[n],
          mode,
          heads[n],
          method=_head_difference,
      )
    else:
      t = hs[n - 1] + network.block_feedback_difference(net, n, params[n], t, hs[n], ctxs[n], mode)
    targets.append(t)
    if fused[n] and (n == 1 or fused[n - 1]):
      # t_{n-1} feeds no feedback pass (block 1 has none; a fused block takes its
      # vjp), so its loss and cotangent (h - t)/B come from h - t = B * shared, never
      # formed: XLA held those arrays beside the backward's (BUILD_NOTES, "Fused
      # backward sweep"). block_loss(B * shared, 0) is the same loss but measured
      # 16 MiB more on VGG, hence the written-out 1/2 B ||shared||^2.
      loss, cotangent = 0.5 * batch * jnp.sum(jnp.square(shared)), shared
    else:
      loss, cotangent = jax.value_and_grad(block_loss)(hs[n - 1], t)
  return tuple(grads), hs[-1], jnp.stack(losses[::-1]), tuple(reversed(targets))
