"""A network as a sequence of DTP blocks, and its derived feedback path.

``Net.blocks`` are the units that get their own target: F_1, ..., F_N with
h_0 = x and h_n = F_n(h_{n-1}). Each block is a ``tp_jax.layers.Layer`` (usually a
``Sequential``), so its feedback G_n is derived from its definition: no model has a
hand-written feedback network. A plain Flax module (Linen or NNX) given as a block is
wrapped as ``layers.Derived``: its feedback is its transposed Jacobian, by autodiff.

Parameters are an explicit tuple with one Flax ``params`` dict per block; feedback
weights of the learned/fixed methods are a second tuple of the same structure.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from tp_jax import derived
from tp_jax import layers

Array = jax.Array
Params = tuple[dict, ...]


@dataclasses.dataclass(frozen=True)
class Net:
  """An ordered tuple of DTP blocks: ``tp_jax.layers`` layers, or plain Flax modules
  (wrapped as ``layers.Derived``). Jitted steps close over it (it is not hashable: a
  Sequential holds a list, so it cannot be a static argument)."""

  blocks: tuple[layers.Layer, ...]
  name: str = 'net'

  def __post_init__(self):
    wrapped = []
    for i, block in enumerate(self.blocks):
      try:
        wrapped.append(derived.as_layer(block))
      except ValueError as e:  # FeedbackError included
        raise type(e)(f'{self.name}: block {i}: {e}') from e
    object.__setattr__(self, 'blocks', tuple(wrapped))

  def __len__(self) -> int:
    return len(self.blocks)


def init(net: Net, key: Array, x: Array) -> Params:
  """Initialises every block in order, propagating shapes through the forward pass.

  A block that cannot take the previous block's output (shape, dtype) or that the
  derived feedback refuses raises here, before training, naming the block."""
  params = []
  for n, (block, k) in enumerate(zip(net.blocks, jax.random.split(key, len(net)))):
    try:
      p = block.init(k, x, method='fwd').get('params', {})
      x, _ = block.apply({'params': p}, x, method='fwd')
    except ValueError as e:  # FeedbackError included
      if type(e) not in (ValueError, layers.FeedbackError):
        raise  # a library's own error type (its constructor may take other arguments)
      raise type(e)(
          f'{net.name}: block {n} ({type(block).__name__}) on an input of ' f'shape {x.shape}: {e}'
      ) from e
    params.append(p)
  return tuple(params)


def block_forward(net: Net, n: int, p: dict, h: Array) -> tuple[Array, Any]:
  """F_n(h) and the ctx its feedback needs (n is 0-based)."""
  return net.blocks[n].apply({'params': p}, h, method='fwd')


def block_feedback(
    net: Net, n: int, p: dict, t: Array, ctx: Any, mode: layers.FeedbackMode = layers.TJMC
) -> Array:
  """G_n(t): pass the forward params for TJMC, or separate feedback weights."""
  with _naming_block(net, n):
    return net.blocks[n].apply({'params': p}, t, ctx, mode, method='feedback')


def block_feedback_difference(
    net: Net, n: int, p: dict, t: Array, h: Array, ctx: Any, mode: layers.FeedbackMode = layers.TJMC
) -> Array:
  """G_n(t) - G_n(h), each linear part of G_n applied once to a difference."""
  with _naming_block(net, n):
    return net.blocks[n].apply({'params': p}, t, h, ctx, mode, method='feedback_difference')


def block_noisy_reconstruction_ctx(net: Net, n: int, ctx: Any, noisy_ctx: Any) -> Any:
  """The ctx for block n's reconstruction of a noisy input in LDRL: the clean ctx with
  the noisy forward's routing (``Layer.noisy_reconstruction_ctx``)."""
  return net.blocks[n].apply({}, ctx, noisy_ctx, method='noisy_reconstruction_ctx')


def block_feedback_differences(
    net: Net,
    n: int,
    p: dict,
    ts: Sequence[Array],
    ctxs: Sequence[Any],
    t0: Array,
    ctx0: Any,
    mode: layers.FeedbackMode = layers.TJMC,
) -> Array:
  """G_n(t_i; ctx_i) - G_n(t0; ctx0) for each i, stacked on a new leading axis, each
  point with its own forward ctx (a noisy input's own argmax).

  Where G_n ends in linear maps whose ctx holds no arrays (a Sequential's first layers:
  conv, dense, reshape; ``Layer.shared_linear_tail``), only the differences go
  through them, all in one call on the batch axis, so G_n(t0) never does."""
  block = net.blocks[n]
  split = block.shared_linear_tail(ctx0, mode)
  head = lambda t, ctx: block.apply({'params': p}, t, ctx, mode, split, method='feedback_head')

  with _naming_block(net, n):
    u0 = head(t0, ctx0)
    d = jnp.stack([head(t, ctx) - u0 for t, ctx in zip(ts, ctxs, strict=True)])
    if not split:
      return d
    # The tail's layers act on each example alone, so the points share its batch axis.
    g = block.apply(
        {'params': p}, d.reshape(-1, *d.shape[2:]), ctx0, mode, split, method='feedback_tail'
    )
    return g.reshape(*d.shape[:2], *g.shape[1:])


def block_feedback_pairing(
    net: Net,
    n: int,
    p: dict,
    c: Array,
    t: Array,
    ctx: Any,
    t0: Array,
    ctx0: Any,
    mode: layers.FeedbackMode = layers.TJMC,
) -> Array:
  """<c, G_n(t; ctx) - G_n(t0; ctx0)>, summed over all axes, as a function of G_n's
  parameters p (LDRL's <dx, dr>).

  Where G_n reads p only in its shared linear tail, and linearly (LeNet's and VGG's
  blocks: unpool, activation, then the transposed conv or dense;
  ``Sequential.tail_is_linear_in_params``), the pairing is linear in p. Its gradient
  g is then the tail's weight gradient against c, and its value is <p, g> (Euler's
  identity), so the tail's output is never formed. Elsewhere the difference is formed."""
  block = net.blocks[n]
  split = block.shared_linear_tail(ctx0, mode)
  tail_linear = split and block.apply({'params': p}, split, mode, method='tail_is_linear_in_params')
  if not tail_linear:
    (d,) = block_feedback_differences(net, n, p, (t,), (ctx,), t0, ctx0, mode)
    return jnp.sum(c * d)
  head = lambda t, ctx: block.apply({'params': p}, t, ctx, mode, split, method='feedback_head')
  with _naming_block(net, n):
    d = head(t, ctx) - head(t0, ctx0)
    tail = lambda p: block.apply({'params': p}, d, ctx0, mode, split, method='feedback_tail')
    (g,) = jax.vjp(tail, p)[1](c)
  g = jax.lax.stop_gradient(g)
  return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(g)))


@contextlib.contextmanager
def _naming_block(net: Net, n: int):
  """A FeedbackError (a mode the block cannot give) says which block refused."""
  try:
    yield
  except layers.FeedbackError as e:
    raise layers.FeedbackError(f'{net.name}: block {n}: {e}') from e


def forward(
    net: Net, params: Params, x: Array, detach: bool = False
) -> tuple[tuple[Array, ...], tuple[Any, ...]]:
  """All block outputs (h_1..h_N) and ctxs. ``detach`` stops gradients between blocks,
  so that a sum of block-local losses trains each block on its own loss only."""
  _check_params(net, params)
  hs, ctxs = [], []
  h = x
  for n, p in enumerate(params):
    h, ctx = block_forward(net, n, p, jax.lax.stop_gradient(h) if detach else h)
    hs.append(h)
    ctxs.append(ctx)
  return tuple(hs), tuple(ctxs)


def apply(net: Net, params: Params, x: Array) -> Array:
  """The network's output (logits)."""
  return forward(net, params, x)[0][-1]


def init_feedback(params: Params, key: Array, scale: float | None = None) -> Params:
  """Feedback weights of the same structure as ``params`` for learned/fixed feedback.

  Kernels are drawn afresh: LeCun-normal w.r.t. the feedback's fan-in (the forward's
  fan-out) when ``scale`` is None, else U(-scale, scale) as in FWDTP. Other leaves
  (biases, LayerNorm scales) are copied; the feedback does not use biases.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, max(len(flat), 1))
  out = []
  for (path, leaf), k in zip(flat, keys):
    if _leaf_name(path) != 'kernel':
      out.append(jnp.array(leaf, copy=True))  # own buffers: states get donated
    elif scale is None:
      fan_in = leaf.shape[-1] * (leaf[..., 0, 0].size if leaf.ndim == 4 else 1)
      out.append(jax.random.normal(k, leaf.shape, leaf.dtype) / jnp.sqrt(fan_in))
    else:
      out.append(jax.random.uniform(k, leaf.shape, leaf.dtype, -scale, scale))
  return jax.tree_util.tree_unflatten(treedef, out)


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', last)))


def _check_params(net: Net, params: Sequence[Any]) -> None:
  if len(params) != len(net):
    raise ValueError(f'{net.name} has {len(net)} blocks but params has {len(params)} ' f'entries')
