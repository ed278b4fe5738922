"""tp_jax.diagnostics: the angle and norm ratio of each block's TP update to BP's
gradient, the feedback's relative TJML, and their hook in the training loop."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from experiments import synthetic
from tp_jax import algorithms
from tp_jax import config as config_lib
from tp_jax import diagnostics
from tp_jax import jml
from tp_jax import layers
from tp_jax import models
from tp_jax import network
from tp_jax import train

WIDTHS = (12, 12)  # the MLP's hidden widths: 3 blocks


@functools.lru_cache(maxsize=None)
def _batch(n=16, seed=0):
  r = np.random.RandomState(seed)
  return (
      jnp.asarray(r.randn(n, 28, 28, 1).astype(np.float32)),
      jnp.asarray(r.randint(0, 10, n).astype(np.int32)),
  )


def _mlp_params(seed=0):
  net = models.mlp(act='tanh', widths=WIDTHS)
  return net, network.init(net, jax.random.key(seed), _batch()[0])


def _run(net, params, fb_params, mode, beta, key=jax.random.key(0)):
  x, y = _batch()
  diagnose = jax.jit(lambda p, b: diagnostics.block_diagnostics(net, p, b, mode, beta, x, y, key))
  return jax.tree.map(np.asarray, diagnose(params, fb_params))


# --------------------------------------------------------------------------------------
# The angle


@pytest.mark.parametrize(
    'a,b,degrees',
    [
        ((1.0, 0.0), (1.0, 1.0), 45.0),
        ((1.0, 0.0), (0.0, 2.0), 90.0),
        ((1.0, 0.0), (-3.0, 0.0), 180.0),
        ((1.0, 2.0, 3.0), (2.0, 4.0, 6.0), 0.0),
        ((1.0, 0.0), (-1.0, 3.0**0.5), 120.0),
    ],
)
def test_angle_of_hand_computed_pairs(a, b, degrees):
  got = float(diagnostics.angle_degrees(jnp.array(a), jnp.array(b)))
  np.testing.assert_allclose(got, degrees, atol=1e-4)


def test_angle_with_a_zero_vector_is_nan():
  assert np.isnan(float(diagnostics.angle_degrees(jnp.zeros(3), jnp.ones(3))))


@pytest.mark.parametrize('seed', range(4))
def test_angle_agrees_with_the_arccos_of_the_cosine(seed):
  """Random shapes and scales: the float32 atan2 form against float64 arccos."""
  r = np.random.RandomState(seed)
  n = r.randint(2, 50)
  a, b = r.randn(n) * r.uniform(0.1, 10), r.randn(n) * r.uniform(0.1, 10)
  cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
  got = diagnostics.angle_degrees(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  chex.assert_trees_all_close(float(got), np.degrees(np.arccos(cos)), atol=1e-3)


# --------------------------------------------------------------------------------------
# Alignment with BP


@pytest.mark.slow
def test_tjmc_update_tends_to_bp_gradient_as_beta_to_0():
  """TJMC (varsigma) on the tanh MLP: G's Jacobian at h is J_F^T, but G is nonlinear,
  so every block's update tends to beta times BP's gradient, in direction and size,
  only as beta -> 0; it is further from it at a large beta."""
  net, params = _mlp_params()
  small = _run(net, params, None, layers.TJMC, 1e-2)
  large = _run(net, params, None, layers.TJMC, 10.0)
  chex.assert_shape((small['bp_angle'], small['bp_norm_ratio']), (len(net),))
  assert np.all(small['bp_angle'] < 0.5), small['bp_angle']
  np.testing.assert_allclose(small['bp_norm_ratio'], 1.0, atol=0.01)
  assert large['bp_angle'][0] > 10 * small['bp_angle'][0] + 1.0, large['bp_angle']


def test_hadamard_update_is_bp_gradient_at_any_beta():
  """The Hadamard feedback is linear in t with Jacobian J_F^T: G(t) - G(h) is exactly
  J_F^T (t - h), so the update is beta times BP's gradient at any beta."""
  net, params = _mlp_params()
  out = _run(net, params, None, layers.TJMC_HADAMARD, 10.0)
  assert np.all(out['bp_angle'] < 0.01), out['bp_angle']
  np.testing.assert_allclose(out['bp_norm_ratio'], 1.0, atol=1e-4)


@pytest.mark.slow
def test_random_fixed_feedback_is_far_from_bp():
  """FWDTP's random feedback (its init, U(-s, s)): the top block's target is exact
  whatever the feedback, the lower blocks' updates are far from BP's gradient."""
  net, params = _mlp_params()
  fb_params = network.init_feedback(
      params, jax.random.key(7), config_lib.default().feedback.init_scale
  )
  out = _run(net, params, fb_params, layers.LEARNED, 1e-4)
  assert out['bp_angle'][-1] < 0.5, out['bp_angle']
  assert np.all(out['bp_angle'][:-1] > 30.0), out['bp_angle']


# --------------------------------------------------------------------------------------
# TJML


@pytest.mark.slow
def test_tjml_is_zero_for_exact_feedback_and_positive_for_random_feedback():
  net, params = _mlp_params()
  fb_params = network.init_feedback(params, jax.random.key(7), None)
  exact = _run(net, params, None, layers.TJMC_HADAMARD, 0.1)['tjml']
  random = _run(net, params, fb_params, layers.LEARNED, 0.1)['tjml']
  chex.assert_shape((exact, random), (len(net) - 1,))
  assert np.all(exact < 1e-5), exact
  assert np.all(random > 0.5), random


@pytest.mark.parametrize('n', [1, 2])
def test_relative_tjml_estimates_the_exact_value(n):
  """Many probes: the estimate of random feedback's relative TJML is the exact value
  (jml's materialised Jacobians) to Monte-Carlo precision."""
  net, params = _mlp_params(seed=1)
  fb_params = network.init_feedback(params, jax.random.key(2), None)
  x, _ = _batch()
  h_in = network.forward(net, params, x)[0][n - 1]
  exact = jml.block_jml(net, params, fb_params, n, h_in, layers.LEARNED, exact=True).relative
  estimate = float(
      jax.jit(
          lambda p, b, h: diagnostics.relative_tjml(
              net, p, b, n, h, layers.LEARNED, jax.random.key(3), num_probes=256
          )
      )(params, fb_params, h_in)
  )
  np.testing.assert_allclose(estimate, exact, rtol=0.05)


# --------------------------------------------------------------------------------------
# Which feedback each method's update uses


@pytest.mark.parametrize(
    'method,feedback',
    [('bp', None), ('tjml_dtp', 'forward'), ('fwdtp', 'weights'), ('ldrl', 'weights')],
)
def test_method_feedback(method, feedback):
  cfg = config_lib.default()
  cfg.method = method
  state = algorithms.TrainState(step=0, params='P', opt_state=(), fb_params='B')
  got = diagnostics.method_feedback(cfg, state)
  if feedback is None:
    assert got is None
  else:
    fb, mode = got
    assert fb == ('B' if feedback == 'weights' else None)
    assert mode == (layers.LEARNED if feedback == 'weights' else layers.TJMC)


def test_scalars_name_tjml_from_block_2():
  tags = diagnostics.scalars({'bp_angle': [1.0, 2.0], 'tjml': [3.0], 'loss': 0.5}, 'step')
  assert tags == {'step/bp_angle/block1': 1.0, 'step/bp_angle/block2': 2.0, 'step/tjml/block2': 3.0}


def test_config_refuses_a_non_bool():
  cfg = config_lib.default()
  cfg.diagnostics = None  # ConfigDict itself refuses other types for a bool field
  with pytest.raises(config_lib.ConfigError, match='diagnostics'):
    config_lib.validate(cfg)


# --------------------------------------------------------------------------------------
# In the training loop


def _dataset(n_train=48, n_test=16):
  return synthetic.dataset('mnist', n_train, n_test)


def _cfg(method, diagnostics_on):
  c = config_lib.default()
  c.model, c.method = 'mlp', method
  c.model_kwargs = {'act': 'tanh', 'widths': WIDTHS}
  c.batch_size, c.epochs, c.eval_batch_size = 16, 2, 16
  c.log_every_steps = 2
  c.feedback.iterations, c.feedback.noise, c.feedback.lr = (2,), (0.1,), (1e-4,)
  c.diagnostics = diagnostics_on
  return c


def _tensorboard_tags(logdir) -> dict[str, list[int]]:
  acc = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.SCALARS: 0}
  )
  acc.Reload()
  return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


@pytest.mark.slow
@pytest.mark.parametrize('method', ['tjml_dtp', 'ldrl'])
def test_training_logs_diagnostics_and_is_unchanged_by_them(tmp_path, method):
  """metrics.jsonl rows and TensorBoard get the diagnostics (epoch ends, and every
  log_every_steps); every other metric and the final state equal a run without them."""
  ds = _dataset()
  on = train.train_and_evaluate(_cfg(method, True), tmp_path / 'on', ds, log=lambda s: None)
  off = train.train_and_evaluate(_cfg(method, False), tmp_path / 'off', ds, log=lambda s: None)
  rows_on = train.read_history(tmp_path / 'on' / 'metrics.jsonl')
  rows_off = train.read_history(tmp_path / 'off' / 'metrics.jsonl')
  nblocks = len(WIDTHS) + 1
  for r_on, r_off in zip(rows_on, rows_off, strict=True):
    assert len(r_on['bp_angle']) == len(r_on['bp_norm_ratio']) == nblocks
    assert len(r_on['tjml']) == nblocks - 1
    assert np.all(np.isfinite(r_on['bp_angle'] + r_on['tjml']))
    assert not set(diagnostics.FIRST_BLOCK) & set(r_off)
    same = lambda r: {
        k: v
        for k, v in r.items()
        if k not in train.TIMING_KEYS and k not in diagnostics.FIRST_BLOCK
    }
    assert same(r_on) == same(r_off)
  chex.assert_trees_all_equal(on['state'], off['state'])
  tags = _tensorboard_tags(tmp_path / 'on')
  steps = 2 * train.steps_per_epoch(_cfg(method, True), 48)
  assert tags['step/bp_angle/block1'] == list(range(2, steps + 1, 2))
  assert tags['step/tjml/block2'] == list(range(2, steps + 1, 2))
  assert tags['train/bp_angle/block3'] == [steps // 2, steps]
  assert 'train/tjml/block1' not in tags


def test_bp_gets_no_diagnostics(tmp_path):
  train.train_and_evaluate(_cfg('bp', True), tmp_path, _dataset(), log=lambda s: None)
  row, _ = train.read_history(tmp_path / 'metrics.jsonl')
  assert not set(diagnostics.FIRST_BLOCK) & set(row)
