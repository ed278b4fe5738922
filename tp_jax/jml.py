"""Jacobian matching losses (Bao et al. 2024, eqs. 12-14): exact and matrix-free.

For a DTP block F_n with input h_n (dimension n_in, flattened per example) and output
h_{n+1} = F_n(h_n) (dimension n_out), and a feedback G_n, let

  J_F = dF/dh       at h_n       (n_out x n_in)
  J_G = dG/dt       at t = h_{n+1}, with G's context (pool argmax, LayerNorm's s,
                    the activation input of the Hadamard feedback) frozen from the
                    forward pass at h_n                                (n_in x n_out)

The three matching losses are Frobenius distances between J_G and a target matrix:

  TJML = || J_G - J_F^T ||_F      (eq. 14; TJMC: G* is built so that this is 0)
  IJML = || J_G - J_F^-1 ||_F     (eq. 12; square J_F only)
  PJML = || J_G - J_F^+ ||_F      (eq. 13; Moore-Penrose pseudo-inverse)

and their relative forms divide by the target's norm: ||J_F^T||_F = ||J_F||_F,
||J_F^-1||_F, ||J_F^+||_F. Every quantity is per example; ``block_jml`` averages the
absolute and the relative values over the batch (the mean of the per-example ratios).

Exact values materialise both Jacobians per example (``jax.jacfwd`` or ``jax.jacrev``,
whichever needs fewer passes), in the block's dtype (float32, or float64 with
``jax_enable_x64``), and take the norms on the host in float64.
That costs O(n_in * n_out) memory per example, so ``block_jml`` switches automatically
to a matrix-free estimate when n_in * n_out > ``MAX_EXACT_SIZE`` (= 2**24, 64 MiB of
float32 per Jacobian; ``report`` takes a smaller, time-based limit as an argument).
``report`` computes J_F once per block and J_G once per feedback, for all kinds.

Matrix-free TJML. With A = J_G - J_F^T (n_in x n_out) and probes v ~ N(0, I_{n_out}),

  E_v ||A v||^2 = tr(A^T A) = ||A||_F^2,    A v = jvp(G, h_{n+1}; v) - vjp(F, h_n)(v),

so neither matrix is formed: one forward-mode pass through G and one reverse-mode pass
through F per probe. With K probes, q = mean_k ||A v_k||^2 estimates ||A||_F^2 with
standard error sd_k(||A v_k||^2)/sqrt(K); the delta method gives
se(sqrt(q)) = se(q) / (2 sqrt(q)). The same probes give p = mean_k ||J_F^T v_k||^2,
an estimate of ||J_F||_F^2, and the relative value r = sqrt(q/p) has, by the delta
method on log r = (log q - log p)/2,

  se(r)^2 = r^2/4 * [var(q)/q^2 + var(p)/p^2 - 2 cov(q, p)/(q p)]

(q and p share probes, hence the covariance). sqrt(q) is biased low by about
var(q)/(8 q^{3/2}), which is second order in 1/K and ignored. The reported standard
errors are Monte-Carlo errors of the probes for the given batch, combined over the
batch as se(mean_i x_i) = sqrt(sum_i se_i^2) / B (independent probes per example);
they do not include the sampling error of the batch itself.

IJML and PJML are exact only: a matrix-free estimate would need J_F^-1 v or J_F^+ v,
i.e. a linear solve per probe. Asking for them with ``exact=False`` raises. In
``block_jml`` their inverses are taken on the host in float64 (``host_target``): the
pseudo-inverse keeps singular values above 10 max(n_in, n_out) eps s_max, eps that of
the block's dtype, as ``jnp.linalg.pinv`` does. (The matrix functions
``pjml``/``target_matrix`` use ``jnp.linalg.pinv`` with that cutoff.) The matrix-free
probes are drawn in the block's dtype too.

PJMC builds G from the layers' own pseudo-inverses, which is J_F^+ only for some blocks:
``pjmc_inexact_reason`` states the rule, ``check_pjmc_exact`` applies it to a network.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tp_jax import layers
from tp_jax import network

Array = jax.Array

MAX_EXACT_SIZE = 2**24
"""Largest n_in * n_out per example for which ``block_jml`` materialises Jacobians."""

KINDS = ('tjml', 'ijml', 'pjml')

COMPILER_OPTIONS: dict[str, Any] = {}
"""XLA compiler options for every program this module compiles, passed to ``jax.jit``
(e.g. tests set ``{'xla_backend_optimization_level': 0}``: they compile many tiny
programs once each)."""


def _jit(fn: Callable) -> Callable:
  return jax.jit(fn, compiler_options=COMPILER_OPTIONS or None)


class JMLError(ValueError):
  """A Jacobian matching loss that is undefined for these shapes or this method."""


# --------------------------------------------------------------------------------------
# Matrix losses


def _fro(m: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(m), axis=(-2, -1)))


def _check_pair(J_F: Array, J_G: Array) -> None:
  if (
      J_F.ndim < 2
      or J_G.ndim < 2
      or J_F.shape[-2:] != J_G.shape[-2:][::-1]
      or J_F.shape[:-2] != J_G.shape[:-2]
  ):
    raise JMLError(
        f'J_F must be (..., n_out, n_in) and J_G (..., n_in, n_out); got '
        f'J_F {J_F.shape} and J_G {J_G.shape}'
    )


def target_matrix(J_F: Array, kind: str) -> Array:
  """The matrix J_G is matched to: J_F^T (tjml), J_F^-1 (ijml) or J_F^+ (pjml)."""
  if kind == 'tjml':
    return jnp.swapaxes(J_F, -1, -2)
  if kind == 'ijml':
    if J_F.shape[-1] != J_F.shape[-2]:
      raise JMLError(
          f'IJML needs a square Jacobian (J_F^-1 must exist); J_F has shape '
          f'{J_F.shape[-2:]} (n_out x n_in). Use PJML for non-square blocks'
      )
    return jnp.linalg.inv(J_F)
  if kind == 'pjml':
    return jnp.linalg.pinv(J_F)
  raise JMLError(f'unknown JML kind {kind!r}; valid: {KINDS}')


def jml(J_F: Array, J_G: Array, kind: str = 'tjml', relative: bool = False) -> Array:
  """||J_G - T||_F with T = target_matrix(J_F, kind); divided by ||T||_F if relative.

  Batched over leading axes: J_F (..., n_out, n_in), J_G (..., n_in, n_out).
  """
  _check_pair(J_F, J_G)
  T = target_matrix(J_F, kind)
  value = _fro(J_G - T)
  return value / _fro(T) if relative else value


def tjml(J_F: Array, J_G: Array, relative: bool = False) -> Array:
  """||J_G - J_F^T||_F (relative: / ||J_F||_F)."""
  return jml(J_F, J_G, 'tjml', relative)


def ijml(J_F: Array, J_G: Array, relative: bool = False) -> Array:
  """||J_G - J_F^-1||_F (relative: / ||J_F^-1||_F); J_F must be square."""
  return jml(J_F, J_G, 'ijml', relative)


def pjml(J_F: Array, J_G: Array, relative: bool = False) -> Array:
  """||J_G - J_F^+||_F (relative: / ||J_F^+||_F)."""
  return jml(J_F, J_G, 'pjml', relative)


# --------------------------------------------------------------------------------------
# Per-example Jacobians


def _size(shape: Sequence[int]) -> int:
  return int(np.prod(shape, dtype=np.int64))


def _jac(fn: Callable, in_size: int, out_size: int) -> Callable:
  """jacfwd when the input is no larger than the output (fewer pushes), else jacrev."""
  return jax.jacfwd(fn) if in_size <= out_size else jax.jacrev(fn)


def _per_example(fn_batched: Callable) -> Callable:
  """A function of one example (no batch axis) from one acting on a batch per example."""

  def fn(x, *rest):
    rest = jax.tree_util.tree_map(lambda a: a[None], rest)
    return fn_batched(x[None], *rest)[0]

  return fn


def example_jacobians(
    f: Callable, g: Callable, x1: Array, y1: Array, ctx1: Any = None
) -> tuple[Array, Array]:
  """J_F (n_out x n_in) at x1 and J_G (n_in x n_out) at y1 for ONE example.

  ``f(x) -> y`` and ``g(t, ctx) -> x`` act on batches (leading axis) per example;
  x1, y1 and the leaves of ctx1 are one example without the batch axis (a batch axis
  of size 1 is added for the calls).
  """
  n_in, n_out = x1.size, y1.size
  f1 = _per_example(f)
  g1 = _per_example(g)
  J_F = _jac(f1, n_in, n_out)(x1).reshape(n_out, n_in)
  J_G = _jac(lambda t: g1(t, ctx1), n_out, n_in)(y1).reshape(n_in, n_out)
  return J_F, J_G


def jacobians(
    f: Callable, g: Callable, x: Array, y: Array | None = None, ctx: Any = None
) -> tuple[Array, Array]:
  """Per-example Jacobians of F at x and of G at y = F(x) (default), vmapped over batch.

  Args:
    f: ``f(x_batch) -> y_batch``, acting per example (no mixing across the batch).
    g: ``g(t_batch, ctx) -> x_batch``, acting per example; ``ctx`` is a pytree whose
      array leaves all have the batch as leading axis (or None).
    x: (B, ...) inputs. y: (B, ...) the points where J_G is taken (default f(x)).
  Returns:
    J_F of shape (B, n_out, n_in) and J_G of shape (B, n_in, n_out), the example's
    input and output flattened in C order.
  """
  if y is None:
    y = f(x)
  return jax.vmap(lambda a, b, c: example_jacobians(f, g, a, b, c))(x, y, ctx)


# --------------------------------------------------------------------------------------
# DTP blocks


def block_fns(
    net: network.Net,
    params: network.Params,
    fb_params: network.Params,
    n: int,
    mode: layers.FeedbackMode,
) -> tuple[Callable, Callable]:
  """(F_n, G_n) as batched functions: ``F(h) -> (y, ctx)`` and ``G(t, ctx) -> h``."""

  def f(h):
    return network.block_forward(net, n, params[n], h)

  def g(t, ctx):
    return network.block_feedback(net, n, fb_params[n], t, ctx, mode)

  return f, g


@dataclasses.dataclass(frozen=True)
class JMLResult:
  """A matching loss of one block on one batch.

  absolute / relative: batch means of ||J_G - T||_F and of ||J_G - T||_F / ||T||_F.
  stderr_absolute / stderr_relative: Monte-Carlo standard errors of those means
    (0.0 for exact values).
  per_example_absolute / per_example_relative: numpy arrays of shape (B,).
  """

  kind: str
  absolute: float
  relative: float
  exact: bool
  stderr_absolute: float
  stderr_relative: float
  per_example_absolute: np.ndarray
  per_example_relative: np.ndarray
  num_probes: int
  in_dim: int
  out_dim: int


def host_target(J_F: np.ndarray, kind: str, dtype: Any = np.float32) -> np.ndarray:
  """J_F^T, J_F^-1 or J_F^+ of one example, in float64 numpy on the host.

  ``dtype`` is the one J_F was computed in (the block's). The pseudo-inverse keeps
  singular values s > rtol s_max with rtol = 10 max(n_out, n_in) eps_dtype (the cutoff
  of ``jnp.linalg.pinv``: J_F's numerically zero singular values are ~eps_dtype s_max,
  not 0); IJML refuses a J_F singular to that precision. It is
  computed from the eigendecomposition of the smaller Gram matrix A A^T = U diag(lam) U^T
  (A = J_F or J_F^T, whichever is wide): A^+ = A^T U diag(1/lam) U^T on the kept pairs
  (lam = s^2). For a float32 J_F the squared condition number (<= rtol^-2 ~ 1e5) costs
  nothing in float64, and this is ~4x cheaper than an SVD (XLA's CPU SVD is slower
  still). A float64 J_F's cutoff (rtol^2 ~ 1e-27) is below float64's resolution of the
  Gram matrix, so its pseudo-inverse is taken from an SVD (``np.linalg.pinv``).
  """
  if kind == 'tjml':
    return J_F.T
  m, n = J_F.shape
  eps = float(jnp.finfo(dtype).eps)
  rtol = 10 * max(m, n) * eps
  if kind == 'ijml':
    s = np.linalg.svd(J_F, compute_uv=False)
    if s[-1] <= rtol * s[0]:
      raise JMLError(
          f'IJML is undefined: J_F ({m} x {n}) is singular to '
          f'{np.dtype(dtype)} precision (s_min / s_max = '
          f'{s[-1] / max(s[0], 1e-300):.1e} <= {rtol:.1e}); use PJML'
      )
    return np.linalg.inv(J_F)
  if eps < np.finfo(np.float32).eps:
    return np.linalg.pinv(J_F, rcond=rtol)
  A = J_F if m <= n else J_F.T
  lam, U = np.linalg.eigh(A @ A.T)
  keep = lam > rtol**2 * max(lam.max(), 0.0)
  U = U[:, keep]
  A_pinv = (A.T @ U) / lam[keep] @ U.T
  return A_pinv if m <= n else A_pinv.T


def _exact_losses(
    net: network.Net,
    params: network.Params,
    feedbacks: Sequence[tuple[network.Params, layers.FeedbackMode]],
    n: int,
    h_in: Array,
    kinds: Sequence[str],
) -> list[dict[str, Any]]:
  """Exact per-example losses of block n for several feedbacks and kinds at once.

  J_F is computed once per example and shared by every feedback; J_G once per feedback
  and shared by every kind; J_F^-1 / J_F^+ once per example and kind. Examples go in
  chunks (a divisor of B) so that at most ~MAX_EXACT_SIZE floats per Jacobian are live
  and each Jacobian program is compiled once. Norms are taken on the host in float64.

  Returns, per feedback, {kind: (absolute (B,), relative (B,))} or {kind: exception}
  (a FeedbackError if the block refuses the mode, a JMLError for IJML of a singular J_F).
  """
  f0 = lambda h: network.block_forward(net, n, params[n], h)[0]
  y = _jit(f0)(h_in)
  B, n_in, n_out = h_in.shape[0], _size(h_in.shape[1:]), _size(y.shape[1:])
  chunk = max(1, min(B, MAX_EXACT_SIZE // max(n_in * n_out, 1)))
  while B % chunk:
    chunk -= 1
  f1 = _per_example(f0)
  jac_f = _jit(jax.vmap(lambda x1: _jac(f1, n_in, n_out)(x1).reshape(n_out, n_in)))
  jac_gs = []
  for fb_params, mode in feedbacks:

    def jac_g_at(x1, fb=fb_params, mode=mode):
      # Each example's ctx comes from its own forward: a derived block's ctx (its vjp)
      # holds the parameters, which have no batch axis to slice per example.
      y1, c1 = network.block_forward(net, n, params[n], x1[None])
      g1 = lambda t: network.block_feedback(net, n, fb[n], t[None], c1, mode)[0]
      return _jac(g1, n_out, n_in)(y1[0]).reshape(n_in, n_out)

    jac_gs.append(_jit(jax.vmap(jac_g_at)))
  out: list[dict[str, Any]] = [{} for _ in feedbacks]
  sums: list[dict[str, tuple[list, list]]] = [{k: ([], []) for k in kinds} for _ in feedbacks]
  for start in range(0, B, chunk):
    xc = h_in[start : start + chunk]
    J_F = np.asarray(jac_f(xc), np.float64)
    J_G = []
    for i, jac_g in enumerate(jac_gs):
      try:
        J_G.append(None if out[i].get('*') else np.asarray(jac_g(xc), np.float64))
      except layers.FeedbackError as e:
        out[i]['*'] = e
        J_G.append(None)
    for b in range(J_F.shape[0]):
      for kind in kinds:
        if any(kind in o for o in out):
          continue
        try:
          T = host_target(J_F[b], kind, y.dtype)
        except JMLError as e:
          for o in out:
            o.setdefault(kind, e)
          continue
        t_norm = np.linalg.norm(T)
        for i in range(len(feedbacks)):
          if J_G[i] is not None:
            d = np.linalg.norm(J_G[i][b] - T)
            sums[i][kind][0].append(d)
            sums[i][kind][1].append(d / t_norm)
  for i, o in enumerate(out):
    err = o.pop('*', None)
    for kind in kinds:
      if err is not None:
        o[kind] = err
      elif kind not in o:
        o[kind] = tuple(np.array(v) for v in sums[i][kind])
  return out


def probe_stats(f, g, h_in, y, ctx, probes):
  """Per-example squared norms ||A v_k||^2 and ||J_F^T v_k||^2, shape (K, B) each, for
  probes v_k of shape (K, *y.shape)."""
  _, f_vjp = jax.vjp(f, h_in)
  axes = tuple(range(1, y.ndim))

  def one(v):
    _, g_v = jax.jvp(lambda t: g(t, ctx), (y,), (v,))
    (ft_v,) = f_vjp(v)
    return (jnp.sum(jnp.square(g_v - ft_v), axis=axes), jnp.sum(jnp.square(ft_v), axis=axes))

  return jax.vmap(one)(probes)


def _host_rng(key: Array) -> np.random.Generator:
  """A numpy generator seeded from a JAX key. Probes are drawn on the host: XLA:CPU
  takes seconds to compile a threefry normal of a large shape, numpy takes none."""
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def _probes(rng: np.random.Generator, shape: Sequence[int], dtype) -> np.ndarray:
  """N(0, 1) probes in the block's dtype: jax.jvp needs tangents of the primal's dtype.
  Drawn in float64 for float64 blocks, else in float32 (then cast, e.g. to bfloat16)."""
  draw = np.float64 if np.dtype(dtype) == np.float64 else np.float32
  return rng.standard_normal(shape, draw).astype(dtype, copy=False)


def _delta_method(a2: np.ndarray, t2: np.ndarray):
  """Per-example sqrt(mean a2), sqrt(mean a2 / mean t2) and their standard errors."""
  k = a2.shape[0]
  q, p = a2.mean(0), t2.mean(0)
  var_q = a2.var(0, ddof=1) / k
  var_p = t2.var(0, ddof=1) / k
  cov = ((a2 - q) * (t2 - p)).sum(0) / (k - 1) / k
  absolute = np.sqrt(q)
  with np.errstate(divide='ignore', invalid='ignore'):
    se_abs = np.where(q > 0, np.sqrt(var_q) / (2 * absolute), 0.0)
    rel = np.sqrt(q / p)
    var_log = (var_q / q**2 + var_p / p**2 - 2 * cov / (q * p)) / 4
    se_rel = np.where(q > 0, rel * np.sqrt(np.maximum(var_log, 0.0)), 0.0)
  return absolute, rel, se_abs, se_rel


def _exact_result(kind, absolute, relative, n_in, n_out) -> JMLResult:
  return JMLResult(
      kind,
      float(absolute.mean()),
      float(relative.mean()),
      True,
      0.0,
      0.0,
      absolute,
      relative,
      0,
      n_in,
      n_out,
  )


def block_jml(
    net: network.Net,
    params: network.Params,
    fb_params: network.Params,
    n: int,
    h_in: Array,
    mode: layers.FeedbackMode = layers.TJMC,
    kind: str = 'tjml',
    exact: bool | None = None,
    num_probes: int = 64,
    key: Array | None = None,
    max_exact_size: int = MAX_EXACT_SIZE,
) -> JMLResult:
  """A Jacobian matching loss of DTP block n (0-based) on the batch h_in (its input).

  F_n uses ``params[n]``; G_n uses ``fb_params[n]`` with ``mode`` (pass ``params`` and
  a TJMC mode for the analytical feedback). J_G is taken at h_{n+1} = F_n(h_in).

  Args:
    kind: 'tjml', 'ijml' or 'pjml'.
    exact: True: materialise both Jacobians per example. False: matrix-free estimate
      (TJML only). None: exact iff n_in * n_out <= max_exact_size (or kind != 'tjml').
    num_probes: Gaussian probes per example for the estimate (>= 2).
    key: PRNG key seeding the (host-side, numpy) probes (default PRNGKey(0)).
  Raises:
    JMLError: unknown kind; IJML of a non-square block; IJML/PJML with exact=False.
  """
  if kind not in KINDS:
    raise JMLError(f'unknown JML kind {kind!r}; valid: {KINDS}')
  f, g = block_fns(net, params, fb_params, n, mode)
  f0 = lambda h: f(h)[0]
  y_shape = jax.eval_shape(f0, h_in).shape
  n_in, n_out = _size(h_in.shape[1:]), _size(y_shape[1:])
  if kind == 'ijml' and n_in != n_out:
    raise JMLError(
        f'IJML is undefined for block {n}: J_F is {n_out} x {n_in}, not '
        f'square (J_F^-1 does not exist); use PJML'
    )
  if exact is None:
    exact = kind != 'tjml' or n_in * n_out <= max_exact_size
  if not exact and kind != 'tjml':
    raise JMLError(
        f'{kind.upper()} has no matrix-free estimate (it needs J_F^-1 v or '
        f'J_F^+ v); only TJML does. Use exact=True'
    )
  B = h_in.shape[0]
  if exact:
    res = _exact_losses(net, params, [(fb_params, mode)], n, h_in, [kind])[0][kind]
    if isinstance(res, Exception):
      raise res
    return _exact_result(kind, *res, n_in, n_out)
  if num_probes < 2:
    raise JMLError(f'num_probes must be >= 2 for a standard error, got {num_probes}')
  y, ctx = _jit(f)(h_in)
  rng = _host_rng(jax.random.PRNGKey(0) if key is None else key)
  # Probes per vmapped step: bounded memory, and a divisor of num_probes so that a
  # single program is compiled.
  chunk = max(1, min(num_probes, 2**22 // max(B * (n_in + n_out), 1)))
  while num_probes % chunk:
    chunk -= 1
  stats = _jit(lambda *a: probe_stats(f0, g, *a))
  parts = [
      stats(h_in, y, ctx, _probes(rng, (chunk, *y.shape), y.dtype))
      for _ in range(num_probes // chunk)
  ]
  a2, t2 = (np.concatenate([np.asarray(p[i], np.float64) for p in parts]) for i in (0, 1))
  absolute, relative, se_abs, se_rel = _delta_method(a2, t2)
  return JMLResult(
      kind,
      float(absolute.mean()),
      float(relative.mean()),
      False,
      float(np.sqrt(np.sum(se_abs**2)) / B),
      float(np.sqrt(np.sum(se_rel**2)) / B),
      absolute,
      relative,
      num_probes,
      n_in,
      n_out,
  )


# --------------------------------------------------------------------------------------
# Where PJMC is exact


def _layer_chain(layer: layers.Layer) -> list[layers.Layer]:
  """The layers of a block in forward order, nested Sequentials flattened."""
  if isinstance(layer, layers.Sequential):
    return [leaf for sub in layer.layers for leaf in _layer_chain(sub)]
  return [layer]


def _out_shape(layer: layers.Layer, in_shape: Sequence[int]) -> tuple[int, ...]:
  return jax.eval_shape(
      lambda h: layer.init_with_output(jax.random.PRNGKey(0), h, method='fwd')[0][0],
      jax.ShapeDtypeStruct(tuple(in_shape), jnp.float32),
  ).shape


def pjmc_inexact_reason(block: layers.Layer, in_shape: Sequence[int]) -> str | None:
  """Why PJMC's feedback of ``block`` is not the pseudo-inverse of its Jacobian, or None
  where it is (PJML = 0). ``in_shape`` is the block's input shape, batch included.

  PJMC composes the layers' own pseudo-inverses: for J_F = J_k ... J_1 (layers in
  forward order) J_G = J_1^+ ... J_k^+, and (P A Q)^+ = Q^+ A^+ P^+ only in special
  cases. With at most one non-square factor A (a dense layer, features != inputs; its
  Jacobian has full rank), and P, Q the products of the factors after and before it:
    A wide (outputs < inputs): exact if Q is orthogonal (reshape, transpose) and P
      invertible (activations, square dense): (P A)^+ = A^+ P^-1 as A A^T is invertible;
    A tall (outputs > inputs): exact if P is orthogonal and Q invertible;
    no such A: J_F is invertible and J_G = J_F^-1.
  Anything else (a tall dense followed by an activation, an activation before a wide
  dense, two non-square dense layers) is inexact for generic weights. Layers of other
  types either refuse PJMC themselves (conv, pooling, LayerNorm, mean, residual) or are
  their own exact inverse (``reversible.Coupling``); they count as invertible here.
  """
  kinds, shape = [], tuple(in_shape)
  for layer in _layer_chain(block):
    out = _out_shape(layer, shape)
    if isinstance(layer, (layers.Reshape, layers.Transpose)):
      kinds.append(('orthogonal', describe(layer)))
    elif isinstance(layer, layers.Dense) and out[-1] != shape[-1]:
      kinds.append(
          (
              'wide' if out[-1] < shape[-1] else 'tall',
              f'{describe(layer)} ({shape[-1]} -> {out[-1]})',
          )
      )
    else:
      kinds.append(('invertible', describe(layer)))
    shape = out
  non_square = [i for i, (kind, _) in enumerate(kinds) if kind in ('wide', 'tall')]
  if len(non_square) > 1:
    return (
        f'{len(non_square)} non-square dense layers '
        f'({", ".join(kinds[i][1] for i in non_square)}): the product of their '
        f'pseudo-inverses is not the pseudo-inverse of the product'
    )
  if not non_square:
    return None
  j = non_square[0]
  kind, what = kinds[j]
  side = kinds[:j] if kind == 'wide' else kinds[j + 1 :]
  blocking = [name for k, name in side if k != 'orthogonal']
  if not blocking:
    return None
  where = 'before' if kind == 'wide' else 'after'
  return (
      f'{kind} {what} with {", ".join(blocking)} {where} it: PJMC is exact for a '
      f'wide dense only with reshapes before it, for a tall one only with reshapes '
      f'after it'
  )


def check_pjmc_exact(net: network.Net, x_shape: Sequence[int]) -> None:
  """Raises FeedbackError naming every block after the first (block 0's feedback is
  never used by DTP) whose PJMC feedback is not its Jacobian's pseudo-inverse."""
  shape, bad = tuple(x_shape), []
  for n, block in enumerate(net.blocks):
    reason = pjmc_inexact_reason(block, shape) if n > 0 else None
    if reason is not None:
      bad.append(f'block {n} {describe(block)}: {reason}')
    shape = _out_shape(block, shape)
  if bad:
    raise layers.FeedbackError(
        'PJMC (layer-by-layer pseudo-inverses) is not the pseudo-inverse of these '
        "blocks' Jacobians, so PJML-DTP would not be PJML-DTP: " + '; '.join(bad)
    )


# --------------------------------------------------------------------------------------
# Report


def describe(layer: Any) -> str:
  """A short one-line description of a layer or block."""
  name = type(layer).__name__
  if isinstance(layer, layers.Sequential):
    return '[' + ', '.join(describe(l) for l in layer.layers) + ']'
  if isinstance(layer, layers.Residual):
    return f'Residual({describe(layer.inner)})'
  if isinstance(layer, layers.Conv):
    kh, kw = layer.kernel_size
    pad = (
        layer.padding
        if isinstance(layer.padding, str)
        else 'pad' + ''.join(str(tuple(p)) for p in layer.padding).replace(' ', '')
    )
    return f'Conv({layer.features},{kh}x{kw}/{layer.strides[0]},{pad})'
  if isinstance(layer, layers.Dense):
    return f'Dense({layer.features})'
  if isinstance(layer, layers.MaxPool):
    return f'MaxPool({layer.window[0]}x{layer.window[1]}/{layer.strides[0]})'
  if isinstance(layer, layers.Activation):
    return layer.fn
  if isinstance(layer, layers.Reshape):
    return f'Reshape{tuple(layer.shape)}'
  if isinstance(layer, layers.Transpose):
    return f'Transpose{tuple(layer.perm)}'
  if isinstance(layer, layers.Mean):
    return f'Mean(axis={layer.axis})'
  return name


def _fmt_shape(shape: Sequence[int]) -> str:
  return 'x'.join(str(d) for d in shape)


def report(
    net: network.Net,
    params: network.Params,
    feedbacks: Mapping[str, tuple[network.Params, layers.FeedbackMode]],
    x: Array,
    kinds: Sequence[str] = KINDS,
    blocks: Sequence[int] | None = None,
    num_probes: int = 64,
    key: Array | None = None,
    max_exact_size: int = MAX_EXACT_SIZE,
) -> list[dict]:
  """One row per (block, feedback, kind) for which the loss is defined and computable.

  Args:
    feedbacks: name -> (feedback params, FeedbackMode), e.g.
      ``{'tjmc_integral': (params, TJMC), 'fwdtp_random': (fb, LEARNED)}``.
    x: the network input batch; block n's input is h_n from the forward pass.
    kinds: subset of ('tjml', 'ijml', 'pjml'). IJML rows appear only for square
      blocks; IJML/PJML rows only where the Jacobian fits (n_in * n_out <=
      max_exact_size), since they have no matrix-free estimate. A feedback mode the
      block refuses (e.g. IJMC on a conv), or IJML of a singular J_F, gives no row.
    blocks: 0-based block indices (default all; the feedback of block 0 is never used
      by DTP, which its ``used_by_dtp`` field says).
  Exact blocks share J_F across feedbacks and J_G across kinds (``_exact_losses``).

  Returns:
    dicts with keys block, description, shape, kind, feedback, mode, absolute,
    relative, method ('exact'|'estimated'), stderr_absolute, stderr_relative,
    num_probes, used_by_dtp, and pjmc_exact: for a PJMC feedback, whether it is the
    pseudo-inverse of the block's Jacobian (``pjmc_inexact_reason``), else None.
  """
  key = jax.random.PRNGKey(0) if key is None else key
  hs = [x]
  for n in range(len(net)):
    hs.append(_jit(lambda h, n=n: network.block_forward(net, n, params[n], h)[0])(hs[-1]))
  names = list(feedbacks)
  rows = []

  def row(n, fb_name, kind, r: JMLResult):
    mode = feedbacks[fb_name][1]
    h_in, h_out = hs[n], hs[n + 1]
    return dict(
        block=n,
        description=describe(net.blocks[n]),
        shape=f'{_fmt_shape(h_in.shape[1:])} -> {_fmt_shape(h_out.shape[1:])}',
        kind=kind,
        feedback=fb_name,
        mode=f'{mode.weights}/{mode.act}',
        absolute=r.absolute,
        relative=r.relative,
        method='exact' if r.exact else 'estimated',
        stderr_absolute=r.stderr_absolute,
        stderr_relative=r.stderr_relative,
        num_probes=r.num_probes,
        used_by_dtp=n > 0,
        pjmc_exact=(
            pjmc_inexact_reason(net.blocks[n], h_in.shape) is None if mode == layers.PJMC else None
        ),
    )

  for n in (range(len(net)) if blocks is None else blocks):
    n_in, n_out = _size(hs[n].shape[1:]), _size(hs[n + 1].shape[1:])
    if n_in * n_out <= max_exact_size:
      todo = [k for k in kinds if k != 'ijml' or n_in == n_out]
      results = _exact_losses(net, params, [feedbacks[k] for k in names], n, hs[n], todo)
      for fb_name, res in zip(names, results):
        for kind in todo:
          if not isinstance(res[kind], Exception):
            rows.append(row(n, fb_name, kind, _exact_result(kind, *res[kind], n_in, n_out)))
    elif 'tjml' in kinds:
      for fb_name in names:
        key, sub = jax.random.split(key)
        fb_params, mode = feedbacks[fb_name]
        try:
          r = block_jml(
              net,
              params,
              fb_params,
              n,
              hs[n],
              mode,
              'tjml',
              exact=False,
              num_probes=num_probes,
              key=sub,
          )
        except layers.FeedbackError:  # the block refuses this feedback mode
          continue
        rows.append(row(n, fb_name, 'tjml', r))
  return rows


def format_rows(rows: Sequence[dict]) -> str:
  """A fixed-width text table of ``report`` rows."""
  head = (
      f'{"blk":>3} {"kind":<5} {"feedback":<16} {"absolute":>22} {"relative":>22} '
      f'{"method":<9} {"pjmc exact?":<11} block'
  )
  exact_flag = {None: '', True: 'yes', False: 'NO'}
  lines = [head, '-' * len(head)]
  for r in rows:

    def val(v, se):
      return f'{v:.4e}' + (f' +- {se:.1e}' if r['method'] == 'estimated' else '')

    lines.append(
        f'{r["block"]:>3} {r["kind"]:<5} {r["feedback"]:<16} '
        f'{val(r["absolute"], r["stderr_absolute"]):>22} '
        f'{val(r["relative"], r["stderr_relative"]):>22} {r["method"]:<9} '
        f'{exact_flag[r["pjmc_exact"]]:<11} {r["description"]} {r["shape"]}'
    )
  return '\n'.join(lines)
