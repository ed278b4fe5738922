"""Property tests of the analytical feedback G* of every layer in ``tp_jax.layers``.

(a) TJMC: the Jacobian of G* at h_{n+1} = F(h_n) equals (dF/dh_n)^T to float32
    tolerance wherever the theory says it is exact; where it is not (LayerNorm's frozen
    s, varsigma evaluated off the forward trajectory), the difference equals the
    predicted matrix. Jacobians are taken over the WHOLE batch, so the test also checks
    that neither map mixes examples (the batched Jacobian is block diagonal).
(b) For the linear layers G*(v) equals jax.vjp(F, h_n)[1](v), at realistic sizes.
(c) The conv feedback is literally a correlation of the dilated, padded target with
    the 180-degree rotated, in/out-swapped kernel (naive numpy, tiny cases).
(d) IJMC / PJMC on dense: G(t) = t W^-1 / t W^+ and IJML = PJML = 0.
(e) Bad inputs raise errors that name the offending module / shapes / mode.

Every assertion helper is itself shown to reject a deliberately wrong feedback.
Shapes and seeds are random, drawn from a fixed generator so failures reproduce.
"""

from __future__ import annotations

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax import lax

from tp_jax import jml
from tp_jax import layers as L
from tp_jax import network

RTOL = 2e-5  # relative Frobenius tolerance for "exact" in float32
_RNG = np.random.default_rng(20240101)


def _hw(lo=5, hi=9):
  return (int(_RNG.integers(lo, hi + 1)), int(_RNG.integers(lo, hi + 1)))


def numpy_params(abstract, seed=0, perturb=0.0):
  """Concrete params for an abstract (eval_shape) tree, drawn with numpy: kernels
  N(0, 1/fan_in) (LeCun), biases N(0, 0.1^2), LayerNorm scales 1 + perturb N(0, 1).

  Tests avoid flax's initialisers and jax.random here on purpose: XLA:CPU compiles a
  threefry / truncated-normal program for every new shape (~0.3-1.5 s each), which
  would dominate the run time of these small tests.
  """
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    name = str(getattr(path[-1], 'key', ''))
    if name == 'kernel':
      v = rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))
    elif name == 'scale':
      v = 1.0 + perturb * rng.standard_normal(a.shape)
    else:
      v = 0.1 * rng.standard_normal(a.shape)
    return jnp.asarray(v, a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _init(layer, x, seed=0, perturb=0.0):
  """Params of ``layer`` at x (shapes from flax, values from ``numpy_params``)."""
  abstract = jax.eval_shape(lambda h: layer.init(jax.random.PRNGKey(0), h, method='fwd'), x)
  return numpy_params(abstract.get('params', {}), seed, perturb)


def _input(shape, seed, kind='normal'):
  x = np.random.default_rng(seed).standard_normal(shape)
  if kind == 'ties':  # many exactly equal values inside pooling windows
    x = np.round(x)
  return jnp.asarray(x, jnp.float32)


def jit0(fn):
  """jax.jit compiled with XLA's backend optimisation off (-O0). These tests compile
  dozens of tiny programs once each: -O0 roughly halves the compile time, and the run
  time is negligible. (Eager execution is avoided for the same reason: every eager
  primitive of a new shape is a compile of its own.)"""

  def run(*args):
    return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})(*args)

  return run


def batch_jacobians(layer, params, x, mode=L.TJMC, fb_params=None, jit=True):
  """J_F (y.size x x.size) at x and J_G (x.size x y.size) at y = F(x), whole batch.

  Jitted (``jit0``) by default; ``jit=False`` for the chex variants.
  """
  if jit:
    return jit0(lambda p, h, fb: batch_jacobians(layer, p, h, mode, fb, jit=False))(
        params, x, fb_params
    )
  fb_params = params if fb_params is None else fb_params
  y, ctx = layer.apply({'params': params}, x, method='fwd')
  f = lambda h: layer.apply({'params': params}, h, method='fwd')[0]
  g = lambda t: layer.apply({'params': fb_params}, t, ctx, mode, method='feedback')
  J_F = jax.jacfwd(f)(x).reshape(y.size, x.size)
  J_G = jax.jacfwd(g)(y).reshape(x.size, y.size)
  return J_F, J_G


def tjml_rel(J_F, J_G):
  J_F, J_G = np.asarray(J_F, np.float64), np.asarray(J_G, np.float64)
  return float(np.linalg.norm(J_G - J_F.T) / np.linalg.norm(J_F))


def assert_tjmc(J_F, J_G, rtol=RTOL):
  """||J_G - J_F^T||_F <= rtol ||J_F||_F, with a nonzero J_F."""
  assert J_G.shape == J_F.T.shape, (J_F.shape, J_G.shape)
  assert float(np.linalg.norm(np.asarray(J_F))) > 0
  rel = tjml_rel(J_F, J_G)
  assert rel <= rtol, f'relative TJML {rel:.3e} > {rtol:.1e}'


def assert_matches_vjp(layer, params, x, seed=0, fb_feedback=None):
  """G*(v) == vjp(F, x)(v) for a random v (G given by ``fb_feedback`` if set)."""
  y = jax.eval_shape(lambda h: layer.apply({'params': params}, h, method='fwd')[0], x)
  v = _input(y.shape, seed + 7)

  @jit0
  def both(p, h, v):
    y, ctx = layer.apply({'params': p}, h, method='fwd')
    _, vjp = jax.vjp(lambda h: layer.apply({'params': p}, h, method='fwd')[0], h)
    g = fb_feedback or (lambda t: layer.apply({'params': p}, t, ctx, method='feedback'))
    return vjp(v)[0], g(v)

  expected, got = (np.asarray(a) for a in both(params, x, v))
  assert got.shape == x.shape, (got.shape, x.shape)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


# --------------------------------------------------------------------------------------
# (a) the table: layer, input shape, input kind, feedback mode — all exact.

ASYM_A = ((1, 2), (0, 1))
ASYM_B = ((2, 0), (1, 2))
POOL3 = dict(window=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def lenet_like():
  """A whole small LeNet as ONE block: two activations inside (conv-act-pool, then
  flatten-dense-act-dense)."""
  a = lambda: L.Activation('leaky_relu', 0.1)
  return L.Sequential(
      [
          L.Conv(3, (5, 5), padding=((2, 2), (2, 2))),
          a(),
          L.MaxPool(**POOL3),
          L.Flatten(),
          L.Dense(6),
          a(),
          L.Dense(3),
      ]
  )


EXACT_CASES = [
    # convolutions: stride 1/2, SAME / VALID / explicit asymmetric, kernel 3/4/5, Cin != Cout
    (
        'conv_s2_same_k3',
        lambda: L.Conv(3, (3, 3), (2, 2), 'SAME'),
        (2, *_hw(), 2),
        'normal',
        L.TJMC,
    ),
    (
        'conv_s2_valid_k5',
        lambda: L.Conv(2, (5, 5), (2, 2), 'VALID'),
        (2, *_hw(6, 9), 3),
        'normal',
        L.TJMC,
    ),
    (
        'conv_s1_asym_k5',
        lambda: L.Conv(2, (5, 5), (1, 1), ASYM_B),
        (2, *_hw(), 3),
        'normal',
        L.TJMC,
    ),
    (
        'conv_s2_asym_k4_rect',
        lambda: L.Conv(5, (4, 3), (2, 1), ASYM_B),
        (1, *_hw(), 2),
        'normal',
        L.TJMC,
    ),
    # dense, on vectors and on tokens
    ('dense', lambda: L.Dense(7), (3, 5), 'normal', L.TJMC),
    ('dense_tokens', lambda: L.Dense(4), (2, 3, 6), 'normal', L.TJMC),
    # max-pooling, with and without ties (rounded inputs), odd sizes
    ('pool2_odd_ties', lambda: L.MaxPool(), (2, 7, 5, 2), 'ties', L.TJMC),
    ('pool3_pad1', lambda: L.MaxPool(**POOL3), (2, *_hw(), 2), 'normal', L.TJMC),
    ('pool3_pad1_ties', lambda: L.MaxPool(**POOL3), (2, *_hw(), 2), 'ties', L.TJMC),
    # activations: integral (varsigma) and Hadamard feedback
    *[
        (f'{fn}_{mode.act}', (lambda fn=fn: L.Activation(fn, 0.1)), (3, 6), 'normal', mode)
        for fn in ('leaky_relu', 'elu', 'tanh', 'sigmoid')
        for mode in (L.TJMC, L.TJMC_HADAMARD)
    ],
    ('gelu_hadamard', lambda: L.Activation('gelu'), (3, 6), 'normal', L.TJMC_HADAMARD),
    # mean, reshape, transpose
    ('mean_tokens', lambda: L.Mean(axis=1), (2, 4, 3), 'normal', L.TJMC),
    ('mean_spatial', lambda: L.Mean(axis=(1, 2)), (2, 3, 4, 2), 'normal', L.TJMC),
    ('flatten', lambda: L.Flatten(), (2, 3, 2, 2), 'normal', L.TJMC),
    ('reshape', lambda: L.Reshape((6, 2)), (2, 3, 4), 'normal', L.TJMC),
    ('transpose', lambda: L.Transpose((2, 1)), (2, 3, 4), 'normal', L.TJMC),
    ('transpose3', lambda: L.Transpose((3, 1, 2)), (2, 2, 3, 4), 'normal', L.TJMC),
    # residual and sequential
    ('residual_dense', lambda: L.Residual(L.Dense(5)), (2, 5), 'normal', L.TJMC),
    (
        'residual_mlp_hadamard',
        lambda: L.Residual(L.Sequential([L.Dense(7), L.Activation('gelu'), L.Dense(4)])),
        (2, 4),
        'normal',
        L.TJMC_HADAMARD,
    ),
    (
        'seq_conv_leaky_pool3',
        lambda: L.Sequential(
            [L.Conv(3, (3, 3)), L.Activation('leaky_relu', 0.1), L.MaxPool(**POOL3)]
        ),
        (2, 7, 6, 2),
        'normal',
        L.TJMC,
    ),
    # composites: a whole LeNet-like and a Mixer-like network as one block
    ('lenet_like_leaky_hadamard', lambda: lenet_like(), (2, 8, 8, 1), 'normal', L.TJMC_HADAMARD),
    (
        'mixer_like_no_norm_hadamard',
        lambda: L.Sequential(
            [
                L.Conv(4, (2, 2), (2, 2), 'VALID'),
                L.Reshape((4, 4)),
                L.Residual(
                    L.Sequential(
                        [L.Transpose((2, 1)), L.Dense(4), L.Activation('gelu'), L.Transpose((2, 1))]
                    )
                ),
                L.Residual(L.Sequential([L.Dense(6), L.Activation('gelu'), L.Dense(4)])),
                L.Mean(axis=1),
                L.Dense(3),
            ]
        ),
        (2, 4, 4, 1),
        'normal',
        L.TJMC_HADAMARD,
    ),
]


VARIANT_CASES = ('dense', 'elu_integral', 'transpose3')


@pytest.mark.parametrize('name,make,shape,kind,mode', EXACT_CASES, ids=[c[0] for c in EXACT_CASES])
def test_jacobian_of_feedback_is_transposed_jacobian(name, make, shape, kind, mode):
  """(a) J(G*) at h_{n+1} == J(F)^T at h_n, for every row of EXACT_CASES (jitted)."""
  layer = make()
  x = _input(shape, seed=len(name), kind=kind)
  params = _init(layer, x, seed=len(shape))
  assert_tjmc(*batch_jacobians(layer, params, x, mode))


class ExactTJMCVariantsTest(chex.TestCase):
  """(a) on a cheap subset, with and without jit (the layers also work eagerly)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[c for c in EXACT_CASES if c[0] in VARIANT_CASES])
  def test_jacobian_of_feedback_is_transposed_jacobian(self, make, shape, kind, mode):
    layer = make()
    x = _input(shape, seed=3, kind=kind)
    params = _init(layer, x, seed=1)
    J_F, J_G = self.variant(lambda p, h: batch_jacobians(layer, p, h, mode, jit=False))(params, x)
    assert_tjmc(J_F, J_G)


# --------------------------------------------------------------------------------------
# (a) continued: where TJMC is not exact, the difference is the predicted matrix.


def test_layernorm_difference_is_the_dropped_term():
  """J_F = diag(g) (P - x^ x^T / d) / sqrt(s) with P = I - 11^T/d, x^ = (x - mu)/sqrt(s);
  G* drops the x^ x^T / d term, so J_G - J_F^T = x^ x^T diag(g) / (d sqrt(s)) per
  example (zero across examples), whose norm is ||x^|| ||g * x^|| / (d sqrt(s))."""
  B, d = 3, 7
  x = _input((B, d), 3) * 1.5 + 0.3
  layer = L.LayerNorm()
  params = _init(layer, x, perturb=0.3)
  J_F, J_G = (np.asarray(m, np.float64) for m in batch_jacobians(layer, params, x))
  gamma, xs = np.asarray(params['scale'], np.float64), np.asarray(x, np.float64)
  mu = xs.mean(-1, keepdims=True)
  s = ((xs - mu) ** 2).mean(-1, keepdims=True) + layer.epsilon
  xh = (xs - mu) / np.sqrt(s)
  predicted = np.zeros_like(J_F.T)
  for b in range(B):
    predicted[b * d : (b + 1) * d, b * d : (b + 1) * d] = np.outer(xh[b], xh[b] * gamma) / (
        d * np.sqrt(s[b, 0])
    )
  np.testing.assert_allclose(J_G - J_F.T, predicted, atol=2e-5 * np.abs(J_F).max())
  assert np.linalg.norm(predicted) > 0.1  # genuinely not exact


def _predicted_varsigma_difference(seq, params, x, act_index, pre):
  """For F = post . sigma . pre and G = pre* . varsigma . post* (post* the feedback of
  the layers after the activation, linear given its ctx; pre* = J_pre^T, the exact conv
  feedback):

     J_G - J_F^T = J_pre^T diag(varsigma'(u) - sigma'(a)) J_post^T,

  with a = pre(x) the activation input and u = post*(F(x)) the point where varsigma is
  actually evaluated. Returned as an (x.size, y.size) matrix.
  """

  @jit0
  def predicted(x):
    y, ctx = seq.apply({'params': params}, x, method='fwd')
    fns = seq.layers[act_index].fns
    post = lambda t: _sub_feedback(seq, params, ctx, t, act_index + 1)
    u = post(y)
    dvs = jax.vmap(jax.grad(fns.integral))(u.ravel()).reshape(u.shape)
    delta = dvs - fns.df(ctx[act_index])  # an Activation's ctx is its input
    _, pre_vjp = jax.vjp(pre, x)
    m = lambda v: pre_vjp(delta * post(v))[0]  # J_pre^T diag(delta) J_post^T v
    return jax.jacfwd(m)(jnp.zeros_like(y)).reshape(x.size, y.size)

  return predicted(x)


def _sub_feedback(seq, params, ctx, t, start):
  """Feedback of seq.layers[start:] (in reverse order), evaluated at t."""
  for i in reversed(range(start, len(seq.layers))):
    sub = seq.layers[i]
    p = params.get(f'layers_{i}', {})
    t = sub.clone(parent=None).apply({'params': p}, t, ctx[i], L.TJMC, method='feedback')
  return t


@pytest.mark.parametrize('fn,pool', [('elu', 'pool3'), ('tanh', 'pool3'), ('leaky_relu', 'pool3')])
def test_conv_act_pool_varsigma_difference(fn, pool):
  """Conv -> sigma -> max-pool with the integral feedback: unpooling puts k sigma(a)
  where k windows share an argmax, so varsigma'(k sigma(a)) != sigma'(a) for ELU/tanh
  with the overlapping 3x3/2 pool. The measured difference equals the predicted
  J_conv^T diag(varsigma'(u) - sigma'(a)) J_pool^T; it is 0 for LeakyReLU (the sign of
  k sigma(a) is that of a) and for the non-overlapping 2x2/2 pool (k = 1; tested as
  block 1 of tests/test_jml.py)."""
  pool_layer = L.MaxPool(**POOL3) if pool == 'pool3' else L.MaxPool()
  layer = L.Sequential([L.Conv(3, (3, 3)), L.Activation(fn, 0.1), pool_layer])
  x = _input((2, 8, 8, 2), 11)
  params = _init(layer, x, seed=5)
  # A negative bias makes window maxima negative: where ELU's varsigma' = 1 + y differs.
  params['layers_0']['bias'] = -jnp.ones_like(params['layers_0']['bias'])
  J_F, J_G = batch_jacobians(layer, params, x, L.TJMC)
  conv = L.Conv(3, (3, 3))
  pre = lambda h: conv.apply({'params': params['layers_0']}, h, method='fwd')[0]
  predicted = _predicted_varsigma_difference(layer, params, x, 1, pre)
  scale = float(jnp.linalg.norm(J_F))
  np.testing.assert_allclose(J_G - J_F.T, predicted, atol=1e-5 * scale)
  rel = float(jnp.linalg.norm(predicted)) / scale
  if fn == 'leaky_relu' or pool == 'pool2':
    assert rel < RTOL
  else:
    assert rel > 1e-3, rel  # a genuine, predicted mismatch


def test_residual_varsigma_difference():
  """F(x) = sigma(x W + b) + x, G(t) = varsigma(t) W^T + t: varsigma' is evaluated at
  h_{n+1} = sigma(a) + x, not at sigma(a), so J_G - J_F^T = W diag(varsigma'(h_{n+1}) -
  sigma'(a)) (column convention). For LeakyReLU that is nonzero exactly where x flips
  the sign of sigma(a)."""
  d = 6
  inner = L.Sequential([L.Dense(d), L.Activation('leaky_relu', 0.1)])
  layer = L.Residual(inner)
  x = _input((3, d), 4) * 2
  params = _init(layer, x, seed=2)
  J_F, J_G = batch_jacobians(layer, params, x, L.TJMC)
  W = np.asarray(params['inner']['layers_0']['kernel'], np.float64)
  a = np.asarray(x, np.float64) @ W + np.asarray(params['inner']['layers_0']['bias'])
  y = np.where(a > 0, a, 0.1 * a) + np.asarray(x, np.float64)
  delta = np.where(y > 0, 1.0, 0.1) - np.where(a > 0, 1.0, 0.1)
  predicted = np.zeros((x.size, x.size))
  for b in range(3):
    predicted[b * d : (b + 1) * d, b * d : (b + 1) * d] = W * delta[b][None, :]
  np.testing.assert_allclose(np.asarray(J_G - J_F.T), predicted, atol=1e-6)
  assert np.abs(delta).max() > 0  # the seed produces sign flips
  # With the Hadamard feedback the residual unit is exact.
  assert_tjmc(*batch_jacobians(layer, params, x, L.TJMC_HADAMARD))


def integral_as_hadamard_ctx(seq, params, ctx, t):
  """The ctx under which the Hadamard feedback of ``seq`` has the Jacobian of its
  integral feedback at t: varsigma'(u) = sigma'(sigma^-1(u)), so each Activation's
  frozen input is replaced by sigma^-1(u_i), u_i the point its integral feedback sees
  when the feedback of ``seq`` runs on t (the layers after it fed back first)."""
  new = list(ctx)
  for i in reversed(range(len(seq.layers))):
    sub = seq.layers[i]
    if isinstance(sub, L.Activation):
      new[i] = sub.fns.inv(t)
    t = sub.clone(parent=None).apply(
        {'params': params.get(f'layers_{i}', {})}, t, ctx[i], L.TJMC, method='feedback'
    )
  return tuple(new)


@pytest.mark.parametrize('which', ['lenet_like', 'mixer_channel_unit'])
def test_integral_feedback_off_trajectory_is_predicted(which):
  """With several layers after an activation in one block (a whole LeNet as one block),
  or a skip connection around it (a Mixer channel unit F = f + id, G = g* + id), the
  activation's varsigma is evaluated at u = (feedback of what follows)(h_{n+1}), not at
  sigma(a). So J_G is the Jacobian of the Hadamard feedback with frozen inputs
  sigma^-1(u) instead of a: for LeakyReLU it differs from J_F^T exactly where
  sign(u) != sign(a). Asserted: J_G equals that prediction, the relative TJML is the
  prediction's, and it is clearly nonzero (~0.1-1). (The Hadamard feedback of both is
  exact: rows lenet_like_leaky_hadamard and residual_mlp_hadamard of the table.)
  """
  if which == 'lenet_like':
    layer, x = lenet_like(), _input((2, 8, 8, 1), 21)
  else:
    layer = L.Residual(L.Sequential([L.Dense(8), L.Activation('leaky_relu', 0.1), L.Dense(5)]))
    x = _input((2, 4, 5), 22)
  params = _init(layer, x, seed=4)
  J_F, J_G = batch_jacobians(layer, params, x, L.TJMC)
  seq, p_seq = (layer, params) if which == 'lenet_like' else (layer.inner, params['inner'])

  @jit0
  def predicted(x):
    y, ctx = layer.apply({'params': params}, x, method='fwd')
    ctx_pred = integral_as_hadamard_ctx(seq, p_seq, ctx, y)
    g_pred = lambda t: layer.apply(
        {'params': params}, t, ctx_pred, L.TJMC_HADAMARD, method='feedback'
    )
    return jax.jacfwd(g_pred)(y).reshape(x.size, y.size), ctx_pred, ctx

  J_pred, ctx_pred, ctx = predicted(x)
  np.testing.assert_allclose(J_G, J_pred, atol=1e-5 * float(jnp.abs(J_G).max()))
  flips = [
      float(jnp.mean(jnp.sign(c) != jnp.sign(ctx[i])))
      for i, c in enumerate(ctx_pred)
      if isinstance(seq.layers[i], L.Activation)
  ]
  assert max(flips) > 0.05, flips
  rel = tjml_rel(J_F, J_G)
  assert rel == pytest.approx(tjml_rel(J_F, J_pred), rel=1e-4)
  assert rel > 0.05, rel


def test_mixer_unit_with_layernorm_is_the_frozen_s_transpose():
  """A Mixer token unit F(x) = T(sigma(Dense(T(LN(x))))) + x with the Hadamard feedback:
  J_G equals the transposed Jacobian of the same unit with LayerNorm's s = var + eps
  frozen (stop_gradient), i.e. TJML = ||J_F - J_F|_{s frozen}||_F, nonzero."""
  tokens, d = 4, 5
  inner = L.Sequential(
      [
          L.LayerNorm(),
          L.Transpose((2, 1)),
          L.Dense(tokens),
          L.Activation('gelu'),
          L.Transpose((2, 1)),
      ]
  )
  layer = L.Residual(inner)
  x = _input((2, tokens, d), 6) + 0.5
  params = _init(layer, x, seed=3, perturb=0.2)
  J_F, J_G = batch_jacobians(layer, params, x, L.TJMC_HADAMARD)
  p = params['inner']

  def frozen(h):
    mu = h.mean(-1, keepdims=True)
    s = lax.stop_gradient(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    n = (h - mu) / jnp.sqrt(s) * p['layers_0']['scale'] + p['layers_0']['bias']
    z = jnp.swapaxes(n, 1, 2) @ p['layers_2']['kernel'] + p['layers_2']['bias']
    return jnp.swapaxes(jax.nn.gelu(z, approximate=False), 1, 2) + h

  J_frozen = jit0(jax.jacfwd(frozen))(x).reshape(x.size, x.size)
  np.testing.assert_allclose(J_G, J_frozen.T, atol=2e-5)
  assert tjml_rel(J_F, J_G) > 1e-2


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('mix_tokens', [False, True])
def test_norm_dense_is_layernorm_then_dense_with_one_product_fewer(seed, mix_tokens):
  """NormDense regroups LayerNorm's affine into W: with the same parameters it has the
  values, parameter gradients and feedbacks of Sequential([LayerNorm, Dense]) (with the
  Transpose between them when it mixes tokens), and one (batch x out x in) product less
  when x is detached. The Sequential runs its layers as written: it fuses nothing."""
  r = np.random.RandomState(seed)
  n, d_in, d_out = (int(v) for v in (r.randint(64, 129), r.randint(32, 65), r.randint(32, 65)))
  if mix_tokens:  # x is (batch, tokens, channels): d_in tokens, a few channels each
    channels = int(r.randint(3, 9))
    n = max(n // channels, 2)
    x_shape, t_shape = (n, d_in, channels), (n, channels, d_out)
    middle = [L.Transpose((2, 1))]
  else:
    channels, x_shape, t_shape, middle = 1, (n, d_in), (n, d_out), []
  seq = L.Sequential([L.LayerNorm(), *middle, L.Dense(d_out)])
  norm_dense = L.NormDense(d_out, mix_tokens=mix_tokens)
  dense = f'layers_{len(middle) + 1}'
  x = _input(x_shape, seed)
  p = _init(seq, x)
  p = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(seed), a.shape), p)
  as_norm_dense = lambda p: {
      'norm_scale': p['layers_0']['scale'],
      'norm_bias': p['layers_0']['bias'],
      'kernel': p[dense]['kernel'],
      'bias': p[dense]['bias'],
  }
  chex.assert_trees_all_equal_shapes(_init(norm_dense, x), as_norm_dense(p))

  plain = lambda p, x: seq.apply({'params': p}, x, method='fwd')[0]
  fused = lambda p, x: norm_dense.apply({'params': as_norm_dense(p)}, x, method='fwd')[0]
  chex.assert_trees_all_close(jit0(fused)(p, x), jit0(plain)(p, x), atol=1e-5, rtol=1e-5)
  t = _input(t_shape, seed + 10)
  losses = {
      name: jax.jit(jax.grad(lambda p, f=f: jnp.sum(jnp.square(f(p, lax.stop_gradient(x)) - t))))
      for name, f in (('fused', fused), ('plain', plain))
  }
  chex.assert_trees_all_close(losses['fused'](p), losses['plain'](p), atol=1e-4, rtol=1e-4)
  flops = {k: f.lower(p).compile().cost_analysis() for k, f in losses.items()}
  flops = {k: (v[0] if isinstance(v, list) else v)['flops'] for k, v in flops.items()}
  product = 2 * n * channels * d_in * d_out
  # mixing tokens, gamma's elementwise products with the (batch, channels, out) product
  # cost back a few of the d_in-fold larger product's flops
  low = 0.75 if mix_tokens else 0.9
  assert low * product < flops['plain'] - flops['fused'] < 1.1 * product

  for mode in (L.TJMC, L.LEARNED):

    def feedbacks(p, mode=mode):
      _, ctx = seq.apply({'params': p}, x, method='fwd')
      _, s = norm_dense.apply({'params': as_norm_dense(p)}, x, method='fwd')
      return (
          seq.apply({'params': p}, t, ctx, mode, method='feedback'),
          norm_dense.apply({'params': as_norm_dense(p)}, t, s, mode, method='feedback'),
      )

    g_plain, g_fused = jit0(feedbacks)(p)
    chex.assert_trees_all_close(g_fused, g_plain, atol=1e-5, rtol=1e-5)
  with pytest.raises(L.FeedbackError, match='NormDense'):
    norm_dense.apply(
        {'params': as_norm_dense(p)}, t, jnp.ones(x_shape[:-1] + (1,)), L.PJMC, method='feedback'
    )


def test_norm_dense_mixing_tokens_refuses_a_flat_input():
  with pytest.raises(ValueError, match=r'mix_tokens=True.*\(batch, tokens, channels\)'):
    _init(L.NormDense(4, mix_tokens=True), jnp.ones((2, 5)))


# --------------------------------------------------------------------------------------
# The assertion helpers reject wrong feedbacks.


def _conv_case():
  layer = L.Conv(3, (3, 3), (2, 2), ASYM_A)
  x = _input((2, 7, 6, 2), 1)
  return layer, x, _init(layer, x)


def _unrotated_feedback(params, layer, x):
  """The classic mistake: the kernel in/out-swapped but NOT rotated by 180 degrees."""
  w_wrong = jnp.flip(params['kernel'], (0, 1))  # conv_feedback flips it back: unrotated
  return lambda t: L.conv_feedback(t, w_wrong, layer.strides, layer.padding, x.shape[1:3])


def test_helpers_detect_unrotated_kernel():
  layer, x, params = _conv_case()
  y = jax.eval_shape(lambda h: layer.apply({'params': params}, h, method='fwd')[0], x)
  g_wrong = _unrotated_feedback(params, layer, x)
  J_F, _ = batch_jacobians(layer, params, x)
  J_wrong = jit0(jax.jacfwd(g_wrong))(jnp.ones(y.shape)).reshape(x.size, y.size)
  with pytest.raises(AssertionError):
    assert_tjmc(J_F, J_wrong)
  with pytest.raises(AssertionError):
    assert_matches_vjp(layer, params, x, fb_feedback=g_wrong)


@pytest.mark.parametrize(
    'wrong',
    ['transpose_scaled', 'integral_at_wrong_point', 'unpool_shifted', 'mean_without_division'],
)
def test_helpers_detect_other_wrong_feedbacks(wrong):
  if wrong == 'transpose_scaled':
    layer, x = L.Dense(4), _input((2, 3), 0)
    params = _init(layer, x)
    J_F, J_G = batch_jacobians(layer, params, x)
    with pytest.raises(AssertionError):
      assert_tjmc(J_F, J_G * (1 + 1e-3))
  elif wrong == 'integral_at_wrong_point':
    # tanh feedback given the forward map instead of varsigma (LEARNED mode)
    layer, x = L.Activation('tanh'), _input((2, 4), 0)
    J_F, J_G = batch_jacobians(layer, {}, x, L.LEARNED)
    with pytest.raises(AssertionError):
      assert_tjmc(J_F, J_G)
  elif wrong == 'unpool_shifted':
    layer, x = L.MaxPool(), _input((1, 4, 4, 1), 0)
    argmax = jit0(lambda h: layer.apply({}, h, method='fwd')[1][0])(x)
    g = lambda t: L.max_unpool(t, (argmax + 1) % 4, (4, 4), (2, 2), (2, 2), 'VALID')
    with pytest.raises(AssertionError):
      assert_matches_vjp(layer, {}, x, fb_feedback=g)
  else:
    layer, x = L.Mean(axis=1), _input((2, 3, 4), 0)
    g = lambda t: jnp.broadcast_to(t[:, None], x.shape)
    with pytest.raises(AssertionError):
      assert_matches_vjp(layer, {}, x, fb_feedback=g)


# --------------------------------------------------------------------------------------
# (b) linear layers: G*(v) == vjp(F, h)(v), at realistic sizes.

VJP_CASES = [
    ('vgg_conv', lambda: L.Conv(16, (3, 3)), (2, 32, 32, 16), 'normal'),
    ('conv_s2_asym', lambda: L.Conv(8, (4, 4), (2, 2), ASYM_B), (2, 15, 17, 3), 'normal'),
    ('patch_embed', lambda: L.Conv(8, (4, 4), (4, 4), 'VALID'), (2, 28, 28, 1), 'normal'),
    ('dense', lambda: L.Dense(33), (4, 50), 'normal'),
    ('pool2_ties', lambda: L.MaxPool(), (2, 15, 16, 3), 'ties'),
    ('pool3_ties', lambda: L.MaxPool(**POOL3), (2, 28, 28, 4), 'ties'),
    ('mean', lambda: L.Mean(axis=1), (3, 49, 16), 'normal'),
    ('flatten', lambda: L.Flatten(), (3, 7, 7, 4), 'normal'),
    ('transpose', lambda: L.Transpose((2, 1)), (3, 49, 16), 'normal'),
]


@pytest.mark.parametrize('name,make,shape,kind', VJP_CASES, ids=[c[0] for c in VJP_CASES])
def test_linear_feedback_equals_vjp(name, make, shape, kind):
  layer = make()
  x = _input(shape, 3, kind)
  assert_matches_vjp(layer, _init(layer, x), x)


POOL_CASES = [
    ((2, 2), (2, 2), 'VALID', 'ties'),
    ((3, 3), (2, 2), ((1, 1), (1, 1)), 'ties'),
    ((3, 3), (2, 2), ((1, 1), (1, 1)), 'normal'),
    ((3, 2), (1, 2), 'SAME', 'ties'),
]


@pytest.mark.parametrize('window,strides,padding,kind', POOL_CASES)
def test_max_pool_value_argmax_and_jvp_match_naive_loops(window, strides, padding, kind):
  """y = window max, argmax = first maximal offset, dy = dx at that offset (numpy loops)."""
  x = _input((2, 7, 6, 3), 5, kind)
  dx = _input((2, 7, 6, 3), 6)
  (y, am), (dy, _) = jax.jit(
      lambda x, dx: jax.jvp(lambda x: L.max_pool_argmax(x, window, strides, padding), (x,), (dx,))
  )(x, dx)
  pads = _pads((7, 6), window, strides, padding)
  xp = np.pad(np.asarray(x), ((0, 0), *pads, (0, 0)), constant_values=-np.inf)
  dxp = np.pad(np.asarray(dx), ((0, 0), *pads, (0, 0)))
  offsets = [(i, j) for i in range(window[0]) for j in range(window[1])]
  for n, a, b, c in np.ndindex(*y.shape):
    vals = [xp[n, a * strides[0] + i, b * strides[1] + j, c] for i, j in offsets]
    k = int(np.argmax(vals))  # numpy's argmax: the first maximum
    i, j = offsets[k]
    assert y[n, a, b, c] == vals[k]
    assert am[n, a, b, c] == k
    assert dy[n, a, b, c] == dxp[n, a * strides[0] + i, b * strides[1] + j, c]


def test_materialize_is_the_identity_and_survives_compilation():
  """x bit for bit (a -0.0 included), under grad, jvp and vmap, and on CPU a conditional
  that XLA keeps: max_unpool's input is computed once, not once per window offset."""
  x = _input((2, 5, 4, 3), 7).at[0, 0, 0, 1].set(-0.0)
  for got in (L.materialize(x), jax.jit(L.materialize)(x), jax.vmap(L.materialize)(x)):
    np.testing.assert_array_equal(np.asarray(got).view(np.int32), np.asarray(x).view(np.int32))
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(L.materialize(x) ** 2))(x), 2 * x)
  np.testing.assert_array_equal(jax.jvp(L.materialize, (x,), (2 * x,))[1], 2 * x)
  nan_first = x.at[0, 0, 0, 0].set(jnp.nan)
  np.testing.assert_array_equal(L.materialize(nan_first), nan_first)
  assert L.materialize(jnp.zeros((0, 3))).shape == (0, 3)
  if jax.default_backend() == 'cpu':
    noisy_unpool = lambda key, t, am: L.max_unpool(
        t + jax.random.normal(key, t.shape), am, (7, 6), (3, 3), (2, 2), ((1, 1), (1, 1))
    )
    t, am = L.max_pool_argmax(_input((2, 7, 6, 3), 8), (3, 3), (2, 2), ((1, 1), (1, 1)))
    hlo = jax.jit(noisy_unpool).lower(jax.random.key(0), t, am).compile().as_text()
    assert 'conditional' in hlo


# --------------------------------------------------------------------------------------
# (c) the conv feedback is a conv with the rotated, swapped kernel (naive numpy).


def _pads(in_hw, k, s, padding):
  if isinstance(padding, str):
    return [tuple(p) for p in lax.padtype_to_pads(in_hw, k, s, padding)]
  return [tuple(p) for p in padding]


def naive_conv(x, w, s, pads):
  """y[i, j, o] = sum_{a, b, c} x_pad[i s0 + a, j s1 + b, c] w[a, b, c, o]  (one example)."""
  xp = np.pad(x, (pads[0], pads[1], (0, 0)))
  kh, kw = w.shape[:2]
  oh = (xp.shape[0] - kh) // s[0] + 1
  ow = (xp.shape[1] - kw) // s[1] + 1
  y = np.zeros((oh, ow, w.shape[3]))
  for i in range(oh):
    for j in range(ow):
      patch = xp[i * s[0] : i * s[0] + kh, j * s[1] : j * s[1] + kw]
      y[i, j] = np.einsum('abc,abco->o', patch, w)
  return y


def naive_transposed_conv_rotated(t, w, s, pads, in_hw):
  """Correlate the s-dilated, (k-1-lo, k-1-hi+r)-padded target with the 180-degree
  rotated kernel with in/out swapped: w_rot[a, b, o, c] = w[k-1-a, k-1-b, c, o]."""
  kh, kw = w.shape[:2]
  oh, ow = t.shape[:2]
  dil = np.zeros(((oh - 1) * s[0] + 1, (ow - 1) * s[1] + 1, t.shape[2]))
  dil[:: s[0], :: s[1]] = t
  tp = []
  for n, k, stride, (lo, hi), o in zip(in_hw, (kh, kw), s, pads, (oh, ow)):
    r = (n + lo + hi - k) - (o - 1) * stride
    tp.append((k - 1 - lo, k - 1 - hi + r))
  # negative pads crop
  padded = np.pad(dil, [(max(p, 0), max(q, 0)) for p, q in tp] + [(0, 0)])
  sl = tuple(slice(max(-p, 0), padded.shape[a] - max(-q, 0)) for a, (p, q) in enumerate(tp))
  padded = padded[sl]
  w_rot = np.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  out = naive_conv(padded, w_rot, (1, 1), [(0, 0), (0, 0)])
  assert out.shape[:2] == tuple(in_hw), (out.shape, in_hw)
  return out


def naive_transposed_conv_scatter(t, w, s, pads, in_hw):
  """The definition of J^T: scatter t[i, j, o] w[a, b, c, o] to x_pad[i s + a, j s + b, c]."""
  kh, kw = w.shape[:2]
  xp = np.zeros((in_hw[0] + sum(pads[0]), in_hw[1] + sum(pads[1]), w.shape[2]))
  for i in range(t.shape[0]):
    for j in range(t.shape[1]):
      xp[i * s[0] : i * s[0] + kh, j * s[1] : j * s[1] + kw] += np.einsum('abco,o->abc', w, t[i, j])
  return xp[pads[0][0] : pads[0][0] + in_hw[0], pads[1][0] : pads[1][0] + in_hw[1]]


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True, database=None)
@hypothesis.given(
    hw=st.tuples(st.integers(4, 7), st.integers(4, 7)),
    k=st.sampled_from([2, 3, 4]),
    stride=st.sampled_from([(1, 1), (2, 2), (2, 1)]),
    padding=st.sampled_from(['SAME', 'VALID', ((1, 2), (0, 1)), ((2, 0), (1, 1))]),
    cin=st.integers(1, 3),
    cout=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_conv_feedback_is_rotated_kernel_conv(hw, k, stride, padding, cin, cout, seed):
  """Layer feedback == naive rotated-kernel correlation == naive scatter (J^T).

  Paddings are limited to 0 <= pad <= k - 1 (every practical case): a larger padding
  makes the transposed conv's padding k - 1 - pad negative, and XLA:CPU's
  conv_general_dilated returns uninitialised memory for some negative paddings
  (e.g. ((-1, 1), (0, 0)) on a 3x7 input with a 2x2 kernel). That hits
  ``layers.conv_feedback`` and ``jax.vjp`` of the forward alike; reported, not tested.
  """
  pads = _pads(hw, (k, k), stride, padding)
  hypothesis.assume(all(0 <= p <= k - 1 for pair in pads for p in pair))
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(k, k, cin, cout))
  x = rng.normal(size=(*hw, cin))
  y = naive_conv(x, w, stride, pads)
  layer = L.Conv(cout, (k, k), stride, padding)
  params = {'kernel': jnp.asarray(w, jnp.float32), 'bias': jnp.zeros(cout)}
  t = rng.normal(size=y.shape)

  @jit0
  def fwd_and_feedback(x, t):
    y, ctx = layer.apply({'params': params}, x, method='fwd')
    return y, layer.apply({'params': params}, t, ctx, method='feedback')

  y_jax, got = (
      np.asarray(a[0])
      for a in fwd_and_feedback(
          jnp.asarray(x[None], jnp.float32), jnp.asarray(t[None], jnp.float32)
      )
  )
  np.testing.assert_allclose(y_jax, y, rtol=1e-4, atol=1e-4)
  rotated = naive_transposed_conv_rotated(t, w, stride, pads, hw)
  scatter = naive_transposed_conv_scatter(t, w, stride, pads, hw)
  np.testing.assert_allclose(rotated, scatter, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(got, rotated, rtol=1e-4, atol=1e-4)
  # The same comparison rejects the unrotated kernel (k > 1 and a generic kernel).
  unrotated = naive_transposed_conv_rotated(t, np.flip(w, (0, 1)), stride, pads, hw)
  assert not np.allclose(got, unrotated, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# (d) IJMC / PJMC on dense.


@pytest.mark.parametrize(
    'i,o,mode', [(5, 5, 'inverse'), (6, 4, 'pinv'), (4, 6, 'pinv'), (5, 5, 'pinv')]
)
def test_dense_inverse_and_pinv_feedback(i, o, mode):
  """G(t) = (t - b) W^-1 (IJMC) or (t - b) W^+ (PJMC), and the exact IJML / PJML
  vanish: for y = x W + b (column convention J_F = W^T), J_G = (W^-1)^T = (W^T)^-1
  resp. (W^+)^T = (W^T)^+. The bias does not enter G's Jacobian."""
  layer = L.Dense(o)
  x = _input((3, i), 9)
  params = _init(layer, x, seed=i * 10 + o)
  W = np.asarray(params['kernel'], np.float64)
  fb_mode = L.IJMC if mode == 'inverse' else L.PJMC
  t = _input((3, o), 10)
  f = lambda h: layer.apply({'params': params}, h[None], method='fwd')[0][0]
  g = lambda s: layer.apply({'params': params}, s[None], None, fb_mode, method='feedback')[0]

  @jit0
  def run(x, t):  # G(t) on a batch, and one example's Jacobians at (x_0, F(x_0))
    got = layer.apply({'params': params}, t, None, fb_mode, method='feedback')
    return got, jax.jacfwd(f)(x[0]), jax.jacfwd(g)(f(x[0]))

  got, J_F, J_G = run(x, t)
  ref = (np.asarray(t, np.float64) - np.asarray(params['bias'], np.float64)) @ (
      np.linalg.inv(W) if mode == 'inverse' else np.linalg.pinv(W)
  )
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  kind = 'ijml' if mode == 'inverse' else 'pjml'
  assert float(jml.jml(J_F, J_G, kind, relative=True)) < 1e-5
  # ... and TJML is not zero (W is not orthogonal): the kinds are distinguished.
  assert float(jml.tjml(J_F, J_G, relative=True)) > 1e-2


# --------------------------------------------------------------------------------------
# (e) bad inputs.


def test_non_module_in_sequential_is_named():
  """(A plain Flax module is wrapped as layers.Derived: tests/test_derived.py.)"""
  with pytest.raises(L.FeedbackError, match=r'PjitFunction is not a Flax module'):
    L.Sequential([L.Dense(3), jnp.tanh])


def test_shape_mismatch_names_both_shapes():
  dense = L.Dense(3)
  p = _init(dense, jnp.ones((2, 5)))
  with pytest.raises(Exception, match=r'\(4, 3\).*\(5, 3\)'):
    dense.apply({'params': p}, jnp.ones((2, 4)), method='fwd')
  with pytest.raises(ValueError, match=r'\(2, 4\).*\(5, 3\)'):
    dense.apply({'params': p}, jnp.ones((2, 4)), None, method='feedback')
  with pytest.raises(ValueError, match=r'\(2, 3\).*\(2, 5\)'):
    L.Residual(L.Dense(3)).init(jax.random.PRNGKey(0), jnp.ones((2, 5)), method='fwd')
  pool = L.MaxPool()
  _, ctx = pool.apply({}, jnp.ones((1, 4, 4, 2)), method='fwd')
  with pytest.raises(ValueError, match=r'\(1, 3, 3, 2\).*\(1, 2, 2, 2\)'):
    pool.apply({}, jnp.ones((1, 3, 3, 2)), ctx, method='feedback')
  conv = L.Conv(3, (3, 3))
  pc = _init(conv, jnp.ones((1, 5, 5, 2)))
  with pytest.raises(ValueError, match=r'\(1, 5, 5, 4\).*\(3, 3, 2, 3\)'):
    conv.apply({'params': pc}, jnp.ones((1, 5, 5, 4)), ctx, method='feedback')


def test_gelu_integral_feedback_is_refused():
  act = L.Activation('gelu')
  x = jnp.ones((2, 3))
  with pytest.raises(L.FeedbackError, match=r'gelu.*not invertible.*hadamard'):
    act.apply({}, x, x, L.TJMC, method='feedback')
  with pytest.raises(L.FeedbackError, match=r'gelu'):
    act.apply({}, x, x, L.IJMC, method='feedback')


def test_ijmc_on_non_square_dense_is_refused():
  dense = L.Dense(3)
  p = _init(dense, jnp.ones((2, 5)))
  with pytest.raises(L.FeedbackError, match=r'square.*\(5, 3\)'):
    dense.apply({'params': p}, jnp.ones((2, 3)), None, L.IJMC, method='feedback')


@pytest.mark.parametrize('mode', [L.IJMC, L.PJMC])
def test_ijmc_pjmc_on_conv_are_refused(mode):
  conv = L.Conv(3, (3, 3))
  x = jnp.ones((1, 5, 5, 2))
  p = _init(conv, x)
  y, ctx = conv.apply({'params': p}, x, method='fwd')
  with pytest.raises(L.FeedbackError, match=r'Conv.*no closed-form'):
    conv.apply({'params': p}, y, ctx, mode, method='feedback')


# --------------------------------------------------------------------------------------
# LayerNorm's TJML near var(x) ~ eps; IJMC / PJMC with a bias.


@pytest.mark.parametrize('seed', [0, 1])
def test_layernorm_tjml_at_small_variance(seed):
  """The LayerNorm docstring's TJML ||x^|| ||gamma * x^|| / (d sqrt(s)) is the exact
  TJML of the layer (jml's, from both Jacobians) also where var(x) ~ eps, and there the
  large-variance form ||gamma * x^|| / sqrt(d s) is far off (by sqrt(s / var))."""
  d = 6
  layer = L.LayerNorm()
  x = 3e-3 * _input((2, d), seed)
  params = _init(layer, x, seed=seed, perturb=0.5)
  net = network.Net((layer,))
  r = jml.block_jml(net, (params,), (params,), 0, x, L.TJMC, 'tjml', exact=True)
  xs, gamma = np.asarray(x, np.float64), np.asarray(params['scale'], np.float64)
  var = xs.var(-1)
  s = var + layer.epsilon
  x_hat = (xs - xs.mean(-1, keepdims=True)) / np.sqrt(s)[:, None]
  norm_gx = np.linalg.norm(gamma * x_hat, axis=-1)
  documented = np.linalg.norm(x_hat, axis=-1) * norm_gx / (d * np.sqrt(s))
  np.testing.assert_allclose(r.per_example_absolute, documented, rtol=1e-3)
  assert np.all(s / var > 1.5)  # var ~ eps: the regime where the two forms differ
  large_variance_form = norm_gx / np.sqrt(d * s)
  assert np.all(np.abs(r.per_example_absolute / large_variance_form - 1) > 0.1)


def _dense_act_block(widths_in_out, act='leaky_relu'):
  """[Dense, act] * k as a Sequential, params with N(0, 1) biases (large enough that a
  dropped bias moves a LeakyReLU's inverse across its kink)."""
  block = L.Sequential([m for w in widths_in_out[1:] for m in (L.Dense(w), L.Activation(act, 0.2))])
  x = _input((4, widths_in_out[0]), 31)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: 10 * a if str(getattr(path[-1], 'key', '')) == 'bias' else a,
      _init(block, x, seed=32),
  )
  return block, params, x


@pytest.mark.parametrize(
    'widths,mode', [((5, 5), L.IJMC), ((5, 5, 5), L.IJMC), ((4, 7), L.PJMC), ((4, 4, 7), L.PJMC)]
)
def test_ijmc_pjmc_feedback_inverts_the_block(widths, mode):
  """IJMC on square dense+act blocks, PJMC on tall ones (x W W^+ = x): G(F(x)) = x with
  nonzero biases, also when a second dense layer's bias must be removed before the
  earlier activation's inverse is taken."""
  block, params, x = _dense_act_block(widths)

  @jit0
  def round_trip(p, h):
    y, ctx = block.apply({'params': p}, h, method='fwd')
    return block.apply({'params': p}, y, ctx, mode, method='feedback')

  np.testing.assert_allclose(round_trip(params, x), x, rtol=1e-4, atol=1e-4)


def test_difference_correction_cancels_a_first_dense_bias():
  """DTP uses G(t) - G(h) only. Where the dense layer is the block's first, its bias
  is a constant offset of G, so the targets of the exact inverse equal those of the
  bias-free t W^-1 (the same block with b = 0 in the feedback's params)."""
  block, params, x = _dense_act_block((5, 5))
  no_bias = {
      **params,
      'layers_0': {**params['layers_0'], 'bias': jnp.zeros_like(params['layers_0']['bias'])},
  }
  t = _input((4, 5), 33)

  @jit0
  def differences(p, fb, h, t):
    y, ctx = block.apply({'params': p}, h, method='fwd')
    return [
        block.apply({'params': q}, t, y, ctx, L.IJMC, method='feedback_difference') for q in (p, fb)
    ]

  with_bias, without = differences(params, no_bias, x, t)
  np.testing.assert_allclose(with_bias, without, rtol=1e-5, atol=1e-6)
  # The offset itself is not zero: G differs by b W^-1 between the two.
  W = np.asarray(params['layers_0']['kernel'], np.float64)
  assert np.linalg.norm(np.asarray(params['layers_0']['bias']) @ np.linalg.inv(W)) > 0.1


@pytest.mark.parametrize('make', [lambda f: L.Dense(f), lambda f: L.Conv(f, (3, 3))])
@pytest.mark.parametrize('features', [0, -3, 2.5, True])
def test_a_layer_without_a_positive_width_is_refused_when_built(make, features):
  with pytest.raises(ValueError, match='features must be a positive integer'):
    make(features)
