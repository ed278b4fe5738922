"""Propositions 1-3 of Bao et al. (2024) in precise form, checked by Monte Carlo.

Setting: a linear block F(x) = J x with J in R^{m x n} and a linear feedback
G(y) = G y with G in R^{n x m}. Noise is Gaussian, eps ~ N(0, sigma^2 I).

Every Monte-Carlo assertion uses a tolerance derived from the sample: the mean of N
i.i.d. samples with sample standard deviation s is within K * s / sqrt(N) of its
expectation (CLT) with K = 5 (two-sided failure probability ~6e-7 per assertion). Each
test also checks that the tolerance is tight enough to reject a wrong constant, so the
test can fail. Linear algebra is in float64 numpy.
"""

from __future__ import annotations

import numpy as np
import pytest

K = 5.0  # CLT multiplier


def _rng(seed):
  return np.random.default_rng(seed)


def _mc_mean(samples):
  """(mean, standard error of the mean) of a 1-D sample."""
  samples = np.asarray(samples, np.float64)
  return samples.mean(), samples.std(ddof=1) / np.sqrt(samples.size)


def _assert_mc_equal(samples, expected, wrong=None):
  """E[samples] == expected within K standard errors; ``wrong`` values must be rejected."""
  mean, se = _mc_mean(samples)
  assert abs(mean - expected) <= K * se, (mean, se, expected)
  for w in np.atleast_1d(wrong if wrong is not None else []):
    assert abs(mean - w) > K * se, f'tolerance {K * se} too loose to reject {w} (mean {mean})'


def _fro2(a):
  return float(np.sum(np.square(a)))


# --------------------------------------------------------------------------------------
# Proposition 1: the reconstruction loss vanishes for all inputs <=> G J = I.


def lrl(G, J, x):
  """LRL = ||G J x - x||^2 per row of x (x already includes the noise: x + eps)."""
  r = x @ (G @ J).T - x
  return np.sum(r * r, axis=-1)


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('m,n', [(5, 5), (8, 5)])
def test_prop1_lrl_vanishes_when_GJ_is_identity(seed, m, n):
  """<=: G J = I (G = J^-1 for square J, G = J^+ for tall full-column-rank J)
  makes LRL(x + eps) = 0 for every input (checked on 1000 random points, relative to
  ||x + eps||^2 at float64 precision)."""
  rng = _rng(seed)
  J = rng.normal(size=(m, n))
  G = np.linalg.inv(J) if m == n else np.linalg.pinv(J)
  np.testing.assert_allclose(G @ J, np.eye(n), atol=1e-10)
  x = rng.normal(size=(1000, n)) * rng.uniform(0.1, 10) + rng.normal(size=(1000, n)) * 0.1
  assert np.all(lrl(G, J, x) <= 1e-20 * np.sum(x * x, axis=-1) + 1e-24)


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('m,n,kind', [(5, 5, 'random'), (8, 5, 'random'),
                                      (3, 6, 'pinv_of_wide'), (5, 5, 'transpose')])
def test_prop1_lrl_positive_somewhere_when_GJ_not_identity(seed, m, n, kind):
  """=>, by contraposition: if G J != I, LRL is positive on an input. Precisely,
  sum_i LRL(e_i) = ||G J - I||_F^2 over the standard basis, so LRL == 0 everywhere
  forces G J = I; and the top right-singular vector u of G J - I gives
  LRL(u) = sigma_max(G J - I)^2 > 0. For a wide J (m < n), even G = J^+ fails:
  G J = J^+ J is the projector onto the row space, LRL(x) = ||P_null x||^2, whose
  Gaussian mean is sigma^2 (n - m)."""
  rng = _rng(seed)
  J = rng.normal(size=(m, n))
  G = {'random': lambda: rng.normal(size=(n, m)), 'pinv_of_wide': lambda: np.linalg.pinv(J),
       'transpose': lambda: J.T}[kind]()
  D = G @ J - np.eye(n)
  assert np.sum(lrl(G, J, np.eye(n))) == pytest.approx(_fro2(D), rel=1e-12)
  _, s, vt = np.linalg.svd(D)
  assert lrl(G, J, vt[:1])[0] == pytest.approx(s[0] ** 2, rel=1e-10)
  assert s[0] ** 2 > 1e-3
  if kind == 'pinv_of_wide':
    sigma = 0.7
    x = rng.normal(size=(20000, n)) * sigma
    _assert_mc_equal(lrl(G, J, x) / sigma ** 2, n - m, wrong=[n - m + 0.5, n])


# --------------------------------------------------------------------------------------
# Proposition 2: the difference reconstruction loss (Meulemans et al. 2020).


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('m,n,sigma', [(4, 6, 0.1), (6, 4, 1.0), (5, 5, 3.0)])
def test_prop2_drl_expectation_is_frobenius(seed, m, n, sigma):
  """E_eps ||G J eps - eps||^2 / sigma^2 = ||G J - I||_F^2 for eps ~ N(0, sigma^2 I_n).

  Derivation: with D = G J - I, E ||D eps||^2 = E tr(D eps eps^T D^T) = sigma^2 tr(D D^T).
  The DRL of a linear pair, ||G(F(x + eps)) - G(F(x)) - eps||^2, is exactly this, for
  every x."""
  rng = _rng(seed)
  J, G = rng.normal(size=(m, n)), rng.normal(size=(n, m)) / np.sqrt(m)
  x = rng.normal(size=(1, n))
  eps = rng.normal(size=(40000, n)) * sigma
  drl = np.sum(np.square((x + eps) @ (G @ J).T - x @ (G @ J).T - eps), axis=-1)
  target = _fro2(G @ J - np.eye(n))
  _assert_mc_equal(drl / sigma ** 2, target, wrong=[0.9 * target, 1.1 * target])


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
  return J.T @ np.linalg.inv(J @ J.T + lam * np.eye(m))


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('m,n,rank', [(4, 6, 4), (6, 4, 4), (5, 5, 3)])
def test_prop2_tikhonov_minimiser_tends_to_pinv(seed, m, n, rank):
  """G_lam is the minimiser (zero gradient, every perturbation increases the loss by
  exactly ||delta (J J^T + lam I)^{1/2}||^2 > 0), and ||G_lam - J^+||_F decreases strictly
  and linearly in lam (ratio 10 per decade) to 0, also for a rank-deficient J."""
  rng = _rng(seed)
  J = rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n))
  J_pinv = np.linalg.pinv(J)
  s = np.linalg.svd(J, compute_uv=False)[:rank]
  loss = lambda G, lam: _fro2(G @ J - np.eye(n)) + lam * _fro2(G)
  for lam in (1.0, 1e-2):
    G = tikhonov_minimiser(J, lam)
    np.testing.assert_allclose(G, np.linalg.inv(J.T @ J + lam * np.eye(n)) @ J.T, atol=1e-10)
    grad = 2 * (G @ J - np.eye(n)) @ J.T + 2 * lam * G
    np.testing.assert_allclose(grad, 0.0, atol=1e-10)
    for _ in range(5):
      delta = rng.normal(size=G.shape) * 0.1
      inc = loss(G + delta, lam) - loss(G, lam)
      assert inc == pytest.approx(_fro2(delta @ J) + lam * _fro2(delta), rel=1e-8)
      assert inc > 0
  lams = 10.0 ** -np.arange(0, 7)
  d = np.array([np.linalg.norm(tikhonov_minimiser(J, lam) - J_pinv) for lam in lams])
  assert np.all(np.diff(d) < 0), d
  np.testing.assert_allclose(d[4:] / lams[4:], np.sqrt(np.sum(s ** -6.0)), rtol=1e-2)
  # The pseudo-inverse itself is not a minimiser for lam > 0 (the limit is not trivial).
  assert loss(J_pinv, 1.0) > loss(tikhonov_minimiser(J, 1.0), 1.0) + 1e-6


# --------------------------------------------------------------------------------------
# Proposition 3: the local difference reconstruction loss (Ernoult et al. 2022).


def ldrl_linear(G, J, dx, dy):
  """LDRL = -2 dx^T (G J dx) + ||G dy||^2, per row of dx (n) and dy (m).

  This is the reference's -2 sum dx * (G(F(x + dx)) - G(F(x))) + sum (G(y + dy) - G(y))^2
  for linear F and G: no factor 1/2 on either term.
  """
  return -2 * np.sum(dx * (dx @ (G @ J).T), axis=-1) + np.sum(np.square(dy @ G.T), axis=-1)


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('m,n,sigma,which', [(4, 6, 0.1, 'random'), (6, 4, 1.0, 'random'),
                                             (5, 5, 0.3, 'transpose')])
def test_prop3_ldrl_expectation(seed, m, n, sigma, which):
  """E[LDRL] / sigma^2 = ||G||_F^2 - 2 tr(G J) = ||G - J^T||_F^2 - ||J||_F^2.

  Derivation (dx ~ N(0, sigma^2 I_n), dy ~ N(0, sigma^2 I_m) independent):
  E[dx^T G J dx] = sigma^2 tr(G J), E||G dy||^2 = sigma^2 tr(G^T G) = sigma^2 ||G||_F^2,
  and ||G - J^T||_F^2 = ||G||_F^2 - 2 tr(G J) + ||J||_F^2 (tr(G^T J^T) = tr(J G) =
  tr(G J)). So the LDRL is minimised exactly at G = J^T (TJMC), where its expectation is
  -||J||_F^2 (not 0: it converges to zero only after adding ||J||_F^2), and E[LDRL] /
  sigma^2 + ||J||_F^2 is the squared TJML."""
  rng = _rng(seed)
  J = rng.normal(size=(m, n))
  # 'random': a random G with a sizeable cross term tr(G J) ~ ||J||^2 / 2, so that a
  # wrong factor on it is detectable.
  G = J.T.copy() if which == 'transpose' else rng.normal(size=(n, m)) * 0.5 + 0.5 * J.T
  N = 60000
  dx, dy = rng.normal(size=(N, n)) * sigma, rng.normal(size=(N, m)) * sigma
  samples = ldrl_linear(G, J, dx, dy) / sigma ** 2
  expected = _fro2(G) - 2 * np.trace(G @ J)
  assert expected == pytest.approx(_fro2(G - J.T) - _fro2(J), rel=1e-10)
  # A factor 1/2 on either term would give these values instead: they are rejected.
  wrong = [0.5 * _fro2(G) - 2 * np.trace(G @ J), _fro2(G) - np.trace(G @ J)]
  _assert_mc_equal(samples, expected, wrong=wrong)
  if which == 'transpose':
    _assert_mc_equal(samples, -_fro2(J), wrong=[0.0])


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_prop3_minimiser_is_transpose(seed):
  """phi(G) = ||G||_F^2 - 2 tr(G J) has gradient 2 G - 2 J^T: its unique minimiser is
  G = J^T, and phi(J^T + delta) - phi(J^T) = ||delta||_F^2 exactly."""
  rng = _rng(seed)
  J = rng.normal(size=(4, 7))
  phi = lambda G: _fro2(G) - 2 * np.trace(G @ J)
  assert phi(J.T) == pytest.approx(-_fro2(J), rel=1e-12)
  for _ in range(10):
    delta = rng.normal(size=(7, 4)) * rng.uniform(1e-3, 1)
    assert phi(J.T + delta) - phi(J.T) == pytest.approx(_fro2(delta), rel=1e-8, abs=1e-12)


def _tanh_layer(seed, m=5, n=6):
  rng = _rng(seed)
  W = rng.normal(size=(m, n)) / np.sqrt(n)
  b = rng.normal(size=m) * 0.5
  x = rng.normal(size=n)
  G = 0.5 * rng.normal(size=(n, m)) / np.sqrt(m) + W.T  # sizeable cross term tr(G J)
  return W, b, x, G


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_prop3_nonlinear_small_noise_limit(seed):
  """For F(x) = tanh(W x + b) and a linear G, with
  LDRL = -2 dx^T (G F(x + dx) - G F(x)) + ||G (F(x) + dy) - G F(x)||^2,

    E[LDRL] / sigma^2 = ||G - J(x)^T||_F^2 - ||J(x)||_F^2 + c sigma^2 + O(sigma^4),
    J(x) = diag(tanh'(z)) W, z = W x + b,  c = -sum_k tanh'''(z_k) (g_k . w_k) ||w_k||^2

  (g_k: column k of G, w_k: row k of W). Derivation: F(x + dx) - F(x) = J dx + R(dx),
  R's quadratic part is even in dx and drops out of E[dx^T G R]; its cubic part
  tanh'''(z_k) (w_k . dx)^3 / 6 contributes, by Isserlis, E[(g.dx)(w.dx)^3] =
  3 sigma^4 (g.w) ||w||^2. So the error of the linearised value shrinks like sigma^2.

  Estimator: E[LDRL] = E[LDRL_lin] + E[LDRL - LDRL_lin], where LDRL_lin uses J dx in
  place of F(x + dx) - F(x) and its expectation is exact (Proposition 3, tested above);
  the second term is sampled with antithetic pairs (dx, -dx) and common random numbers
  dx = sigma z across sigma. At sigma = 0.04 and 0.02, err / sigma^2 equals c within
  K standard errors plus an O(sigma^2) remainder allowance 10 sigma^2 max(|c|, 1); the
  paired change of err / sigma^2 between the two sigmas is within the same kind of
  bound, so err(0.04) / err(0.02) = 4 (the error shrinks like sigma^2). Plain Monte
  Carlo of the full LDRL (no control variate) agrees with the limit at sigma = 0.05.
  """
  W, b, x, G = _tanh_layer(seed)
  z = W @ x + b
  t = np.tanh(z)
  Jx = (1 - t ** 2)[:, None] * W
  limit = _fro2(G - Jx.T) - _fro2(Jx)
  tanh3 = (1 - t ** 2) * (6 * t ** 2 - 2)
  c = -np.sum(tanh3 * np.sum(G.T * W, axis=1) * np.sum(W * W, axis=1))
  rng = _rng(100 + seed)
  F = lambda xs: np.tanh(xs @ W.T + b)
  zs = rng.normal(size=(80000, x.size))
  scaled = {}  # per-sample (LDRL - LDRL_lin) / sigma^2, divided once more by sigma^2
  sigmas = (0.04, 0.02)
  for sigma in sigmas:
    pair = []
    for sign in (1.0, -1.0):
      dx = sign * sigma * zs
      R = F(x + dx) - F(x[None]) - dx @ Jx.T
      pair.append(-2 * np.sum(dx * (R @ G.T), axis=-1))
    scaled[sigma] = 0.5 * (pair[0] + pair[1]) / sigma ** 4
    mean, se = _mc_mean(scaled[sigma])
    assert abs(mean - c) <= K * se + 10 * sigma ** 2 * max(abs(c), 1.0), (sigma, mean, c)
    assert abs(mean) > K * se  # the O(sigma^2) error is resolved, not noise
  (m1, m2), (s1, s2) = (scaled[s].mean() for s in sigmas), sigmas
  d_mean, d_se = _mc_mean(scaled[s1] - scaled[s2])
  bound = K * d_se + 10 * (s1 ** 2 - s2 ** 2) * max(abs(c), 1.0)
  assert abs(d_mean) <= bound
  ratio = (m1 * s1 ** 2) / (m2 * s2 ** 2)
  assert abs(ratio - (s1 / s2) ** 2) <= (s1 / s2) ** 2 * bound / (abs(m2) - bound), ratio
  # Plain Monte Carlo of the full nonlinear LDRL at a small sigma.
  sigma, N = 0.05, 60000
  dx = rng.normal(size=(N, x.size)) * sigma
  dy = rng.normal(size=(N, W.shape[0])) * sigma
  ldrl = (-2 * np.sum(dx * ((F(x + dx) - F(x[None])) @ G.T), axis=-1)
          + np.sum(np.square(dy @ G.T), axis=-1))
  mean, se = _mc_mean(ldrl / sigma ** 2)
  assert abs(mean - limit) <= K * se + abs(c) * sigma ** 2
  assert abs(mean - _fro2(G)) > K * se  # not the value without the cross term
