"""2-D convolution whose backward pass stays on XLA:CPU's fast paths.

``conv2d(x, w, strides, padding)`` computes exactly
``lax.conv_general_dilated(x, w, strides, padding,
dimension_numbers=('NHWC', 'HWIO', 'NHWC'))``.  Only *how the derivatives are
computed* differs, and only when the fast implementation is selected
(``impl='fast'``, or ``impl='auto'`` with ``jax.default_backend() == 'cpu'``).

Why
---
On XLA:CPU the forward convolution runs at matmul speed, but the weight gradient is
lowered to a "backward filter" convolution several times slower; XLA's own convolution
is also very slow when the kernel is larger than the output, and for an odd number of
input channels. The fast path computes the weight gradient as chunked, materialised
per-tap dots (or one im2col matrix per chunk for small ``kh*kw*Cin``), lowers the
forward and input gradient to im2col + dot where the kernel exceeds the output, and pads
odd channel counts with one zero channel. BUILD_NOTES.md ("Convolutions on XLA:CPU") has
the measurements behind each choice and what was tried and did not help.

Mechanics
---------
The fast path is a JAX primitive (``tp_conv2d``) that lowers to the ordinary
XLA convolution and is registered as *bilinear* (like ``dot_general``).  Its
JVP is therefore the usual ``conv(dx, w) + conv(x, dw)`` (so ``jax.jvp`` /
forward-mode works, unlike with a ``custom_vjp``), and its transpose rules are
the fast formulations above.  These rules are themselves ordinary JAX code
(``tp_conv2d``, ``dot_general``, ``lax.scan``), so higher-order derivatives
(grad-of-grad, jvp-of-vjp / Hessian-vector products) work.  ``vmap`` over the
input only folds the mapped axis into the batch; ``vmap`` over the weights
falls back to ``lax.conv_general_dilated``'s batching rule (correct, standard
speed).

Caveats: the weight-grad materialises ``kh*kw`` shifted copies of one batch
chunk (``_WGRAD_ROWS`` output pixels, a few MB) rather than the whole im2col
matrix, and pads the batch up to a multiple of the chunk with zeros.  Results
agree with XLA's to float32 round-off (different summation order), not
bit-for-bit.
"""

from __future__ import annotations

import functools
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["conv2d", "flax_conv_general_dilated", "resolve_impl", "IMPLS"]

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
IMPLS = ("auto", "xla", "fast")

Padding = Union[str, Sequence[Tuple[int, int]]]

# Target number of output pixels (rows of the per-tap matrices) per batch
# chunk in the weight gradient.  2048 rows x 128 channels x 4 B = 1 MB per
# materialised tap; measured best among 1k/2k/4k/8k/32k at 32x32x128.
_WGRAD_ROWS = 2048
# Below this many im2col columns (kh*kw*Cin) one im2col matrix per chunk is
# used instead of kh*kw per-tap dots.
_IM2COL_MAX_COLS = 256


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _normalize_padding(padding: Padding, x_shape, w_shape, strides):
  """Returns ((lo_h, hi_h), (lo_w, hi_w)) as python ints."""
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(tuple(x_shape[1:3]), tuple(w_shape[0:2]), tuple(strides), padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if len(pads) != 2:
    raise ValueError(f"padding must have 2 (lo, hi) pairs, got {padding!r}")
  return pads


def _reference(x, w, *, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DIMENSION_NUMBERS)


def _acc_dtype(dtype):
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    return jnp.dtype(jnp.float32)
  return dtype


def _barrier(*xs):
  """Keeps XLA from fusing the producers of ``xs`` into their consumers."""
  return lax.optimization_barrier(xs)


# ----------------------------------------------------------------------------
# The primitive
# ----------------------------------------------------------------------------

tp_conv2d_p = Primitive("tp_conv2d")


def _conv_bind(x, w, strides, padding):
  return tp_conv2d_p.bind(x, w, strides=tuple(strides), padding=tuple(tuple(p) for p in padding))


def _abstract_eval(x, w, *, strides, padding):
  out = jax.eval_shape(
      functools.partial(_reference, strides=strides, padding=padding),
      jax.ShapeDtypeStruct(x.shape, x.dtype),
      jax.ShapeDtypeStruct(w.shape, w.dtype),
  )
  return jax.core.ShapedArray(out.shape, out.dtype)


def _im2col(xp, kh, kw, ho, wo, strides):
  """(N, Hp, Wp, C) padded input -> (N, ho, wo, kh*kw*C) patches.

  Built in two stages (kw column shifts, then kh row shifts of those) so the
  graph has kh + kw slices instead of kh * kw (XLA:CPU compile time).
  """
  n, hp, _, c = xp.shape
  sh, sw = strides
  cols = jnp.stack(
      [
          lax.slice(xp, (0, 0, j, 0), (n, hp, j + sw * (wo - 1) + 1, c), (1, 1, sw, 1))
          for j in range(kw)
      ],
      axis=3,
  )  # (n, hp, wo, kw, c)
  rows = jnp.stack(
      [
          lax.slice(cols, (0, i, 0, 0, 0), (n, i + sh * (ho - 1) + 1, wo, kw, c), (1, sh, 1, 1, 1))
          for i in range(kh)
      ],
      axis=3,
  )  # (n, ho, wo, kh, kw, c)
  return rows.reshape(n, ho, wo, kh * kw * c)


def _kernel_exceeds_output(out_hw, w_shape):
  """XLA:CPU's convolution is pathologically slow in this regime (BUILD_NOTES.md)."""
  return out_hw[0] < w_shape[0] or out_hw[1] < w_shape[1]


def _forward(x, w, *, strides, padding):
  kh, kw = w.shape[0], w.shape[1]
  out = _abstract_eval(x, w, strides=strides, padding=padding)
  n, ho, wo, cout = out.shape
  if not _kernel_exceeds_output((ho, wo), w.shape) or 0 in out.shape or x.dtype != w.dtype:
    cin = x.shape[3]
    if cin > 1 and cin % 2:
      # An odd number of input channels sends XLA:CPU's convolution down a
      # slow path for some output widths (BUILD_NOTES.md). Zero channels
      # change no output.
      x = jnp.pad(x, [(0, 0)] * 3 + [(0, 1)])
      w = jnp.pad(w, [(0, 0)] * 2 + [(0, 1), (0, 0)])
    return _reference(x, w, strides=strides, padding=padding)
  (lo_h, hi_h), (lo_w, hi_w) = padding
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, [(0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0), (0, 0, 0)])
  p = _im2col(xp, kh, kw, ho, wo, strides)
  (p,) = _barrier(p)
  y = lax.dot_general(
      p.reshape(n * ho * wo, -1),
      w.reshape(-1, cout),
      (((1,), (0,)), ((), ())),
      preferred_element_type=_acc_dtype(x.dtype),
  )
  return y.reshape(n, ho, wo, cout).astype(out.dtype)


tp_conv2d_p.def_impl(_forward)
tp_conv2d_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(tp_conv2d_p, mlir.lower_fun(_forward, multiple_results=False))


def _input_grad(g, w, x_shape, strides, padding):
  """d/dx of conv(x, w) contracted with cotangent g (shape of the output)."""
  kh, kw = w.shape[0], w.shape[1]
  wt = jnp.flip(w, (0, 1)).swapaxes(2, 3)  # (kh, kw, O, I)
  pads = []
  for d, (k, s, (lo, hi)) in enumerate(zip((kh, kw), strides, padding)):
    n_in = x_shape[1 + d]
    n_out = g.shape[1 + d]
    # Padded-input rows beyond the last window get no gradient.
    r = (n_in + lo + hi) - (s * (n_out - 1) + k)
    pads.append((k - 1 - lo, k - 1 - hi + r))
  # Zero-upsample g for strides > 1 and apply negative padding (padding larger
  # than k - 1 leaves kernel rows that only ever see zeros) as a crop, so the
  # convolution itself only gets non-negative padding.
  crop = [(min(lo, 0), min(hi, 0)) for lo, hi in pads]
  if tuple(strides) != (1, 1) or any(c != (0, 0) for c in crop):
    zero = jnp.zeros((), g.dtype)
    g = lax.pad(
        g, zero, [(0, 0, 0), (*crop[0], strides[0] - 1), (*crop[1], strides[1] - 1), (0, 0, 0)]
    )
    (g,) = _barrier(g)
    pads = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
  out = _conv_bind(g, wt, (1, 1), pads)
  return out.astype(g.dtype)


def _weight_grad(x, g, w_shape, strides, padding, rows=None):
  """d/dw of conv(x, w) contracted with cotangent g, chunked over batch."""
  rows = _WGRAD_ROWS if rows is None else rows
  n, _, _, cin = x.shape
  _, ho, wo, cout = g.shape
  kh, kw = w_shape[0], w_shape[1]
  sh, sw = strides
  (lo_h, hi_h), (lo_w, hi_w) = padding
  acc = _acc_dtype(jnp.result_type(x.dtype, g.dtype))
  # Explicit padding (lax.pad also handles negative padding = cropping),
  # then crop to the rows/cols actually touched by some window.
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, [(0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0), (0, 0, 0)])
  hp, wp = sh * (ho - 1) + kh, sw * (wo - 1) + kw
  xp = xp[:, :hp, :wp, :]

  b = max(1, min(n, rows // max(1, ho * wo)))
  nchunks = -(-n // b)
  if nchunks * b != n:  # zero images contribute nothing
    extra = nchunks * b - n
    xp = jnp.pad(xp, [(0, extra), (0, 0), (0, 0), (0, 0)])
    g = jnp.pad(g, [(0, extra), (0, 0), (0, 0), (0, 0)])
  use_im2col = kh * kw * cin <= _IM2COL_MAX_COLS or ho * wo < kh * kw
  dn = (((0,), (0,)), ((), ()))

  def taps(xc):
    for i in range(kh):
      for j in range(kw):
        yield lax.slice(
            xc, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin), (1, sh, sw, 1)
        ).reshape(b * ho * wo, cin)

  def chunk_grad(xc, gc):
    if use_im2col:
      p = _im2col(xc, kh, kw, ho, wo, strides).reshape(b * ho * wo, -1)
      p, gc = _barrier(p, gc)
      out = lax.dot_general(p, gc, dn, preferred_element_type=acc)
      return out.reshape(kh, kw, cin, cout)
    outs = []
    for t in taps(xc):
      t, gc = _barrier(t, gc)
      outs.append(lax.dot_general(t, gc, dn, preferred_element_type=acc))
    return jnp.stack(outs).reshape(kh, kw, cin, cout)

  gs = g.reshape(nchunks, b * ho * wo, cout)
  if nchunks == 1:
    dw = chunk_grad(xp, gs[0])
  else:
    xs = xp.reshape(nchunks, b, hp, wp, cin)

    def body(carry, inp):
      return carry + chunk_grad(*inp), None

    dw, _ = lax.scan(body, jnp.zeros((kh, kw, cin, cout), acc), (xs, gs))
  return dw


def _transpose_lhs(ct, x, w, *, strides, padding):
  return _input_grad(ct, w, x.aval.shape, strides, padding).astype(x.aval.dtype)


def _transpose_rhs(ct, x, w, *, strides, padding):
  return _weight_grad(x, ct, w.aval.shape, strides, padding).astype(w.aval.dtype)


ad.defbilinear(tp_conv2d_p, _transpose_lhs, _transpose_rhs)


def _batch_rule(args, dims, *, strides, padding):
  x, w = args
  bx, bw = dims
  if bw is None:
    x = jnp.moveaxis(x, bx, 0)
    nb, n = x.shape[0], x.shape[1]
    out = _conv_bind(x.reshape((nb * n,) + x.shape[2:]), w, strides, padding)
    return out.reshape((nb, n) + out.shape[1:]), 0
  # Per-example weights: use lax's own batching rule (standard speed).
  out = jax.vmap(functools.partial(_reference, strides=strides, padding=padding), in_axes=(bx, bw))(
      x, w
  )
  return out, 0


batching.primitive_batchers[tp_conv2d_p] = _batch_rule


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def resolve_impl(impl: str = "auto") -> str:
  """Maps ``impl`` to 'xla' or 'fast'.

  'auto' picks 'fast' iff ``jax.default_backend() == 'cpu'`` at trace time.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "fast" if jax.default_backend() == "cpu" else "xla"
  return impl


def conv2d(x, w, strides: Sequence[int] = (1, 1), padding: Padding = "SAME", *, impl: str = "auto"):
  """NHWC x HWIO -> NHWC convolution, ``lax.conv_general_dilated`` semantics.

  Args:
    x: input, (N, H, W, Cin).
    w: kernel, (kh, kw, Cin, Cout).
    strides: (sh, sw).
    padding: 'SAME', 'VALID' (any string ``lax.padtype_to_pads`` accepts)
      or ((lo_h, hi_h), (lo_w, hi_w)).
    impl: 'xla' -> plain ``lax.conv_general_dilated`` (standard XLA
      derivatives); 'fast' -> same forward, derivatives computed by the
      CPU-friendly formulations described in the module docstring;
      'auto' -> 'fast' on the CPU backend, 'xla' elsewhere.
  Returns:
    (N, Ho, Wo, Cout), identical to ``lax.conv_general_dilated``.
  """
  strides = tuple(int(s) for s in strides)
  if len(strides) != 2:
    raise ValueError(f"strides must have 2 entries, got {strides}")
  if resolve_impl(impl) == "xla":
    return _reference(x, w, strides=strides, padding=padding)
  x = jnp.asarray(x)
  w = jnp.asarray(w)
  if x.ndim != 4 or w.ndim != 4:
    raise ValueError(f"expected NHWC x and HWIO w, got {x.shape}, {w.shape}")
  pads = _normalize_padding(padding, x.shape, w.shape, strides)
  return _conv_bind(x, w, strides, pads)


def flax_conv_general_dilated(impl: str = "auto"):
  """``conv2d`` as ``flax.linen.Conv``'s ``conv_general_dilated`` argument, so a plain
  Flax convolution gets the fast derivatives too:
  ``nn.Conv(64, (3, 3), conv_general_dilated=flax_conv_general_dilated())``.

  Why: on XLA:CPU a plain ``nn.Conv``'s weight gradient is a backward-filter convolution,
  and inside LDRL's feedback training XLA compiles it to convolutions with windows as
  large as the feature map (BENCHMARKS, the ResNet LDRL slowdown). Calls ``conv2d`` lacks
  (dilation, feature groups, an explicit precision, other layouts) go to
  ``lax.conv_general_dilated`` unchanged.
  """
  resolve_impl(impl)  # a bad name fails here, at model build, not at trace time

  def conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=None,
      rhs_dilation=None,
      dimension_numbers=None,
      feature_group_count=1,
      precision=None,
      **kwargs,
  ):
    plain = lambda d: d is None or all(int(v) == 1 for v in d)
    if (
        lhs.ndim == 4  # first: the NHWC spec below only parses 4-d shapes
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, DIMENSION_NUMBERS)
        and plain(lhs_dilation)
        and plain(rhs_dilation)
        and feature_group_count == 1
        and precision is None
        and not kwargs
    ):
      return conv2d(lhs, rhs, window_strides, padding, impl=impl)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **kwargs,
    )

  return conv_general_dilated
