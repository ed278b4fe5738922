"""models.resnet18 (CIFAR variant) and its config: structure, the skip rule's exactness,
and a step of every method its config trains with."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import resnet18_cifar10
from tp_jax import algorithms
from tp_jax import config as config_lib
from tp_jax import data
from tp_jax import derived
from tp_jax import dtp
from tp_jax import layers as L
from tp_jax import models
from tp_jax import network
from tp_jax.algorithms import bp as bp_lib
from tp_jax.algorithms import feedback_training
from tp_jax.algorithms import ldrl


def _shapes(net, x_shape):
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  params = jax.eval_shape(lambda k, x: network.init(net, k, x), jax.random.key(0), x)
  hs = jax.eval_shape(lambda p, x: network.forward(net, p, x)[0], params, x)
  return params, [h.shape for h in hs]


def test_full_width_structure_and_size():
  """Stem, eight units (stride 2 at the first unit of stages 2-4), head: 10 DTP blocks;
  ~11.2M parameters, as ResNet-18's CIFAR variant (shapes only, nothing computed)."""
  net = models.resnet18()
  kinds = [type(b).__name__ for b in net.blocks]
  assert kinds == [
      'Sequential',
      'Residual',
      'Residual',
      'Derived',
      'Residual',
      'Derived',
      'Residual',
      'Derived',
      'Residual',
      'Sequential',
  ]
  params, hs = _shapes(net, (2, 32, 32, 3))
  assert hs == [(2, 32, 32, 64)] * 3 + [(2, 16, 16, 128)] * 2 + [(2, 8, 8, 256)] * 2 + [
      (2, 4, 4, 512)
  ] * 2 + [(2, 10)]
  size = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  assert 11.0e6 < size < 11.3e6, size


def test_width_scales_the_channels():
  _, hs = _shapes(models.resnet18(width=8, num_classes=3), (1, 16, 16, 3))
  assert [h[-1] for h in hs] == [8, 8, 8, 16, 16, 32, 32, 64, 64, 3]


def test_group_norm_groups_divide_the_channels():
  """32 groups (Wu & He) where the width allows, else a divisor of the channels."""
  for c in (4, 16, 48, 64, 512):
    groups = models._group_norm(c).num_groups  # pylint: disable=protected-access
    assert c % groups == 0 and groups <= 32, (c, groups)
    assert groups == 32 or c % 32, (c, groups)


@pytest.mark.slow
def test_tjml_dtp_update_tends_to_bp_gradient():
  """Every unit's feedback is exactly J^T in the Hadamard mode (closed-form convs and
  activations, derived GroupNorms and downsampling units, + id at the skips), so as
  beta -> 0 each block's TJML-DTP update is beta times BP's gradient."""
  net = models.resnet18(width=4)
  # 16x16: stage 4 is then 2x2, so that its GroupNorms (one channel per group at this
  # width) do not normalise single values to 0.
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 3)), jnp.float32)
  y = jnp.arange(4)
  params = network.init(net, jax.random.key(0), x)
  beta = 1e-3
  tp, _ = jax.jit(lambda p: dtp.local_grads(net, p, None, L.TJMC_HADAMARD, beta, x, y))(params)
  bp = jax.jit(lambda p: bp_lib.gradient(net, p, x, y))(params)
  for n in range(len(net)):
    g_tp = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(tp[n])])
    g_bp = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(bp[n])])
    cos = np.vdot(g_tp, g_bp) / (np.linalg.norm(g_tp) * np.linalg.norm(g_bp))
    ratio = np.linalg.norm(g_tp) / (beta * np.linalg.norm(g_bp))
    assert cos > 0.999 and abs(ratio - 1) < 0.01, (n, cos, ratio)


@pytest.mark.slow
def test_config_validates_for_every_method():
  cfg = resnet18_cifar10.get_config()
  n = len(models.resnet18()) - 1
  assert all(len(cfg.feedback[f]) == n for f in ('iterations', 'noise', 'lr'))
  for method in ('bp', 'tjml_dtp', 'fwdtp', 'ldrl', 'dtp'):
    cfg.method = method
    config_lib.validate(cfg)


@pytest.mark.slow
@pytest.mark.parametrize('method', ['bp', 'tjml_dtp', 'fwdtp', 'ldrl'])
def test_every_method_takes_a_step(method):
  """A narrow ResNet-18 on 16x16 images: one step of each method moves every block
  (a nonzero gradient in each) and keeps its parameters finite."""
  cfg = resnet18_cifar10.get_config()
  cfg.method = method
  cfg.model_kwargs.width = 4
  cfg.optimizer.weight_decay = 0.0  # so that a leaf moves only by its gradient
  cfg.feedback.iterations = (1,) * len(cfg.feedback.iterations)
  # LeCun-scale feedback weights: with FWDTP's U(-1e-3, 1e-3) the three downsampling
  # units (no identity path in their feedback) shrink the stem's target difference by
  # ~1e-3 each, below float32 resolution of its parameters.
  cfg.feedback.init_scale = 0.0
  net = models.get(cfg.model, **cfg.model_kwargs)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 16, 3)), jnp.float32)
  y = jnp.arange(4)
  algo = algorithms.make(net, cfg, algorithms.make_optimizer(cfg.optimizer, 10))
  state = algo.init(jax.random.key(0), x)
  new, metrics = jax.jit(algo.step)(state, (x, y), jax.random.key(1))
  assert bool(metrics['finite'])
  for n, (before, after) in enumerate(zip(state.params, new.params)):
    moved = [
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after))
    ]
    assert max(moved) > 0, (method, n)


def _ldrl_on_cifar10(data_dir, width, batch):
  """The config's LDRL on a narrow ResNet-18: (cfg, net, x, params, hs, ctxs), x the
  first ``batch`` CIFAR-10 training images."""
  cfg = resnet18_cifar10.get_config()
  cfg.method = 'ldrl'
  cfg.model_kwargs.width = width
  net = models.get(cfg.model, **cfg.model_kwargs)
  x = data.load_dataset('cifar10', data_dir, download=False).x_train[:batch]
  params = network.init(net, jax.random.key(0), x)
  hs, ctxs = network.forward(net, params, x)
  return cfg, net, x, params, hs, ctxs


def _train_feedback(cfg, net, x, params, hs, ctxs, fb):
  """One LDRL feedback training (the config's K, sigma, lr per block) from ``fb``:
  (trained feedback weights, final loss per trained block)."""
  txs = feedback_training.optimizers(cfg, net)
  state = feedback_training.init_state(fb, txs)
  train = jax.jit(
      lambda fb: feedback_training.train(
          net, ldrl.ldrl_loss, cfg, txs, params, fb, state, x, hs, ctxs, jax.random.key(3)
      )
  )
  fb, _, losses = train(fb)
  return fb, losses


@pytest.mark.slow
def test_ldrl_feedback_lr_keeps_every_block_finite_on_cifar10(real_data_dir):
  """The config's LDRL feedback training (its K, sigma and lr per block) from the
  initial weights of a width-16 ResNet-18 on a CIFAR-10 batch keeps every block's
  feedback weights and final loss finite. VGG's 1e-4 for every unit does not (random
  inputs did not show it: BUILD_NOTES)."""
  cfg, net, x, params, hs, ctxs = _ldrl_on_cifar10(real_data_dir, 16, 32)
  fb, losses = _train_feedback(
      cfg, net, x, params, hs, ctxs, network.init_feedback(params, jax.random.key(1))
  )
  finite = [bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(fb[1:])]
  assert all(finite) and bool(jnp.all(jnp.isfinite(losses))), (finite, losses)


@pytest.mark.slow
def test_ldrl_feedback_of_a_unit_stays_below_its_transposed_jacobian(real_data_dir):
  """Trained on LDRL's loss, the first unit's learned feedback (it starts near the
  identity, its body near 0) grows toward J^T and its largest singular value stays
  below J^T's. With the noisy input's linearisation of the GroupNorms in G(F(x + dx))
  (``Layer.noisy_reconstruction_ctx``), the loss rewarded a G far larger than J^T: at
  60 iterations its largest singular value was 2.6x J^T's (40.1 against 15.4), and in a
  longer probe the weights went non-finite near 140 iterations."""
  cfg, net, x, params, hs, ctxs = _ldrl_on_cifar10(real_data_dir, 8, 32)
  n = 1
  cfg.feedback.iterations = (60,) + (1,) * (len(net) - 2)  # the first unit's alone, mostly
  fb = network.init_feedback(params, jax.random.key(1), cfg.feedback.init_scale)
  fb, _ = _train_feedback(cfg, net, x, params, hs, ctxs, fb)
  b = fb[n]

  def largest_singular_value(p, mode):
    g = lambda v: network.block_feedback_difference(net, n, p, hs[n] + v, hs[n], ctxs[n], mode)
    _, g_t = jax.vjp(g, jnp.zeros_like(hs[n]))
    v = jax.random.normal(jax.random.key(7), hs[n].shape)
    for _ in range(15):  # power iteration on J_G^T J_G
      v = g_t(g(v / jnp.linalg.norm(v)))[0]
    return float(jnp.sqrt(jnp.linalg.norm(v)))

  assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(b))
  learned = largest_singular_value(b, L.LEARNED)
  exact = largest_singular_value(params[n], L.TJMC)
  assert learned < exact, (learned, exact)


def test_downsampling_unit_is_a_plain_module_with_derived_feedback():
  unit = models.resnet18(width=4).blocks[3]
  assert isinstance(unit, derived.Derived)
  assert isinstance(unit.module, models.PreActDownsample)
