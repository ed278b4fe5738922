"""Forward layers F and their analytical feedback G*, side by side.

Every layer is a Flax Linen module with two methods:

* ``fwd(x) -> (y, ctx)``: the forward map, plus the context the feedback needs
  (max-pool argmax, LayerNorm's frozen variance, the input shape). ``ctx`` is an
  explicit pytree returned to the caller, never module state: the PyTorch reference
  kept pooling indices in a shared deque and broke on several GPUs.
* ``feedback(t, ctx, mode) -> x``: the feedback map G(t), built in closed form from
  the *same* parameter names as the forward. Calling it with the forward parameters
  gives the TJMC solution G* (Jacobian of G* == transposed Jacobian of F); calling it
  with a separate pytree of the same structure gives the learned (LDRL, DTP) or fixed
  random (FWDTP) feedback of the reference methods.

Closed forms (Bao et al. 2024, eqs. 16-35), with x the layer input and y = F(x):

========================  =====================================================
F                          G* (TJMC)
========================  =====================================================
conv W, stride s, pad p    conv with W rotated 180 deg and in/out swapped, lhs
                           dilation s  (== the transposed convolution)
dense  y = x W + b         t W^T  (the bias does not enter G)
max-pool                   max-unpool: scatter-add t to the forward argmax
activation sigma           varsigma(t) = int sigma'(sigma^-1(t)) dt, or the
                           Hadamard form sigma'(x) * t with x frozen
LayerNorm                  (I - 11^T/d) (gamma * t) / sqrt(s), s = var + eps frozen
mean over an axis          broadcast t / d
reshape / transpose        the inverse reshape / transpose
f + id                     g* + id
f2 . f1                    g1* . g2*
========================  =====================================================

IJMC (G = F^-1) and PJMC (J_G = J_F^+) are offered for the layers where they are
closed-form (dense: (t - b) W^-1 and (t - b) W^+; invertible activations: sigma^-1;
reshapes); elsewhere they are refused. A block composes its layers' maps, so IJMC gives
G = F^-1 for every block of square dense layers and invertible activations, but PJMC's
composed pseudo-inverses are J_F^+ only in special cases (a wide dense with reshapes
before it, a tall one with reshapes after it: ``jml.pjmc_inexact_reason``), and
PJML-DTP refuses the other blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from tp_jax import conv as conv_ops

Array = jax.Array
Padding = str | Sequence[tuple[int, int]]

# --------------------------------------------------------------------------------------
# Feedback modes


@dataclasses.dataclass(frozen=True)
class FeedbackMode:
  """How a layer's feedback is formed. Hashable: it is a static argument under jit.

  weights: 'transpose' (TJMC and the learned/fixed feedback of LDRL, DTP, FWDTP),
    'inverse' (IJMC, W^-1) or 'pinv' (PJMC, W^+).
  act: 'integral' (varsigma, TJMC), 'hadamard' (sigma'(x) * t, TJMC), 'inverse'
    (sigma^-1, IJMC/PJMC) or 'forward' (sigma itself, as in the LDRL/FWDTP code).
  """

  weights: str = 'transpose'
  act: str = 'integral'

  def __post_init__(self):
    if self.weights not in ('transpose', 'inverse', 'pinv'):
      raise ValueError(
          f"FeedbackMode.weights must be 'transpose', 'inverse' or 'pinv', " f'got {self.weights!r}'
      )
    if self.act not in ('integral', 'hadamard', 'inverse', 'forward'):
      raise ValueError(
          f"FeedbackMode.act must be 'integral', 'hadamard', 'inverse' or "
          f"'forward', got {self.act!r}"
      )


TJMC = FeedbackMode('transpose', 'integral')
TJMC_HADAMARD = FeedbackMode('transpose', 'hadamard')
IJMC = FeedbackMode('inverse', 'inverse')
PJMC = FeedbackMode('pinv', 'inverse')
LEARNED = FeedbackMode('transpose', 'forward')


@struct.dataclass
class Shape:
  """A static shape carried inside a ctx pytree (no array leaves, survives jit)."""

  dims: tuple[int, ...] = struct.field(pytree_node=False)


class FeedbackError(ValueError):
  """A feedback that is not defined for this layer, mode or input."""


# --------------------------------------------------------------------------------------
# Base class


class Layer(nn.Module):
  """A forward map with its feedback. Subclasses implement ``fwd`` and ``feedback``."""

  def fwd(self, x: Array) -> tuple[Array, Any]:
    raise NotImplementedError(f'{type(self).__name__} does not implement fwd')

  def feedback(self, t: Array, ctx: Any, mode: FeedbackMode = TJMC) -> Array:
    raise FeedbackError(f'{type(self).__name__} has no feedback defined')

  def feedback_is_linear(self, mode: FeedbackMode) -> bool:
    """Is t -> feedback(t, ctx, mode) linear (for a fixed ctx)?"""
    return False

  def feedback_is_vjp(self, mode: FeedbackMode) -> bool:
    """Is feedback_difference(t, h, ctx, mode), given the forward's own parameters,
    exactly J_F(x)^T (t - h) for J_F the Jacobian of fwd at its input x (not an
    approximation: equal up to round-off for every t)? Then one vjp of the block gives
    both its gradient and the next target (``dtp.local_grads``). False is always safe."""
    return False

  def feedback_is_linear_in_params(self, mode: FeedbackMode) -> bool:
    """For a fixed t and ctx, is the feedback linear in this layer's parameters (t W^T is
    in W)? ``network.block_feedback_pairing`` then needs only its weight gradient. False
    is always safe."""
    return False

  def shared_linear_tail(self, ctx: Any, mode: FeedbackMode = TJMC) -> int:
    """How many first layers of this one form a linear tail of G whose ctx holds no
    arrays (``Sequential`` finds them; a single layer keeps all of G in its head)."""
    return 0

  def feedback_head(self, t: Array, ctx: Any, mode: FeedbackMode = TJMC, split: int = 0) -> Array:
    """G without its first ``split`` layers' feedback (all of G here)."""
    return self.feedback(t, ctx, mode)

  def feedback_difference(self, t: Array, h: Array, ctx: Any, mode: FeedbackMode = TJMC) -> Array:
    """G(t) - G(h), the difference correction, for h the output of the forward pass that
    returned ctx. A linear G is applied once, to t - h: it halves the feedback cost of
    DTP for the linear layers (conv, dense, pooling)."""
    if self.feedback_is_linear(mode):
      return self.feedback(t - h, ctx, mode)
    return self.feedback(t, ctx, mode) - self.feedback(h, ctx, mode)

  def noisy_reconstruction_ctx(self, ctx: Any, noisy_ctx: Any) -> Any:
    """The ctx with which LDRL reconstructs a noisy input, G(F(x + dx)), given the clean
    and the noisy forward ctxs. G must be one map for the three reconstructions, so its
    linearisation state (frozen statistics, a derived Jacobian's point) is the clean
    input's: with the noisy one, G(F(x + dx)) - G(y) gains a term that follows dx and
    that ||dr_y||^2 does not penalise, and LDRL's loss has no minimum near J^T
    (BUILD_NOTES, "LDRL and the linearisation point"). Routing that a forward call
    decides (max-pool's argmax) is the noisy input's, as in the reference code."""
    del noisy_ctx
    return ctx

  def __call__(self, x: Array) -> Array:
    return self.fwd(x)[0]

  def _refuse(self, mode: FeedbackMode, what: str) -> FeedbackError:
    return FeedbackError(
        f'{type(self).__name__} (name={self.name!r}) has no closed-form '
        f'{what} feedback (mode {mode}); use TJMC or a learned feedback'
    )


def _check_last_dim(layer: str, x: Array, expected: int, what: str) -> None:
  if x.shape[-1] != expected:
    raise ValueError(
        f'{layer}: input shape {x.shape} does not match {what} '
        f'(expected last dimension {expected})'
    )


# PyTorch's default (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
# the initialisation the reference TP code and its tuned learning rates assume.
torch_default_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')

# --------------------------------------------------------------------------------------
# Dense


def _check_features(layer: Layer) -> None:
  """Refuses a width that cannot be right when the layer is built, before any init."""
  if isinstance(layer.features, bool) or not isinstance(layer.features, int) or layer.features < 1:
    raise ValueError(
        f'{type(layer).__name__}: features must be a positive integer, got ' f'{layer.features!r}'
    )


class Dense(Layer):
  """y = x W + b on the last axis; G*(t) = t W^T (TJMC matches Jacobians: no bias).

  IJMC: G(t) = (t - b) W^-1 = F^-1(t); PJMC: G(t) = (t - b) W^+, the minimum-norm
  least-squares solution of x W + b = t. The bias is subtracted so that the feedback of
  an earlier layer of the block (a sigma^-1) is evaluated at its own forward output; a
  dropped bias would cancel in DTP's G(t) - G(h) only where the dense layer is the
  block's first (nonlinear) layer."""

  features: int
  use_bias: bool = True
  kernel_init: Callable = torch_default_init

  def __post_init__(self):
    _check_features(self)
    super().__post_init__()

  @nn.compact
  def fwd(self, x):
    w_IxO = self.param('kernel', self.kernel_init, (x.shape[-1], self.features))
    _check_last_dim('Dense', x, w_IxO.shape[0], f'kernel {w_IxO.shape}')
    y = x @ w_IxO
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,))
    return y, None

  def feedback(self, t, ctx, mode=TJMC):
    params = self.variables['params']
    w_IxO = params['kernel']
    _check_last_dim('Dense feedback', t, w_IxO.shape[1], f'kernel {w_IxO.shape}')
    if mode.weights == 'transpose':
      return t @ w_IxO.T
    if self.use_bias:
      t = t - params['bias']
    if mode.weights == 'pinv':
      return t @ jnp.linalg.pinv(w_IxO)
    if w_IxO.shape[0] != w_IxO.shape[1]:
      raise FeedbackError(
          f'IJMC needs a square dense kernel; {self.name!r} has kernel '
          f'shape {w_IxO.shape} (use PJMC for non-square layers)'
      )
    return t @ jnp.linalg.inv(w_IxO)

  def feedback_is_linear(self, mode):
    return mode.weights == 'transpose' or not self.use_bias  # else affine: t - b

  def feedback_is_vjp(self, mode):
    return mode.weights == 'transpose'

  def feedback_is_linear_in_params(self, mode):
    return mode.weights == 'transpose'  # t W^T; W^-1 and W^+ are not


# --------------------------------------------------------------------------------------
# Convolution


def conv_feedback(
    t_NHWO: Array,
    w_HWIO: Array,
    strides: Sequence[int],
    padding: Padding,
    in_hw: Sequence[int],
    impl: str = 'auto',
) -> Array:
  """The TJMC feedback of a convolution: the kernel rotated 180 deg with in/out swapped.

  Equals the transposed convolution (the vjp of the forward w.r.t. its input) for any
  stride and padding: the stride becomes an lhs dilation, a padding (lo, hi) becomes
  (k-1-lo, k-1-hi+r) with r the rows the forward's floor division dropped.
  """
  kh, kw = w_HWIO.shape[:2]
  pads = (
      lax.padtype_to_pads(in_hw, (kh, kw), strides, padding)
      if isinstance(padding, str)
      else padding
  )
  out_hw = t_NHWO.shape[1:3]
  tpads = []
  for n, k, s, (lo, hi), o in zip(in_hw, (kh, kw), strides, pads, out_hw):
    r = (n + lo + hi - k) - (o - 1) * s  # rows of the padded input no window reached
    tpads.append((k - 1 - lo, k - 1 - hi + r))
  w_rot_HWOI = jnp.flip(w_HWIO, (0, 1)).swapaxes(2, 3)
  # The lhs dilation and the padding as one explicit lax.pad (a negative pad, when the
  # forward padding exceeds k - 1, crops), then a VALID convolution.
  cfg = [(0, 0, 0), *((lo, hi, s - 1) for (lo, hi), s in zip(tpads, strides)), (0, 0, 0)]
  t_NHWO = lax.pad(t_NHWO, jnp.zeros((), t_NHWO.dtype), cfg)
  return conv_ops.conv2d(t_NHWO, w_rot_HWOI, (1, 1), 'VALID', impl=impl)


class Conv(Layer):
  """2-D convolution, NHWC / HWIO, with bias; feedback in ``conv_feedback``."""

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: Padding = 'SAME'
  use_bias: bool = True
  kernel_init: Callable = torch_default_init
  # tp_jax.conv implementation: 'auto' (fast derivatives on CPU), 'fast' or 'xla'.
  impl: str = 'auto'

  def __post_init__(self):
    _check_features(self)
    super().__post_init__()

  @nn.compact
  def fwd(self, x):
    if x.ndim != 4:
      raise ValueError(f'Conv {self.name!r}: expected NHWC input, got shape {x.shape}')
    w_HWIO = self.param('kernel', self.kernel_init, (*self.kernel_size, x.shape[-1], self.features))
    _check_last_dim('Conv', x, w_HWIO.shape[2], f'kernel {w_HWIO.shape}')
    y = conv_ops.conv2d(x, w_HWIO, self.strides, self.padding, impl=self.impl)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,))
    return y, Shape(x.shape[1:3])

  def feedback(self, t, ctx, mode=TJMC):
    if mode.weights != 'transpose':
      raise self._refuse(mode, mode.weights)
    w_HWIO = self.variables['params']['kernel']
    _check_last_dim('Conv feedback', t, w_HWIO.shape[3], f'kernel {w_HWIO.shape}')
    return conv_feedback(t, w_HWIO, self.strides, self.padding, ctx.dims, self.impl)

  def feedback_is_linear(self, mode):
    return True

  def feedback_is_vjp(self, mode):
    return mode.weights == 'transpose'

  def feedback_is_linear_in_params(self, mode):
    return mode.weights == 'transpose'


# --------------------------------------------------------------------------------------
# Max-pooling


def _pool_pads(in_hw, window, strides, padding):
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(in_hw, window, strides, padding))
  return tuple(tuple(p) for p in padding)


def _window_offsets(window):
  return [(i, j) for i in range(window[0]) for j in range(window[1])]


def _pool_windows(x_NHWC: Array, window, strides, padding, fill) -> list[Array]:
  """The pooled-shape slices of x (padded with ``fill``), one per window offset."""
  pads = _pool_pads(x_NHWC.shape[1:3], window, strides, padding)
  xp = jnp.pad(x_NHWC, ((0, 0), *pads, (0, 0)), constant_values=fill)
  out_hw = [(xp.shape[1 + a] - window[a]) // strides[a] + 1 for a in range(2)]
  return [
      xp[
          :,
          i : i + (out_hw[0] - 1) * strides[0] + 1 : strides[0],
          j : j + (out_hw[1] - 1) * strides[1] + 1 : strides[1],
      ]
      for i, j in _window_offsets(window)
  ]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def max_pool_argmax(x_NHWC: Array, window, strides, padding) -> tuple[Array, Array]:
  """Max-pooling that also returns the argmax (window offset index, first max wins).

  Its derivative routes each output to exactly the input at its argmax, so the
  unpooling below is the exact transpose of the Jacobian, ties and overlapping windows
  included. Both passes are element-wise chains over the window offsets: XLA:CPU fuses
  them into single loops (stacking the offsets on a new axis instead ran 10x slower,
  and the derivative of that form ran 10x slower than ``max_unpool``).
  """
  ps = _pool_windows(x_NHWC, window, strides, padding, -jnp.inf)
  y = functools.reduce(jnp.maximum, ps)
  argmax = jnp.full(y.shape, len(ps) - 1, jnp.int32)
  for k in range(len(ps) - 2, -1, -1):  # downwards: the first maximum wins
    argmax = jnp.where(ps[k] == y, k, argmax)
  return y, argmax


@max_pool_argmax.defjvp
def _max_pool_argmax_jvp(window, strides, padding, primals, tangents):
  (x,), (dx,) = primals, tangents
  y, argmax = max_pool_argmax(x, window, strides, padding)
  dps = _pool_windows(dx, window, strides, padding, 0.0)
  dy = functools.reduce(jnp.add, [jnp.where(argmax == k, d, 0.0) for k, d in enumerate(dps)])
  return (y, argmax), (dy, np.zeros(argmax.shape, jax.dtypes.float0))


def materialize(x: Array) -> Array:
  """x, computed once into memory before its consumers read it.

  XLA:CPU fuses a producer into each consumer loop and recomputes it per read, and it
  drops ``lax.optimization_barrier`` before fusion. A conditional is a fusion boundary
  that survives, if its branches differ (XLA merges identical ones): x where x's first
  element equals itself, else x + 0 (only a NaN there takes it, and it changes only
  the sign of zeros). Off CPU, and where a vmap batches x (the cond becomes a select),
  this is only x."""
  if jax.default_backend() != 'cpu' or not x.size:
    return x
  first = x.ravel()[0]
  return lax.cond(first == first, lambda x: x, lambda x: x + 0.0, x)


def max_unpool(t_NHWC: Array, argmax: Array, in_hw, window, strides, padding) -> Array:
  """Scatter-add each value of t to its forward argmax (transpose of max-pooling)."""
  pads = _pool_pads(in_hw, window, strides, padding)
  padded_hw = [in_hw[a] + pads[a][0] + pads[a][1] for a in range(2)]
  out_hw = t_NHWC.shape[1:3]
  t_NHWC = materialize(t_NHWC)
  total = 0.0
  for k, (i, j) in enumerate(_window_offsets(window)):
    part = jnp.where(argmax == k, t_NHWC, 0.0)
    cfg = [(0, 0, 0)]
    for a, off in enumerate((i, j)):
      span = (out_hw[a] - 1) * strides[a] + 1
      cfg.append((off, padded_hw[a] - off - span, strides[a] - 1))
    total = total + lax.pad(part, jnp.zeros((), t_NHWC.dtype), cfg + [(0, 0, 0)])
  (lo_h, _), (lo_w, _) = pads
  return total[:, lo_h : lo_h + in_hw[0], lo_w : lo_w + in_hw[1]]


class MaxPool(Layer):
  """Max-pooling (e.g. 2x2/2, or LeNet's overlapping 3x3/2 with padding 1)."""

  window: tuple[int, int] = (2, 2)
  strides: tuple[int, int] = (2, 2)
  padding: Padding = 'VALID'

  def fwd(self, x):
    if x.ndim != 4:
      raise ValueError(f'MaxPool {self.name!r}: expected NHWC input, got shape {x.shape}')
    y, argmax = max_pool_argmax(x, self.window, self.strides, self.padding)
    return y, (argmax, Shape(x.shape[1:3]))

  def feedback(self, t, ctx, mode=TJMC):
    if mode.weights != 'transpose':
      raise self._refuse(mode, mode.weights)
    argmax, in_shape = ctx
    if t.shape != argmax.shape:
      raise ValueError(
          f'MaxPool feedback: target shape {t.shape} does not match the '
          f'pooled shape {argmax.shape}'
      )
    return max_unpool(t, argmax, in_shape.dims, self.window, self.strides, self.padding)

  def feedback_is_linear(self, mode):
    return True

  def feedback_is_vjp(self, mode):
    return mode.weights == 'transpose'

  def noisy_reconstruction_ctx(self, ctx, noisy_ctx):
    del ctx
    return noisy_ctx  # the noisy input's own argmax (reference)


# --------------------------------------------------------------------------------------
# Element-wise activations


@dataclasses.dataclass(frozen=True)
class ActivationFns:
  """sigma, sigma', sigma^-1 and varsigma = int sigma'(sigma^-1(y)) dy (None: undefined)."""

  f: Callable
  df: Callable
  inv: Callable | None
  integral: Callable | None


def _leaky(a):
  return ActivationFns(
      f=lambda x: jnp.where(x > 0, x, a * x),
      df=lambda x: jnp.where(x > 0, 1.0, a),
      inv=lambda y: jnp.where(y > 0, y, y / a),
      integral=lambda y: jnp.where(y > 0, y, a * y),  # LeakyReLU maps to itself
  )


ACTIVATIONS: dict[str, Callable[[float], ActivationFns]] = {
    'leaky_relu': _leaky,
    # ELU: sigma'(sigma^-1(y)) = 1 + y for y <= 0, so varsigma(y) = y + y^2/2 there.
    'elu': lambda a: ActivationFns(
        f=jax.nn.elu,
        df=lambda x: jnp.where(x > 0, 1.0, jnp.exp(jnp.minimum(x, 0.0))),
        inv=lambda y: jnp.where(y > 0, y, jnp.log1p(jnp.minimum(y, 0.0))),
        integral=lambda y: jnp.where(y > 0, y, y + 0.5 * y * y),
    ),
    # tanh: sigma'(sigma^-1(y)) = 1 - y^2, varsigma(y) = y - y^3/3.
    'tanh': lambda a: ActivationFns(
        f=jnp.tanh,
        df=lambda x: 1.0 - jnp.tanh(x) ** 2,
        inv=jnp.arctanh,
        integral=lambda y: y - y**3 / 3.0,
    ),
    # sigmoid: sigma'(sigma^-1(y)) = y (1 - y), varsigma(y) = y^2/2 - y^3/3.
    'sigmoid': lambda a: ActivationFns(
        f=jax.nn.sigmoid,
        df=lambda x: jax.nn.sigmoid(x) * (1.0 - jax.nn.sigmoid(x)),
        inv=lambda y: jnp.log(y) - jnp.log1p(-y),
        integral=lambda y: y * y / 2.0 - y**3 / 3.0,
    ),
    # GELU is not invertible: only the Hadamard feedback is defined.
    'gelu': lambda a: ActivationFns(
        f=lambda x: jax.nn.gelu(x, approximate=False),
        df=lambda x: jax.scipy.stats.norm.cdf(x) + x * jax.scipy.stats.norm.pdf(x),
        inv=None,
        integral=None,
    ),
}


class Activation(Layer):
  """Element-wise sigma. ``negative_slope`` is LeakyReLU's slope (unused otherwise)."""

  fn: str = 'elu'
  negative_slope: float = 0.01

  def setup(self):
    if self.fn not in ACTIVATIONS:
      raise ValueError(f'unknown activation {self.fn!r}; valid: {sorted(ACTIVATIONS)}')

  @property
  def fns(self) -> ActivationFns:
    return ACTIVATIONS[self.fn](self.negative_slope)

  def fwd(self, x):
    return self.fns.f(x), x

  def feedback_is_linear(self, mode):
    return mode.act == 'hadamard'

  def feedback_is_vjp(self, mode):
    return mode.act == 'hadamard'  # sigma'(x) * t; varsigma and sigma^-1 are nonlinear

  def feedback(self, t, x, mode=TJMC):
    fns = self.fns
    if mode.act == 'hadamard':
      return fns.df(x) * t
    if mode.act == 'forward':
      return fns.f(t)
    g = fns.integral if mode.act == 'integral' else fns.inv
    if g is None:
      raise FeedbackError(
          f'activation {self.fn!r} is not invertible, so its '
          f'{mode.act!r} feedback is undefined; use the Hadamard feedback '
          f'(FeedbackMode act="hadamard") or an invertible activation'
      )
    return g(t)


# --------------------------------------------------------------------------------------
# Normalisation and shape layers


class LayerNorm(Layer):
  """LayerNorm over the last axis with affine scale and shift.

  G*(t) = (I - 11^T/d)(gamma * t) / sqrt(s) with s = var(x) + eps frozen from the
  forward pass (eqs. 30-35). This drops the rank-one term x_hat (gamma * x_hat)^T /
  (d sqrt(s)) of the true transposed Jacobian, so per example

    TJML = ||x_hat|| ||gamma * x_hat|| / (d sqrt(s)),   ||x_hat||^2 = d var(x) / s.

  When var(x) >> eps, ||x_hat||^2 ~ d: TJML ~ ||gamma * x_hat|| / sqrt(d s) (1/sqrt(s)
  at gamma = 1, relative 1/sqrt(d - 2)); near var(x) ~ eps it is smaller by
  sqrt(var(x) / s). An approximation, measured in the tests and in BUILD_NOTES.md.
  """

  epsilon: float = 1e-5

  @nn.compact
  def fwd(self, x):
    d = x.shape[-1]
    gamma = self.param('scale', nn.initializers.ones, (d,))
    beta = self.param('bias', nn.initializers.zeros, (d,))
    x_hat, s = _standardise(x, self.epsilon)
    return x_hat * gamma + beta, s

  def feedback(self, t, s, mode=TJMC):
    if mode.weights != 'transpose':
      raise self._refuse(mode, mode.weights)
    return _layer_norm_feedback(t, self.variables['params']['scale'], s)

  def feedback_is_linear(self, mode):
    return True

  def feedback_is_vjp(self, mode):
    return False  # approximate: the rank-one term of J^T is dropped


def _standardise(x: Array, epsilon: float) -> tuple[Array, Array]:
  """(x_hat, s): x centred and scaled to unit variance on the last axis, s = var + eps."""
  mu = jnp.mean(x, axis=-1, keepdims=True)
  s = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True) + epsilon
  return (x - mu) * lax.rsqrt(s), s


def _layer_norm_feedback(t: Array, gamma: Array, s: Array) -> Array:
  """LayerNorm's G*(t) = (I - 11^T/d)(gamma * t) / sqrt(s), s frozen from the forward."""
  u = t * gamma
  return (u - jnp.mean(u, axis=-1, keepdims=True)) * lax.rsqrt(s)


class NormDense(Layer):
  """Dense(LayerNorm(x)) as one layer, regrouped so that LayerNorm's gamma and beta get
  their gradients from products W's gradient needs anyway; G*(t) = LayerNorm's G* of
  the dense's transpose (TJMC and learned feedback only, as LayerNorm).

  - ``mix_tokens=False`` (the Mixer's channel unit): the same map as
    ``Sequential([LayerNorm(), Dense(features)])``, y = x_hat (gamma W) + (beta W + b).
  - ``mix_tokens=True`` (its token unit; x is (batch, tokens, channels)): the same map as
    ``Sequential([LayerNorm(), Transpose((2, 1)), Dense(features)])``, the dense over the
    tokens: y = gamma * (x_hat^T W) + beta (1^T W) + b, (batch, channels, features).

  The plain forms get gamma's and beta's gradients from dy W^T, one extra (batch x out x
  in) matmul whenever x's own gradient is not needed, as at the start of a DTP block.
  Parameters: ``norm_scale``, ``norm_bias`` (LayerNorm's gamma, beta), ``kernel``,
  ``bias`` (Dense's).
  """

  features: int
  use_bias: bool = True
  epsilon: float = 1e-5
  kernel_init: Callable = torch_default_init
  mix_tokens: bool = False

  @nn.compact
  def fwd(self, x):
    if self.mix_tokens and x.ndim != 3:
      raise ValueError(
          f'NormDense(mix_tokens=True) (name={self.name!r}) needs x of shape (batch, tokens, '
          f'channels), got {x.shape}'
      )
    d = x.shape[-1]
    gamma = self.param('norm_scale', nn.initializers.ones, (d,))
    beta = self.param('norm_bias', nn.initializers.zeros, (d,))
    w_IxO = self.param(
        'kernel', self.kernel_init, (x.shape[-2 if self.mix_tokens else -1], self.features)
    )
    x_hat, s = _standardise(x, self.epsilon)
    if self.mix_tokens:
      # gamma scales the product's free channel axis: its gradient is dy * (x_hat^T W),
      # the stored forward product, elementwise
      xw_BxCxO = jnp.einsum('btc,to->bco', x_hat, w_IxO)
      y = gamma[:, None] * xw_BxCxO + beta[:, None] * jnp.sum(w_IxO, axis=0)
    else:
      y = x_hat @ (gamma[:, None] * w_IxO) + beta @ w_IxO
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,))
    return y, s

  def feedback(self, t, s, mode=TJMC):
    if mode.weights != 'transpose':
      raise self._refuse(mode, mode.weights)
    params = self.variables['params']
    w_IxO = params['kernel']
    _check_last_dim('NormDense feedback', t, w_IxO.shape[1], f'kernel {w_IxO.shape}')
    u = t @ w_IxO.T
    if self.mix_tokens:
      u = jnp.swapaxes(u, 1, 2)  # back to (batch, tokens, channels)
    return _layer_norm_feedback(u, params['norm_scale'], s)

  def feedback_is_linear(self, mode):
    return True

  def feedback_is_vjp(self, mode):
    return False  # LayerNorm's approximate G*


class Mean(Layer):
  """Mean over one non-batch axis (global average pooling / mean over tokens)."""

  axis: int | tuple[int, ...] = 1

  def fwd(self, x):
    return jnp.mean(x, axis=self.axis), Shape(x.shape[1:])

  def feedback(self, t, ctx, mode=TJMC):
    if mode.weights != 'transpose':
      raise self._refuse(mode, mode.weights)
    full = (t.shape[0], *ctx.dims)
    axes = (self.axis,) if isinstance(self.axis, int) else self.axis
    d = 1
    for a in axes:
      d *= full[a]
    return jnp.broadcast_to(jnp.expand_dims(t, axes), full) / d

  def feedback_is_linear(self, mode):
    return True

  def feedback_is_vjp(self, mode):
    return mode.weights == 'transpose'


class Reshape(Layer):
  """Reshape of the non-batch axes (e.g. flatten: ``shape=(-1,)``); G = the inverse."""

  shape: tuple[int, ...] = (-1,)

  def fwd(self, x):
    return x.reshape(x.shape[0], *self.shape), Shape(x.shape[1:])

  def feedback(self, t, ctx, mode=TJMC):
    return t.reshape(t.shape[0], *ctx.dims)

  def feedback_is_linear(self, mode):
    return True

  def feedback_is_vjp(self, mode):
    return True  # a reshape only reorders values: its inverse is its transpose


def Flatten(name: str | None = None) -> Reshape:  # pylint: disable=invalid-name
  return Reshape(shape=(-1,), name=name)


class Transpose(Layer):
  """Permutation of the non-batch axes (token mixing); G = the inverse permutation."""

  perm: tuple[int, ...] = (2, 1)

  def fwd(self, x):
    return jnp.transpose(x, (0, *self.perm)), None

  def feedback(self, t, ctx, mode=TJMC):
    inv = [0] * len(self.perm)
    for i, p in enumerate(self.perm):
      inv[p - 1] = i + 1
    return jnp.transpose(t, (0, *inv))

  def feedback_is_linear(self, mode):
    return True

  def feedback_is_vjp(self, mode):
    return True  # a permutation: its inverse is its transpose


# --------------------------------------------------------------------------------------
# Composition


class Sequential(Layer):
  """f_k . ... . f_1, with feedback g_1 . ... . g_k (the reversed composition)."""

  layers: Sequence[nn.Module]

  def __post_init__(self):
    # Plain Flax modules get the feedback derived by autodiff (tp_jax.derived).
    object.__setattr__(self, 'layers', [_as_layer(layer) for layer in self.layers])
    super().__post_init__()

  def fwd(self, x):
    return sequence_fwd(self.layers, x)

  def feedback(self, t, ctx, mode=TJMC):
    return sequence_feedback(self.layers, ctx, t, mode)

  def feedback_is_linear(self, mode):
    return all(layer.feedback_is_linear(mode) for layer in self.layers)

  def feedback_is_vjp(self, mode):
    return all(layer.feedback_is_vjp(mode) for layer in self.layers)

  def feedback_difference(self, t, h, ctx, mode=TJMC):
    return sequence_feedback_difference(self.layers, ctx, t, h, mode)

  def shared_linear_tail(self, ctx, mode=TJMC) -> int:
    """j, the number of first layers f_1..f_j whose feedback is linear in t with a ctx
    that holds no arrays (a conv, a dense, a reshape): then, for any two forward ctxs,
    G(t1; c1) - G(t0; c0) = g_1 . ... . g_j (u1 - u0), u = the feedback of the rest."""
    j = 0
    while (
        j < len(self.layers)
        and self.layers[j].feedback_is_linear(mode)
        and not jax.tree.leaves(ctx[j])
    ):
      j += 1
    return j

  def feedback_head(self, t, ctx, mode=TJMC, split=0):
    """g_{split+1} . ... . g_k (t), the feedback of layers split+1..k."""
    return sequence_feedback(self.layers[split:], ctx[split:], t, mode)

  def feedback_tail(self, t, ctx, mode=TJMC, split=0):
    """g_1 . ... . g_split (t), the feedback of the first ``split`` layers."""
    return sequence_feedback(self.layers[:split], ctx[:split], t, mode)

  def tail_is_linear_in_params(self, split: int, mode=TJMC) -> bool:
    """Does G read the block's parameters only in one layer of its first ``split``, and
    linearly there? Then G's tail output is linear in the whole parameter pytree. Call
    it bound: it reads which layers hold parameters."""
    holds = [bool(jax.tree.leaves(layer.variables)) for layer in self.layers]
    return (
        not any(holds[split:])
        and sum(holds[:split]) == 1
        and all(
            layer.feedback_is_linear_in_params(mode)
            for layer, h in zip(self.layers[:split], holds)
            if h
        )
    )

  def noisy_reconstruction_ctx(self, ctx, noisy_ctx):
    return tuple(
        layer.noisy_reconstruction_ctx(c, n)
        for layer, c, n in zip(self.layers, ctx, noisy_ctx, strict=True)
    )


def sequence_fwd(layers_: Sequence[Layer], x: Array) -> tuple[Array, tuple[Any, ...]]:
  """f_k . ... . f_1 (x) for ``layers_`` (bound) and their ctxs."""
  ctxs = []
  for layer in layers_:
    x, ctx = layer.fwd(x)
    ctxs.append(ctx)
  return x, tuple(ctxs)


def sequence_feedback(
    layers_: Sequence[Layer], ctxs: Sequence[Any], t: Array, mode: FeedbackMode
) -> Array:
  """g_1 . ... . g_k (t), the feedback of ``layers_`` (bound) given their ctxs."""
  for layer, c in zip(reversed(layers_), reversed(ctxs)):
    t = layer.feedback(t, c, mode)
  return t


def sequence_feedback_difference(
    layers_: Sequence[Layer], ctxs: Sequence[Any], t: Array, h: Array, mode: FeedbackMode
) -> Array:
  """G(t) - G(h) for G = g_1 . ... . g_k, the feedback of ``layers_`` (f_1..f_k, bound,
  with their forward ctxs): t and h through the nonlinear layers (g_k first), then the
  difference alone through the linear rest."""
  layers_, ctxs = list(layers_), list(ctxs)
  while layers_ and not all(l.feedback_is_linear(mode) for l in layers_):
    layer, c = layers_.pop(), ctxs.pop()
    t, h = layer.feedback(t, c, mode), layer.feedback(h, c, mode)
  d = t - h
  for layer, c in zip(reversed(layers_), reversed(ctxs)):
    d = layer.feedback(d, c, mode)
  return d


class Residual(Layer):
  """F(x) = f(x) + x, G(t) = g*(t) + t (TJMC only: F's inverse is not closed-form)."""

  inner: nn.Module

  def __post_init__(self):
    object.__setattr__(self, 'inner', _as_layer(self.inner))
    super().__post_init__()

  def fwd(self, x):
    y, ctx = self.inner.fwd(x)
    if y.shape != x.shape:
      raise ValueError(
          f'Residual: inner output shape {y.shape} does not match input ' f'shape {x.shape}'
      )
    return y + x, ctx

  def feedback(self, t, ctx, mode=TJMC):
    if mode.weights != 'transpose':
      raise self._refuse(mode, mode.weights)
    return self.inner.feedback(t, ctx, mode) + t

  def feedback_is_linear(self, mode):
    return self.inner.feedback_is_linear(mode)

  def feedback_is_vjp(self, mode):
    return mode.weights == 'transpose' and self.inner.feedback_is_vjp(mode)

  def feedback_difference(self, t, h, ctx, mode=TJMC):
    if mode.weights != 'transpose':
      raise self._refuse(mode, mode.weights)
    return self.inner.feedback_difference(t, h, ctx, mode) + (t - h)

  def noisy_reconstruction_ctx(self, ctx, noisy_ctx):
    return self.inner.noisy_reconstruction_ctx(ctx, noisy_ctx)


def _as_layer(module: Any) -> Layer:
  from tp_jax import derived  # pylint: disable=g-import-not-at-top (it imports this module)

  return derived.as_layer(module)


def __getattr__(name: str) -> Any:
  """``layers.Derived``, ``layers.Function`` and ``layers.from_nnx`` live in
  ``tp_jax.derived``, which imports this module: looked up on first use."""
  if name in ('Derived', 'Function', 'from_nnx'):
    from tp_jax import derived  # pylint: disable=g-import-not-at-top

    return getattr(derived, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
