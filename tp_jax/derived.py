"""Feedback derived by autodiff: the TJMC feedback of any Flax module or pure function.

For a block F(params, x) the derived feedback is the transpose of F's linearisation at
the forward input x (``jax.vjp``), formed in the forward pass and carried in ``ctx``:

  G*(t) - G*(h) = J_F(x)^T (t - h)        exactly, for every target t,

so TJML is 0 to round-off and no target needs a second forward. ``jax.vjp`` returns a
pytree (its residuals are the leaves), so the map survives ``jit``, ``stop_gradient``
and being returned from the forward pass. It is taken with respect to the input only:
its residuals are values the forward pass computes (the kernel, GroupNorm's statistics,
an activation's input) that BP's backward through the block keeps too. (The compiled
steps' peak memory is compared in BUILD_NOTES.)

Its ctx leaves include parameters (e.g. a conv kernel), which have no batch axis: code
that slices or vmaps a ctx per example must instead take each example's ctx from its
own forward pass.

``Derived(module)`` wraps a ``flax.linen`` module whose only collection is ``params``;
``Function(apply_fn, init_fn)`` turns a pure function F(params, x) into one, and
``from_nnx(module)`` a ``flax.nnx`` module (through ``nnx.split``: its ``nnx.Param``
state, as a pure dict, is the block's params). ``tp_jax.layers.Sequential``,
``Residual`` and ``network.Net`` wrap plain modules themselves (``as_layer``).

Feedback modes:
* ``TJMC`` and ``TJMC_HADAMARD``: J_F^T from the forward pass (both: the derived map is
  the exact transpose, there is no varsigma to choose).
* ``LEARNED`` (LDRL, DTP, FWDTP): J_F^T with F evaluated at the feedback weights (a
  pytree of the forward params' structure), linearised at the same input x. For a
  dense or conv layer this is the closed form B^T t; it is linear in t and
  differentiable in the weights, which is what feedback training needs. It costs one
  forward of the block per feedback call (the weights are not the forward's).
* ``IJMC``/``PJMC``: refused. J_F^-1 / J_F^+ of a general module is a per-example
  matrix inversion; no closed form exists to derive.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct
from jax.extend import core as jax_core

from tp_jax import layers

Array = jax.Array


@struct.dataclass
class DerivedCtx:
  """The transpose of F's linearisation at x (``vjp``), x itself (for LEARNED
  feedback) and F's output shape."""

  vjp: Callable
  x: Array
  out: layers.Shape


class Function(nn.Module):
  """A pure function F(params, x) as a Linen module: ``init_fn(key, x) -> params``
  (stored as the module's param ``weights``: flax reserves the name ``params``)."""

  apply_fn: Callable[[Any, Array], Array]
  init_fn: Callable[[Array, Array], Any]

  @nn.compact
  def __call__(self, x):
    return self.apply_fn(self.param('weights', self.init_fn, x), x)


def from_nnx(module: nnx.Module) -> Function:
  """An NNX module as a pure function of its ``nnx.Param`` state (a pure dict) and x.

  Its parameters are the ones the module was constructed with (NNX initialises
  eagerly), whatever key ``network.init`` is given. Other state (``BatchStat``, RNG
  streams) is refused: it would change outside the block's params.
  """
  graphdef, params, other = nnx.split(module, nnx.Param, ...)
  if jax.tree_util.tree_leaves(other):
    kinds = sorted(
        {
            type(v).__name__
            for v in jax.tree_util.tree_leaves(other, is_leaf=lambda v: isinstance(v, nnx.Variable))
        }
    )
    raise ValueError(
        f'{type(module).__name__} (NNX) holds state other than nnx.Param '
        f'({", ".join(kinds)}); a DTP block must be a function of its '
        f'params and input only'
    )
  pure_params = nnx.to_pure_dict(params)

  def apply_fn(p, x):
    state = jax.tree_util.tree_map(lambda a: a, params)  # a copy to fill in
    nnx.replace_by_pure_dict(state, p)
    return nnx.merge(graphdef, state)(x)

  return Function(apply_fn, lambda key, x: pure_params)


def as_layer(module: Any) -> layers.Layer:
  """A ``tp_jax.layers.Layer`` unchanged; a plain Linen or NNX module as ``Derived``."""
  if isinstance(module, layers.Layer):
    return module
  if isinstance(module, nnx.Module):
    module = from_nnx(module)
  if isinstance(module, nn.Module):
    return Derived(module, parent=None)
  raise layers.FeedbackError(
      f'{type(module).__module__}.{type(module).__name__} is not a Flax module; wrap a '
      f'pure function F(params, x) as derived.Function(apply_fn, init_fn)'
  )


def _output_depends_on_input(fn: Callable[[Array], Array], x: Array) -> bool:
  """Does any output of fn's linearisation at x depend on its tangent input? Read off
  the jaxpr (structural, so a derivative that is 0 at this x still counts)."""
  jaxpr = jax.make_jaxpr(lambda dx: jax.jvp(fn, (x,), (dx,))[1])(x).jaxpr
  live = set(jaxpr.invars)
  for eqn in jaxpr.eqns:
    if any(isinstance(v, jax_core.Var) and v in live for v in eqn.invars):
      live.update(eqn.outvars)
  return any(
      isinstance(v, jax_core.Var) and v in live for v in jax.tree_util.tree_leaves(jaxpr.outvars)
  )


class Derived(layers.Layer):
  """A plain Flax module as a DTP layer whose feedback is derived by autodiff."""

  module: nn.Module

  def _what(self) -> str:
    name = f' {self.name!r}' if self.name else ''
    return f'Derived({type(self.module).__name__}){name}'

  def _apply(self, params, x):
    return self.module.clone(parent=None).apply({'params': params}, x)

  def _check_init(self, x):
    """Refuses, before training, a module the derived feedback would get wrong."""
    collections = sorted(set(self.module.variables) - {'params'})
    if collections:
      raise ValueError(
          f'{self._what()} has variable collections {collections} besides '
          f"'params' (e.g. BatchNorm's batch_stats): a DTP block must be a "
          f'function of its params and input only; use GroupNorm/LayerNorm'
      )
    params = self.module.variables.get('params', {})
    try:
      depends = _output_depends_on_input(lambda x: self._apply(params, x), x)
    except Exception as e:  # e.g. a dropout RNG that is not given
      raise ValueError(
          f'{self._what()} cannot run as a pure function of '
          f'(params, x): {type(e).__name__}: {e}'
      ) from e
    if not depends:
      raise ValueError(
          f'{self._what()}: its output does not depend on its input, so '
          f'its feedback is zero and no target could pass through it'
      )

  def fwd(self, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(
          f'{self._what()}: input dtype {x.dtype} is not floating-point; '
          f'its derived feedback needs a differentiable input'
      )
    if self.is_initializing():
      try:
        self.module(x)
      except Exception as e:
        raise ValueError(
            f'{self._what()} failed on an input of shape {x.shape}: ' f'{type(e).__name__}: {e}'
        ) from e
      self._check_init(x)
    params = self.module.variables.get('params', {})
    y, vjp = jax.vjp(lambda x: self._apply(params, x), x)
    return y, DerivedCtx(vjp, x, layers.Shape(y.shape))

  def feedback(self, t, ctx, mode=layers.TJMC):
    if t.shape != ctx.out.dims:
      raise ValueError(
          f'{self._what()} feedback: target shape {t.shape} does not match '
          f'the forward output shape {ctx.out.dims}'
      )
    if mode in (layers.TJMC, layers.TJMC_HADAMARD):
      return ctx.vjp(t)[0]
    if mode == layers.LEARNED:
      weights = self.module.variables.get('params', {})
      return jax.vjp(lambda x: self._apply(weights, x), ctx.x)[1](t)[0]
    raise layers.FeedbackError(
        f'{self._what()} has no derived feedback for mode {mode}: autodiff gives J_F^T '
        f'(TJMC, TJMC_HADAMARD) or J_F^T at feedback weights (LEARNED), not J_F^-1 or '
        f'J_F^+; use TJMC or a learned feedback'
    )

  def feedback_is_linear(self, mode):
    return True

  def feedback_is_vjp(self, mode):
    return mode in (layers.TJMC, layers.TJMC_HADAMARD)  # its feedback is the forward's vjp
