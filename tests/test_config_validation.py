"""Bad configs: each is refused up front with a ConfigError naming the field.

Hand-written cases for every rule, then property tests: random malformed configs are
either refused with a ConfigError/ValueError raised by tp_jax (never an error from
deep inside JAX, Flax or Optax) whose message names a changed field, or accepted, in
which case they must train one step.
"""

from __future__ import annotations

import math
import traceback

from hypothesis import HealthCheck, assume, given, settings, strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from tp_jax import algorithms
from tp_jax import config as config_lib
from tp_jax import data
from tp_jax import models
from tp_jax import train

ConfigError = config_lib.ConfigError


def _ldrl_lenet():
  c = config_lib.default()
  c.method = 'ldrl'
  return c


def _dataset(shape=(28, 28, 1), n_train=32, n_test=8):
  r = np.random.RandomState(0)
  return data.Dataset(jnp.asarray(r.randn(n_train, *shape), jnp.float32),
                      jnp.asarray(r.randint(0, 10, n_train), jnp.int32),
                      jnp.asarray(r.randn(n_test, *shape), jnp.float32),
                      jnp.asarray(r.randint(0, 10, n_test), jnp.int32), data.info('mnist'))


def _set(cfg, path: str, value) -> None:
  *parents, leaf = path.split('.')
  node = cfg
  for p in parents:
    node = node[p]
  with cfg.unlocked():
    if hasattr(node, 'unlocked'):
      with node.unlocked():
        node[leaf] = value
    else:
      node[leaf] = value


# --------------------------------------------------------------------------------------
# One test per rule


def test_default_and_experiment_configs_are_valid():
  import importlib  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  config_lib.validate(config_lib.default())
  for f in sorted((Path(__file__).parents[1] / 'experiments' / 'configs').glob('*.py')):
    if f.name == '__init__.py':
      continue
    cfg = importlib.import_module(f'experiments.configs.{f.stem}').get_config()
    for method in algorithms.METHODS:
      if method == 'ijml_dtp':
        continue  # needs square blocks: not every model has them
      c = cfg.copy_and_resolve_references()
      c.method = method
      if method == 'pjml_dtp' and c.model != 'mlp':
        continue
      if c.model == 'reversible_mixer' and method in config_lib.FEEDBACK_WEIGHTS:
        with pytest.raises(ConfigError, match='exact inverse'):
          config_lib.validate(c)  # feedback weights have no meaning there
        continue
      config_lib.validate(c)


@pytest.mark.parametrize('field, value, valid', [
    ('model', 'resnet50', sorted(models.MODELS)),
    ('method', 'backprop', list(algorithms.METHODS)),
    ('dataset', 'imagenet', list(config_lib.DATASETS)),
    ('model_kwargs.conv_impl', 'cudnn', ['auto', 'xla', 'fast']),
    ('data_backend', 'hdf5', ['native', 'tfds']),
])
def test_unknown_names_list_the_valid_ones(field, value, valid):
  cfg = config_lib.default()
  _set(cfg, field, value)
  with pytest.raises(ConfigError) as e:
    config_lib.validate(cfg)
  msg = str(e.value)
  assert repr(value) in msg and field in msg
  assert all(v in msg for v in valid), msg


@pytest.mark.parametrize('field, value', [
    (f, v) for f in ('batch_size', 'epochs', 'eval_batch_size') for v in (0, -1)] + [
    (f, v) for f in ('optimizer.lr', 'beta') for v in (0.0, -1.0, -0.5, float('nan'))]
)
def test_non_positive_numbers(field, value):
  cfg = config_lib.default()
  _set(cfg, field, value)
  with pytest.raises(ConfigError, match=field.replace('.', r'\.') + ' must be a positive'):
    config_lib.validate(cfg)


@pytest.mark.parametrize('field, bad', [('iterations', 0), ('iterations', 2.5),
                                        ('noise', 0.0), ('noise', -0.1), ('lr', -1e-3),
                                        ('lr', 'fast')])
def test_per_block_entries_must_be_positive(field, bad):
  cfg = _ldrl_lenet()
  values = list(cfg.feedback[field])
  values[1] = bad
  _set(cfg, f'feedback.{field}', values)
  with pytest.raises(ConfigError, match=rf'feedback\.{field}\[1\] must be a positive'):
    config_lib.validate(cfg)


@pytest.mark.parametrize('method', ['ldrl', 'dtp'])
@pytest.mark.parametrize('field', ['iterations', 'noise', 'lr'])
@pytest.mark.parametrize('length', [2, 4])
def test_per_block_lists_of_the_wrong_length(method, field, length):
  """LeNet has 4 blocks, 3 of whose feedback is trained: 3 values, not 2 or 4 (the
  reference code silently truncated)."""
  cfg = _ldrl_lenet()
  cfg.method = method
  _set(cfg, f'feedback.{field}', (list(cfg.feedback[field]) * 2)[:length])
  with pytest.raises(ConfigError, match=rf'feedback\.{field} has {length} entries but '
                                        r'lenet has 3 blocks'):
    config_lib.validate(cfg)


def test_batch_size_must_divide_over_devices():
  cfg = config_lib.default()
  cfg.batch_size = 12
  config_lib.validate(cfg, num_devices=4)
  with pytest.raises(ConfigError, match=r'batch_size=12 is not divisible .*\(8\)'):
    config_lib.validate(cfg, num_devices=8)


def test_batch_size_larger_than_dataset(tmp_path):
  cfg = config_lib.default()
  cfg.batch_size = 64
  with pytest.raises(ConfigError, match='batch_size=64 exceeds the 32 training examples'):
    train.train_and_evaluate(cfg, tmp_path, _dataset(), log=lambda s: None)


@pytest.mark.parametrize('model, shape, match', [
    ('mlp_mixer', (28, 28, 1), r'mlp_mixer was built for \(32, 32\) images'),
    ('simple_vgg', (8, 8, 1), r'simple_vgg .*cannot take mnist images of shape \(8, 8, 1\)'),
])
def test_image_shape_not_matching_the_model(tmp_path, model, shape, match):
  cfg = config_lib.default()
  cfg.model = model
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(cfg, tmp_path, _dataset(shape), log=lambda s: None)
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize('seed', [-1, 2 ** 32, 2 ** 40])
def test_seed_out_of_range(seed):
  """jax.random.key keeps 32 bits: seed 2**32 would silently repeat seed 0's run."""
  cfg = config_lib.default()
  cfg.seed = seed
  with pytest.raises(ConfigError, match=r'seed must be an integer in \[0, 2\*\*32\)'):
    config_lib.validate(cfg)


def test_num_processes_must_be_positive(tmp_path):
  cfg = config_lib.default()
  cfg.num_processes = 0
  with pytest.raises(ConfigError, match='num_processes must be a positive integer'):
    train.train_and_evaluate(cfg, tmp_path, _dataset(), log=lambda s: None)


def test_bad_model_kwargs_name_the_field():
  cfg = config_lib.default()
  _set(cfg, 'model_kwargs', {'act': 'elu', 'depth': 3})
  with pytest.raises(ConfigError, match='model_kwargs'):
    config_lib.validate(cfg)


# --------------------------------------------------------------------------------------
# Property tests

_JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=4),
                  st.floats(allow_nan=True, allow_infinity=True),
                  st.integers(-10, 10), st.lists(st.integers(-2, 3), max_size=3))
_NUM = st.one_of(st.integers(-3, 64), st.floats(-1.0, 2.0),
                 st.sampled_from([0, -0.0, math.nan, math.inf, -math.inf, 1e30]), _JUNK)
_COUNT = st.one_of(st.integers(-3, 5), st.sampled_from([0.5, 2.0, '3', True]), _JUNK)
_LIST = st.one_of(st.lists(st.one_of(st.integers(-1, 3), st.floats(-1, 1), _JUNK),
                           min_size=0, max_size=4), _JUNK)

# (field, strategy). Valid values appear too, so some configs are accepted. Expensive
# valid models (LeNet, VGG) are left out: accepted configs must train a step here.
MUTATIONS = {
    'model': st.sampled_from(['mlp', 'mlp_mixer', 'resnet', '', 'MLP', None, 7]),
    'method': st.sampled_from(list(algorithms.METHODS) + ['backprop', '', None, 2]),
    'dataset': st.sampled_from(list(config_lib.DATASETS) + ['imagenet', '', None]),
    'model_kwargs.act': st.sampled_from(list(config_lib.ACTIVATIONS) + ['relu', '', None, 1]),
    'model_kwargs.widths': st.one_of(st.lists(st.integers(-2, 12), max_size=3), _JUNK),
    'feedback_act': st.sampled_from(['integral', 'hadamard', 'sigma', None]),
    'batch_size': st.one_of(st.sampled_from([8, 16, 12, 33, 64]), _NUM),
    'epochs': _COUNT,
    'beta': _NUM,
    'seed': st.one_of(st.integers(-3, 2 ** 40), _JUNK),
    'steps_per_epoch': _COUNT,
    'check_every_steps': _COUNT,
    'eval_batch_size': _COUNT,
    'checkpoint_every_steps': _COUNT,
    'keep_checkpoints': _COUNT,
    'augment': st.one_of(st.booleans(), _JUNK),
    'skip_nonfinite': st.one_of(st.booleans(), _JUNK),
    'num_processes': st.sampled_from([0, -1, 1.5, '2', None]),
    'optimizer.name': st.sampled_from(['sgd', 'adam', 'rmsprop', '', None]),
    'optimizer.lr': _NUM,
    'optimizer.momentum': _NUM,
    'optimizer.weight_decay': _NUM,
    'optimizer.schedule': st.sampled_from(['constant', 'cosine', 'linear', None]),
    'feedback.iterations': _LIST,
    'feedback.noise': _LIST,
    'feedback.lr': _LIST,
    'feedback.order': st.sampled_from(['parallel', 'sequential', 'random', None]),
    'feedback.init_scale': _NUM,
}


def _base():
  """A config that is valid and cheap to run: a 2-hidden-layer MLP."""
  c = config_lib.default()
  c.model, c.method = 'mlp', 'tjml_dtp'
  c.model_kwargs = {'act': 'tanh', 'widths': (8, 8)}
  c.batch_size, c.epochs, c.steps_per_epoch, c.eval_batch_size = 8, 1, 2, 8
  c.feedback.iterations, c.feedback.noise, c.feedback.lr = [1, 1], [0.1, 0.1], [1e-3, 1e-3]
  return c


@st.composite
def malformed(draw):
  fields = draw(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3,
                         unique=True))
  cfg = _base()
  changes = {}
  for f in fields:
    value = draw(MUTATIONS[f])
    if isinstance(value, list) and f == 'model_kwargs.widths':
      value = tuple(value)
    try:
      _set(cfg, f, value)
    except TypeError:  # ConfigDict keeps a field's type: such a value never gets in
      continue
    changes[f] = value
  assume(changes)
  return cfg, changes


def _check_refusal(e: Exception, changes: dict) -> None:
  assert isinstance(e, ValueError), f'{type(e).__name__}: {e}'
  frames = traceback.extract_tb(e.__traceback__)
  origin = frames[-1].filename
  assert '/tp_jax/' in origin, (
      f'{type(e).__name__} raised from {origin}, not by tp_jax: {e}\n'
      + ''.join(traceback.format_list(frames[-4:])))
  msg = str(e).lower()
  names = {part.lower() for f in changes for part in f.split('.')}
  assert any(n in msg for n in names), f'message names none of {sorted(changes)}: {e}'


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(malformed())
def test_validator_refuses_cleanly_or_accepts(case):
  """Many configs through ``validate`` alone: it never fails from deep inside."""
  cfg, changes = case
  try:
    config_lib.validate(cfg)
  except Exception as e:  # pylint: disable=broad-except
    _check_refusal(e, changes)


_TRIED = {'accepted': 0, 'refused': 0}


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(malformed())
def test_malformed_configs_are_refused_or_train_one_step(tmp_path_factory, case):
  cfg, changes = case
  try:
    res = train.train_and_evaluate(cfg, tmp_path_factory.mktemp('run'), _dataset(),
                                   log=lambda s: None, until_step=1, progress=False)
  except train.DivergenceError:
    _TRIED['accepted'] += 1  # it trained the step, and said the step was not finite
    return
  except Exception as e:  # pylint: disable=broad-except
    _check_refusal(e, changes)
    _TRIED['refused'] += 1
    return
  _TRIED['accepted'] += 1
  assert res['step'] == 1, changes
