"""The fused backward sweep of ``dtp.local_grads``: one vjp of a block gives its gradient
and its next target where the block declares its feedback difference to be exactly its
transposed Jacobian (``Layer.feedback_is_vjp``).

(a) The declaration: declared exact => feedback_difference(t, h) == vjp(F, x)(t - h) to
    float32 round-off, random shapes, seeds and targets; a few declared-inexact cases
    really differ; the declarations compose as the models need.
(b) The fused sweep == the unfused computation (targets by the feedback pass, one
    value_and_grad of the block losses): grads, block losses and targets, on LeNet,
    Simplified-VGG, the MLP-Mixer and ResNet-18 (small) in the Hadamard mode, on a
    model of plain Flax modules, and on ResNet-18 and the Mixer under varsigma (fused
    derived units, shared heads: ``dtp.shared_heads``).
(c) LeNet under varsigma (the main job) fuses only its head, and its step is unchanged
    bit for bit; learned feedback weights never fuse.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tp_jax import derived
from tp_jax import dtp
from tp_jax import layers as L
from tp_jax import models
from tp_jax import network
from tp_jax import reversible

_RNG = np.random.default_rng(20261202)
MODES = {'tjmc': L.TJMC, 'hadamard': L.TJMC_HADAMARD, 'ijmc': L.IJMC, 'learned': L.LEARNED}


def _draw(lo, hi):
  return int(_RNG.integers(lo, hi + 1))


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _params(layer, x, seed):
  """Params of ``layer`` at x: shapes from flax, values from numpy (LeCun-normal
  kernels, N(0, 0.1^2) biases, LayerNorm/GroupNorm scales 1 + N(0, 0.3^2))."""
  abstract = jax.eval_shape(lambda h: layer.init(jax.random.key(0), h, method='fwd'), x)
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    name = str(getattr(path[-1], 'key', ''))
    if name == 'kernel':
      v = rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))
    elif 'scale' in name:
      v = 1.0 + 0.3 * rng.standard_normal(a.shape)
    else:
      v = 0.1 * rng.standard_normal(a.shape)
    return jnp.asarray(v, a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract.get('params', {}))


def _image():
  return (_draw(1, 3), _draw(6, 9), _draw(6, 9), _draw(1, 4))


def _tokens():
  return (_draw(1, 3), _draw(3, 7), 2 * _draw(2, 4))


def _channel_unit():
  return L.Residual(L.Sequential([L.Dense(_draw(3, 9)), L.Activation('elu'), L.Dense(8)]))


# (name, layer, input shape): each built afresh per test, with shapes drawn at random.
CASES = {
    'dense': (lambda: L.Dense(_draw(2, 9)), lambda: (_draw(1, 3), _draw(2, 9))),
    'conv_s2': (lambda: L.Conv(_draw(1, 5), (3, 3), (2, 2), ((1, 0), (0, 1))), _image),
    'pool3': (lambda: L.MaxPool((3, 3), (2, 2), ((1, 1), (1, 1))), _image),
    'elu': (lambda: L.Activation('elu'), _image),
    'gelu': (lambda: L.Activation('gelu'), _tokens),
    'mean': (lambda: L.Mean(axis=1), _tokens),
    'flatten': (lambda: L.Flatten(), _image),
    'transpose': (lambda: L.Transpose((2, 1)), _tokens),
    'layernorm': (lambda: L.LayerNorm(), _tokens),
    'norm_dense': (lambda: L.NormDense(_draw(2, 6)), _tokens),
    'norm_dense_tokens': (lambda: L.NormDense(_draw(2, 6), mix_tokens=True), _tokens),
    'conv_tanh_pool': (
        lambda: L.Sequential(
            [L.Conv(4, (3, 3)), L.Activation('tanh'), L.MaxPool((3, 3), (2, 2), ((1, 1), (1, 1)))]
        ),
        _image,
    ),
    'residual_mlp': (_channel_unit, lambda: (_draw(1, 3), 8)),
    'derived_group_norm': (lambda: derived.Derived(nn.GroupNorm(num_groups=2)), _tokens),
    'derived_in_sequential': (
        lambda: L.Sequential([nn.Conv(3, (2, 2)), L.Activation('tanh')]),
        _image,
    ),
    'coupling': (lambda: reversible.Coupling(L.Dense(4), L.Dense(4)), lambda: (_draw(1, 3), 8)),
}
# Declared inexact where the feedback is approximate or nonlinear in the target, each
# shown below to differ from the vjp by more than round-off.
INEXACT = [
    ('elu', 'tjmc'),
    ('layernorm', 'tjmc'),
    ('norm_dense', 'hadamard'),
    ('norm_dense_tokens', 'hadamard'),
    ('conv_tanh_pool', 'tjmc'),
    ('residual_mlp', 'tjmc'),
    ('coupling', 'hadamard'),
]


def _difference_and_vjp(layer, x, seed, mode):
  """(feedback_difference(t, h), vjp(F, x)(t - h)) at a random target t."""
  params = _params(layer, x, seed)

  def both(p, x):
    h, ctx = layer.apply({'params': p}, x, method='fwd')
    t = h + 0.5 * _normal(h.shape, seed + 1)
    diff = layer.apply({'params': p}, t, h, ctx, mode, method='feedback_difference')
    _, vjp = jax.vjp(lambda x: layer.apply({'params': p}, x, method='fwd')[0], x)
    return diff, vjp(t - h)[0]

  return jax.jit(both)(params, x)


def _relative(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('mode_name', sorted(MODES))
def test_declared_exact_feedback_difference_is_the_vjp(case, mode_name):
  make_layer, make_shape = CASES[case]
  layer, mode = make_layer(), MODES[mode_name]
  if not layer.feedback_is_vjp(mode):
    pytest.skip('declared inexact in this mode')
  seed = _draw(0, 10_000)
  diff, vjp = _difference_and_vjp(layer, _normal(make_shape(), seed), seed, mode)
  chex.assert_trees_all_close(diff, vjp, rtol=1e-5, atol=1e-5 * float(jnp.abs(vjp).max()))


@pytest.mark.parametrize('case,mode_name', INEXACT)
def test_declared_inexact_cases_really_differ(case, mode_name):
  make_layer, make_shape = CASES[case]
  layer, mode = make_layer(), MODES[mode_name]
  assert not layer.feedback_is_vjp(mode)
  seed = _draw(0, 10_000)
  diff, vjp = _difference_and_vjp(layer, _normal(make_shape(), seed), seed, mode)
  assert _relative(diff, vjp) > 1e-3, (case, mode_name, _relative(diff, vjp))


def test_declarations_compose_in_the_models():
  """Which blocks fuse: block 1 never (it passes no target); the Hadamard mode fuses
  every ResNet block and every LeNet/VGG block, but only the Mixer's head (its units
  hold LayerNorm, whose G* is approximate); varsigma fuses the dense heads and the
  derived downsampling units; IJMC nothing."""
  hadamard = [True] * 9
  assert dtp.fused_blocks(models.resnet18(width=8), L.TJMC_HADAMARD) == (False, *hadamard)
  assert dtp.fused_blocks(models.resnet18(width=8), L.TJMC) == (
      (False,) * 3 + (True, False) * 3 + (False,)
  )
  assert dtp.fused_blocks(models.lenet(), L.TJMC_HADAMARD) == (False, True, True, True)
  assert dtp.fused_blocks(models.lenet(), L.TJMC) == (False, False, False, True)
  assert dtp.fused_blocks(models.mlp_mixer(num_blocks=1), L.TJMC_HADAMARD) == (
      (False,) * 4 + (True,)
  )
  assert not any(dtp.fused_blocks(models.mlp(widths=(10, 10)), L.IJMC))


def _abstract_params(net, shape):
  return jax.eval_shape(lambda k: network.init(net, k, jnp.zeros(shape)), jax.random.key(0))


def test_shared_heads_are_the_exact_weight_layers_above_the_nonlinear_feedback():
  """Under varsigma a ResNet identity unit shares its second conv, the head block its
  dense, a Mixer channel unit its second dense; LeNet's and VGG's pooling heads hold no
  weights and are not shared (so the main job's step is unchanged), nor is the Mixer
  token unit's (act, transpose) above its NormDense, whose LayerNorm is inexact: the
  whole G of that unit is linear under Hadamard and runs once, on t - h."""
  resnet = models.resnet18(width=4)
  assert dtp.shared_heads(resnet, _abstract_params(resnet, (1, 16, 16, 3)), L.TJMC) == (
      (0, 1, 1, 0, 1, 0, 1, 0, 1, 1)
  )
  mixer = models.mlp_mixer(num_blocks=1)
  mixer_params = _abstract_params(mixer, (1, 32, 32, 3))
  assert dtp.shared_heads(mixer, mixer_params, L.TJMC) == (0, 0, 1, 0, 0)
  assert dtp.shared_heads(mixer, mixer_params, L.TJMC_HADAMARD) == (0, 0, 1, 0, 0)
  for net, shape in (
      (models.lenet(), (1, 28, 28, 1)),
      (models.simple_vgg(channels=(4, 4)), (1, 8, 8, 3)),
  ):
    assert not any(dtp.shared_heads(net, _abstract_params(net, shape), L.TJMC)), net.name


# --------------------------------------------------------------------------------------
# (b) the fused sweep against the unfused computation


def _plain_net():
  """Blocks of plain Flax modules: every feedback derived."""
  return network.Net(
      (
          nn.Conv(4, (3, 3)),
          nn.Sequential([nn.Conv(6, (3, 3), (2, 2)), nn.GroupNorm(num_groups=2), nn.gelu]),
          nn.Sequential([lambda x: x.reshape(x.shape[0], -1), nn.Dense(10)]),
      ),
      name='plain',
  )


NETS = {
    'lenet': (lambda: models.lenet(), (4, 28, 28, 1)),
    'simple_vgg': (lambda: models.simple_vgg(channels=(8, 8, 16)), (4, 32, 32, 3)),
    'mlp_mixer': (
        lambda: models.mlp_mixer(patch=8, hidden=16, channel_dim=32, num_blocks=2),
        (4, 32, 32, 3),
    ),
    # 16x16: stage 4 is then 2x2, so that its GroupNorms do not see single values; width
    # 8: two channels per group there (at one, the head's GroupNorm maps varsigma's
    # spatially constant image of the mean to 0, and no target reaches the units).
    'resnet18': (lambda: models.resnet18(width=8), (4, 16, 16, 3)),
    'plain_flax': (_plain_net, (4, 12, 12, 2)),
}


def _unfused(net, params, mode, beta, x, y):
  """The step without fusion, written out: targets by the feedback pass
  (propagate_targets), then one value_and_grad of the summed block losses."""

  def loss(p):
    hs, ctxs = network.forward(net, p, x, detach=True)
    t_N = dtp.first_target(jax.lax.stop_gradient(hs[-1]), y, beta)
    targets = dtp.propagate_targets(net, p, hs, ctxs, t_N, mode)
    total, per_block = dtp.local_loss(hs, targets)
    return total, (per_block, targets, hs)

  (_, (losses, targets, hs)), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return grads, losses, targets, hs


def _assert_block_close(a, b, rtol, what):
  """Each block's tree equal to rtol of that block's largest magnitude: a target's
  difference t - h is a few ulps of h, so leaves whose true value is 0 (a conv bias
  before a GroupNorm) hold round-off of that size."""
  for n, (u, v) in enumerate(zip(a, b)):
    scale = max(float(jnp.abs(leaf).max()) for leaf in jax.tree_util.tree_leaves(v))
    chex.assert_trees_all_close(u, v, rtol=0, atol=rtol * scale, custom_message=f'{what} {n}')


@pytest.mark.slow
@pytest.mark.parametrize(
    'name,mode_name',
    [(name, 'hadamard') for name in NETS]
    + [('resnet18', 'tjmc'), ('mlp_mixer', 'tjmc'), ('plain_flax', 'tjmc')],
)
def test_fused_sweep_equals_unfused_computation(name, mode_name):
  make_net, shape = NETS[name]
  net, mode = make_net(), MODES[mode_name]
  x, y = _normal(shape, 3), jnp.arange(shape[0]) % 10
  params = network.init(net, jax.random.key(1), x)
  assert any(dtp.fused_blocks(net, mode) + dtp.shared_heads(net, params, mode)), name
  beta = 0.5
  grads, _, losses, targets = jax.jit(lambda p: dtp.fused_sweep(net, p, mode, beta, x, y))(params)
  want_grads, want_losses, want_targets, hs = jax.jit(lambda p: _unfused(net, p, mode, beta, x, y))(
      params
  )
  chex.assert_trees_all_close(losses, want_losses, rtol=1e-5)
  differences = [t - h for t, h in zip(targets, hs)]
  want_differences = [t - h for t, h in zip(want_targets, hs)]
  _assert_block_close(differences, want_differences, 1e-4, 't - h of block')
  _assert_block_close(grads, want_grads, 1e-3, 'grads of block')


@pytest.mark.slow
def test_local_grads_fuses_only_without_feedback_weights():
  """local_grads is the fused sweep when G is built from the forward params, the
  unfused computation when it is given feedback weights (even equal ones). (The two
  differ in the last bits here, so the test tells them apart.)"""
  make_net, shape = NETS['lenet']
  net = make_net()
  x, y = _normal(shape, 4), jnp.arange(shape[0])
  params = network.init(net, jax.random.key(2), x)
  run = jax.jit(lambda p, fb: dtp.local_grads(net, p, fb, L.TJMC_HADAMARD, 0.5, x, y)[0])
  sweep = jax.jit(lambda p: dtp.fused_sweep(net, p, L.TJMC_HADAMARD, 0.5, x, y)[0])(params)
  unfused = jax.jit(lambda p: _unfused(net, p, L.TJMC_HADAMARD, 0.5, x, y)[0])(params)
  chex.assert_trees_all_equal(run(params, None), sweep)
  chex.assert_trees_all_equal(run(params, params), unfused)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_equal(sweep, unfused)


@pytest.mark.slow
def test_main_job_step_is_bit_identical():
  """LeNet under varsigma (the main job) fuses only its dense head, whose vjp is the
  closed form's product: the step's grads and block losses equal the unfused ones bit
  for bit (checked at the main job's batch of 256 too, and on a 20-step MNIST run's
  metrics.jsonl: BUILD_NOTES)."""
  net = models.lenet()
  x, y = _normal((8, 28, 28, 1), 5), jnp.arange(8)
  params = network.init(net, jax.random.key(3), x)
  grads, metrics = jax.jit(lambda p: dtp.local_grads(net, p, None, L.TJMC, 0.5, x, y))(params)
  want_grads, want_losses, _, _ = jax.jit(lambda p: _unfused(net, p, L.TJMC, 0.5, x, y))(params)
  chex.assert_trees_all_equal((grads, metrics['block_loss']), (want_grads, want_losses))
