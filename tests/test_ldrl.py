"""LDRL's loss computed in one batched feedback call equals the reference's three calls.

The reference (scalingDTP) evaluates G(y), G(F(x + dx)) and G(y + dy) separately.
``ldrl.ldrl_loss`` sends only the differences through a block's linear, ctx-free tail
(its conv or dense; ``network.block_feedback_differences``), and takes <dx, dr> from
that tail's weight gradient where the weights enter only there, linearly
(``network.block_feedback_pairing``). Same keys, same numbers to float32 round-off: the
losses and gradients per iteration, and the feedback weights after training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tp_jax import layers as L
from tp_jax import models
from tp_jax import network
from tp_jax.algorithms import feedback_training as fbt
from tp_jax.algorithms import ldrl

_RNG = np.random.default_rng(20261202)

# The models whose feedback can be learned (the reversible Mixer's inverse cannot).
SMALL_MODELS = {
    'lenet': ({}, (28, 28, 1)),
    'simple_vgg': ({'channels': (4, 4, 8, 8, 8)}, (32, 32, 3)),
    'mlp_mixer': (
        {'hidden': 8, 'channel_dim': 8, 'num_blocks': 1, 'image_hw': (16, 16)},
        (16, 16, 3),
    ),
    'mlp': ({'widths': (8, 8)}, (28, 28, 1)),
    'resnet18': ({'width': 4}, (16, 16, 3)),
}


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def three_call_ldrl_loss(net, n, p, b, x, y, ctx, key, sigma):
  """The reference's form of the loss: r = G(y), dr = G(F(x + dx)) - r, dr_y = G(y + dy) - r,
  G(F(x + dx)) with the noisy forward's routing (its argmax) and the clean rest."""
  k_x, k_y = jax.random.split(key)
  dx = sigma * jax.random.normal(k_x, x.shape, x.dtype)
  dy = sigma * jax.random.normal(k_y, y.shape, y.dtype)
  r = fbt.learned_feedback(net, n, b, y, ctx)
  y_noisy, ctx_noisy = network.block_forward(net, n, p, x + dx)
  ctx_noisy = network.block_noisy_reconstruction_ctx(net, n, ctx, ctx_noisy)
  dr = fbt.learned_feedback(net, n, b, y_noisy, ctx_noisy) - r
  dr_y = fbt.learned_feedback(net, n, b, y + dy, ctx) - r
  return (-2.0 * jnp.sum(dx * dr) + jnp.sum(jnp.square(dr_y))) / x.shape[0]


def _setup(model, batch):
  kwargs, shape = SMALL_MODELS[model]
  net = models.get(model, **kwargs)
  x = _normal((batch, *shape), batch)
  params = network.init(net, jax.random.key(0), x)
  fb = network.init_feedback(params, jax.random.key(1))
  return net, x, params, fb


def _assert_close(a, b, what):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    u, v = np.asarray(u), np.asarray(v)
    np.testing.assert_allclose(
        u, v, rtol=2e-4, atol=2e-5 * max(np.abs(v).max(), 1e-30), err_msg=what
    )


@pytest.mark.parametrize(
    'model',
    [m if m in ('lenet', 'mlp') else pytest.param(m, marks=pytest.mark.slow) for m in SMALL_MODELS],
)
@pytest.mark.parametrize('mode', [L.LEARNED, L.TJMC_HADAMARD])
def test_feedback_differences_and_pairing_equal_separate_calls(model, mode):
  """The differences, and <c, G(t) - G(y)> with its gradient w.r.t. G's weights, whether
  the pairing takes the weight-gradient path (LeNet's, VGG's and the MLP's blocks) or
  forms the difference."""
  batch = int(_RNG.integers(2, 5))
  net, x, params, fb = _setup(model, batch)
  weights = fb if mode == L.LEARNED else params
  hs = (x,) + network.forward(net, params, x)[0]
  for n in range(1, len(net)):
    y, ctx = network.block_forward(net, n, params[n], hs[n])
    y_noisy, ctx_noisy = network.block_forward(
        net, n, params[n], hs[n] + 0.3 * _normal(hs[n].shape, n)
    )
    t = y + 0.3 * _normal(y.shape, 10 + n)
    G = lambda t, c, n=n: network.block_feedback(net, n, weights[n], t, c, mode)
    expected = jnp.stack([G(y_noisy, ctx_noisy) - G(y, ctx), G(t, ctx) - G(y, ctx)])
    got = network.block_feedback_differences(
        net, n, weights[n], (y_noisy, t), (ctx_noisy, ctx), y, ctx, mode
    )
    assert got.shape == expected.shape
    _assert_close(got, expected, f'{model} block {n}')

    c = _normal(hs[n].shape, 20 + n)
    G_b = lambda b, t, t_ctx: network.block_feedback(net, n, b, t, t_ctx, mode)
    direct = lambda b: jnp.sum(c * (G_b(b, y_noisy, ctx_noisy) - G_b(b, y, ctx)))
    pairing = lambda b: network.block_feedback_pairing(
        net, n, b, c, y_noisy, ctx_noisy, y, ctx, mode
    )
    _assert_close(
        jax.value_and_grad(pairing)(weights[n]),
        jax.value_and_grad(direct)(weights[n]),
        f'{model} block {n} pairing',
    )


@pytest.mark.parametrize('model', sorted(SMALL_MODELS))
def test_noisy_reconstruction_takes_only_the_routing_from_the_noisy_forward(model):
  """LDRL's G(F(x + dx)) keeps the noisy input's max-pool argmax (the only integer ctx
  leaves here) and every other ctx leaf (frozen statistics, activations, a derived
  block's linearisation) from the clean forward."""
  net, x, params, _ = _setup(model, 2)
  hs = (x,) + network.forward(net, params, x)[0]
  routed = 0
  for n in range(len(net)):
    _, ctx = network.block_forward(net, n, params[n], hs[n])
    _, noisy = network.block_forward(net, n, params[n], hs[n] + 0.3 * _normal(hs[n].shape, n))
    got = network.block_noisy_reconstruction_ctx(net, n, ctx, noisy)
    assert jax.tree.structure(got) == jax.tree.structure(ctx), (model, n)
    for g, c, z in zip(*(jax.tree.leaves(t) for t in (got, ctx, noisy)), strict=True):
      routing = jnp.issubdtype(jnp.asarray(c).dtype, jnp.integer)
      assert g is (z if routing else c), (model, n, jnp.asarray(c).dtype)
      routed += routing
  has_pool = any(isinstance(m, L.MaxPool) for b in net.blocks for m in getattr(b, 'layers', ()))
  assert bool(routed) == has_pool, (model, routed)


def test_lenet_conv_and_dense_take_the_difference_path():
  """Only the differences go through LeNet's conv, reshape + dense and last dense."""
  net, x, params, _ = _setup('lenet', 2)
  _, ctxs = network.forward(net, params, x)
  splits = [net.blocks[n].shared_linear_tail(ctxs[n], L.LEARNED) for n in range(len(net))]
  assert splits == [1, 1, 2, 1]
  # A max-pool's ctx holds the argmax, so a tail never reaches past it.
  pool_first = L.Sequential([L.MaxPool((2, 2), (2, 2)), L.Conv(4)])
  p = pool_first.init(jax.random.key(0), x, method='fwd')['params']
  _, ctx = pool_first.apply({'params': p}, x, method='fwd')
  assert pool_first.shared_linear_tail(ctx, L.LEARNED) == 0


def test_pairing_takes_the_weight_gradient_only_where_the_weights_enter_linearly():
  """LeNet's blocks read their feedback weights once, linearly, in the tail. A pinv dense
  (not linear in W), a tail of two dense layers (quadratic) and weights above the tail
  are computed from the difference, and give the same pairing."""
  net, x, params, _ = _setup('lenet', 2)
  _, ctxs = network.forward(net, params, x)
  for n, block in enumerate(net.blocks):
    split = block.shared_linear_tail(ctxs[n], L.LEARNED)
    assert block.apply(
        {'params': params[n]}, split, L.LEARNED, method='tail_is_linear_in_params'
    ), n
  x = _normal((3, 6), 0)
  cases = {
      'pinv': (L.Sequential([L.Dense(5, use_bias=False)]), L.PJMC, False),
      'two dense': (L.Sequential([L.Dense(5), L.Dense(4)]), L.LEARNED, False),
      'weights above the tail': (
          L.Sequential([L.Dense(5), L.Activation('elu'), L.Dense(4)]),
          L.LEARNED,
          False,
      ),
      'dense': (L.Sequential([L.Dense(5), L.Activation('elu')]), L.LEARNED, True),
  }
  for name, (block, mode, linear) in cases.items():
    net = network.Net((block,), name=name)
    p = network.init(net, jax.random.key(1), x)[0]
    y, ctx = network.block_forward(net, 0, p, x)
    t, t_ctx = network.block_forward(net, 0, p, x + 0.5)
    split = block.shared_linear_tail(ctx, mode)
    assert (
        bool(split)
        and block.apply({'params': p}, split, mode, method='tail_is_linear_in_params') == linear
    ), name
    c = _normal(x.shape, 3)
    G = lambda b, t, ctx: network.block_feedback(net, 0, b, t, ctx, mode)
    want = jax.value_and_grad(lambda b: jnp.sum(c * (G(b, t, t_ctx) - G(b, y, ctx))))(p)
    got = jax.value_and_grad(
        lambda b: network.block_feedback_pairing(net, 0, b, c, t, t_ctx, y, ctx, mode)
    )(p)
    _assert_close(got, want, name)


@pytest.mark.parametrize('model', ['lenet', pytest.param('mlp_mixer', marks=pytest.mark.slow)])
def test_loss_and_gradient_equal_the_three_call_form(model):
  net, x, params, fb = _setup(model, 3)
  hs, ctxs = network.forward(net, params, x)
  ins = (x,) + hs[:-1]
  for n in range(1, len(net)):
    args = lambda b, n=n: (net, n, params[n], b, ins[n], hs[n], ctxs[n], jax.random.key(n), 0.3)
    got = jax.value_and_grad(lambda b: ldrl.ldrl_loss(*args(b)))(fb[n])
    expected = jax.value_and_grad(lambda b: three_call_ldrl_loss(*args(b)))(fb[n])
    _assert_close(got, expected, f'{model} block {n}')


def test_feedback_training_equals_the_three_call_form():
  """Per-iteration losses (training for 1, 2, 3 iterations) and the final feedback
  weights of LeNet's blocks, same keys."""
  net, x, params, fb = _setup('lenet', 4)
  hs, ctxs = network.forward(net, params, x)
  cfg = ml_collections.ConfigDict(
      {
          'feedback': {
              'iterations': [3],
              'noise': [0.4, 0.38, 0.14],
              'lr': [7e-4, 1.2e-4, 3.5e-2],
              'momentum': 0.9,
              'order': 'parallel',
          },
          'model': 'lenet',
      }
  )
  txs = fbt.optimizers(cfg, net)

  def train(loss_fn, iterations):
    cfg.feedback.iterations = [iterations]
    return jax.jit(
        lambda fb: fbt.train(
            net,
            loss_fn,
            cfg,
            txs,
            params,
            fb,
            fbt.init_state(fb, txs),
            x,
            hs,
            ctxs,
            jax.random.key(7),
        )
    )(fb)

  for k in (1, 2, 3):
    got_fb, _, got_loss = train(ldrl.ldrl_loss, k)
    want_fb, _, want_loss = train(three_call_ldrl_loss, k)
    _assert_close(got_loss, want_loss, f'losses at iteration {k}')
  _assert_close(got_fb, want_fb, 'feedback weights after 3 iterations')
  assert not np.allclose(got_fb[1]['layers_0']['kernel'], fb[1]['layers_0']['kernel'])
