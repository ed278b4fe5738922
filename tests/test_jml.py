"""Tests of tp_jax.jml: the Jacobian matching losses, exact and matrix-free.

* exact TJML / IJML / PJML are 0 where the theory says (TJMC blocks; IJMC on a square
  invertible dense+activation block; PJMC on dense), and TJMC is not mistaken for IJMC;
* LayerNorm's TJML equals the predicted ||x^|| ||gamma * x^|| / (d sqrt(s)) per example
  (1/sqrt(s) and relative 1/sqrt(d - 2) for gamma = 1);
* the matrix-free estimate agrees with the exact value within a few standard errors on
  small blocks with a deliberately perturbed feedback, its standard error is
  calibrated, and it is ~0 for an exact feedback;
* errors: IJML of a non-square block, IJML/PJML without Jacobians, unknown kinds.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tp_jax import algorithms
from tp_jax import config as config_lib
from tp_jax import jml
from tp_jax import layers as L
from tp_jax import models
from tp_jax import network

POOL3 = dict(window=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@pytest.fixture(autouse=True)
def _fast_compiles(monkeypatch):
  """-O0: these tests compile many tiny programs once each (compile time dominates)."""
  monkeypatch.setattr(jml, 'COMPILER_OPTIONS', {'xla_backend_optimization_level': 0})


def _net(*blocks):
  return network.Net(tuple(blocks), name='test')


def _perturbed(params, scale, seed=0):
  """Feedback params: every kernel plus scale * std(kernel) * N(0, 1) noise."""
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    if str(getattr(path[-1], 'key', '')) != 'kernel':
      return a
    return a + scale * jnp.std(a) * jnp.asarray(rng.standard_normal(a.shape), a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, params)


def _randn(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _init(net, x, seed=0):
  """network.init's structure, values drawn with numpy (kernels N(0, 1/fan_in), biases
  N(0, 0.01), LayerNorm scales 1): XLA:CPU compiles a threefry / truncated-normal
  program per new shape (~0.3-1.5 s each), which would dominate these small tests."""
  abstract = jax.eval_shape(lambda h: network.init(net, jax.random.PRNGKey(0), h), x)
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    name = str(getattr(path[-1], 'key', ''))
    if name == 'kernel':
      v = rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))
    elif name == 'scale':
      v = np.ones(a.shape)
    else:
      v = 0.1 * rng.standard_normal(a.shape)
    return jnp.asarray(v, a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


# --------------------------------------------------------------------------------------
# Matrix functions


def test_matrix_losses():
  rng = np.random.default_rng(0)
  J = jnp.asarray(rng.normal(size=(3, 5, 5)), jnp.float32)
  assert np.allclose(jml.tjml(J, jnp.swapaxes(J, 1, 2)), 0)
  assert np.allclose(jml.ijml(J, jnp.linalg.inv(J), relative=True), 0, atol=1e-5)
  assert np.allclose(jml.pjml(J, jnp.linalg.pinv(J), relative=True), 0, atol=1e-5)
  G = jnp.asarray(rng.normal(size=(3, 5, 5)), jnp.float32)
  np.testing.assert_allclose(
      jml.tjml(J, G), np.linalg.norm(G - np.swapaxes(J, 1, 2), axis=(1, 2)), rtol=1e-5
  )
  np.testing.assert_allclose(
      jml.tjml(J, G, relative=True), jml.tjml(J, G) / np.linalg.norm(J, axis=(1, 2)), rtol=1e-5
  )
  tall = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
  assert float(jml.pjml(tall, jnp.linalg.pinv(tall), relative=True)) < 1e-5
  with pytest.raises(jml.JMLError, match=r'square.*\(7, 4\)'):
    jml.ijml(tall, tall.T)
  with pytest.raises(jml.JMLError, match=r'J_F \(7, 4\) and J_G \(7, 4\)'):
    jml.tjml(tall, tall)
  with pytest.raises(jml.JMLError, match='unknown JML kind'):
    jml.jml(J, G, 'xjml')


def test_jacobians_match_direct_per_example_jacfwd():
  """``jacobians`` returns per-example (n_out x n_in) and (n_in x n_out) matrices equal
  to jax.jacfwd of the single-example maps (ctx sliced per example)."""
  layer = L.Sequential([L.Conv(3, (3, 3), (2, 2)), L.Activation('elu'), L.MaxPool()])
  B = 2
  x = _randn(seed=0, shape=(B, 8, 8, 2))
  p = _init(network.Net((layer,)), x, 1)[0]
  f = lambda h: layer.apply({'params': p}, h, method='fwd')[0]
  g = lambda t, c: layer.apply({'params': p}, t, c, L.TJMC_HADAMARD, method='feedback')
  y, ctx = layer.apply({'params': p}, x, method='fwd')
  J_F, J_G = jax.jit(lambda *a: jml.jacobians(f, g, *a))(x, y, ctx)
  assert J_F.shape == (B, y[0].size, x[0].size) and J_G.shape == (B, x[0].size, y[0].size)

  @jax.jit
  def direct(x, y, ctx):  # the whole-batch Jacobians, then their diagonal blocks
    jf = jax.jacfwd(f)(x).reshape(B, y[0].size, B, x[0].size)
    jg = jax.jacfwd(lambda t: g(t, ctx))(y).reshape(B, x[0].size, B, y[0].size)
    return jf, jg

  jf, jg = direct(x, y, ctx)
  for b in range(B):
    np.testing.assert_allclose(J_F[b], jf[b, :, b], atol=1e-6)
    np.testing.assert_allclose(J_G[b], jg[b, :, b], atol=1e-6)
    assert float(jnp.abs(jf[b, :, 1 - b]).max()) == 0.0  # no mixing across examples
  np.testing.assert_allclose(jml.tjml(J_F, J_G, relative=True), 0, atol=2e-6)


# --------------------------------------------------------------------------------------
# Exact values where the theory gives them


def _small_net_and_input():
  net = _net(
      L.Sequential(
          [
              L.Conv(4, (5, 5), padding=((2, 2), (2, 2))),
              L.Activation('leaky_relu', 0.1),
              L.MaxPool(**POOL3),
          ]
      ),
      L.Sequential([L.Conv(4, (3, 3)), L.Activation('elu'), L.MaxPool()]),
      L.Sequential([L.Flatten(), L.Dense(6), L.Activation('tanh')]),
      L.Sequential([L.Dense(6), L.Activation('leaky_relu', 0.2)]),  # square
      L.Sequential([L.Dense(3)]),
  )
  x = _randn(seed=0, shape=(3, 8, 8, 1))
  return net, x, _init(net, x, 1)


def test_exact_jmls_vanish_where_theory_says():
  """TJMC (integral and Hadamard) gives TJML = 0 on a conv-ELU-pool2x2 block (one
  activation, non-overlapping pool); IJMC gives IJML = 0 on the square invertible
  dense+LeakyReLU block (J_G = W^-T diag(1/sigma'(a)) = J_F^-1 at h_{n+1}); PJMC gives
  PJML = 0 on the last dense block. TJMC's IJML and PJMC's TJML are not 0 there."""
  net, x, params = _small_net_and_input()
  # Random block inputs of the right shapes (the theory holds at any input).
  shapes = jax.eval_shape(lambda p, h: network.forward(net, p, h)[0], params, x)
  h_in = (x, *(_randn(h.shape, seed=20 + i) for i, h in enumerate(shapes[:-1])))
  # Several feedbacks / kinds sharing one J_F (the path ``report`` takes).
  tj_int, tj_had = [
      v['tjml'][1]
      for v in jml._exact_losses(
          net, params, [(params, L.TJMC), (params, L.TJMC_HADAMARD)], 1, h_in[1], ['tjml']
      )
  ]
  assert tj_int.shape == (3,) and tj_int.max() < 2e-6 and tj_had.max() < 2e-6
  ij_ijmc, ij_tjmc = [
      v['ijml'][1].mean()
      for v in jml._exact_losses(
          net, params, [(params, L.IJMC), (params, L.TJMC)], 3, h_in[3], ['ijml']
      )
  ]
  assert ij_ijmc < 1e-5 and ij_tjmc > 0.1, (ij_ijmc, ij_tjmc)
  r = jml.block_jml(net, params, params, 4, h_in[4], L.PJMC, 'pjml')
  assert r.exact and r.relative < 1e-5 and r.per_example_relative.shape == (3,), r
  assert (r.in_dim, r.out_dim, r.stderr_relative) == (6, 3, 0.0)
  tj = jml._exact_losses(net, params, [(params, L.PJMC)], 4, h_in[4], ['tjml'])[0]['tjml']
  assert tj[1].mean() > 0.1


@pytest.mark.parametrize('unit_gamma', [True, False])
def test_layernorm_tjml_is_predicted(unit_gamma):
  """LayerNorm: J_G - J_F^T = x^ x^T diag(gamma) / (d sqrt(s)) (the dropped term), so
  TJML = ||x^|| ||gamma * x^|| / (d sqrt(s)) per example; for gamma = 1 and var >> eps,
  ||x^||^2 = d var / s ~ d, TJML ~ 1/sqrt(s) and the relative value ~ 1/sqrt(d - 2)
  (J_F sqrt(s) = P - x^x^T/d is a projector of rank d - 2)."""
  d, B = 16, 4
  net = _net(L.Sequential([L.LayerNorm()]))
  x = _randn(seed=2, shape=(B, d)) * jnp.arange(1, B + 1)[:, None]
  params = _init(net, x, 3)
  if not unit_gamma:
    params = (
        {
            'layers_0': {
                'scale': 1 + 0.5 * _randn(seed=4, shape=(d,)),
                'bias': params[0]['layers_0']['bias'],
            }
        },
    )
  gamma = np.asarray(params[0]['layers_0']['scale'], np.float64)
  xs = np.asarray(x, np.float64)
  mu = xs.mean(-1, keepdims=True)
  s = ((xs - mu) ** 2).mean(-1, keepdims=True) + 1e-5
  xh = (xs - mu) / np.sqrt(s)
  predicted = (
      np.linalg.norm(xh, axis=-1) * np.linalg.norm(gamma * xh, axis=-1) / (d * np.sqrt(s[:, 0]))
  )
  r = jml.block_jml(net, params, params, 0, x, L.TJMC, 'tjml')
  np.testing.assert_allclose(r.per_example_absolute, predicted, rtol=1e-4)
  assert r.absolute > 0.05  # measured, not zero
  if unit_gamma:
    np.testing.assert_allclose(r.per_example_absolute, 1 / np.sqrt(s[:, 0]), rtol=1e-4)
    np.testing.assert_allclose(r.per_example_relative, 1 / np.sqrt(d - 2), rtol=1e-4)


# --------------------------------------------------------------------------------------
# Matrix-free estimate


ESTIMATE_CASES = {
    'conv': (L.Sequential([L.Conv(4, (3, 3), (2, 2), ((1, 2), (0, 1)))]), (4, 9, 8, 3)),
    'lenet_block': (
        L.Sequential(
            [L.Conv(4, (5, 5), padding=((2, 2), (2, 2))), L.Activation('elu'), L.MaxPool(**POOL3)]
        ),
        (4, 10, 10, 2),
    ),
}


@pytest.mark.parametrize('case', sorted(ESTIMATE_CASES))
def test_estimate_agrees_with_exact(case):
  """Feedback kernels perturbed by 30% noise, so TJML != 0: the estimate of the absolute
  and relative TJML is within 4 standard errors of the exact value, the standard error is
  small enough for that to mean something (< 10% of the value). (With an exact feedback
  the estimate is ~0: test_estimate_handles_a_vgg_sized_conv_block.)"""
  block, shape = ESTIMATE_CASES[case]
  net = _net(block)
  x = _randn(seed=5, shape=shape)
  params = _init(net, x, 6)
  fb = _perturbed(params, 0.3)
  exact = jml.block_jml(net, params, fb, 0, x, L.TJMC, exact=True)
  est = jml.block_jml(
      net, params, fb, 0, x, L.TJMC, exact=False, num_probes=128, key=jax.random.PRNGKey(7)
  )
  assert exact.exact and not est.exact and est.num_probes == 128
  assert exact.relative > 0.05
  for name in ('absolute', 'relative'):
    e, v, se = getattr(exact, name), getattr(est, name), getattr(est, 'stderr_' + name)
    assert 0 < se < 0.1 * e, (name, se, e)
    assert abs(v - e) <= 4 * se, (name, v, e, se)


def test_estimate_standard_error_is_calibrated():
  """The delta-method standard error matches the spread of independent estimates: 24
  groups of 64 probes on the same batch; the empirical sd of the per-group estimates
  is within [0.6, 1.6] of the mean reported se (the sd of a sd from 24 samples is ~15%)."""
  block, shape = ESTIMATE_CASES['lenet_block']
  net = _net(block)
  x = _randn(seed=8, shape=(1, *shape[1:]))
  params = _init(net, x, 9)
  fb = _perturbed(params, 0.3, seed=1)
  f, g = jml.block_fns(net, params, fb, 0, L.TJMC)
  y, ctx = f(x)
  groups, k = 24, 64
  probes = np.random.default_rng(10).standard_normal((groups * k, *y.shape), np.float32)
  a2, t2 = jax.jit(lambda *a: jml.probe_stats(lambda h: f(h)[0], g, *a))(x, y, ctx, probes)
  a2 = np.asarray(a2, np.float64).reshape(groups, k, 1)
  t2 = np.asarray(t2, np.float64).reshape(groups, k, 1)
  stats = [jml._delta_method(a2[i], t2[i]) for i in range(groups)]
  for j in (0, 1):  # absolute, relative
    values = np.array([s[j][0] for s in stats])
    ses = np.array([s[2 + j][0] for s in stats])
    ratio = values.std(ddof=1) / ses.mean()
    assert 0.6 < ratio < 1.6, (j, ratio)


def test_estimate_handles_a_vgg_sized_conv_block():
  """The matrix-free path runs at a real size without materialising the Jacobian (a VGG
  block's Jacobian would be 131072 x 32768 per example) and gives TJML ~ 0 for TJMC."""
  net = _net(L.Sequential([L.Conv(128, (3, 3)), L.Activation('elu'), L.MaxPool()]))
  x = _randn(seed=11, shape=(1, 32, 32, 128))
  params = _init(net, x, 12)
  r = jml.block_jml(net, params, params, 0, x, L.TJMC, num_probes=4)
  assert not r.exact and r.in_dim == 32 * 32 * 128 and r.out_dim == 16 * 16 * 128
  assert r.relative < 1e-5


# --------------------------------------------------------------------------------------
# Errors and the report


def test_block_jml_errors():
  net, x, params = _small_net_and_input()
  h1 = jax.eval_shape(lambda h: network.block_forward(net, 0, params[0], h)[0], x)
  h1 = jnp.zeros(h1.shape, h1.dtype)  # only its shape matters for the errors below
  with pytest.raises(jml.JMLError, match=r'IJML is undefined for block 1: J_F is 16 x 64'):
    jml.block_jml(net, params, params, 1, h1, L.TJMC, 'ijml')
  # Block 0 is square (64 -> 64) but max-pooling drops inputs: J_F is singular.
  with pytest.raises(jml.JMLError, match=r'singular'):
    jml.block_jml(net, params, params, 0, x, L.TJMC, 'ijml')
  with pytest.raises(jml.JMLError, match='PJML has no matrix-free estimate'):
    jml.block_jml(net, params, params, 0, x, L.TJMC, 'pjml', exact=False)
  with pytest.raises(jml.JMLError, match='unknown JML kind'):
    jml.block_jml(net, params, params, 0, x, L.TJMC, 'jml')
  with pytest.raises(jml.JMLError, match='num_probes'):
    jml.block_jml(net, params, params, 0, x, L.TJMC, exact=False, num_probes=1)


def test_report_rows():
  """One row per block x feedback x defined kind: IJML only on the square block, IJMC
  refused by the conv block (no row), a too-large block estimated (max_exact_size)."""
  net = _net(
      L.Sequential([L.Conv(2, (3, 3)), L.Activation('leaky_relu', 0.1), L.MaxPool()]),
      L.Sequential([L.Flatten(), L.Dense(18), L.Activation('leaky_relu', 0.2)]),
  )
  x = _randn(seed=13, shape=(2, 6, 6, 1))
  params = _init(net, x, 14)
  fbs = {'tjmc': (params, L.TJMC), 'ijmc': (params, L.IJMC)}
  rows = jml.report(net, params, fbs, x, max_exact_size=36 * 18 - 1, num_probes=8)
  keys = [(r['block'], r['feedback'], r['kind']) for r in rows]
  assert sorted(keys) == sorted(
      [(0, 'tjmc', 'tjml')]
      + [(1, fb, k) for fb in ('tjmc', 'ijmc') for k in ('tjml', 'ijml', 'pjml')]
  )
  by = {k: r for k, r in zip(keys, rows)}
  assert by[(0, 'tjmc', 'tjml')]['method'] == 'estimated'
  assert by[(0, 'tjmc', 'tjml')]['relative'] < 1e-5
  assert by[(0, 'tjmc', 'tjml')]['used_by_dtp'] is False
  assert by[(1, 'ijmc', 'ijml')]['method'] == 'exact'
  assert by[(1, 'ijmc', 'ijml')]['relative'] < 1e-5
  assert by[(1, 'tjmc', 'tjml')]['relative'] < 1e-6
  assert by[(1, 'tjmc', 'ijml')]['relative'] > 0.1
  assert all(math.isfinite(r[k]) for r in rows for k in ('absolute', 'relative'))
  text = jml.format_rows(rows)
  assert 'Conv(2,3x3/1,SAME)' in text and 'estimated' in text and '6x6x1 -> 3x3x2' in text


# --------------------------------------------------------------------------------------
# float64 blocks


def test_float64_blocks_are_measured_in_float64():
  """With jax_enable_x64 a float64 block gets float64 probes (jax.jvp refuses tangents
  of another dtype) and float64 Jacobians: the estimate and the exact TJML of TJMC, and
  PJMC's exact PJML, are at float64 round-off; a perturbed feedback's estimate agrees
  with its exact value. (x64 is switched on only inside this test.)"""
  with jax.enable_x64(True):
    net = _net(L.Sequential([L.Dense(3)]), L.Sequential([L.Dense(2), L.Activation('tanh')]))
    x = jnp.asarray(np.random.default_rng(40).standard_normal((2, 4)))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), _init(net, x, 41))
    h1 = network.block_forward(net, 0, params[0], x)[0]
    assert h1.dtype == jnp.float64
    for exact in (False, True):
      r = jml.block_jml(net, params, params, 1, h1, L.TJMC, exact=exact, num_probes=8)
      assert r.exact == exact and r.relative < 1e-12, r
    assert jml.block_jml(net, params, params, 1, h1, L.PJMC, 'pjml').relative < 1e-12
    fb = _perturbed(params, 0.3, seed=42)
    exact = jml.block_jml(net, params, fb, 1, h1, L.TJMC, exact=True)
    est = jml.block_jml(net, params, fb, 1, h1, L.TJMC, exact=False, num_probes=256)
    assert abs(est.relative - exact.relative) <= 4 * est.stderr_relative, (est, exact)


# --------------------------------------------------------------------------------------
# IJMC and PJMC of composed blocks


def _biased(params, scale, seed):
  """params with every bias replaced by scale * N(0, 1)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype)
      if str(getattr(path[-1], 'key', '')) == 'bias'
      else a,
      params,
  )


def test_ijml_vanishes_on_a_two_dense_block_with_biases():
  """IJMC's dense feedback subtracts the bias, (t - b) W^-1: on [Dense, LeakyReLU, Dense,
  LeakyReLU] the inner activation's inverse is then taken at its own output, so
  J_G = J_F^-1 (IJML = 0) also with nonzero biases."""
  net = _net(
      L.Sequential(
          [L.Dense(5), L.Activation('leaky_relu', 0.2), L.Dense(5), L.Activation('leaky_relu', 0.2)]
      )
  )
  x = _randn(seed=43, shape=(4, 5))
  params = _biased(_init(net, x, 44), 1.0, seed=45)
  r = jml.block_jml(net, params, params, 0, x, L.IJMC, 'ijml')
  assert r.relative < 1e-5, r


def _act(fn='leaky_relu'):
  return L.Activation(fn, 0.2)


# (layers, input width): PJMC exact by the rule of ``pjmc_inexact_reason``?
PJMC_CASES = {
    'wide_dense_act': (lambda: [L.Dense(3), _act()], 6, True),
    'flatten_wide_dense_act': (lambda: [L.Reshape((-1,)), L.Dense(3), _act('tanh')], 6, True),
    'square_dense_act_square': (lambda: [L.Dense(5), _act(), L.Dense(5), _act()], 5, True),
    'tall_dense_alone': (lambda: [L.Dense(7)], 4, True),
    'act_tall_dense': (lambda: [_act(), L.Dense(7)], 4, True),
    'wide_dense_act_square': (lambda: [L.Dense(3), _act(), L.Dense(3), _act()], 6, True),
    'tall_dense_act': (lambda: [L.Dense(7), _act()], 4, False),
    'act_wide_dense': (lambda: [_act(), L.Dense(3)], 6, False),
    'square_act_wide': (lambda: [L.Dense(6), _act(), L.Dense(3)], 6, False),
    'two_wide_dense': (lambda: [L.Dense(4), L.Dense(2)], 6, False),
}


@pytest.mark.parametrize('case', sorted(PJMC_CASES))
def test_pjmc_exactness_rule_matches_measured_pjml(case):
  """``pjmc_inexact_reason`` is None exactly where PJMC's layer-by-layer feedback has
  PJML = 0 (measured from both Jacobians, random biases); elsewhere PJML is not small."""
  make, width, exact = PJMC_CASES[case]
  net = _net(L.Sequential(make()))
  x = _randn(seed=46, shape=(3, width))
  params = _biased(_init(net, x, 47), 0.5, seed=48)
  reason = jml.pjmc_inexact_reason(net.blocks[0], x.shape)
  assert (reason is None) == exact, reason
  r = jml.block_jml(net, params, params, 0, x, L.PJMC, 'pjml')
  if exact:
    assert r.relative < 1e-5, r
  else:
    assert r.relative > 1e-2 and 'dense' in reason, (r, reason)


def test_check_pjmc_exact_names_inexact_blocks_after_the_first():
  """A tall dense + activation block is refused from block 1 on; as block 0 (whose
  feedback DTP never uses) it is not, and the FWDTP MLP's blocks are all exact."""
  tall = lambda: L.Sequential([L.Dense(7), _act()])
  jml.check_pjmc_exact(_net(tall(), L.Sequential([L.Dense(3)])), (2, 4))
  with pytest.raises(L.FeedbackError, match=r'block 1 \[Dense\(7\), leaky_relu\]: tall'):
    jml.check_pjmc_exact(_net(L.Sequential([L.Dense(4)]), tall()), (2, 4))
  jml.check_pjmc_exact(models.mlp(widths=(16, 16)), (2, 28, 28, 1))


def test_pjml_dtp_refuses_an_inexact_pjmc_block():
  """method='pjml_dtp' checks its blocks when the state is built: an MLP whose widths
  grow (a tall dense + activation block) is refused, equal widths are accepted."""
  cfg = config_lib.default()
  cfg.method, cfg.model = 'pjml_dtp', 'mlp'
  x = jnp.zeros((2, 4, 4, 1))
  tx = algorithms.make_optimizer(cfg.optimizer, 10)
  with pytest.raises(L.FeedbackError, match='block 2'):
    algorithms.make(models.mlp(widths=(8, 8, 16)), cfg, tx).init(jax.random.key(0), x)
  algorithms.make(models.mlp(widths=(8, 8)), cfg, tx).init(jax.random.key(0), x)
