"""tp_jax.reversible: additive coupling whose feedback is the exact inverse, and the
reversible MLP-Mixer (Table 4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tp_jax import algorithms
from tp_jax import config as config_lib
from tp_jax import dtp
from tp_jax import layers as L
from tp_jax import models
from tp_jax import network
from tp_jax import reversible as R

SMALL = dict(image_hw=(8, 8), patch=4, hidden=8, channel_dim=16, num_blocks=2)


def _jitted(block):
  """(fwd, feedback) of a block, jitted (eager Flax dispatch is slow on CPU)."""
  fwd = jax.jit(lambda p, x: block.apply({'params': p}, x, method='fwd'))
  fb = jax.jit(
      lambda p, t, ctx, mode: block.apply({'params': p}, t, ctx, mode, method='feedback'),
      static_argnums=3,
  )
  return fwd, fb


def _coupling_and_params(key=0):
  """A Mixer coupling block of the small reversible Mixer (4 tokens, 8 channels)."""
  block = models.reversible_mixer(**SMALL).blocks[1]
  x = jax.random.normal(jax.random.key(key), (3, 4, 8))
  p = block.init(jax.random.key(key + 1), x, method='fwd')['params']
  # Non-trivial LayerNorm affine parameters, so that they enter the inverse too.
  p = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(7), a.shape), p)
  return block, p, x


@pytest.mark.slow
def test_coupling_feedback_is_the_exact_inverse():
  block, p, x = _coupling_and_params()
  fwd, fb = _jitted(block)
  y, ctx = fwd(p, x)
  assert y.shape == x.shape
  assert float(jnp.max(jnp.abs(y - x))) > 0.1  # not the identity
  for mode in (L.TJMC, L.TJMC_HADAMARD, L.IJMC, L.PJMC):
    np.testing.assert_allclose(fb(p, y, ctx, mode), x, atol=2e-5, rtol=1e-5)
  # ... of any point, not only of the forward's own output.
  t = y + 0.5 * jax.random.normal(jax.random.key(3), y.shape)
  np.testing.assert_allclose(fwd(p, fb(p, t, ctx, L.TJMC))[0], t, atol=2e-5, rtol=1e-5)


def test_coupling_difference_inverts_once_and_matches_two_inverses():
  block, p, x = _coupling_and_params()
  fwd, fb = _jitted(block)
  y, ctx = fwd(p, x)
  t = y + 0.5 * jax.random.normal(jax.random.key(4), y.shape)
  diff = jax.jit(
      lambda p, t, h, ctx: block.apply(
          {'params': p}, t, h, ctx, L.TJMC, method='feedback_difference'
      )
  )
  np.testing.assert_allclose(
      diff(p, t, y, ctx), fb(p, t, ctx, L.TJMC) - fb(p, y, ctx, L.TJMC), atol=2e-5, rtol=1e-5
  )
  # One inverse per call: the token-mixing dense appears once in the jaxpr, not twice.
  jaxpr = str(jax.make_jaxpr(diff)(p, t, y, ctx))
  assert (
      jaxpr.count('dot_general')
      == str(jax.make_jaxpr(fb, static_argnums=3)(p, t, ctx, L.TJMC)).count('dot_general')
      > 0
  )


def test_coupling_forward_is_the_additive_coupling():
  block, p, x = _coupling_and_params()

  @jax.jit
  def both(p, x):
    y, _ = block.apply({'params': p}, x, method='fwd')
    f = lambda v: block.f.apply({'params': p['f']}, v, method='fwd')[0]
    g = lambda v: block.g.apply({'params': p['g']}, v, method='fwd')[0]
    x1, x2 = jnp.split(x, 2, -1)
    y1 = x1 + f(x2)
    return y, jnp.concatenate([y1, x2 + g(y1)], -1)

  y, want = both(p, x)
  np.testing.assert_allclose(y, want, atol=1e-6)


def test_learned_feedback_is_refused_and_bad_shapes_are_named():
  block, p, x = _coupling_and_params()
  fwd, fb = _jitted(block)
  y, ctx = fwd(p, x)
  with pytest.raises(L.FeedbackError, match='exact inverse'):
    fb(p, y, ctx, L.LEARNED)
  odd = R.Coupling(L.Dense(3), L.Dense(3))
  with pytest.raises(ValueError, match='must be even'):
    odd.init(jax.random.key(0), jnp.ones((2, 5)), method='fwd')
  wrong = R.Coupling(L.Dense(2), L.Dense(3))
  with pytest.raises(ValueError, match='g maps shape'):
    wrong.init(jax.random.key(0), jnp.ones((2, 4)), method='fwd')


def test_reversible_mixer_targets_are_exact_inverses():
  net = models.get('reversible_mixer', **SMALL)
  assert len(net) == 1 + 2 + 2
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  labels = jnp.array([0, 1, 2, 3])
  params = jax.jit(lambda k, x: network.init(net, k, x))(jax.random.key(1), x)

  @jax.jit
  def run(params, x, labels):
    hs, ctxs = network.forward(net, params, x)
    t_N = dtp.first_target(hs[-1], labels, 0.5)
    targets = dtp.propagate_targets(net, params, hs, ctxs, t_N, L.TJMC)
    # F_n(t_{n-1}) for the coupling blocks n = 1, 2 (0-based)
    outs = [network.block_forward(net, n, params[n], targets[n - 1])[0] for n in (1, 2)]
    return hs, targets, outs

  hs, targets, outs = run(params, x, labels)
  for n, out in zip((1, 2), outs):  # the coupling blocks: F_n(t_{n-1}) = t_n exactly
    np.testing.assert_allclose(out, targets[n], atol=5e-5, rtol=1e-4)
    assert float(jnp.max(jnp.abs(targets[n] - hs[n]))) > 1e-3  # the targets moved


@pytest.mark.slow
def test_reversible_mixer_trains_with_tjml_dtp():
  cfg = config_lib.default()
  cfg.model = 'reversible_mixer'
  cfg.model_kwargs = dict(SMALL, act='leaky_relu')
  cfg.dataset = 'cifar10'
  cfg.method = 'tjml_dtp'
  cfg.beta = 0.5
  cfg.optimizer.lr = 0.02
  config_lib.validate(cfg)
  net = models.get(cfg.model, **cfg.model_kwargs)
  algo = algorithms.make(net, cfg, algorithms.make_optimizer(cfg.optimizer, 100))
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  labels = jnp.arange(16) % 4
  state = jax.jit(algo.init)(jax.random.key(1), x)
  step = jax.jit(algo.step)
  losses = []
  for i in range(30):
    state, m = step(state, (x, labels), jax.random.key(i))
    assert bool(m['finite'])
    losses.append(float(m['loss']))
  assert losses[-1] < 0.7 * losses[0], losses


def test_registered_model():
  net = models.get('reversible_mixer')
  assert sum(isinstance(b, R.Coupling) for b in net.blocks) == 4


@pytest.mark.parametrize('method', ['ldrl', 'dtp', 'fwdtp'])
def test_feedback_weight_methods_are_refused_by_the_validator(method):
  cfg = config_lib.default()
  cfg.model = 'reversible_mixer'
  cfg.model_kwargs = dict(SMALL)
  cfg.dataset = 'cifar10'
  cfg.method = method
  with pytest.raises(config_lib.ConfigError, match='exact inverse'):
    config_lib.validate(cfg)


def test_table4_config_validates():
  from experiments.configs import reversible_mixer_cifar10  # pylint: disable=g-import-not-at-top

  cfg = reversible_mixer_cifar10.get_config()
  config_lib.validate(cfg)
  assert len(models.get(cfg.model, **cfg.model_kwargs)) == 1 + 4 + 2
