"""Propositions 1-3 of Bao et al. (2024) in precise form, checked on the library's code.

Every quantity comes from tp_jax: the blocks are ``tp_jax.layers`` (Dense, Conv,
activations) in a ``network.Net``; the feedbacks are ``network.block_feedback`` with the
modes TJMC / IJMC / PJMC / LEARNED; the losses are ``vanilla_dtp.reconstruction_loss``
(Prop. 1), ``network.block_feedback_difference`` (the DRL of Prop. 2) and
``ldrl.ldrl_loss`` (Prop. 3), each with the noise it draws itself from a PRNG key; the
Jacobians and matching losses are ``jml.block_fns`` with ``jml.jacobians``, ``jml.tjml`` / ``ijml`` /
``pjml`` and ``jml.block_jml``. So a wrong feedback, a wrong factor in a loss or a wrong
Jacobian makes these tests fail.

Setting: block F with input dimension n and output dimension m, Jacobian J = J_F (m x n),
feedback G with Jacobian J_G (n x m). For a linear F (a Dense block) and the learned
feedback (LEARNED: G(t) = t B^T for feedback kernel B), J = W^T and J_G = B.

Property tests: shapes, parameters and inputs are drawn from the seed (numpy, so that no
threefry program is compiled per shape); the noise is the library's own, from a JAX key.
Every Monte-Carlo assertion uses a tolerance derived from the sample: the mean of N
i.i.d. samples with sample standard deviation s is within K * s / sqrt(N) of its
expectation (CLT) with K = 5 (two-sided failure probability ~6e-7 per assertion). Each
test also checks that the tolerance is tight enough to reject a wrong constant, so the
test can fail. Everything runs in float64 (``jax.enable_x64``), so that the exact
identities hold to ~1e-12.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tp_jax import jml
from tp_jax import layers as L
from tp_jax import network
from tp_jax.algorithms import ldrl
from tp_jax.algorithms import vanilla_dtp

K = 5.0  # CLT multiplier


FAST_COMPILE = {'xla_backend_optimization_level': 0}
"""-O0: each program here runs once on tiny shapes, so compiling it dominates."""


@pytest.fixture(autouse=True)
def _float64_fast_compiles(monkeypatch):
  """float64 for the exact identities; -O0 also for the programs jml compiles itself."""
  monkeypatch.setattr(jml, 'COMPILER_OPTIONS', FAST_COMPILE, raising=False)
  with jax.enable_x64(True):
    yield


def _run(fn, *args):
  """fn(*args) as one program compiled with FAST_COMPILE, as float64 numpy arrays (eager
  dispatch would compile every op, and every threefry draw, separately)."""
  out = jax.jit(fn, compiler_options=FAST_COMPILE)(*args)
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), out)


# --------------------------------------------------------------------------------------
# Helpers: blocks, parameters and inputs drawn from a seed; the library's losses


def _dims(rng, shape_kind):
  """(n_in, n_out) of a random size: square, tall (n_out > n_in) or wide (n_out < n_in)."""
  n = int(rng.integers(3, 7))
  extra = int(rng.integers(1, 3))
  return {'square': (n, n), 'tall': (n, n + extra), 'wide': (n, n - extra)}[shape_kind]


def _randn(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape))


def _params(net, x, rng):
  """network.init's structure, drawn with numpy: kernels N(0, 1/fan_in), biases
  N(0, 0.25)."""
  abstract = jax.eval_shape(lambda h: network.init(net, jax.random.PRNGKey(0), h), x)

  def leaf(path, a):
    if str(getattr(path[-1], 'key', '')) == 'kernel':
      return _randn(rng, *a.shape) / np.sqrt(np.prod(a.shape[:-1]))
    return 0.5 * _randn(rng, *a.shape)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _dense_net(n_out, use_bias):
  return network.Net((L.Dense(n_out, use_bias=use_bias),), name='dense')


def _learned_reproducing(net, params, mode):
  """Feedback weights B whose LEARNED feedback t B^T is the Dense block's ``mode``
  feedback: B^T = G_mode(I_m), the library's feedback applied to the standard basis."""
  m = params[0]['kernel'].shape[1]
  return ({'kernel': network.block_feedback(net, 0, params[0], jnp.eye(m), None, mode).T},)


def _mixed_feedback(params, rng):
  """Feedback weights 0.5 * (forward) + 0.5 * (random of the same scale): a random G
  whose cross term tr(J_G J_F) is sizeable, so that a wrong factor on it is detectable."""
  return jax.tree_util.tree_map(
      lambda a: 0.5 * a + 0.5 * jnp.std(a) * _randn(rng, *a.shape), params
  )


def _keys(seed, num):
  return jax.random.split(jax.random.PRNGKey(seed), num)


def _reconstruction_loss(net, params, fb_params, x, key, sigma):
  """The library's DTP reconstruction loss of block 0: ||G(F(x + eps)) - (x + eps)||^2,
  batch mean, eps ~ N(0, sigma^2) drawn from ``key``."""
  return vanilla_dtp.reconstruction_loss(net, 0, params[0], fb_params[0], x, None, None, key, sigma)


def _ldrl_loss(net, params, fb_params, x, key, sigma):
  """The library's LDRL of block 0 at the input batch x (batch mean)."""
  y, ctx = network.block_forward(net, 0, params[0], x)
  return ldrl.ldrl_loss(net, 0, params[0], fb_params[0], x, y, ctx, key, sigma)


def _example_jacobians(net, params, fb_params, x, mode=L.LEARNED):
  """The library's (J_F, J_G) of block 0 at the first example of x."""
  f, g = jml.block_fns(net, params, fb_params, 0, mode)
  y, ctx = f(x[:1])
  J_F, J_G = jml.jacobians(lambda h: f(h)[0], g, x[:1], y, ctx)
  return J_F[0], J_G[0]


def _mc_mean(samples):
  """(mean, standard error of the mean) of a 1-D sample."""
  samples = np.asarray(samples, np.float64)
  return samples.mean(), samples.std(ddof=1) / np.sqrt(samples.size)


def _assert_mc_equal(samples, expected, wrong=()):
  """E[samples] == expected within K standard errors; ``wrong`` values must be rejected."""
  mean, se = _mc_mean(samples)
  assert abs(mean - expected) <= K * se, (mean, se, expected)
  for w in np.atleast_1d(wrong):
    assert abs(mean - w) > K * se, f'tolerance {K * se} too loose to reject {w} (mean {mean})'


def _fro2(a):
  return float(np.sum(np.square(a)))


# --------------------------------------------------------------------------------------
# Proposition 1: the reconstruction loss vanishes for all inputs <=> G J = I.


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('shape_kind', ['square', 'tall'])
def test_prop1_reconstruction_loss_vanishes_when_GJ_is_identity(seed, shape_kind):
  """<=: G J = I (IJMC, G = J^-1, for a square block; PJMC, G = J^+, for a tall block of
  full column rank) makes the reconstruction loss L_rec(x) = ||G(F(x + eps)) - (x + eps)||^2
  vanish for every input and every noise (checked on 400 random points, relative to their
  squared norm, at float64 precision), and the library's IJML / PJML of the block is 0.
  The loss is the library's DTP loss with learned feedback weights that reproduce the
  library's IJMC / PJMC feedback."""
  rng = np.random.default_rng(seed)
  n, m = _dims(rng, shape_kind)
  mode, matching_loss = (L.IJMC, jml.ijml) if shape_kind == 'square' else (L.PJMC, jml.pjml)
  net = _dense_net(m, use_bias=False)
  scale, sigma = rng.uniform(0.1, 10), float(rng.uniform(0.1, 3))
  x, t = scale * _randn(rng, 400, n), _randn(rng, 7, m)
  params = _params(net, x, rng)

  def quantities(params, x, t, keys):
    fb_params = _learned_reproducing(net, params, mode)
    J_F, J_G = _example_jacobians(net, params, params, x, mode)
    return dict(
        learned=network.block_feedback(net, 0, fb_params[0], t, None, L.LEARNED),
        analytical=network.block_feedback(net, 0, params[0], t, None, mode),
        J_F=J_F,
        J_G=J_G,
        matching_loss=matching_loss(J_F, J_G),
        losses=jax.vmap(
            lambda xi, k: _reconstruction_loss(net, params, fb_params, xi[None], k, sigma)
        )(x, keys),
    )

  q = _run(quantities, params, x, t, _keys(seed, x.shape[0]))
  chex.assert_trees_all_close(q['learned'], q['analytical'], rtol=1e-12, atol=1e-12)
  chex.assert_trees_all_close(q['J_G'] @ q['J_F'], np.eye(n), atol=1e-10)
  assert q['matching_loss'] < 1e-10
  cond = np.linalg.cond(np.asarray(params[0]['kernel']))
  chex.assert_shape(q['losses'], (x.shape[0],))
  assert np.all(q['losses'] <= (1e-13 * cond) ** 2 * (scale**2 + sigma**2) * n), q['losses'].max()


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('fn', ['elu', 'leaky_relu'])
def test_prop1_inverse_feedback_of_an_invertible_nonlinear_block(seed, fn):
  """The same for a nonlinear invertible block F(x) = sigma(x W): the IJMC feedback
  G = F^-1 = sigma^-1(.) W^-1 reconstructs every input, G(F(x)) = x, so its Jacobian at
  F(x) is J_F(x)^-1 and the library's IJML (``block_jml``) is 0; the TJMC feedback of the
  same block is no inverse (its IJML is positive)."""
  rng = np.random.default_rng(seed)
  n = _dims(rng, 'square')[0]
  net = network.Net((L.Sequential([L.Dense(n, use_bias=False), L.Activation(fn)]),))
  x = rng.uniform(0.3, 3) * _randn(rng, 50, n)
  params = _params(net, x, rng)

  def quantities(params, x):
    y, ctx = network.block_forward(net, 0, params[0], x)
    J_F, J_G = _example_jacobians(net, params, params, x, L.TJMC)
    return network.block_feedback(net, 0, params[0], y, ctx, L.IJMC), jml.ijml(J_F, J_G)

  reconstructed, tjmc_ijml = _run(quantities, params, x)
  chex.assert_trees_all_close(reconstructed, x, atol=1e-10, rtol=1e-10)
  assert tjmc_ijml > 1e-2
  assert jml.block_jml(net, params, params, 0, x[:4], L.IJMC, 'ijml').absolute < 1e-9


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('kind', ['random', 'transpose', 'pinv_of_wide'])
def test_prop1_reconstruction_loss_positive_somewhere_when_GJ_not_identity(seed, kind):
  """=>, by contraposition: if G J != I, the reconstruction loss is positive on an input.
  Precisely, for linear F and G (no noise, sigma = 0), sum_i L_rec(e_i) = ||G J - I||_F^2
  over the standard basis, so L_rec == 0 everywhere forces G J = I; and the top
  right-singular vector u of G J - I gives L_rec(u) = sigma_max(G J - I)^2 > 0. This
  holds for a random feedback, for the TJMC feedback G = J^T (its TJML is 0, but it is
  no inverse), and for a wide J (m < n), where even G = J^+ (PJML 0) fails:
  G J = J^+ J is the projector onto the row space, L_rec(eps) = ||P_null eps||^2, whose
  Gaussian mean is sigma^2 (n - m)."""
  rng = np.random.default_rng(seed)
  shape_kind = {
      'random': rng.choice(['square', 'tall']),
      'transpose': 'square',
      'pinv_of_wide': 'wide',
  }[kind]
  n, m = _dims(rng, shape_kind)
  net = _dense_net(m, use_bias=False)
  basis, sigma = jnp.eye(n), 0.7
  params = _params(net, basis, rng)
  key = jax.random.PRNGKey(seed)

  def quantities(params, key):
    fb_params = {
        'random': lambda: network.init_feedback(params, key),
        'transpose': lambda: params,
        'pinv_of_wide': lambda: _learned_reproducing(net, params, L.PJMC),
    }[kind]()
    J_F, J_G = _example_jacobians(net, params, fb_params, basis)
    D = J_G @ J_F - jnp.eye(n)
    _, s, vt = jnp.linalg.svd(D)
    out = dict(
        D=D,
        s_max=s[0],
        tjml=jml.tjml(J_F, J_G),
        pjml=jml.pjml(J_F, J_G),
        at_basis=n * _reconstruction_loss(net, params, fb_params, basis, key, 0.0),
        at_u=_reconstruction_loss(net, params, fb_params, vt[:1], key, 0.0),
    )
    if kind == 'pinv_of_wide':
      zeros = jnp.zeros((50, n))
      out['samples'] = (
          jax.vmap(lambda k: _reconstruction_loss(net, params, fb_params, zeros, k, sigma))(
              _keys(seed, 400)
          )
          / sigma**2
      )
    return out

  q = _run(quantities, params, key)
  assert q['at_basis'] == pytest.approx(_fro2(q['D']), rel=1e-10)
  assert q['at_u'] == pytest.approx(q['s_max'] ** 2, rel=1e-10)
  assert q['s_max'] ** 2 > 1e-3
  if kind == 'transpose':
    assert q['tjml'] < 1e-12
  if kind == 'pinv_of_wide':
    assert q['pjml'] < 1e-10
    _assert_mc_equal(q['samples'], n - m, wrong=[n - m + 0.5, n])


# --------------------------------------------------------------------------------------
# Proposition 2: the difference reconstruction loss (Meulemans et al. 2020).


def _drl(net, params, fb_params, x, eps):
  """DRL = ||G(F(x + eps)) - G(F(x)) - eps||^2 per example, the difference G(.) - G(.)
  by the library's ``block_feedback_difference`` (DTP's difference correction)."""
  y, ctx = network.block_forward(net, 0, params[0], x)
  y_noisy, _ = network.block_forward(net, 0, params[0], x + eps)
  diff = network.block_feedback_difference(net, 0, fb_params[0], y_noisy, y, ctx, L.LEARNED)
  return jnp.sum(jnp.square(diff - eps), axis=-1)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_prop2_drl_expectation_is_frobenius(seed):
  """E_eps DRL / sigma^2 = ||G J - I||_F^2 for eps ~ N(0, sigma^2 I_n), for every x.

  Derivation: for a linear G and an affine F (a Dense block with bias), the DRL is
  ||D eps||^2 with D = G J - I, whatever x; E ||D eps||^2 = E tr(D eps eps^T D^T) =
  sigma^2 tr(D D^T). J and G's Jacobian are the library's, G is the library's random
  feedback initialisation; sigma is drawn log-uniform from [0.1, 3]."""
  rng = np.random.default_rng(seed)
  sigma = float(10 ** rng.uniform(-1, 0.5))
  n, m = _dims(rng, rng.choice(['square', 'tall', 'wide']))
  net = _dense_net(m, use_bias=True)
  x = _randn(rng, 2, n)
  params = _params(net, x, rng)

  def quantities(params, x, key):
    k_fb, k_eps = jax.random.split(key)
    fb_params = network.init_feedback(params, k_fb)
    J_F, J_G = _example_jacobians(net, params, fb_params, x)
    eps = sigma * jax.random.normal(k_eps, (40000, n))
    at = [_drl(net, params, fb_params, jnp.broadcast_to(x[i], eps.shape), eps) for i in (0, 1)]
    return J_G @ J_F - jnp.eye(n), at[0] / sigma**2, at[1] / sigma**2

  D, at_x0, at_x1 = _run(quantities, params, x, jax.random.PRNGKey(seed))
  chex.assert_trees_all_close(at_x0, at_x1, rtol=1e-9, atol=1e-9)  # the same for every x
  target = _fro2(D)
  _assert_mc_equal(at_x0, target, wrong=[0.9 * target, 1.1 * target])


def tikhonov_minimiser(J, lam):
  """argmin_G ||G J - I||_F^2 + lam ||G||_F^2 = J^T (J J^T + lam I_m)^-1.

  Derivation: the loss is a convex quadratic in G with gradient
  2 (G J - I) J^T + 2 lam G; setting it to 0 gives G (J J^T + lam I) = J^T, and
  J J^T + lam I is positive definite for lam > 0. Equivalently (J^T J + lam I_n)^-1 J^T
  (push-through identity). With J = U diag(s) V^T, G_lam = V diag(s / (s^2 + lam)) U^T,
  so G_lam - J^+ = -V diag(lam / (s (s^2 + lam))) U^T on the nonzero s (and 0 on the
  null space): ||G_lam - J^+||_F decreases monotonically to 0 as lam -> 0, and
  ||G_lam - J^+||_F / lam -> sqrt(sum_i s_i^-6).
  """
  m = J.shape[0]
  return J.T @ jnp.linalg.inv(J @ J.T + lam * jnp.eye(m))


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('rank_deficit', [0, 2])
def test_prop2_tikhonov_minimiser_tends_to_pinv(seed, rank_deficit):
  """By Prop. 2's expectation, E[DRL] / sigma^2 + lam ||G||_F^2 = ||G J - I||_F^2 +
  lam ||G||_F^2 (the DRL with weight decay). Its minimiser G_lam has zero gradient and
  every perturbation increases the loss by exactly ||delta J||^2 + lam ||delta||^2 > 0;
  and the library's PJML of G_lam, ||G_lam - J^+||_F, decreases strictly and, once
  lam << s_min^2, linearly in lam (ratio 10 per decade) to 0, also for a rank-deficient J:
  the minimiser tends to the library's PJMC feedback, whose PJML is 0. J is the library's
  Jacobian of a Dense block of a drawn shape and rank (full, or 2 below full)."""
  rng = np.random.default_rng(seed)
  n, m = _dims(rng, rng.choice(['square', 'tall'] if rank_deficit else ['square', 'tall', 'wide']))
  rank = min(n, m) - rank_deficit
  net = _dense_net(m, use_bias=True)
  x = _randn(rng, 1, n)
  params = _params(net, x, rng)
  params = ({**params[0], 'kernel': _randn(rng, n, rank) @ _randn(rng, rank, m)},)
  lams_per_s_min2 = 10.0 ** -np.arange(0, 7)

  def quantities(params, x):
    J_F, J_pinv = _example_jacobians(net, params, params, x, L.PJMC)
    s = jnp.linalg.svd(J_F, compute_uv=False)[:rank]
    lams = s[-1] ** 2 * lams_per_s_min2
    G_lams = jax.vmap(lambda lam: tikhonov_minimiser(J_F, lam))(lams)
    return dict(
        J_F=J_F,
        J_pinv=J_pinv,
        s=s,
        lams=lams,
        pjml_of_pjmc=jml.pjml(J_F, J_pinv),
        pjml=jml.pjml(jnp.broadcast_to(J_F, (len(lams), m, n)), G_lams),
    )

  q = _run(quantities, params, x)
  J_F, s, d, lams = q['J_F'], q['s'], q['pjml'], q['lams']
  assert q['pjml_of_pjmc'] < 1e-10
  loss = lambda G, lam: _fro2(G @ J_F - np.eye(n)) + lam * _fro2(G)
  for lam in (1.0, 1e-2):
    G = np.asarray(tikhonov_minimiser(J_F, lam))
    np.testing.assert_allclose(G, np.linalg.inv(J_F.T @ J_F + lam * np.eye(n)) @ J_F.T, atol=1e-10)
    grad = 2 * (G @ J_F - np.eye(n)) @ J_F.T + 2 * lam * G
    np.testing.assert_allclose(grad, 0.0, atol=1e-10)
    for _ in range(5):
      delta = rng.normal(size=G.shape) * 0.1
      inc = loss(G + delta, lam) - loss(G, lam)
      assert inc == pytest.approx(_fro2(delta @ J_F) + lam * _fro2(delta), rel=1e-8)
      assert inc > 0
  assert np.all(np.diff(d) < 0), d
  np.testing.assert_allclose(d[4:] / lams[4:], np.sqrt(np.sum(s**-6.0)), rtol=1e-2)
  # The pseudo-inverse itself is not a minimiser for lam > 0 (the limit is not trivial).
  assert loss(q['J_pinv'], 1.0) > loss(np.asarray(tikhonov_minimiser(J_F, 1.0)), 1.0) + 1e-6


# --------------------------------------------------------------------------------------
# Proposition 3: the local difference reconstruction loss (Ernoult et al. 2022).


def _linear_block(rng, block):
  """A linear library block (Dense with bias, or a small Conv with bias) and an input."""
  if block == 'dense':
    n, m = _dims(rng, rng.choice(['square', 'tall', 'wide']))
    return _dense_net(m, use_bias=True), _randn(rng, 20, n)
  conv = L.Conv(int(rng.integers(2, 4)), (3, 3), strides=(int(rng.integers(1, 3)),) * 2)
  return network.Net((conv,), name='conv'), _randn(rng, 4, 4, 4, 2)


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('block', ['dense', 'conv'])
@pytest.mark.parametrize('which', ['random', 'transpose'])
def test_prop3_ldrl_expectation(seed, block, which):
  """E[LDRL] / sigma^2 = ||G||_F^2 - 2 tr(G J) = ||G - J^T||_F^2 - ||J||_F^2 per example,
  i.e. TJML^2 - ||J_F||_F^2, with

    LDRL = -2 dx^T (G(F(x + dx)) - G(F(x))) + ||G(F(x) + dy) - G(F(x))||^2

  (the library's ``ldrl_loss``, with its own noise; no factor 1/2 on either term).

  Derivation (linear G and affine F, dx ~ N(0, sigma^2 I_n), dy ~ N(0, sigma^2 I_m)
  independent): the LDRL is -2 dx^T G J dx + ||G dy||^2; E[dx^T G J dx] = sigma^2 tr(G J),
  E||G dy||^2 = sigma^2 ||G||_F^2, and ||G - J^T||_F^2 = ||G||_F^2 - 2 tr(G J) + ||J||_F^2.
  So the LDRL is minimised exactly at G = J^T (TJMC: the feedback weights are the forward
  ones), where its expectation is -||J||_F^2 (not 0: it converges to zero only after adding
  ||J||_F^2). J and J_G are the library's Jacobians; the TJML is ``jml.tjml``. sigma is
  drawn from [0.1, 2]."""
  rng = np.random.default_rng(seed)
  net, x = _linear_block(rng, block)
  params = _params(net, x, rng)
  fb_params = params if which == 'transpose' else _mixed_feedback(params, rng)
  sigma = float(rng.uniform(0.1, 2))

  def quantities(params, fb_params, x, keys):
    J_F, J_G = _example_jacobians(net, params, fb_params, x)
    return dict(
        J_F=J_F,
        J_G=J_G,
        tjml=jml.tjml(J_F, J_G),
        samples=jax.vmap(lambda k: _ldrl_loss(net, params, fb_params, x, k, sigma))(keys)
        / sigma**2,
    )

  q = _run(quantities, params, fb_params, x, _keys(seed, 1000))
  J_F, J_G = q['J_F'], q['J_G']
  expected = q['tjml'] ** 2 - _fro2(J_F)
  assert expected == pytest.approx(_fro2(J_G) - 2 * np.trace(J_G @ J_F), rel=1e-10, abs=1e-10)
  # A factor 1/2 on either term would give these values instead: they are rejected.
  wrong = [0.5 * _fro2(J_G) - 2 * np.trace(J_G @ J_F), _fro2(J_G) - np.trace(J_G @ J_F)]
  _assert_mc_equal(q['samples'], expected, wrong=wrong)
  if which == 'transpose':
    assert q['tjml'] < 1e-12
    _assert_mc_equal(q['samples'], -_fro2(J_F), wrong=[0.0])


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_prop3_minimiser_is_transpose(seed):
  """phi(B) = E[LDRL] / sigma^2 = ||B||_F^2 - 2 tr(B W^T) (B the feedback kernel, W the
  forward kernel of a Dense block: J_G = B, J = W^T) has gradient 2 B - 2 W: its unique
  minimiser is B = W, the TJMC feedback. Checked on the library's LDRL with its own noise:
  at B = W the gradient of the LDRL w.r.t. the feedback kernel has mean 0 (every entry
  within K standard errors); at B = W + delta its mean along delta is
  2 sigma^2 ||delta||^2; and, with common noise, phi(W + delta) - phi(W) = ||delta||_F^2."""
  rng = np.random.default_rng(seed)
  net, x = _linear_block(rng, 'dense')
  params = _params(net, x, rng)
  delta = 0.3 * _randn(rng, *params[0]['kernel'].shape)
  sigma, num = float(rng.uniform(0.1, 2)), 2000

  def sample(params, delta, key):
    """(gradient at W, gradient at W + delta along delta, LDRL(W + delta) - LDRL(W))."""
    with_kernel = lambda kernel: ({**params[0], 'kernel': kernel},)
    ldrl_of = lambda kernel: _ldrl_loss(net, params, with_kernel(kernel), x, key, sigma)
    W = params[0]['kernel']
    return (
        jax.grad(ldrl_of)(W),
        jnp.sum(jax.grad(ldrl_of)(W + delta) * delta),
        ldrl_of(W + delta) - ldrl_of(W),
    )

  at_w, along, change = _run(jax.vmap(sample, (None, None, 0)), params, delta, _keys(seed, num))
  means, ses = at_w.mean(0), at_w.std(0, ddof=1) / np.sqrt(num)
  assert np.all(np.abs(means) <= K * ses), (means, ses)
  _assert_mc_equal(along / (sigma**2 * _fro2(delta)), 2.0, wrong=[1.0, 3.0])
  _assert_mc_equal(change / sigma**2, _fro2(delta), wrong=[0.5 * _fro2(delta), 2 * _fro2(delta)])


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_prop3_nonlinear_small_noise_limit(seed):
  """For a nonlinear block F(x) = tanh(x W + b) and its learned feedback
  G(t) = tanh(t) B^T (both nonlinear), as sigma -> 0

    E[LDRL] / sigma^2 = ||J_G - J_F^T||_F^2 - ||J_F||_F^2 + c sigma^2 + O(sigma^4),

  with J_F = J_F(x), J_G = J_G(F(x)): the squared TJML of the block at x minus ||J_F||^2,
  from the library. Derivation: G(F(x + dx)) - G(F(x)) = J_G J_F dx + (quadratic) +
  (cubic) + ..., and G(y + dy) - G(y) likewise; the linear parts give Prop. 3's value
  exactly, the odd moments of the Gaussian noise vanish, and the first correction is of
  order sigma^4 (sigma^2 after dividing by sigma^2).

  Estimator: E[LDRL] = E[LDRL_lin] + E[LDRL - LDRL_lin], where LDRL_lin is the library's
  LDRL of the linearised block (Dense kernel J_F^T, feedback kernel J_G) with the same key,
  hence the same noise, and its expectation is Prop. 3's exact value. The second term is
  sampled with antithetic pairs (the library's loss at sigma and -sigma: noise -dx, -dy)
  and common random numbers across sigma (the same keys: dx = sigma z). Its scaled mean
  q(sigma) = E[LDRL - LDRL_lin] / sigma^4 tends to c: at sigma = 0.02 it is resolved
  (nonzero beyond K standard errors), and the paired change from sigma = 0.04 is within
  K standard errors plus a quarter of |q(0.02)|, so the error shrinks like sigma^2
  (an error shrinking like sigma would halve q, and is rejected). Plain Monte Carlo of the
  full LDRL agrees with the limit at sigma = 0.05 within K standard errors plus
  |q| sigma^2, and rejects the value without the cross term, ||J_G||_F^2.
  """
  rng = np.random.default_rng(seed)
  n, m = _dims(rng, rng.choice(['square', 'tall', 'wide']))
  net = network.Net((L.Sequential([L.Dense(m), L.Activation('tanh')]),), name='tanh')
  x = _randn(rng, 1, n)
  params = _params(net, x, rng)
  fb_params = _mixed_feedback(params, rng)
  J_F, J_G = _run(lambda p, fb, x: _example_jacobians(net, p, fb, x), params, fb_params, x)
  limit = float(jml.tjml(J_F, J_G)) ** 2 - _fro2(J_F)
  lin_net, sigma = _dense_net(m, use_bias=False), 0.05

  def sample(params, fb_params, lin_params, lin_fb, key):
    """q at sigma = 0.04 and 0.02 (common noise), and the plain LDRL at sigma (own noise)."""

    def scaled_error(s):
      err = lambda s: (
          _ldrl_loss(net, params, fb_params, x, key, s)
          - _ldrl_loss(lin_net, lin_params, lin_fb, x, key, s)
      )
      return 0.5 * (err(s) + err(-s)) / s**4

    plain = _ldrl_loss(net, params, fb_params, x, jax.random.fold_in(key, 1), sigma)
    return scaled_error(0.04), scaled_error(0.02), plain / sigma**2

  q_large, q_small, plain = _run(
      jax.vmap(sample, (None, None, None, None, 0)),
      params,
      fb_params,
      ({'kernel': J_F.T},),
      ({'kernel': J_G},),
      _keys(seed, 40000),
  )
  q_mean, q_se = _mc_mean(q_small)
  assert abs(q_mean) > K * q_se, (q_mean, q_se)  # the O(sigma^2) error is resolved
  d_mean, d_se = _mc_mean(q_large - q_small)
  assert abs(d_mean) <= K * d_se + 0.25 * abs(q_mean), (d_mean, d_se, q_mean)
  mean, se = _mc_mean(plain)
  assert abs(mean - limit) <= K * se + abs(q_mean) * sigma**2, (mean, se, limit)
  assert abs(mean - _fro2(J_G)) > K * se + abs(q_mean) * sigma**2  # the cross term counts
