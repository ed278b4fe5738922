"""Bad configs: each is refused up front with a ConfigError naming the field.

Hand-written cases for every rule, then the fields set from the command line (through
ml_collections' flags and the absl binary), then property tests: random malformed
configs are either refused with a ConfigError/ValueError raised by tp_jax (never an
error from deep inside JAX, Flax or Optax) whose message names a changed field, or
accepted, in which case they must train one step.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path
import subprocess
import sys
import traceback

from absl import flags
from hypothesis import HealthCheck, assume, given, settings, strategies as st
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import pytest

from experiments import synthetic
from tp_jax import algorithms
from tp_jax import config as config_lib
from tp_jax import data
from tp_jax import layers
from tp_jax import models
from tp_jax import network
from tp_jax import train
from tp_jax.algorithms import feedback_training

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    f for f in (ROOT / 'experiments' / 'configs').glob('*.py') if f.name != '__init__.py'
)

ConfigError = config_lib.ConfigError


def _ldrl_lenet():
  c = config_lib.default()
  c.method = 'ldrl'
  return c


def _dataset(shape=(28, 28, 1), n_train=32, n_test=8):
  return synthetic.dataset('mnist', n_train, n_test, image_shape=shape)


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


def _experiment_config(f: Path):
  return importlib.import_module(f'experiments.configs.{f.stem}').get_config()


@pytest.mark.slow
def test_default_and_experiment_configs_are_valid():
  """Every method on every experiment config validates, except where a layer refuses
  the method's feedback: then validate refuses with the layer's own reason."""
  config_lib.validate(config_lib.default())
  for f in CONFIGS:
    cfg = _experiment_config(f)
    for method in algorithms.METHODS:
      c = cfg.copy_and_resolve_references()
      c.method = method
      if c.model == 'reversible_mixer' and algorithms.has_feedback_weights(method):
        with pytest.raises(ConfigError, match='exact inverse'):
          config_lib.validate(c)  # feedback weights have no meaning there
      elif method == 'ijml_dtp' or (method == 'pjml_dtp' and c.model != 'mlp'):
        # IJMC needs square dense blocks and PJMC dense ones: no experiment model has
        # the first, only the MLP the second.
        with pytest.raises(ConfigError, match=rf"method='{method}'.*(square|closed-form)"):
          config_lib.validate(c)
      else:
        config_lib.validate(c)


@pytest.mark.parametrize(
    'field, value, valid',
    [
        ('model', 'resnet50', sorted(models.MODELS)),
        ('method', 'backprop', list(algorithms.METHODS)),
        ('dataset', 'imagenet', list(data.DATASETS)),
        ('model_kwargs.act', 'relu', list(layers.ACTIVATIONS)),
        ('model_kwargs.conv_impl', 'cudnn', ['auto', 'xla', 'fast']),
        ('data_backend', 'hdf5', ['native', 'tfds']),
    ],
)
def test_unknown_names_list_the_valid_ones(field, value, valid):
  cfg = config_lib.default()
  _set(cfg, field, value)
  with pytest.raises(ConfigError) as e:
    config_lib.validate(cfg)
  msg = str(e.value)
  assert repr(value) in msg and field in msg
  assert all(v in msg for v in valid), msg


@pytest.mark.parametrize(
    'field, value',
    [(f, v) for f in ('batch_size', 'epochs', 'eval_batch_size') for v in (0, -1)]
    + [(f, v) for f in ('optimizer.lr', 'beta') for v in (0.0, -1.0, -0.5, float('nan'))],
)
def test_non_positive_numbers(field, value):
  cfg = config_lib.default()
  _set(cfg, field, value)
  with pytest.raises(ConfigError, match=field.replace('.', r'\.') + ' must be a positive'):
    config_lib.validate(cfg)


@pytest.mark.parametrize(
    'field, bad',
    [
        ('iterations', 0),
        ('iterations', 2.5),
        ('noise', 0.0),
        ('noise', -0.1),
        ('lr', -1e-3),
        ('lr', 'fast'),
    ],
)
def test_per_block_entries_must_be_positive(field, bad):
  cfg = _ldrl_lenet()
  values = list(cfg.feedback[field])
  values[1] = bad
  _set(cfg, f'feedback.{field}', values)
  with pytest.raises(ConfigError, match=rf'feedback\.{field}\[1\] must be a positive'):
    config_lib.validate(cfg)


@pytest.mark.parametrize('method', ['ldrl', 'dtp'])
@pytest.mark.parametrize('field', ['iterations', 'noise', 'lr'])
@pytest.mark.parametrize('length', [0, 2, 4])
def test_per_block_lists_of_the_wrong_length(method, field, length):
  """LeNet has 4 blocks, 3 of whose feedback is trained: 3 values (or 1 for all), not
  0, 2 or 4 (the reference code silently truncated). The message names the field, the
  expected length and the blocks."""
  cfg = _ldrl_lenet()
  cfg.method = method
  _set(cfg, f'feedback.{field}', (list(cfg.feedback[field]) * 2)[:length])
  with pytest.raises(
      ConfigError,
      match=rf'feedback\.{field} has {length} entries but '
      r'lenet has 3 blocks whose feedback is trained '
      r'\(blocks 2\.\.4\); give 3 values',
  ):
    config_lib.validate(cfg)


@pytest.mark.slow
@pytest.mark.parametrize('method', ['ldrl', 'dtp'])
def test_one_per_block_value_is_used_for_every_block(method):
  """(K,) trains exactly as (K, K) does: the same step, bit for bit."""
  states = []
  for iterations, noise, lr in (((2,), (0.1,), (1e-3,)), ((2, 2), (0.1, 0.1), (1e-3, 1e-3))):
    cfg = _base()
    cfg.method = method
    cfg.feedback.iterations, cfg.feedback.noise, cfg.feedback.lr = iterations, noise, lr
    config_lib.validate(cfg)
    net = models.for_config(cfg)
    assert feedback_training.per_block(cfg, 'iterations', net) == (2, 2)
    x = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
    algo = algorithms.make(net, cfg, algorithms.make_optimizer(cfg.optimizer, 10))
    state = algo.init(jax.random.key(1), x)
    states.append(jax.jit(algo.step)(state, (x, jnp.arange(8) % 10), jax.random.key(2)))
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(a, b)


def test_algorithms_declare_their_feedback():
  assert [m for m in algorithms.METHODS if algorithms.has_feedback_weights(m)] == [
      'ldrl',
      'fwdtp',
      'dtp',
  ]
  assert [m for m in algorithms.METHODS if algorithms.trains_feedback(m)] == ['ldrl', 'dtp']
  with pytest.raises(ValueError, match="unknown method 'backprop'"):
    algorithms.has_feedback_weights('backprop')


@pytest.mark.parametrize(
    'method, feedback_act, mode',
    [
        ('bp', 'integral', None),
        ('tjml_dtp', 'integral', layers.TJMC),
        ('tjml_dtp', 'hadamard', layers.TJMC_HADAMARD),
        ('ijml_dtp', 'integral', layers.IJMC),
        ('pjml_dtp', 'integral', layers.PJMC),
        ('ldrl', 'integral', layers.LEARNED),
        ('fwdtp', 'integral', layers.LEARNED),
        ('dtp', 'integral', layers.LEARNED),
    ],
)
def test_each_method_declares_its_feedback_mode(method, feedback_act, mode):
  cfg = config_lib.default()
  cfg.method, cfg.feedback_act = method, feedback_act
  assert algorithms.feedback_mode(cfg) == mode


@pytest.mark.parametrize(
    'method, act, feedback_act, match',
    [
        ('tjml_dtp', 'gelu', 'integral', r'gelu.*not invertible'),
        ('ijml_dtp', 'tanh', 'hadamard', r"ijml_dtp supports feedback_act in \['integral'\]"),
        ('ijml_dtp', 'tanh', 'integral', r"method='ijml_dtp'.*square"),
    ],
)
def test_feedback_a_layer_refuses_is_refused_up_front(method, act, feedback_act, match):
  """The refusal comes from the layers (traced on the dataset's image shape), before
  any data is loaded or anything compiled; GELU's Hadamard feedback is accepted."""
  cfg = _base()
  cfg.method, cfg.feedback_act = method, feedback_act
  cfg.model_kwargs.act = act
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(cfg)
  cfg.method, cfg.feedback_act = 'tjml_dtp', 'hadamard'
  config_lib.validate(cfg)


@pytest.mark.parametrize(
    'model, dataset, model_kwargs, shape',
    [
        ('lenet', 'mnist', {}, (28, 28, 1)),
        ('simple_vgg', 'cifar10', {}, (32, 32, 3)),
        ('mlp_mixer', 'mnist', {}, (32, 32, 1)),  # the Mixer's default token grid
        ('reversible_mixer', 'cifar10', {'image_hw': (8, 8)}, (8, 8, 3)),
    ],
)
def test_the_model_knows_its_input_shape(model, dataset, model_kwargs, shape):
  cfg = config_lib.default()
  cfg.model, cfg.dataset, cfg.model_kwargs = model, dataset, model_kwargs
  assert models.input_shape(cfg) == shape


@pytest.mark.parametrize('model', sorted(models.MODELS))
def test_the_dataset_gives_every_model_its_classes(monkeypatch, model):
  """A 7-class CIFAR-10 gives 7 logits, whatever the model; the class count is not a
  model keyword of the config."""
  seven = data.info('cifar10')._replace(num_classes=7)
  monkeypatch.setattr(data, 'info', lambda name: seven)
  cfg = config_lib.default()
  cfg.model, cfg.dataset, cfg.model_kwargs = model, 'cifar10', {}
  net = models.for_config(cfg)
  x = jax.ShapeDtypeStruct((2, *seven.image_shape), jnp.float32)
  logits = jax.eval_shape(
      lambda k, x: network.apply(net, network.init(net, k, x), x), jax.random.key(0), x
  )
  assert logits.shape == (2, 7)
  _set(cfg, 'model_kwargs.num_classes', 7)
  with pytest.raises(
      ConfigError,
      match=r'model_kwargs\.num_classes: the number of classes '
      r'comes from the dataset \(cifar10: 7\)',
  ):
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


@pytest.mark.parametrize(
    'model, shape, match',
    [
        ('mlp_mixer', (28, 28, 1), r'mlp_mixer was built for \(32, 32\) images'),
        ('simple_vgg', (8, 8, 1), r'simple_vgg .*cannot take mnist images of shape \(8, 8, 1\)'),
    ],
)
def test_image_shape_not_matching_the_model(tmp_path, model, shape, match):
  cfg = config_lib.default()
  cfg.model = model
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(cfg, tmp_path, _dataset(shape), log=lambda s: None)
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize('seed', [-1, 2**32, 2**40])
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
# From the command line


def _parse_flags(config: Path, *overrides: str):
  """The config that ``experiments.train``'s flags make of these arguments."""
  argv = ['train', f'--config={config}', *overrides]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      'config', str(config), flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return holder.value


def _leaves(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    out.update(_leaves(v, f'{prefix}{k}.') if isinstance(v, dict) else {prefix + k: v})
  return out


def _changed(v):
  """Another value of the same type, and how a user types it."""
  if isinstance(v, bool):
    return not v, str(not v).lower()
  if isinstance(v, (int, float)):
    return v + 1, repr(v + 1)
  if isinstance(v, tuple):
    return v[:1] + v, repr(v[:1] + v)
  return v + 'x', v + 'x'


def test_per_block_values_from_flags():
  """The issue's command line: a tuple per block, one value for all blocks, or the flag
  repeated once per block."""
  cfg = _parse_flags(
      ROOT / 'experiments' / 'configs' / 'lenet_mnist.py',
      '--config.method=ldrl',
      '--config.feedback.iterations=(10,10,10)',
      '--config.feedback.noise=0.2',
      '--config.feedback.lr=1e-3',
      '--config.feedback.lr=2e-3',
      '--config.feedback.lr=3e-3',
  )
  assert cfg.feedback.iterations == (10, 10, 10)
  assert cfg.feedback.noise == (0.2,)
  assert cfg.feedback.lr == (1e-3, 2e-3, 3e-3)
  config_lib.validate(cfg)
  net = models.for_config(cfg)
  assert feedback_training.per_block(cfg, 'noise', net) == (0.2, 0.2, 0.2)
  assert feedback_training.per_block(cfg, 'lr', net) == (1e-3, 2e-3, 3e-3)


@pytest.mark.parametrize('config', CONFIGS, ids=lambda f: f.stem)
def test_every_field_can_be_set_from_flags(config):
  fields = _leaves(_experiment_config(config).to_dict())
  changed = {path: _changed(v) for path, v in fields.items()}
  cfg = _parse_flags(config, *(f'--config.{path}={text}' for path, (_, text) in changed.items()))
  assert _leaves(cfg.to_dict()) == {path: v for path, (v, _) in changed.items()}


def _train_binary(tmp_path, config: str, *overrides: str) -> subprocess.CompletedProcess:
  cmd = [
      sys.executable,
      '-m',
      'experiments.train',
      f'--config=experiments/configs/{config}',
      f'--workdir={tmp_path / "run"}',
      *overrides,
  ]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_binary_refuses_a_per_block_list_of_the_wrong_length(tmp_path):
  p = _train_binary(
      tmp_path, 'lenet_mnist.py', '--config.method=ldrl', '--config.feedback.iterations=(10,10)'
  )
  assert p.returncode == 1, p.stdout + p.stderr
  assert (
      'error: ConfigError: feedback.iterations has 2 entries but lenet has 3 blocks '
      'whose feedback is trained (blocks 2..4); give 3 values'
  ) in p.stderr, p.stderr
  assert 'Traceback' not in p.stderr, p.stderr[-3000:]
  assert not (tmp_path / 'run' / 'checkpoints').exists()


@pytest.mark.slow
def test_binary_trains_with_per_block_values_from_flags(tmp_path):
  """K per block and one sigma for all, on the real data ($TP_JAX_DATA, as CI sets)."""
  p = _train_binary(
      tmp_path,
      'mlp_mnist.py',
      '--config.method=ldrl',
      '--config.model_kwargs.widths=(16,16)',
      '--config.feedback.iterations=(3,2)',
      '--config.feedback.noise=0.05',
      '--config.epochs=1',
      '--config.steps_per_epoch=2',
      '--config.batch_size=16',
  )
  assert p.returncode == 0, p.stdout + p.stderr
  result = json.loads((tmp_path / 'run' / 'result.json').read_text())
  assert result['step'] == 2 and result['complete']
  assert result['config']['feedback']['iterations'] == [3, 2]
  assert result['config']['feedback']['noise'] == [0.05]


# --------------------------------------------------------------------------------------
# Property tests

_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=4),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10, 10),
    st.lists(st.integers(-2, 3), max_size=3),
)
_NUM = st.one_of(
    st.integers(-3, 64),
    st.floats(-1.0, 2.0),
    st.sampled_from([0, -0.0, math.nan, math.inf, -math.inf, 1e30]),
    _JUNK,
)
_COUNT = st.one_of(st.integers(-3, 5), st.sampled_from([0.5, 2.0, '3', True]), _JUNK)
_LIST = st.one_of(
    st.lists(st.one_of(st.integers(-1, 3), st.floats(-1, 1), _JUNK), min_size=0, max_size=4), _JUNK
)

# (field, strategy). Valid values appear too, so some configs are accepted. Expensive
# valid models (LeNet, VGG) are left out: accepted configs must train a step here.
MUTATIONS = {
    'model': st.sampled_from(['mlp', 'mlp_mixer', 'resnet', '', 'MLP', None, 7]),
    'method': st.sampled_from(list(algorithms.METHODS) + ['backprop', '', None, 2]),
    'dataset': st.sampled_from(list(data.DATASETS) + ['imagenet', '', None]),
    'model_kwargs.act': st.sampled_from(list(layers.ACTIVATIONS) + ['relu', '', None, 1]),
    'model_kwargs.widths': st.one_of(st.lists(st.integers(-2, 12), max_size=3), _JUNK),
    'feedback_act': st.sampled_from(['integral', 'hadamard', 'sigma', None]),
    'batch_size': st.one_of(st.sampled_from([8, 16, 12, 33, 64]), _NUM),
    'epochs': _COUNT,
    'beta': _NUM,
    'seed': st.one_of(st.integers(-3, 2**40), _JUNK),
    'steps_per_epoch': _COUNT,
    'check_every_steps': _COUNT,
    'eval_batch_size': _COUNT,
    'eval_every_steps': _COUNT,
    'train_seconds': _NUM,
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
  c.feedback.iterations, c.feedback.noise, c.feedback.lr = (1, 1), (0.1, 0.1), (1e-3, 1e-3)
  return c


@st.composite
def malformed(draw):
  fields = draw(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3, unique=True))
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
  assert (
      '/tp_jax/' in origin
  ), f'{type(e).__name__} raised from {origin}, not by tp_jax: {e}\n' + ''.join(
      traceback.format_list(frames[-4:])
  )
  msg = str(e).lower()
  names = {part.lower() for f in changes for part in f.split('.')}
  assert any(n in msg for n in names), f'message names none of {sorted(changes)}: {e}'


@pytest.mark.slow
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


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(malformed())
def test_malformed_configs_are_refused_or_train_one_step(tmp_path_factory, case):
  cfg, changes = case
  try:
    res = train.train_and_evaluate(
        cfg,
        tmp_path_factory.mktemp('run'),
        _dataset(),
        log=lambda s: None,
        until_step=1,
        progress=False,
    )
  except train.DivergenceError:
    _TRIED['accepted'] += 1  # it trained the step, and said the step was not finite
    return
  except Exception as e:  # pylint: disable=broad-except
    _check_refusal(e, changes)
    _TRIED['refused'] += 1
    return
  _TRIED['accepted'] += 1
  assert res['step'] == 1, changes


def test_field_paths_and_numbers():
  cfg = config_lib.default()
  config_lib.set_field(cfg, 'optimizer.lr', 0.5)
  config_lib.set_field(cfg, 'beta', 0.25)
  assert config_lib.get_field(cfg, 'optimizer.lr') == cfg.optimizer.lr == 0.5
  assert config_lib.get_field(cfg, 'beta') == cfg.beta == 0.25
  with pytest.raises(KeyError):
    config_lib.get_field(cfg, 'optimizer.no_such_field')
  assert [config_lib.is_number(v) for v in (1, 0.5, True, float('nan'), '1')] == [
      True,
      True,
      False,
      False,
      False,
  ]
  assert not config_lib.is_number(1.0, integer=True) and config_lib.is_number(3, integer=True)


def test_derived_feedback_with_an_inverse_mode_is_refused_before_training(tmp_path):
  """Autodiff gives J^T, not J^-1 or J^+: IJML-DTP on derived blocks is refused up front."""
  cfg = config_lib.default()
  cfg.update(method='ijml_dtp', derived_feedback=True)
  with pytest.raises(
      ConfigError, match=r"method='ijml_dtp'.*Derived\(Sequential\) has no derived feedback"
  ):
    train.train_and_evaluate(cfg, tmp_path, _dataset(), log=lambda s: None)
  assert not (tmp_path / 'checkpoints').exists()
