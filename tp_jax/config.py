"""The training config: defaults, and a validator that refuses bad values up front.

Experiment configs (``experiments/configs/*.py``) start from ``default()`` and state
where each non-default hyper-parameter comes from. Every field can be set from the
command line (``--config.<field>=<value>``): per-block values are tuples
(``--config.feedback.iterations='(10,10,10)'``), and a single value
(``--config.feedback.noise=0.2``) is used for every trained block.

The validator holds no copies of what other parts know: datasets are ``data.DATASETS``,
models ``models.MODELS``, activations ``layers.ACTIVATIONS``; each algorithm checks its
own fields, and the layers themselves refuse a feedback they do not define
(``algorithms.validate``).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from tp_jax import conv
from tp_jax import data
from tp_jax import layers
from tp_jax import models


class ConfigError(ValueError):
  """A config value that cannot be right; the message names the field."""


def default() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'lenet'
  c.model_kwargs = ml_collections.ConfigDict({'act': 'elu'})
  c.dataset = 'mnist'
  c.data_dir = ''  # '' -> $TP_JAX_DATA, ./data, ../shared/data, ~/.cache/tp_jax/data
  c.verify_checksums = True
  # 'native' | 'tfds' (pip install 'tp-jax[tfds]'): the same examples, in TFDS's order.
  c.data_backend = 'native'
  c.augment = False  # random crop (4-pixel padding) + horizontal flip, in the jitted step
  c.method = 'tjml_dtp'
  c.feedback_act = 'integral'  # TJMC activation feedback: 'integral' (varsigma) | 'hadamard'
  # True: every block wrapped as derived.Derived, its feedback autodiff's exact J^T
  # instead of the closed forms (under feedback_act='hadamard' both give the same targets;
  # for comparing the two builds).
  c.derived_feedback = False
  c.beta = 0.4655  # first-target step; scalingDTP LeNet config
  c.seed = 0
  # S > 1: S independent runs (seeds seed, ..., seed + S - 1) in one program, the step
  # vmapped over a leading seed axis of the state; each seed equals its separate run.
  c.num_seeds = 1
  # A grid of scalar hyper-parameters trained in one program, each setting x num_seeds
  # a member of the leading axis: 'optimizer.lr=[0.01,0.03] beta=[0.3,0.5]' (tp_jax.sweep;
  # python -m experiments.sweep also runs fields that change the program, one by one).
  c.sweep = ''
  # How the step runs the members: 0 vmaps all at once; k > 0 loops over chunks of k
  # members, vmapped within a chunk (the same results). On CPU, conv nets want 1.
  c.members_per_vmap = 0
  c.epochs = 10
  c.batch_size = 256
  c.steps_per_epoch = 0  # 0 -> a full pass over the training set
  c.check_every_steps = 50  # host sync: fetch metrics, stop on non-finite values; 0 -> per epoch
  c.eval_batch_size = 1000
  # > 0: the test set is also evaluated every this many steps (evals.jsonl: test accuracy
  # against cumulative training seconds); evaluation is timed apart from training.
  c.eval_every_steps = 0
  # > 0: a wall-clock budget: training stops at the first host sync (check_every_steps)
  # after this many training seconds (evaluation excluded); the run is then complete.
  c.train_seconds = 0.0
  c.skip_nonfinite = False  # True: skip (and count) a step whose loss/targets/params are not finite

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'
  c.optimizer.lr = 0.03618  # scalingDTP LeNet forward lr
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = 'constant'  # 'constant' | 'cosine'
  c.optimizer.cosine_alpha = 0.0

  # Learned / fixed feedback (LDRL, DTP, FWDTP). Per-block tuples: one entry per block
  # whose feedback is trained, i.e. blocks 2..N (block 1's feedback is never used), or
  # one entry for all of them.
  c.feedback = ml_collections.ConfigDict()
  c.feedback.iterations = (41, 51, 24)  # K per block (scalingDTP LeNet)
  c.feedback.noise = (0.4164, 0.3826, 0.1395)  # sigma per block
  c.feedback.lr = (7.19e-4, 1.25e-4, 3.54e-2)  # SGD-momentum lr per block
  c.feedback.momentum = 0.9
  c.feedback.order = 'parallel'  # LDRL: 'parallel' (one scan over all blocks) | 'sequential'
  # Initial feedback kernels B ~ U(-scale, scale) (FWDTP's default 1e-3); 0 -> LeCun
  # normal. Small B keeps lower targets near h until LDRL/DTP have trained B: with
  # LeCun-scale random B, LeNet's loss rose from the first steps (measured).
  c.feedback.init_scale = 1e-3

  c.checkpoint_every_steps = 0  # 0 -> at the end of every epoch
  c.keep_checkpoints = 2
  c.log_every_steps = 0
  c.diagnostics = True  # per-block bp_angle, bp_norm_ratio, tjml at log steps and epoch ends
  c.num_processes = 1  # >1: jax.distributed.initialize() (multi-host)
  return c


def get_field(cfg, path: str) -> Any:
  """The value at a dotted ``path`` ('optimizer.lr') of ``cfg``."""
  value = cfg
  for part in path.split('.'):
    value = value[part]
  return value


def set_field(cfg, path: str, value) -> None:
  """Sets the value at a dotted ``path`` of ``cfg`` (ConfigDict's own type checks apply)."""
  *parents, leaf = path.split('.')
  node = get_field(cfg, '.'.join(parents)) if parents else cfg
  node[leaf] = value


def is_number(v, integer: bool = False) -> bool:
  """Is ``v`` a number (an int with ``integer``), not a bool or NaN?"""
  kinds = (int,) if integer else (int, float)
  return isinstance(v, kinds) and not isinstance(v, bool) and v == v


def check_number(cfg, path: str, allow_zero: bool = False) -> None:
  """Raises ConfigError unless the field at ``path`` is a positive (non-negative) number."""
  v = get_field(cfg, path)
  if not is_number(v) or (v < 0 if allow_zero else v <= 0):
    need = 'non-negative' if allow_zero else 'positive'
    raise ConfigError(f'{path} must be a {need} number, got {v!r}')


def num_trained_feedback_blocks(cfg) -> int:
  """Blocks 2..N of ``cfg``'s model: those with per-block feedback hyper-parameters."""
  return len(models.for_config(cfg)) - 1


def validate(cfg: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises ConfigError naming the first bad field. Cheap: builds the model and traces
  its feedback on shapes only."""
  from tp_jax import algorithms  # pylint: disable=g-import-not-at-top (it imports this module)

  if cfg.model not in models.MODELS:
    raise ConfigError(f'unknown model {cfg.model!r}; valid models: {sorted(models.MODELS)}')
  if cfg.dataset not in data.DATASETS:
    raise ConfigError(f'unknown dataset {cfg.dataset!r}; valid datasets: ' f'{list(data.DATASETS)}')
  if cfg.method not in algorithms.METHODS:
    raise ConfigError(
        f'unknown method {cfg.method!r}; valid methods: ' f'{list(algorithms.METHODS)}'
    )
  act = cfg.model_kwargs.get('act')
  if act is not None and act not in layers.ACTIVATIONS:
    raise ConfigError(
        f'unknown activation model_kwargs.act={act!r}; valid: ' f'{list(layers.ACTIVATIONS)}'
    )
  impl = cfg.model_kwargs.get('conv_impl', 'auto')
  if impl not in conv.IMPLS:
    raise ConfigError(f'unknown model_kwargs.conv_impl={impl!r}; valid: {list(conv.IMPLS)}')
  try:  # unknown, mistyped or empty keyword arguments of the model
    net = models.for_config(cfg)
  except (TypeError, ValueError, IndexError) as e:
    kw = cfg.model_kwargs.to_dict() if hasattr(cfg.model_kwargs, 'to_dict') else cfg.model_kwargs
    raise ConfigError(f'model_kwargs={kw!r} do not fit model {cfg.model!r}: {e}') from None
  if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or not 0 <= cfg.seed < 2**32:
    # jax.random.key keeps the low 32 bits: seeds 0 and 2**32 would be the same run.
    raise ConfigError(f'seed must be an integer in [0, 2**32), got {cfg.seed!r}')
  if not is_number(cfg.num_seeds, integer=True) or cfg.num_seeds < 1:
    raise ConfigError(f'num_seeds must be a positive integer, got {cfg.num_seeds!r}')
  if not is_number(cfg.members_per_vmap, integer=True) or cfg.members_per_vmap < 0:
    raise ConfigError(
        f'members_per_vmap must be a non-negative integer (0: all members), got '
        f'{cfg.members_per_vmap!r}'
    )
  if cfg.seed + cfg.num_seeds > 2**32:
    raise ConfigError(
        f'seed + num_seeds - 1 = {cfg.seed + cfg.num_seeds - 1} exceeds '
        f'2**32 - 1: the last seeds would repeat the first'
    )
  if cfg.data_backend not in data.BACKENDS:
    raise ConfigError(f'unknown data_backend={cfg.data_backend!r}; valid: {list(data.BACKENDS)}')
  if cfg.feedback_act not in algorithms.FEEDBACK_ACTS:
    raise ConfigError(
        f'feedback_act must be one of {list(algorithms.FEEDBACK_ACTS)}, got '
        f'{cfg.feedback_act!r}'
    )
  for path in ('batch_size', 'epochs', 'beta', 'optimizer.lr', 'eval_batch_size'):
    check_number(cfg, path)
  for path in (
      'steps_per_epoch',
      'check_every_steps',
      'optimizer.weight_decay',
      'optimizer.momentum',
      'checkpoint_every_steps',
      'keep_checkpoints',
      'eval_every_steps',
      'train_seconds',
  ):
    check_number(cfg, path, allow_zero=True)
  if not isinstance(cfg.eval_every_steps, int) or isinstance(cfg.eval_every_steps, bool):
    raise ConfigError(f'eval_every_steps must be an integer, got {cfg.eval_every_steps!r}')
  if not isinstance(cfg.batch_size, int) or isinstance(cfg.batch_size, bool):
    raise ConfigError(f'batch_size must be an integer, got {cfg.batch_size!r}')
  if cfg.batch_size % num_devices:
    raise ConfigError(
        f'batch_size={cfg.batch_size} is not divisible by the number of '
        f'devices ({num_devices}); the global batch is split evenly'
    )
  if not isinstance(cfg.diagnostics, bool):
    raise ConfigError(f'diagnostics must be True or False, got {cfg.diagnostics!r}')
  if cfg.optimizer.name not in ('sgd', 'adam'):
    raise ConfigError(f"optimizer.name must be 'sgd' or 'adam', got {cfg.optimizer.name!r}")
  if cfg.optimizer.schedule not in ('constant', 'cosine'):
    raise ConfigError(
        f"optimizer.schedule must be 'constant' or 'cosine', got " f'{cfg.optimizer.schedule!r}'
    )
  algorithms.validate(cfg, net, models.input_shape(cfg))
  if not isinstance(cfg.sweep, str):
    raise ConfigError(f"sweep must be a string such as 'beta=[0.3,0.5]', got {cfg.sweep!r}")
  if cfg.sweep.strip():
    from tp_jax import sweep  # pylint: disable=g-import-not-at-top (it imports this module)

    sweep.validate(cfg, num_devices)
