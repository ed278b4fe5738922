"""Every (model, method) pair steps on real data; TP methods' defining properties."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tp_jax import algorithms
from tp_jax import config as config_lib
from tp_jax import data
from tp_jax import dtp
from tp_jax import layers
from tp_jax import models
from tp_jax import network
from tp_jax.algorithms import bp as bp_lib
from tp_jax.algorithms import feedback_training

# The real data, by the loader's own lookup; conftest's fixture fails under CI when absent.
needs_data = pytest.mark.usefixtures('real_data_dir')

# Small variants of the real architectures keep CI fast; the full-size ones are
# exercised by the benchmarks and the training runs in BUILD_NOTES.md.
SMOKE_MODELS = {
    'lenet': ('mnist', {}),
    'simple_vgg': ('cifar10', {'channels': (8, 8, 16, 16, 16)}),
    'mlp_mixer': (
        'cifar10',
        {'hidden': 16, 'channel_dim': 32, 'num_blocks': 1, 'act': 'leaky_relu'},
    ),
    # LeakyReLU: sigma^-1 (IJMC/PJMC) is defined on all of R, tanh's only on (-1, 1).
    # (slope 0.2: its inverse scales negative targets by 5, not 100).
    'mlp': ('mnist', {'widths': (32, 32), 'act': 'leaky_relu', 'negative_slope': 0.2}),
}


@functools.lru_cache(maxsize=None)
def real_batch(dataset: str, n: int):
  x, y = data.load(dataset, 'test')
  return data.normalise(x[:n], dataset), jnp.asarray(y[:n])


def make_cfg(model: str, method: str, **overrides):
  cfg = config_lib.default()
  cfg.model = model
  cfg.dataset, kwargs = SMOKE_MODELS[model]
  cfg.model_kwargs = dict(kwargs)
  cfg.method = method
  # Untrained feedback sends lower blocks random targets, and PJMC's W^+ of a random
  # layer amplifies targets: a smaller forward step keeps the smoke steps stable.
  cfg.optimizer.lr = 0.002 if method in ('ldrl', 'dtp', 'fwdtp', 'pjml_dtp') else 0.02
  if method == 'pjml_dtp':
    cfg.beta = 0.01
  cfg.update(overrides)
  n = config_lib.num_trained_feedback_blocks(cfg)
  cfg.feedback.iterations = [2] * n
  cfg.feedback.noise = [0.1] * n
  cfg.feedback.lr = [1e-5] * n
  config_lib.validate(cfg)
  return cfg


def build(cfg, x):
  net = models.get(cfg.model, **cfg.model_kwargs)
  tx = algorithms.make_optimizer(cfg.optimizer, 100)
  algo = algorithms.make(net, cfg, tx)
  return net, algo, algo.init(jax.random.key(0), x)


def mean_ce(net, params, x, y):
  return float(jax.jit(lambda p: bp_lib.mean_cross_entropy(net, p, x, y)[0])(params))


PAIRS = [
    (m, a)
    for m in ('lenet', 'simple_vgg', 'mlp_mixer')
    for a in ('bp', 'tjml_dtp', 'ldrl', 'fwdtp', 'dtp')
] + [('mlp', a) for a in ('bp', 'tjml_dtp', 'pjml_dtp', 'ldrl', 'fwdtp', 'dtp')]


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize('model,method', PAIRS)
def test_loss_drops_on_a_fixed_real_batch(model, method):
  cfg = make_cfg(model, method)
  x, y = real_batch(cfg.dataset, 16)
  net, algo, state = build(cfg, x)
  before = mean_ce(net, state.params, x, y)
  step = jax.jit(algo.step)
  for i in range(3):
    state, metrics = step(state, (x, y), jax.random.key(i))
    assert bool(metrics['finite'])
  after = mean_ce(net, state.params, x, y)
  assert after < before, f'{model}/{method}: loss {before:.4f} -> {after:.4f}'
  assert int(state.step) == 3


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize('mode,norm_tol', [(layers.TJMC_HADAMARD, 0.02), (layers.TJMC, 0.1)])
def test_tjml_dtp_update_tends_to_bp_gradient(mode, norm_tol):
  """With exact TJMC, t_n - h_n = -beta dL/dh_n + O(beta^2), so each block's update
  is beta times BP's gradient of the mean cross-entropy as beta -> 0.

  The Hadamard feedback is exact. With varsigma, LeNet's ELU + overlapping pooling
  evaluates varsigma' at k*sigma(a) where k windows share an argmax, so block 1's
  update is parallel to BP's (cos > 0.99) but measured ~5% shorter."""
  net = models.lenet()
  x, y = real_batch('mnist', 32)
  params = network.init(net, jax.random.key(1), x)
  beta = 1e-4
  tp, _ = dtp.local_grads(net, params, None, mode, beta, x, y)
  bp = bp_lib.gradient(net, params, x, y)
  for n in range(len(net)):
    for name, g_tp in jax.tree_util.tree_leaves_with_path(tp[n]):
      g_bp = jax.tree_util.tree_leaves(bp[n])[
          [p for p, _ in jax.tree_util.tree_leaves_with_path(tp[n])].index(name)
      ]
      cos = float(jnp.vdot(g_tp, g_bp) / (jnp.linalg.norm(g_tp) * jnp.linalg.norm(g_bp)))
      ratio = float(jnp.linalg.norm(g_tp) / (beta * jnp.linalg.norm(g_bp)))
      assert cos > 0.99, (n, name, cos)
      assert abs(ratio - 1) < norm_tol, (n, name, ratio)


@pytest.mark.slow
def test_local_grads_ignore_other_blocks_losses():
  """Each block's gradient is that of its own loss: perturbing block 1's target
  path must not change the head's gradient (targets are held fixed)."""
  net = models.mlp(widths=(8, 8), act='tanh')
  x = jax.random.normal(jax.random.key(0), (4, 4, 4, 1))
  y = jnp.arange(4) % 10
  params = network.init(net, jax.random.key(1), x)
  grads, _ = dtp.local_grads(net, params, None, layers.TJMC, 0.1, x, y)
  hs, _ = network.forward(net, params, x)
  t_N = dtp.first_target(hs[-1], y, 0.1)
  head_only = jax.grad(
      lambda p: 0.5 * jnp.mean(jnp.sum((network.block_forward(net, 2, p, hs[1])[0] - t_N) ** 2, -1))
  )(params[2])
  np.testing.assert_allclose(
      grads[2]['layers_0']['kernel'], head_only['layers_0']['kernel'], rtol=1e-5, atol=1e-7
  )


def test_bp_step_descends_the_bp_gradient():
  """With plain SGD the BP step moves the parameters by -lr * bp.gradient, and its loss
  metric is bp.mean_cross_entropy before the step (so the reference gradient the TP
  diagnostics compare with is the one BP trains on); a changed label changes the gradient."""
  net = models.mlp(widths=(8, 8), act='tanh')
  x = jax.random.normal(jax.random.key(0), (4, 4, 4, 1))
  y = jnp.arange(4) % 10
  lr = 0.5
  algo = algorithms.bp.make(net, None, optax.sgd(lr), {})
  state = algo.init(jax.random.key(1), x)
  new, metrics = jax.jit(algo.step)(state, (x, y), jax.random.key(2))
  grads = bp_lib.gradient(net, state.params, x, y)
  moved = jax.tree_util.tree_map(lambda a, b: (a - b) / lr, state.params, new.params)
  chex.assert_trees_all_close(moved, grads, rtol=1e-5, atol=1e-7)
  loss, logits = bp_lib.mean_cross_entropy(net, state.params, x, y)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-6)
  assert logits.shape == (4, 10)
  other = bp_lib.gradient(net, state.params, x, (y + 1) % 10)
  assert not np.allclose(other[-1]['layers_0']['kernel'], grads[-1]['layers_0']['kernel'])


def test_ijml_dtp_targets_are_exact_inverses():
  """With G = F^-1 the difference correction gives t_{n-1} = F_n^-1(t_n), so
  F_n(t_{n-1}) = t_n for every block after the first (square MLP, tanh)."""
  net = models.mlp(num_classes=10, widths=(10, 10, 10), act='tanh')
  x = jax.random.normal(jax.random.key(0), (8, 5, 5, 1))
  y = jnp.arange(8) % 10
  params = network.init(net, jax.random.key(2), x)
  hs, ctxs = network.forward(net, params, x)
  t_N = dtp.first_target(hs[-1], y, 0.01)
  targets = dtp.propagate_targets(net, params, hs, ctxs, t_N, layers.IJMC)
  for n in range(1, len(net)):
    f_t, _ = network.block_forward(net, n, params[n], targets[n - 1])
    np.testing.assert_allclose(f_t, targets[n], rtol=1e-4, atol=1e-5)
  # and a non-inverse feedback (TJMC) does not have this property
  targets = dtp.propagate_targets(net, params, hs, ctxs, t_N, layers.TJMC)
  f_t, _ = network.block_forward(net, 2, params[2], targets[1])
  assert not np.allclose(f_t, targets[2], rtol=1e-4, atol=1e-5)


def test_ijml_dtp_refuses_non_square_layers():
  with pytest.raises(config_lib.ConfigError, match='square'):
    make_cfg('mlp', 'ijml_dtp')  # the validator traces the feedback: the layer refuses
  cfg = make_cfg('mlp', 'tjml_dtp')
  cfg.method = 'ijml_dtp'  # and so does the step itself, unvalidated
  x = jnp.zeros((2, 28, 28, 1))
  net, algo, state = build(cfg, x)
  with pytest.raises(layers.FeedbackError, match='square'):
    algo.step(state, (x, jnp.zeros(2, jnp.int32)), jax.random.key(0))


@pytest.mark.slow
def test_ldrl_parallel_and_sequential_orders_agree():
  x, y = jax.random.normal(jax.random.key(0), (8, 28, 28, 1)), jnp.arange(8) % 10
  results = []
  for order in ('parallel', 'sequential'):
    cfg = make_cfg('lenet', 'ldrl')
    cfg.feedback.iterations = [3, 1, 2]
    cfg.feedback.order = order
    _, algo, state = build(cfg, x)
    results.append(jax.jit(algo.step)(state, (x, y), jax.random.key(3))[0])
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # the first block's feedback is never trained, the others are
  init_fb = build(make_cfg('lenet', 'ldrl'), x)[2].fb_params
  fb = results[0].fb_params
  assert all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fb[0]), jax.tree.leaves(init_fb[0]))
  )
  assert not np.array_equal(fb[3]['layers_0']['kernel'], init_fb[3]['layers_0']['kernel'])


def test_ldrl_feedback_training_moves_towards_the_transpose():
  """LDRL's minimiser is G = J^T (Prop. 3): training a dense block's feedback
  brings B closer to the forward W."""
  net = models.mlp(widths=(16,), act='tanh')
  cfg = make_cfg('mlp', 'ldrl', model_kwargs={'widths': (16,), 'act': 'tanh'})
  cfg.feedback.iterations = [300]
  cfg.feedback.noise = [0.05]
  cfg.feedback.lr = [0.05]
  x = jax.random.normal(jax.random.key(0), (64, 4, 4, 1))
  params = network.init(net, jax.random.key(1), x)
  fb = network.init_feedback(params, jax.random.key(2))
  txs = feedback_training.optimizers(cfg, net)
  hs, ctxs = network.forward(net, params, x)
  from tp_jax.algorithms import ldrl  # pylint: disable=g-import-not-at-top

  new_fb, _, _ = jax.jit(
      lambda fb: feedback_training.train(
          net,
          ldrl.ldrl_loss,
          cfg,
          txs,
          params,
          fb,
          feedback_training.init_state(fb, txs),
          x,
          hs,
          ctxs,
          jax.random.key(3),
      )
  )(fb)
  w = params[1]['layers_0']['kernel']
  dist = lambda b: float(jnp.linalg.norm(b['layers_0']['kernel'] - w) / jnp.linalg.norm(w))
  assert dist(new_fb[1]) < 0.5 * dist(fb[1]), (dist(fb[1]), dist(new_fb[1]))


@pytest.mark.slow
def test_fwdtp_feedback_stays_fixed_and_tjml_has_none():
  x, y = jax.random.normal(jax.random.key(0), (8, 28, 28, 1)), jnp.arange(8) % 10
  _, algo, state = build(make_cfg('lenet', 'fwdtp'), x)
  new, _ = jax.jit(algo.step)(state, (x, y), jax.random.key(0))
  for a, b in zip(jax.tree.leaves(state.fb_params), jax.tree.leaves(new.fb_params)):
    np.testing.assert_array_equal(a, b)
  _, algo, state = build(make_cfg('lenet', 'tjml_dtp'), x)
  assert state.fb_params == () and state.fb_opt_state == ()


def test_unknown_method_lists_valid_ones():
  cfg = make_cfg('lenet', 'bp')
  cfg.method = 'backprop'
  with pytest.raises(ValueError, match='valid methods'):
    algorithms.make(models.lenet(), cfg, optax.sgd(0.1))
