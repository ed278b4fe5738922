"""What each table, column and profile of the reproduction is: the configs each row
trains, the published numbers beside it, and how much each profile runs."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import ml_collections

from experiments import synthetic
from experiments import timing
from experiments.configs import lenet_cifar10
from experiments.configs import lenet_fashion_mnist
from experiments.configs import lenet_mnist
from experiments.configs import mixer_cifar10
from experiments.configs import resnet18_cifar10
from experiments.configs import reversible_mixer_cifar10
from experiments.configs import vgg_cifar10
from experiments.reproduce import figure2
from tp_jax import algorithms
from tp_jax import config as config_lib
from tp_jax import data

METHODS = ('ldrl', 'fwdtp', 'tjml_dtp', 'bp')
METHOD_NAMES = {'ldrl': 'LDRL', 'fwdtp': 'FWDTP', 'tjml_dtp': 'TJML-DTP', 'bp': 'BP'}
DATASET_NAMES = {'mnist': 'MNIST', 'fashion_mnist': 'F-MNIST', 'cifar10': 'CIFAR-10'}


@dataclasses.dataclass(frozen=True)
class Column:
  """One (model, dataset) column of a table: one row per method."""

  table: int
  dataset: str
  get_config: Callable[[], ml_collections.ConfigDict]
  model_name: str
  # Speed may be taken from another column of the same table whose step is the same
  # computation (same model, shapes and config; only the dataset name differs).
  same_step_as: str | None = None
  name: str = ''  # directory and speed-file name; default: the dataset
  methods: tuple[str, ...] = METHODS
  labels: tuple[tuple[str, str], ...] = ()  # (method, row label) overrides
  # Model arguments of the cpu and smoke profiles, where the config's model is too large
  # for CPU (the paper profile keeps the config's); shown in the column's title.
  cpu_model_kwargs: tuple[tuple[str, Any], ...] = ()

  @property
  def id(self) -> str:
    return self.name or self.dataset

  def label(self, method: str) -> str:
    return dict(self.labels).get(method, METHOD_NAMES[method])

  @property
  def title(self) -> str:
    return f'{self.model_name} / {DATASET_NAMES[self.dataset]}'

  def model_overrides(self) -> dict[str, Any]:
    """``cpu_model_kwargs`` as config overrides (``model_kwargs.<name>``)."""
    return {f'model_kwargs.{k}': v for k, v in self.cpu_model_kwargs}


TABLES: dict[int, tuple[Column, ...]] = {
    1: (
        Column(1, 'mnist', lenet_mnist.get_config, 'LeNet'),
        Column(1, 'fashion_mnist', lenet_fashion_mnist.get_config, 'LeNet', same_step_as='mnist'),
        Column(1, 'cifar10', lenet_cifar10.get_config, 'LeNet'),
    ),
    2: (Column(2, 'cifar10', vgg_cifar10.get_config, 'Simplified-VGG'),),
    3: (Column(3, 'cifar10', mixer_cifar10.get_config, 'MLP-Mixer'),),
    # tjml_dtp on the reversible Mixer: exact-inverse targets through the 4 reversible
    # blocks, TJMC feedback through the pooling and the head (tp_jax/reversible.py).
    4: (
        Column(
            4,
            'cifar10',
            reversible_mixer_cifar10.get_config,
            'Reversible MLP-Mixer',
            name='cifar10_reversible',
            methods=('tjml_dtp',),
            labels=(('tjml_dtp', 'DTP, exact inverse'),),
        ),
        Column(4, 'cifar10', mixer_cifar10.get_config, 'MLP-Mixer', methods=('tjml_dtp', 'bp')),
    ),
    # Not in the paper: TP through skip connections (the paper studies them only
    # empirically); full-width ResNet-18 epochs cost ~85 TFLOP, so CPU runs use width 16.
    5: (
        Column(
            5,
            'cifar10',
            resnet18_cifar10.get_config,
            'ResNet-18',
            cpu_model_kwargs=(('width', 16),),
        ),
    ),
}
# Tables whose columns are timed together, in one interleaved session (their rows are
# compared with each other: the same data, different models).
JOINT_SPEED = {4}
TABLE_TITLES = {
    1: 'Table 1: LeNet on MNIST, Fashion-MNIST and CIFAR-10',
    2: 'Table 2: Simplified-VGG on CIFAR-10',
    3: 'Table 3: MLP-Mixer on CIFAR-10',
    4: 'Table 4: reversible MLP-Mixer vs TJML-DTP on CIFAR-10',
    5: (
        'Table 5: ResNet-18 on CIFAR-10 (an extension of the paper, which has no ResNet; '
        'cpu and smoke profiles at width 16)'
    ),
}

# Published test accuracies (%), Bao et al. (AAAI 2024). Only the TJML-DTP row is
# filled in: the other methods' published cells are left blank rather than guessed.
PAPER_TEST_ACC: dict[tuple[int, str, str], float] = {
    (1, 'mnist', 'tjml_dtp'): 99.3,
    (1, 'fashion_mnist', 'tjml_dtp'): 91.4,
    (1, 'cifar10', 'tjml_dtp'): 76.7,
    (2, 'cifar10', 'tjml_dtp'): 85.2,
    (3, 'cifar10', 'tjml_dtp'): 56.9,
}

# The performance targets: TJML-DTP time per step / BP's (at most), and TJML-DTP
# speed-up per epoch over our LDRL (at least).
TARGET_TJML_OVER_BP = {1: 1.15, 2: 1.15, 3: 1.3, 5: 1.10}  # Table 4: none
TARGET_SPEEDUP_OVER_LDRL = {1: 5.0, 2: 5.0}


# --------------------------------------------------------------------------------------
# Profiles


@dataclasses.dataclass(frozen=True)
class SpeedPlan:
  """Interleaved timing: ``rounds`` x (one LDRL window of ``ldrl_steps`` steps, then
  ``inner`` windows of ``steps`` steps of each other method, in rotating order), after
  ``warmup`` steps of every method but LDRL, which gets ``ldrl_warmup`` (its steps are
  long, and compilation happens ahead of time, apart from any step)."""

  warmup: int
  rounds: int
  inner: int
  steps: int
  ldrl_steps: int
  ldrl_warmup: int

  def describe(self) -> str:
    return (
        f'{self.rounds} rounds, each one LDRL window of {self.ldrl_steps} step(s) '
        f'then {self.inner} window(s) of {self.steps} step(s) per other method in '
        f'rotating order, after {self.warmup} warm-up step(s) per method '
        f'(LDRL {self.ldrl_warmup}); compilation ahead of time, not timed; median '
        f'ms/step over windows'
    )

  def timing_plan(self) -> timing.Plan:
    return timing.Plan(
        rounds=self.rounds,
        steps=self.steps,
        warmup=self.warmup,
        inner=self.inner,
        slow_steps=self.ldrl_steps,
        slow_warmup=self.ldrl_warmup,
    )


@dataclasses.dataclass(frozen=True)
class Profile:
  name: str
  description: str
  seeds: tuple[int, ...]
  # (column, method, config) -> {dotted field: value}, applied on top of the config.
  overrides: Callable[[Column, str, ml_collections.ConfigDict], dict[str, Any]]
  speed: SpeedPlan
  share_speed: bool  # reuse a column's speed for a column with the same step
  train_examples: int | None = None  # a subset of the data (smoke)
  test_examples: int | None = None
  figure_sizes: tuple[int, ...] = figure2.DEFAULT_SIZES
  figure_repeats: int = 11
  figure_max_seconds: float = 30.0
  # Compile with most XLA optimisations off (jax_disable_most_optimizations): ~3x
  # faster compilation, slower steps. Only for the smoke profile, whose numbers mean
  # nothing anyway.
  fast_compile: bool = False
  # Test-set evaluations per epoch (``eval_every_steps``) besides the epoch ends': the
  # accuracy-against-time figure's points (0: the epoch ends' only). A profile's
  # overrides may set ``eval_every_steps`` themselves.
  evals_per_epoch: int = 4
  # LDRL trains for the wall-clock budget of TJML-DTP's measured training seconds in the
  # same column (``train_seconds``) instead of the profile's epochs; TJML-DTP runs first.
  ldrl_budget: bool = False


def _n_feedback(cfg) -> int:
  return config_lib.num_trained_feedback_blocks(cfg)


def _smoke_overrides(col, method, cfg):
  o = {
      'epochs': 1,
      'steps_per_epoch': 2,
      'batch_size': 8,
      'eval_batch_size': 32,
      'check_every_steps': 0,
      'keep_checkpoints': 1,
      **col.model_overrides(),
  }
  if algorithms.trains_feedback(method):
    o['feedback.iterations'] = [1] * _n_feedback(cfg)
  return o


# cpu profile: what fits hours on 2 shared CPU cores. LDRL's step costs 30-100x
# BP's here, so LDRL trains for TJML-DTP's measured training seconds (``ldrl_budget``),
# syncing (the budget's check) after every step: a sync costs nothing beside a 10-80 s
# step, and the overshoot stays under one step (syncing every 5 steps, LDRL ran 401 s
# of a 205 s budget).
_CPU_EPOCHS = {1: 1, 2: 1, 3: 2, 4: 2, 5: 1}
_CPU_LDRL_SYNC_STEPS = 1
_CPU_LDRL_EVAL_STEPS = 10


def _cpu_overrides(col, method, cfg):
  # Seeds one after the other inside the one program: on XLA:CPU a LeNet step vmapped
  # over 5 seeds cost 3.3x its separate runs' per seed, a scan over them 0.91x (BUILD_NOTES).
  o = {'epochs': _CPU_EPOCHS[col.table], 'members_per_vmap': 1, **col.model_overrides()}
  if method == 'ldrl':
    o.update(check_every_steps=_CPU_LDRL_SYNC_STEPS, eval_every_steps=_CPU_LDRL_EVAL_STEPS)
  return o


PROFILES: dict[str, Profile] = {
    'smoke': Profile(
        'smoke',
        'machinery check only (CI): 1 epoch of 2 steps at batch 8 on 32 '
        'training / 32 test examples, LDRL K = 1 per block; numbers mean nothing',
        seeds=(0,),
        overrides=_smoke_overrides,
        speed=SpeedPlan(warmup=1, rounds=1, inner=1, steps=1, ldrl_steps=1, ldrl_warmup=0),
        share_speed=True,
        train_examples=32,
        test_examples=32,
        figure_sizes=(8, 16),
        figure_repeats=3,
        figure_max_seconds=1.0,
        fast_compile=True,
    ),
    'cpu': Profile(
        'cpu',
        'hours on 2 CPU cores: 3 seeds in one program; LeNet 1 epoch, VGG 1 '
        "epoch, Mixers 2 epochs, ResNet-18 1 epoch at width 16; LDRL trained for the wall-clock seconds TJML-DTP's "
        'run took in the same column (its steps stated in the table); all other '
        'hyper-parameters as the configs (LDRL K as the reference)',
        seeds=(0, 1, 2),
        overrides=_cpu_overrides,
        speed=SpeedPlan(warmup=2, rounds=2, inner=2, steps=3, ldrl_steps=1, ldrl_warmup=0),
        share_speed=True,
        figure_repeats=7,
        figure_max_seconds=20.0,
        ldrl_budget=True,
    ),
    'paper': Profile(
        'paper',
        'the full protocol (for a GPU): 5 seeds in one program per (model, method), '
        "the configs' epochs and hyper-parameters (the reference code's)",
        seeds=(0, 1, 2, 3, 4),
        overrides=lambda col, method, cfg: {},
        speed=SpeedPlan(warmup=5, rounds=5, inner=4, steps=20, ldrl_steps=3, ldrl_warmup=1),
        share_speed=False,
        figure_repeats=21,
        evals_per_epoch=0,  # tens of epochs: their ends are points enough
    ),
}


def make_config(
    col: Column,
    method: str,
    profile: Profile,
    seed: int,
    num_seeds: int = 1,
    train_seconds: float = 0.0,
) -> ml_collections.ConfigDict:
  """The config of one run of ``col``'s row ``method``: seeds ``seed .. seed +
  num_seeds - 1`` in one program, the profile's overrides, ``profile.evals_per_epoch``
  test evaluations per epoch (unless the overrides set ``eval_every_steps``), and a
  ``train_seconds`` budget when given."""
  cfg = col.get_config()
  cfg.method = method
  cfg.seed = seed
  cfg.num_seeds = num_seeds
  overrides = profile.overrides(col, method, cfg)
  for k, v in overrides.items():
    config_lib.set_field(cfg, k, v)
  if 'eval_every_steps' not in overrides and profile.evals_per_epoch:
    spe = full_epoch_steps(cfg.dataset, cfg.batch_size, profile.train_examples)
    spe = min(cfg.steps_per_epoch or spe, spe)
    cfg.eval_every_steps = max(1, spe // profile.evals_per_epoch)
  cfg.train_seconds = float(train_seconds)
  config_lib.validate(cfg)
  return cfg


def select_columns(table: int, columns: Sequence[str] | None = None) -> tuple[Column, ...]:
  """``table``'s columns whose ids are in ``columns`` (all when None), in table order."""
  cols = TABLES[table]
  if columns is None:
    return cols
  unknown = sorted(set(columns) - {c.id for c in cols})
  if unknown:
    raise ValueError(f'table {table} has no column {unknown}; valid: {[c.id for c in cols]}')
  return tuple(c for c in cols if c.id in columns)


def select_methods(col: Column, methods: Sequence[str] | None = None) -> tuple[str, ...]:
  """``col``'s methods that are in ``methods`` (all when None), in table order."""
  if methods is not None and set(methods) - set(METHODS):
    raise ValueError(f'unknown methods {sorted(set(methods) - set(METHODS))}; valid: {METHODS}')
  return col.methods if methods is None else tuple(m for m in col.methods if m in methods)


# --------------------------------------------------------------------------------------
# Data


_DATA_CACHE: dict[tuple, data.Dataset] = {}


def get_dataset(name: str, profile: Profile, source: str) -> data.Dataset:
  key = (name, profile.train_examples, profile.test_examples, source)
  if key not in _DATA_CACHE:
    if source == 'synthetic':
      ds = synthetic.dataset(name, profile.train_examples or 256, profile.test_examples or 128)
    elif source == 'real':
      ds = data.load_dataset(name)
      if profile.train_examples or profile.test_examples:
        ntr, nte = profile.train_examples, profile.test_examples
        ds = ds._replace(
            x_train=ds.x_train[:ntr],
            y_train=ds.y_train[:ntr],
            x_test=ds.x_test[:nte],
            y_test=ds.y_test[:nte],
        )
    else:
      raise ValueError(f"data source must be 'real' or 'synthetic', got {source!r}")
    _DATA_CACHE[key] = ds
  return _DATA_CACHE[key]


def full_epoch_steps(dataset: str, batch_size: int, train_examples: int | None = None) -> int:
  """Steps of one full epoch over the real training set (what the paper times), or
  over its first ``train_examples``."""
  return (train_examples or data.info(dataset).num_examples['train']) // batch_size
