"""Feedback derived by autodiff (``tp_jax.derived``): plain Flax modules as DTP blocks.

(a) For plain Linen modules (strided, grouped, asymmetrically padded convs, transposed
    convs, GroupNorm, LayerNorm, attention, pooling, a user's residual block), a pure
    function and an NNX module, the derived feedback is jax.vjp of the block at its
    forward input, for random shapes and seeds; G(t) - G(h) = J^T (t - h).
(b) The closed forms of tp_jax.layers that are exactly J^T equal the derived feedback
    on every model in tp_jax.models.
(c) TJML-DTP through derived feedback: block updates tend to BP's as beta -> 0;
    tp_jax.jml gives TJML 0 on derived blocks.
(d) LEARNED feedback is J^T at the feedback weights; IJMC/PJMC and bad modules and
    inputs are refused, naming the block and the module.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from experiments import synthetic
from experiments.configs import lenet_mnist
from flax import nnx

from tp_jax import derived
from tp_jax import dtp
from tp_jax import jml
from tp_jax import layers as L
from tp_jax import models
from tp_jax import network
from tp_jax import train
from tp_jax.algorithms import bp as bp_lib

_RNG = np.random.default_rng(20261201)


def _draw(lo, hi):
  return int(_RNG.integers(lo, hi + 1))


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


class ResidualUnit(nn.Module):
  """A user's residual block: conv -> GroupNorm -> GELU, plus the input."""

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.GroupNorm(num_groups=2)(nn.Conv(x.shape[-1], (3, 3))(x)))
    return x + y


class Pool(nn.Module):
  """nn.avg_pool / nn.max_pool (functions) as a module."""

  kind: str

  @nn.compact
  def __call__(self, x):
    pool = nn.max_pool if self.kind == 'max' else nn.avg_pool
    return pool(x, (3, 3), (2, 2), padding=((1, 0), (0, 1)))


class Attention(nn.Module):
  """Self-attention on (batch, tokens, features)."""

  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(x)


def _hw():
  return (_draw(5, 9), _draw(5, 9))


PLAIN_CASES = [
    (
        'conv_s2_grouped_asym',
        lambda: nn.Conv(4, (3, 2), (2, 2), padding=((1, 2), (0, 1)), feature_group_count=2),
        lambda: (_draw(1, 3), *_hw(), 4),
    ),
    (
        'conv_transpose',
        lambda: nn.ConvTranspose(3, (3, 3), (2, 2)),
        lambda: (_draw(1, 3), *_hw(), 2),
    ),
    ('group_norm', lambda: nn.GroupNorm(num_groups=2), lambda: (_draw(1, 3), *_hw(), 4)),
    ('layer_norm', lambda: nn.LayerNorm(), lambda: (_draw(1, 3), _draw(3, 9))),
    ('attention', Attention, lambda: (_draw(1, 3), _draw(2, 5), _draw(2, 6))),
    ('max_pool', lambda: Pool('max'), lambda: (_draw(1, 3), *_hw(), 2)),
    ('avg_pool', lambda: Pool('avg'), lambda: (_draw(1, 3), *_hw(), 2)),
    ('user_residual_block', ResidualUnit, lambda: (_draw(1, 3), *_hw(), 4)),
    (
        'pure_function',
        lambda: derived.Function(
            lambda p, x: jnp.tanh(x @ p['w']),
            lambda k, x: {'w': jax.random.normal(k, (x.shape[-1], 5)) / 3.0},
        ),
        lambda: (_draw(1, 3), _draw(2, 6)),
    ),
]


def _net(module):
  return network.Net((module,), name='one')


def _check_against_vjp(net, params, x, seed):
  """feedback(t) and feedback_difference(t, h) == jax.vjp of block 0 at x."""

  @jax.jit
  def both(p, x, t):
    y, ctx = network.block_forward(net, 0, p, x)
    _, vjp = jax.vjp(lambda h: network.block_forward(net, 0, p, h)[0], x)
    return (
        vjp(t)[0],
        vjp(t - y)[0],
        network.block_feedback(net, 0, p, t, ctx),
        network.block_feedback_difference(net, 0, p, t, y, ctx),
    )

  y = jax.eval_shape(lambda x: network.block_forward(net, 0, params[0], x)[0], x)
  t = _normal(y.shape, seed + 1)
  want_g, want_d, got_g, got_d = (np.asarray(a) for a in both(params[0], x, t))
  assert got_g.shape == x.shape
  assert np.abs(want_g).max() > 0
  np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-6 * np.abs(want_g).max())
  np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-6 * np.abs(want_d).max())


class DerivedIsVjpTest(chex.TestCase):
  """(a) Random shapes and seeds, two draws per case."""

  @parameterized.named_parameters(
      *[(f'{name}_{draw}', make, shape) for name, make, shape in PLAIN_CASES for draw in range(2)]
  )
  def test_derived_feedback_is_vjp(self, make, shape):
    seed = _draw(0, 10**6)
    x = _normal(shape(), seed)
    net = _net(make())
    assert isinstance(net.blocks[0], L.Derived)
    params = network.init(net, jax.random.key(seed), x)
    _check_against_vjp(net, params, x, seed)


def test_nnx_module_is_a_block():
  """An NNX module: its nnx.Param state (a pure dict) is the block's params."""

  class Mlp(nnx.Module):

    def __init__(self, rngs):
      self.a, self.b = nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
      return self.b(nnx.gelu(self.a(x)))

  module = Mlp(nnx.Rngs(0))
  net = _net(module)
  x = _normal((3, 4), 1)
  params = network.init(net, jax.random.key(0), x)
  np.testing.assert_array_equal(params[0]['module']['weights']['a']['kernel'], module.a.kernel[...])
  _check_against_vjp(net, params, x, 2)
  with pytest.raises(ValueError, match=r'BatchNorm \(NNX\).*BatchStat'):
    _net(nnx.BatchNorm(4, rngs=nnx.Rngs(0)))


def test_sequential_and_residual_mix_closed_forms_and_plain_modules():
  """Plain modules in Sequential/Residual are wrapped as Derived; tp_jax layers keep
  their closed forms; the whole block's feedback is still its vjp (Hadamard mode)."""
  block = L.Residual(
      L.Sequential(
          [L.Conv(4, (3, 3)), nn.GroupNorm(num_groups=2), L.Activation('elu'), nn.Conv(4, (1, 1))]
      )
  )
  kinds = [type(l).__name__ for l in block.inner.layers]
  assert kinds == ['Conv', 'Derived', 'Activation', 'Derived']
  x = _normal((2, 6, 5, 4), 3)
  net = _net(block)
  params = network.init(net, jax.random.key(0), x)
  y, ctx = network.block_forward(net, 0, params[0], x)
  t = _normal(y.shape, 4)
  got = network.block_feedback_difference(net, 0, params[0], t, y, ctx, L.TJMC_HADAMARD)
  _, vjp = jax.vjp(lambda h: network.block_forward(net, 0, params[0], h)[0], x)
  np.testing.assert_allclose(got, vjp(t - y)[0], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# (b) closed forms == derived, on every model


SMALL_MODELS = {
    'lenet': ({}, (2, 28, 28, 1)),
    'simple_vgg': ({'channels': (4, 4, 8, 8, 8)}, (2, 32, 32, 3)),
    'mlp_mixer': (
        {'hidden': 8, 'channel_dim': 8, 'num_blocks': 1, 'image_hw': (16, 16)},
        (2, 16, 16, 3),
    ),
    'reversible_mixer': (
        {'hidden': 8, 'channel_dim': 8, 'num_blocks': 1, 'image_hw': (16, 16)},
        (2, 16, 16, 3),
    ),
    'mlp': ({'widths': (8, 8)}, (2, 28, 28, 1)),
    'resnet18': ({'width': 4}, (2, 16, 16, 3)),
}
# Closed forms that are exactly J^T (in the Hadamard mode); the others (LayerNorm's
# frozen s, the coupling's inverse, NormDense's LayerNorm) are not J^T by definition.
EXACT = (L.Conv, L.Dense, L.MaxPool, L.Mean, L.Reshape, L.Transpose, L.Activation)


def _leaf_layers(layer, params, x):
  """(layer, params, input) for every leaf layer of a block, by running it forward."""
  if isinstance(layer, L.Sequential):
    out = []
    for i, sub in enumerate(layer.layers):
      p = params.get(f'layers_{i}', {})
      out += _leaf_layers(sub, p, x)
      x = sub.apply({'params': p}, x, method='fwd')[0]
    return out
  if isinstance(layer, L.Residual):
    return _leaf_layers(layer.inner, params['inner'], x)
  return [(layer, params, x)]


def test_every_model_is_covered():
  assert set(SMALL_MODELS) == set(models.MODELS)


@pytest.mark.slow
@pytest.mark.parametrize('model', sorted(SMALL_MODELS))
def test_closed_forms_equal_derived_feedback(model):
  kwargs, shape = SMALL_MODELS[model]
  net = models.get(model, **kwargs)
  x = _normal(shape, 5)
  params = network.init(net, jax.random.key(0), x)
  hs = (x,) + network.forward(net, params, x)[0]
  leaves = [leaf for n in range(len(net)) for leaf in _leaf_layers(net.blocks[n], params[n], hs[n])]
  exact = [leaf for leaf in leaves if type(leaf[0]) in EXACT]
  assert exact, model
  for i, (layer, p, h) in enumerate(exact):
    plain = network.Net((layer,), name='closed')
    wrapped = network.Net((derived.Derived(layer, parent=None),), name='derived')

    @jax.jit
    def both(p, h):
      y, c_closed = network.block_forward(plain, 0, p, h)
      _, c_derived = network.block_forward(wrapped, 0, {'module': p}, h)
      t = y + _normal(y.shape, i)
      return (
          network.block_feedback_difference(plain, 0, p, t, y, c_closed, L.TJMC_HADAMARD),
          network.block_feedback_difference(wrapped, 0, {'module': p}, t, y, c_derived, L.TJMC),
      )

    closed, by_autodiff = (np.asarray(a) for a in both(p, h))
    np.testing.assert_allclose(
        closed,
        by_autodiff,
        rtol=1e-4,
        atol=1e-5 * max(np.abs(by_autodiff).max(), 1e-30),
        err_msg=f'{model}: {type(layer).__name__} #{i}',
    )


def test_closed_form_lenet_targets_equal_derived_lenet_targets():
  """Whole blocks: LeNet's targets through its closed forms (Hadamard) == through
  each block wrapped as Derived."""
  net = models.lenet()
  wrapped = models.with_derived_feedback(net)
  assert all(isinstance(b, derived.Derived) for b in wrapped.blocks)
  x, y = _normal((2, 28, 28, 1), 6), jnp.array([3, 7])
  params = network.init(net, jax.random.key(0), x)
  wrapped_params = tuple({'module': p} for p in params)

  def targets(net, params, mode):
    hs, ctxs = network.forward(net, params, x)
    t_N = dtp.first_target(hs[-1], y, 0.5)
    return dtp.propagate_targets(net, params, hs, ctxs, t_N, mode)

  closed = jax.jit(lambda p: targets(net, p, L.TJMC_HADAMARD))(params)
  by_autodiff = jax.jit(lambda p: targets(wrapped, p, L.TJMC))(wrapped_params)
  chex.assert_trees_all_close(closed, by_autodiff, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_config_derived_feedback_trains_like_the_closed_forms():
  """``derived_feedback=True`` builds every block as Derived; under the Hadamard mode,
  from the same parameters, its training steps equal the closed-form build's (the same
  J^T, computed another way). Its blocks' params sit under 'module', so Flax draws them
  from other keys: the derived run starts from the closed-form run's."""

  def setup(derived_feedback):
    cfg = lenet_mnist.get_config()
    cfg.update(feedback_act='hadamard', batch_size=8, derived_feedback=derived_feedback)
    run = train.setup(cfg, synthetic.dataset('mnist', 24, 8))
    return run, train.init_state(run)

  def three_steps(run, state):
    idx = train.epoch_indices(run, 0)
    for _ in range(3):
      state, metrics = run.train_step(state, run.x_train, run.y_train, idx, run.step_key)
    return state.params, metrics

  closed_run, closed_state = setup(False)
  derived_run, derived_state = setup(True)
  assert not any(isinstance(b, derived.Derived) for b in closed_run.net.blocks)
  assert all(isinstance(b, derived.Derived) for b in derived_run.net.blocks)
  start = jax.tree.map(jnp.copy, closed_state.params)
  derived_state = derived_state._replace(params=tuple({'module': p} for p in start))
  closed, m_closed = three_steps(closed_run, closed_state)
  by_autodiff, m_derived = three_steps(derived_run, derived_state)
  chex.assert_trees_all_close(closed, tuple(p['module'] for p in by_autodiff), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m_closed['loss'], m_derived['loss'], rtol=1e-5)


# --------------------------------------------------------------------------------------
# (c) TJML-DTP through derived feedback


def _plain_net():
  """Blocks built from plain Flax modules only."""
  return network.Net(
      (
          nn.Sequential([nn.Conv(4, (3, 3), (2, 2)), nn.GroupNorm(num_groups=2), nn.gelu]),
          ResidualUnit(),
          nn.Sequential([lambda x: x.reshape(x.shape[0], -1), nn.Dense(16), jnp.tanh]),
          nn.Dense(10),
      ),
      name='plain',
  )


@pytest.mark.slow
def test_tjml_dtp_update_tends_to_bp_gradient_through_derived_feedback():
  """t_n - h_n = -beta dL/dh_n + O(beta^2) with exact J^T feedback, so each block's
  update is beta times BP's gradient as beta -> 0: parallel, and of the same norm."""
  net = _plain_net()
  x, y = _normal((8, 8, 8, 3), 7), jnp.arange(8) % 10
  params = network.init(net, jax.random.key(1), x)
  beta = 1e-3
  tp, _ = jax.jit(lambda p: dtp.local_grads(net, p, None, L.TJMC, beta, x, y))(params)
  bp = jax.jit(lambda p: bp_lib.gradient(net, p, x, y))(params)
  for (path, g_tp), g_bp in zip(
      jax.tree_util.tree_leaves_with_path(tp), jax.tree_util.tree_leaves(bp)
  ):
    g_tp, g_bp = np.asarray(g_tp, np.float64), np.asarray(g_bp, np.float64)
    cos = np.vdot(g_tp, g_bp) / (np.linalg.norm(g_tp) * np.linalg.norm(g_bp))
    ratio = np.linalg.norm(g_tp) / (beta * np.linalg.norm(g_bp))
    assert cos > 0.999, (jax.tree_util.keystr(path), cos)
    assert abs(ratio - 1) < 0.01, (jax.tree_util.keystr(path), ratio)


@pytest.mark.slow
def test_jml_of_derived_blocks_is_zero():
  """The matrix-free TJML of every derived block is 0 to round-off (J_G v = J_F^T v)."""
  net = _plain_net()
  x = _normal((2, 8, 8, 3), 8)
  params = network.init(net, jax.random.key(0), x)
  hs = (x,) + network.forward(net, params, x)[0]
  for n in range(len(net)):
    r = jml.block_jml(net, params, params, n, hs[n], L.TJMC, 'tjml', exact=False, num_probes=4)
    assert r.relative < 1e-6, (n, r.relative)


def test_exact_jml_of_derived_blocks_is_zero():
  """jml's exact path takes each example's ctx from its own forward: a derived ctx holds
  parameters, with no batch axis to slice."""
  net = _plain_net()
  x = _normal((2, 8, 8, 3), 8)
  params = network.init(net, jax.random.key(0), x)
  h1 = network.forward(net, params, x)[0][0]
  assert jml.block_jml(net, params, params, 1, h1, L.TJMC, 'tjml', exact=True).relative < 1e-6


# --------------------------------------------------------------------------------------
# (d) modes and bad input


def test_learned_feedback_is_the_transpose_at_the_feedback_weights():
  """LEARNED: J^T of F(B, .) at the forward input; for a dense layer that is the
  closed form's t B^T (the same as L.Dense's learned feedback)."""
  net = _net(nn.Dense(5))
  x = _normal((3, 4), 9)
  params = network.init(net, jax.random.key(0), x)
  fb = network.init_feedback(params, jax.random.key(1))
  y, ctx = network.block_forward(net, 0, params[0], x)
  t = _normal(y.shape, 10)
  got = network.block_feedback(net, 0, fb[0], t, ctx, L.LEARNED)
  np.testing.assert_allclose(got, t @ fb[0]['module']['kernel'].T, rtol=1e-5, atol=1e-6)
  closed = L.Dense(5).apply({'params': fb[0]['module']}, t, None, L.LEARNED, method='feedback')
  np.testing.assert_allclose(got, closed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mode', [L.IJMC, L.PJMC], ids=['ijmc', 'pjmc'])
def test_inverse_modes_are_refused_naming_block_and_module(mode):
  net = network.Net((nn.Dense(4), nn.GroupNorm(num_groups=2)), name='net')
  x = _normal((2, 4), 11)
  params = network.init(net, jax.random.key(0), x)
  y, ctx = network.block_forward(net, 1, params[1], x)
  with pytest.raises(L.FeedbackError, match=rf'block 1.*GroupNorm.*{mode.weights}'):
    network.block_feedback_difference(net, 1, params[1], y, y, ctx, mode)


class Constant(nn.Module):

  @nn.compact
  def __call__(self, x):
    return jnp.broadcast_to(self.param('c', nn.initializers.ones, (3,)), (x.shape[0], 3))


class FixedReshape(nn.Module):

  @nn.compact
  def __call__(self, x):
    return x.reshape(x.shape[0], 12)


@pytest.mark.parametrize(
    'module,x,match',
    [
        (
            nn.BatchNorm(use_running_average=False),
            jnp.ones((2, 4)),
            r'block 1.*BatchNorm.*batch_stats',
        ),
        (nn.Dropout(0.5, deterministic=False), jnp.ones((2, 4)), r'block 1.*Dropout.*dropout'),
        (Constant(), jnp.ones((2, 4)), r'block 1.*Constant.*does not depend on its input'),
        (FixedReshape(), jnp.ones((2, 4)), r'block 1.*FixedReshape.*shape \(2, 4\)'),
        (nn.Dense(3), jnp.ones((2, 4), jnp.int32), r'block 0.*Dense.*int32'),
    ],
    ids=['batch_norm', 'dropout', 'constant', 'shape_mismatch', 'int_input'],
)
def test_bad_blocks_are_refused_at_init_naming_block_and_module(module, x, match):
  first = nn.Dense(4) if x.dtype != jnp.int32 else L.Reshape((-1,))
  net = network.Net((first, module) if x.dtype != jnp.int32 else (module,), name='net')
  with pytest.raises(ValueError, match=match):
    network.init(net, jax.random.key(0), x)


def test_a_non_module_block_is_refused():
  with pytest.raises(
      L.FeedbackError, match=r'block 1: \S+ is not a Flax module.*' r'derived\.Function'
  ):
    network.Net((nn.Dense(3), jnp.tanh))
