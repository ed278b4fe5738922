"""Additive coupling (RevNet; Gomez et al. 2017), a block whose feedback is its exact
inverse: the reversible MLP-Mixer of the paper's Table 4 (``models.reversible_mixer``).

On the two halves of the last axis, for any maps f, g:

  y1 = x1 + f(x2)            x2 = y2 - g(y1)
  y2 = x2 + g(y1)            x1 = y1 - f(x2)

The inverse on the right is exact (up to floating point) whatever f and g are. With
G = F^-1, DTP's difference-corrected target t_{n-1} = h_{n-1} + G(t_n) - G(h_n) is
exactly F^-1(t_n): the input for which the block outputs t_n. (G(h_n) = h_{n-1} is taken
from the forward pass, so a step inverts each coupling once.)

The feedback is this inverse under every analytical mode (``TJMC``, ``TJMC_HADAMARD``,
``IJMC``, ``PJMC``): the point of a reversible block is that its feedback needs no
approximation. So a model built from couplings and trained with ``method='tjml_dtp'``
gets exact-inverse targets through them and TJMC feedback through its other blocks.
Learned feedback (``LEARNED``: LDRL, DTP, FWDTP) is refused: an inverse built from
feedback weights would be neither F^-1 nor a learned approximation of it.
"""

from __future__ import annotations

import jax.numpy as jnp

from tp_jax import layers as L


class Coupling(L.Layer):
  """F(x1, x2) = (x1 + f(x2), x2 + g(x1 + f(x2))) on the halves of the last axis;
  G = F^-1 exactly. ``f`` and ``g`` are any ``tp_jax.layers`` maps from half the last
  axis to itself; only their forward maps are used."""

  f: L.Layer
  g: L.Layer

  def _halves(self, x):
    if x.shape[-1] % 2:
      raise ValueError(f'Coupling: the last axis ({x.shape[-1]}) must be even')
    return jnp.split(x, 2, axis=-1)

  def _map(self, fn: L.Layer, x, what: str):
    y, _ = fn.fwd(x)
    if y.shape != x.shape:
      raise ValueError(
          f'Coupling: {what} maps shape {x.shape} to {y.shape}; '
          f'it must keep the shape of a half'
      )
    return y

  def fwd(self, x):
    x1, x2 = self._halves(x)
    y1 = x1 + self._map(self.f, x2, 'f')
    y2 = x2 + self._map(self.g, y1, 'g')
    return jnp.concatenate([y1, y2], axis=-1), x  # ctx: the input, F^-1(y) exactly

  def inverse(self, y):
    y1, y2 = self._halves(y)
    x2 = y2 - self._map(self.g, y1, 'g')
    x1 = y1 - self._map(self.f, x2, 'f')
    return jnp.concatenate([x1, x2], axis=-1)

  def feedback(self, t, ctx, mode=L.TJMC):
    if mode.act == 'forward':
      raise L.FeedbackError(
          f'Coupling (name={self.name!r}): its feedback is the exact inverse '
          f'of the forward map; learned/fixed feedback weights (mode {mode}) have no '
          f'meaning here'
      )
    return self.inverse(t)

  def feedback_is_linear(self, mode):
    return False

  def feedback_difference(self, t, h, x, mode=L.TJMC):
    """F^-1(t) - F^-1(h), with F^-1(h) = x, the forward input: one inverse, not two."""
    return self.feedback(t, x, mode) - x
