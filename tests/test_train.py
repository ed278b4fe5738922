"""tp_jax.train's set-up (``setup``, ``init_state``, ``epoch_indices``,
``steps_per_epoch``) and metrics reader: the pieces the loop, the speed harness and
the benches share."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments import synthetic
from tp_jax import config as config_lib
from tp_jax import train


def _dataset(n_train=48, n_test=16, seed=0):
  return synthetic.dataset('mnist', n_train, n_test, seed)


def _mlp():
  c = config_lib.default()
  c.model, c.method = 'mlp', 'tjml_dtp'
  c.model_kwargs = {'act': 'tanh', 'widths': (16,)}
  c.batch_size, c.epochs, c.eval_batch_size = 16, 2, 16
  return c


def test_steps_per_epoch():
  cfg = _mlp()
  assert train.steps_per_epoch(cfg, 50) == 3  # full batches only
  cfg.steps_per_epoch = 2
  assert train.steps_per_epoch(cfg, 50) == 2
  cfg.steps_per_epoch = 9
  assert train.steps_per_epoch(cfg, 50) == 3
  with pytest.raises(config_lib.ConfigError, match='exceeds the 15 training examples'):
    train.steps_per_epoch(cfg, 15)


def test_setup_steps_like_the_training_loop(tmp_path):
  """A run stepped by hand from ``setup`` reaches the loop's parameters bit for bit."""
  cfg, ds = _mlp(), _dataset()
  seen = []
  run = train.setup(cfg, ds, before_compile=seen.append)
  assert run.steps_per_epoch == 3 and run.total_steps == 6 and run.n_train == 48
  assert run.compile_s > 0
  (spec,) = seen  # the state's shapes, before the compile
  state = train.init_state(run)
  assert jax.tree.structure(spec) == jax.tree.structure(state)
  assert [s.shape for s in jax.tree.leaves(spec)] == [a.shape for a in jax.tree.leaves(state)]
  for epoch in range(cfg.epochs):
    idx = train.epoch_indices(run, epoch)
    assert idx.shape == (3, 16)
    assert len(set(np.asarray(idx).ravel())) == 48  # a permutation: each example once
    for _ in range(run.steps_per_epoch):
      state, _ = run.train_step(state, run.x_train, run.y_train, idx, run.step_key)
  looped = train.train_and_evaluate(cfg, tmp_path, ds, log=lambda s: None)['state']
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(looped)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(
      np.asarray(train.epoch_indices(run, 0)), np.asarray(train.epoch_indices(run, 1))
  )


def test_read_history(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"epoch": 1, "step": 3}\n\n{"epoch": 2, "step": 6}\n')
  assert train.read_history(path) == [{'epoch': 1, 'step': 3}, {'epoch': 2, 'step': 6}]
  path.write_text('')
  assert train.read_history(path) == []
