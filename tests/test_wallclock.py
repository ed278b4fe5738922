"""Accuracy against wall-clock: ``eval_every_steps`` (test-set evaluations timed apart
from training, in evals.jsonl) and the ``train_seconds`` budget (training stops at the
first host sync after it is spent; the run is then complete)."""

from __future__ import annotations

import itertools
import json
import types

import pytest

from experiments import synthetic
from experiments.configs import mlp_mnist
from tp_jax import config as config_lib
from tp_jax import train


def _dataset(n_train=48, n_test=16):
  return synthetic.dataset('mnist', n_train, n_test)


def _cfg(**fields):
  c = mlp_mnist.get_config()
  c.method, c.diagnostics = 'tjml_dtp', False
  c.model_kwargs.widths = (16,)
  c.batch_size, c.epochs, c.steps_per_epoch, c.eval_batch_size = 16, 2, 3, 16
  for k, v in fields.items():
    c[k] = v
  return c


def _quiet(_):
  pass


def _without_timing(rows):
  return [{k: v for k, v in r.items() if k not in train.TIMING_KEYS} for r in rows]


@pytest.fixture
def ticking_clock(monkeypatch):
  """train's clock advances 1 s per reading: a chunk (two readings) takes 1 s."""
  ticks = itertools.count()
  monkeypatch.setattr(train, 'time', types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))


@pytest.mark.slow
def test_eval_every_steps_rows_and_unchanged_training(tmp_path):
  ds = _dataset()
  plain = train.train_and_evaluate(_cfg(num_seeds=2), tmp_path / 'plain', ds, log=_quiet)
  res = train.train_and_evaluate(
      _cfg(num_seeds=2, eval_every_steps=2), tmp_path / 'evals', ds, log=_quiet
  )
  assert _without_timing(res['history']) == _without_timing(plain['history'])
  evals = train.read_history(tmp_path / 'evals' / train.EVALS_FILE)
  assert (
      evals == res['evals'] == json.loads((tmp_path / 'evals' / 'result.json').read_text())['evals']
  )
  assert [r['step'] for r in evals] == [0, 2, 4, 6]  # the initial state, then every 2 steps
  assert [r['epoch'] for r in evals] == pytest.approx([0, 2 / 3, 4 / 3, 2])
  assert all(len(r['test_accuracy']) == 2 for r in evals)  # one per seed
  assert evals[-1]['test_accuracy'] == res['history'][-1]['test_accuracy']
  train_s, eval_s = [r['train_s'] for r in evals], [r['eval_s'] for r in evals]
  assert train_s[0] == 0 and train_s == sorted(train_s) and train_s[-1] == res['train_s']
  assert 0 < eval_s[0] < eval_s[-1] == res['eval_s'] and eval_s == sorted(eval_s)
  # Rows carry the run's cumulative training seconds: the sum of its epochs'.
  assert res['history'][-1]['train_s'] == pytest.approx(
      sum(r['epoch_train_s'] for r in res['history'])
  )
  assert 'evals' not in plain and not (tmp_path / 'plain' / train.EVALS_FILE).exists()


@pytest.mark.slow
def test_train_seconds_stops_at_the_first_sync_after_the_budget(tmp_path, ticking_clock):
  cfg = _cfg(check_every_steps=1, train_seconds=2.5, steps_per_epoch=5)
  logs, ds = [], _dataset(n_train=96)
  res = train.train_and_evaluate(cfg, tmp_path, ds, log=logs.append)
  assert res['step'] == 3  # 1 s per one-step chunk: 3 s >= 2.5 s after step 3
  assert res['complete'] and res['budget_spent'] and res['train_s'] == 3.0
  (row,) = res['history']  # the partial epoch's row
  assert (row['epoch'], row['step'], row['steps']) == (1, 3, 3)
  assert any('training budget of 2.5 s spent after 3 steps' in l for l in logs)
  assert json.loads((tmp_path / 'result.json').read_text())['step'] == 3
  again = train.train_and_evaluate(cfg, tmp_path, ds, log=_quiet)  # nothing to add
  assert again['step'] == 3 and again['history'] == res['history']
  longer = cfg.copy_and_resolve_references()
  longer.train_seconds = 10.0
  with pytest.raises(config_lib.ConfigError, match='train_seconds'):
    train.train_and_evaluate(longer, tmp_path, ds, log=_quiet)


def test_budget_and_eval_fields_are_validated():
  for field, bad in (('eval_every_steps', -1), ('eval_every_steps', 1.5), ('train_seconds', -2.0)):
    cfg = _cfg()
    with cfg.ignore_type():
      cfg[field] = bad
    with pytest.raises(config_lib.ConfigError, match=field):
      config_lib.validate(cfg)
