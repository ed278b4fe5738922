r"""Regenerates the paper's tables and Figure 2 (Bao et al., AAAI 2024), one command each.

  python -m experiments.reproduce --table=1 --profile=cpu [--seeds=0,1,2] \
      [--workdir=runs/reproduce] [--what=all|speed|accuracy|table]
  python -m experiments.reproduce --figure=2 --profile=cpu

Tables (methods LDRL, FWDTP, TJML-DTP, BP in every column of Tables 1-3):
  1  LeNet on MNIST, Fashion-MNIST, CIFAR-10
  2  Simplified-VGG on CIFAR-10
  3  MLP-Mixer on CIFAR-10
  4  reversible MLP-Mixer (4 additive-coupling Mixer blocks,
     ``experiments/configs/reversible_mixer_cifar10.py``) trained by DTP with the exact
     inverse as feedback, vs TJML-DTP and BP on the MLP-Mixer; the three timed together

Each table has two independent parts:

* accuracy: one ``tp_jax.train.train_and_evaluate`` run per (column, method, seed) in
  its own directory ``<workdir>/<profile>/table<T>/<dataset>/<method>/seed<S>`` (its
  ``result.json``, ``metrics.jsonl``, checkpoints). A finished run with the same config
  is reused, an interrupted one resumes, one with a different config is refused.
* speed: every method's jitted training step (``tp_jax.train.make_train_step``, the
  training loop's own: batch gather, augmentation, the method's step) is compiled in
  this process, warmed up, then timed in interleaved windows so that all methods see
  the same machine load; the median ms/step times the steps of a full epoch is the
  epoch time. LDRL's windows alternate with rounds of windows of the other methods
  (its steps are ~100x longer). Written to ``speed_<dataset>.json``.

Then ``<workdir>/<profile>/table<T>.md`` (header: profile, hardware, epochs, seeds,
date, command; the paper's published numbers beside ours) and ``table<T>_curves.png``
are generated from whatever results exist, so ``--what=speed`` and ``--what=accuracy``
can run at different times and ``--what=table`` only regenerates the files.

Profiles (config overrides; see ``PROFILES``):
  smoke  seconds per method: 2 steps of batch 8 on 32 examples, LDRL K = 1; checks the
         machinery (CI), not accuracy or speed.
  cpu    the largest honest run for a few hours on 2 CPU cores: 1 seed, a few epochs
         (LDRL: a fixed number of steps); speed from a few interleaved windows.
  paper  the full protocol for a GPU: 5 seeds, the configs' epochs (the reference's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import json
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from absl import app
from absl import flags
from absl import logging

from experiments import figure2
from experiments.configs import lenet_cifar10
from experiments.configs import lenet_fashion_mnist
from experiments.configs import lenet_mnist
from experiments.configs import mixer_cifar10
from experiments.configs import reversible_mixer_cifar10
from experiments.configs import vgg_cifar10
from tp_jax import algorithms
from tp_jax import config as config_lib
from tp_jax import data
from tp_jax import models
from tp_jax import train

Log = Callable[[str], None]

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

  @property
  def id(self) -> str:
    return self.name or self.dataset

  def label(self, method: str) -> str:
    return dict(self.labels).get(method, METHOD_NAMES[method])

  @property
  def title(self) -> str:
    return f'{self.model_name} / {DATASET_NAMES[self.dataset]}'


TABLES: dict[int, tuple[Column, ...]] = {
    1: (Column(1, 'mnist', lenet_mnist.get_config, 'LeNet'),
        Column(1, 'fashion_mnist', lenet_fashion_mnist.get_config, 'LeNet',
               same_step_as='mnist'),
        Column(1, 'cifar10', lenet_cifar10.get_config, 'LeNet')),
    2: (Column(2, 'cifar10', vgg_cifar10.get_config, 'Simplified-VGG'),),
    3: (Column(3, 'cifar10', mixer_cifar10.get_config, 'MLP-Mixer'),),
    # tjml_dtp on the reversible Mixer: exact-inverse targets through the 4 reversible
    # blocks, TJMC feedback through the pooling and the head (tp_jax/reversible.py).
    4: (Column(4, 'cifar10', reversible_mixer_cifar10.get_config, 'Reversible MLP-Mixer',
               name='cifar10_reversible', methods=('tjml_dtp',),
               labels=(('tjml_dtp', 'DTP, exact inverse'),)),
        Column(4, 'cifar10', mixer_cifar10.get_config, 'MLP-Mixer',
               methods=('tjml_dtp', 'bp'))),
}
# Tables whose columns are timed together, in one interleaved session (their rows are
# compared with each other: the same data, different models).
JOINT_SPEED = {4}
TABLE_TITLES = {1: 'Table 1: LeNet on MNIST, Fashion-MNIST and CIFAR-10',
                2: 'Table 2: Simplified-VGG on CIFAR-10',
                3: 'Table 3: MLP-Mixer on CIFAR-10',
                4: 'Table 4: reversible MLP-Mixer vs TJML-DTP on CIFAR-10'}

# Published test accuracies (%), Bao et al. (AAAI 2024). Only the TJML-DTP row is
# filled in: the other methods' published cells are left blank rather than guessed.
PAPER_TEST_ACC: dict[tuple[int, str, str], float] = {
    (1, 'mnist', 'tjml_dtp'): 99.3,
    (1, 'fashion_mnist', 'tjml_dtp'): 91.4,
    (1, 'cifar10', 'tjml_dtp'): 76.7,
    (2, 'cifar10', 'tjml_dtp'): 85.2,
    (3, 'cifar10', 'tjml_dtp'): 56.9,
}

# Issue 4's performance targets: TJML-DTP time per step / BP's (at most), and TJML-DTP
# speed-up per epoch over our LDRL (at least).
TARGET_TJML_OVER_BP = {1: 1.15, 2: 1.15, 3: 1.3}  # Table 4: none
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
    return (f'{self.rounds} rounds, each one LDRL window of {self.ldrl_steps} step(s) '
            f'then {self.inner} window(s) of {self.steps} step(s) per other method in '
            f'rotating order, after {self.warmup} warm-up step(s) per method '
            f'(LDRL {self.ldrl_warmup}); compilation ahead of time, not timed; median '
            f'ms/step over windows')


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


def _n_feedback(cfg) -> int:
  return config_lib.num_trained_feedback_blocks(cfg)


def _smoke_overrides(col, method, cfg):
  o = {'epochs': 1, 'steps_per_epoch': 2, 'batch_size': 8, 'eval_batch_size': 32,
       'check_every_steps': 0, 'keep_checkpoints': 1}
  if method in config_lib.FEEDBACK_TRAINED:
    o['feedback.iterations'] = [1] * _n_feedback(cfg)
  return o


# cpu profile: what fits a few hours on 2 shared CPU cores. LDRL's step costs 30-100x
# BP's here, so LDRL trains for a fixed number of steps (stated in the table).
_CPU_EPOCHS = {1: 3, 2: 1, 3: 2, 4: 2}
_CPU_LDRL_STEPS = {1: 20, 2: 10, 3: 10}


def _cpu_overrides(col, method, cfg):
  if method == 'ldrl':
    return {'epochs': 1, 'steps_per_epoch': _CPU_LDRL_STEPS[col.table]}
  return {'epochs': _CPU_EPOCHS[col.table]}


PROFILES: dict[str, Profile] = {
    'smoke': Profile(
        'smoke', 'machinery check only (CI): 1 epoch of 2 steps at batch 8 on 32 '
        'training / 32 test examples, LDRL K = 1 per block; numbers mean nothing',
        seeds=(0,), overrides=_smoke_overrides,
        speed=SpeedPlan(warmup=1, rounds=1, inner=1, steps=1, ldrl_steps=1, ldrl_warmup=0),
        share_speed=True, train_examples=32, test_examples=32,
        figure_sizes=(8, 16), figure_repeats=3, figure_max_seconds=1.0,
        fast_compile=True),
    'cpu': Profile(
        'cpu', 'a few hours on 2 CPU cores: 1 seed; LeNet 3 epochs, VGG 1 epoch, Mixers '
        '2 epochs; LDRL trained for a fixed number of steps only (LeNet 20, VGG 10, '
        'Mixer 10); all other hyper-parameters as the configs (LDRL K as the reference)',
        seeds=(0,), overrides=_cpu_overrides,
        speed=SpeedPlan(warmup=2, rounds=2, inner=2, steps=3, ldrl_steps=1, ldrl_warmup=0),
        share_speed=True, figure_repeats=7, figure_max_seconds=20.0),
    'paper': Profile(
        'paper', 'the full protocol (for a GPU): 5 seeds, the configs\' epochs and '
        'hyper-parameters (the reference code\'s)',
        seeds=(0, 1, 2, 3, 4), overrides=lambda col, method, cfg: {},
        speed=SpeedPlan(warmup=5, rounds=5, inner=4, steps=20, ldrl_steps=3, ldrl_warmup=1),
        share_speed=False, figure_repeats=21),
}


def _set(cfg: ml_collections.ConfigDict, dotted: str, value) -> None:
  *parents, leaf = dotted.split('.')
  node = cfg
  for p in parents:
    node = node[p]
  node[leaf] = value


def make_config(col: Column, method: str, profile: Profile, seed: int
                ) -> ml_collections.ConfigDict:
  cfg = col.get_config()
  cfg.method = method
  cfg.seed = seed
  for k, v in profile.overrides(col, method, cfg).items():
    _set(cfg, k, v)
  config_lib.validate(cfg)
  return cfg


# --------------------------------------------------------------------------------------
# Data


_DATA_CACHE: dict[tuple, data.Dataset] = {}


def synthetic_dataset(name: str, n_train: int = 256, n_test: int = 128, seed: int = 0
                      ) -> data.Dataset:
  """Random normalised images and labels of the dataset's shape (tests, no files)."""
  info = data.info(name)
  k = jax.random.split(jax.random.key(seed), 4)
  return data.Dataset(
      jax.random.normal(k[0], (n_train, *info.image_shape)),
      jax.random.randint(k[1], (n_train,), 0, info.num_classes, jnp.int32),
      jax.random.normal(k[2], (n_test, *info.image_shape)),
      jax.random.randint(k[3], (n_test,), 0, info.num_classes, jnp.int32), info)


def get_dataset(name: str, profile: Profile, source: str) -> data.Dataset:
  key = (name, profile.train_examples, profile.test_examples, source)
  if key not in _DATA_CACHE:
    if source == 'synthetic':
      ds = synthetic_dataset(name, profile.train_examples or 256, profile.test_examples or 128)
    elif source == 'real':
      ds = data.load_dataset(name)
      if profile.train_examples or profile.test_examples:
        ntr, nte = profile.train_examples, profile.test_examples
        ds = ds._replace(x_train=ds.x_train[:ntr], y_train=ds.y_train[:ntr],
                         x_test=ds.x_test[:nte], y_test=ds.y_test[:nte])
    else:
      raise ValueError(f"data source must be 'real' or 'synthetic', got {source!r}")
    _DATA_CACHE[key] = ds
  return _DATA_CACHE[key]


def full_epoch_steps(dataset: str, batch_size: int) -> int:
  """Steps of one full epoch over the real training set (what the paper times)."""
  return data.info(dataset).num_examples['train'] // batch_size


# --------------------------------------------------------------------------------------
# Accuracy runs


def _jsonable(cfg) -> dict:
  return json.loads(json.dumps(cfg.to_dict(), default=str))


DIVERGED = 'diverged.json'  # written instead of result.json by a run that diverged


def run_dir(root: Path, col: Column, method: str, seed: int) -> Path:
  return root / col.id / method / f'seed{seed}'


def train_one(cfg, workdir: Path, dataset: data.Dataset, log: Log) -> dict:
  """One training run in its own directory; reuses a finished run with the same config,
  resumes an interrupted one, refuses a directory that holds another config.

  A run that diverges is recorded (``diverged.json``: the message, which names the step
  and block) and returned as ``{'diverged': message}``, so that one method's failure
  shows in its table row instead of stopping the suite.
  """
  want = _jsonable(cfg)
  cfg_file = workdir / 'reproduce_config.json'
  if cfg_file.exists():
    have = json.loads(cfg_file.read_text())
    if have != want:
      diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
      raise RuntimeError(f'{workdir} holds a run with another config (fields {diff}); '
                         f'use a fresh --workdir or delete that directory')
    for name in ('result.json', DIVERGED):
      if (workdir / name).exists():
        log(f'reusing finished run {workdir}')
        return json.loads((workdir / name).read_text())
  workdir.mkdir(parents=True, exist_ok=True)
  cfg_file.write_text(json.dumps(want, indent=1))
  try:
    return train.train_and_evaluate(cfg, workdir, dataset=dataset,
                                    log=lambda s: log(f'  [{workdir}] {s}'))
  except train.DivergenceError as e:
    out = {'diverged': str(e)}
    (workdir / DIVERGED).write_text(json.dumps(out, indent=1))
    return out


def run_accuracy(table: int, profile: Profile, root: Path, seeds: Sequence[int],
                 source: str, log: Log) -> None:
  total = sum(len(col.methods) for col in TABLES[table]) * len(seeds)
  done, start = 0, time.perf_counter()
  for col in TABLES[table]:
    ds = get_dataset(col.dataset, profile, source)
    for method in col.methods:
      for seed in seeds:
        cfg = make_config(col, method, profile, seed)
        done += 1
        log(f'table {table} run {done}/{total}: training {col.model_name}/{col.dataset} '
            f'{method} seed {seed} ({(time.perf_counter() - start) / 60:.0f} min so far)')
        t0 = time.perf_counter()
        r = train_one(cfg, run_dir(root, col, method, seed), ds, log)
        if 'diverged' in r:
          log(f'  -> {r["diverged"]}')
          continue
        log(f'  -> train {100 * r["train_accuracy"]:.2f}%  test '
            f'{100 * r["test_accuracy"]:.2f}%  ({time.perf_counter() - t0:.0f} s)')


# --------------------------------------------------------------------------------------
# Speed


def step_gflop(cfg: ml_collections.ConfigDict, image_shape: tuple[int, ...]
               ) -> float | None:
  """GFLOP of one training step of ``cfg`` by XLA's cost analysis of the compiled step.

  XLA counts a loop body once. So the count is taken on the same step built with XLA's
  own convolution (``conv_impl='xla'``): the fast convolution's weight gradient is a
  loop over batch chunks. It is None for LDRL and DTP, whose K feedback-training
  iterations are a loop too.
  """
  if cfg.method in config_lib.FEEDBACK_TRAINED:
    return None
  kwargs = dict(cfg.model_kwargs)
  if 'conv_impl' in inspect.signature(models.MODELS[cfg.model]).parameters:
    kwargs['conv_impl'] = 'xla'
  algo = algorithms.make(models.get(cfg.model, **kwargs), cfg,
                         algorithms.make_optimizer(cfg.optimizer, 1))
  x = jax.ShapeDtypeStruct((cfg.batch_size, *image_shape), jnp.float32)
  y = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32)
  state = jax.eval_shape(algo.init, jax.random.key(0), x)
  cost = jax.jit(algo.step).lower(state, (x, y), jax.random.key(1)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['flops'] / 1e9 if cost and cost.get('flops') else None


def measure_speed(cfgs: dict[str, ml_collections.ConfigDict], dataset: data.Dataset,
                  plan: SpeedPlan, log: Log) -> dict[str, Any]:
  """Median ms per training step of each entry of ``cfgs`` (name -> config), from
  interleaved timing windows; entries whose ``method`` is LDRL get LDRL's windows.

  Each method runs the training loop's own jitted step (``train.make_train_step``:
  batch gather from device-resident data, augmentation, the method's step, finiteness
  checks), compiled ahead of time (timed apart), on the same data. The program is the
  one ``train_and_evaluate`` compiles for the same config, so with a persistent
  compilation cache (smoke profile) the accuracy runs reuse it.
  """
  mesh = Mesh(np.array(jax.devices()), ('data',))
  replicated = NamedSharding(mesh, P())
  x_all, y_all = jax.device_put((dataset.x_train, dataset.y_train.astype(jnp.int32)),
                                replicated)
  n = x_all.shape[0]
  runners = {}
  for name, cfg in cfgs.items():
    if cfg.batch_size > n:
      raise ValueError(f'batch {cfg.batch_size} > {n} examples')
    net = models.get(cfg.model, **cfg.model_kwargs)
    # As train_and_evaluate: the optimiser's schedule spans the run's steps.
    steps_per_epoch = n // cfg.batch_size
    if cfg.steps_per_epoch:
      steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    tx = algorithms.make_optimizer(cfg.optimizer, steps_per_epoch * cfg.epochs)
    algo = algorithms.make(net, cfg, tx)
    k_init, k_data, k_step = (jax.device_put(jax.random.key_data(k), replicated)
                              for k in jax.random.split(jax.random.key(cfg.seed), 3))
    state = train.make_init(algo, mesh)(k_init, x_all[:cfg.batch_size])
    idx = np.asarray(data.batches(jax.random.wrap_key_data(k_data), n, cfg.batch_size))
    idx = jax.device_put(idx[:steps_per_epoch].astype(np.int32), replicated)
    t0 = time.perf_counter()
    step = train.make_train_step(algo, cfg, mesh, steps_per_epoch).lower(
        state, x_all, y_all, idx, k_step).compile()
    compile_s = time.perf_counter() - t0
    log(f'  compiled {name} step in {compile_s:.1f} s')
    gflop = step_gflop(cfg, x_all.shape[1:])
    runners[name] = dict(step=step, state=state, idx=idx, key=k_step,
                         compile_s=compile_s, gflop=gflop, windows=[])

  def run(name: str, k: int) -> float:
    r = runners[name]
    jax.block_until_ready(r['state'])
    t0 = time.perf_counter()
    state = r['state']
    for _ in range(k):
      state, _ = r['step'](state, x_all, y_all, r['idx'], r['key'])
    jax.block_until_ready(state)
    r['state'] = state
    return 1e3 * (time.perf_counter() - t0) / k

  is_ldrl = lambda name: cfgs[name].method == 'ldrl'
  load_before = os.getloadavg()
  for name in runners:
    w = plan.ldrl_warmup if is_ldrl(name) else plan.warmup
    if w:
      ms = run(name, w)
      log(f'  warm-up {name}: {ms:.1f} ms/step')
  others = [m for m in runners if not is_ldrl(m)]
  rot = 0
  for rnd in range(plan.rounds):
    for m in runners:
      if is_ldrl(m):
        runners[m]['windows'].append(run(m, plan.ldrl_steps))
    for _ in range(plan.inner):
      order = others[rot % len(others):] + others[:rot % len(others)] if others else []
      rot += 1
      for m in order:
        runners[m]['windows'].append(run(m, plan.steps))
    log(f'  round {rnd + 1}/{plan.rounds}: ' + ', '.join(
        f'{m} {r["windows"][-1]:.1f}' for m, r in runners.items() if r['windows']) +
        ' ms/step')
  load_after = os.getloadavg()
  out = {}
  for name, r in runners.items():
    cfg = cfgs[name]
    ms = statistics.median(r['windows'])
    steps = full_epoch_steps(cfg.dataset, cfg.batch_size)
    out[name] = dict(ms_per_step=ms, windows_ms=r['windows'], compile_s=r['compile_s'],
                     gflop_per_step=r['gflop'],
                     batch_size=cfg.batch_size, full_epoch_steps=steps,
                     epoch_s=ms * steps / 1e3,
                     steps_per_window=plan.ldrl_steps if is_ldrl(name) else plan.steps)
  return dict(methods=out, plan=dataclasses.asdict(plan), hardware=train.hardware(),
              loadavg_before=load_before, loadavg_after=load_after,
              date=datetime.datetime.now().isoformat(timespec='seconds'))


def run_speed(table: int, profile: Profile, root: Path, source: str, log: Log,
              command: str = '') -> None:
  """Writes ``speed_<column>.json`` per column: {'methods': {method: timing}, ...}."""
  root.mkdir(parents=True, exist_ok=True)
  cols = TABLES[table]
  if table in JOINT_SPEED:  # all columns in one session, then split per column
    if len({c.dataset for c in cols}) != 1:
      raise ValueError(f'table {table}: joint timing needs one dataset')
    log(f'table {table}: timing ' + ', '.join(f'{c.title} {m}' for c in cols
                                               for m in c.methods) + ', interleaved')
    cfgs = {f'{c.id}/{m}': make_config(c, m, profile, profile.seeds[0])
            for c in cols for m in c.methods}
    res = measure_speed(cfgs, get_dataset(cols[0].dataset, profile, source),
                        profile.speed, log)
    res['command'] = command
    for c in cols:
      part = dict(res, methods={m: res['methods'][f'{c.id}/{m}'] for m in c.methods},
                  joint=[c2.id for c2 in cols])
      (root / f'speed_{c.id}.json').write_text(json.dumps(part, indent=1))
    return
  measured: dict[str, Path] = {}
  for col in cols:
    out = root / f'speed_{col.id}.json'
    if profile.share_speed and col.same_step_as in measured:
      src = json.loads(measured[col.same_step_as].read_text())
      src['same_step_as'] = col.same_step_as
      out.write_text(json.dumps(src, indent=1))
      log(f'table {table}: {col.id} speed = {col.same_step_as} speed (same step)')
      continue
    log(f'table {table}: timing {col.title} ({", ".join(col.methods)}), interleaved')
    cfgs = {m: make_config(col, m, profile, profile.seeds[0]) for m in col.methods}
    res = measure_speed(cfgs, get_dataset(col.dataset, profile, source), profile.speed, log)
    res['command'] = command
    out.write_text(json.dumps(res, indent=1))
    measured[col.id] = out


# --------------------------------------------------------------------------------------
# The generated table


def _fmt_acc(values: list[float]) -> str:
  if not values:
    return ''
  pct = [100 * v for v in values]
  if len(pct) == 1:
    return f'{pct[0]:.2f}'
  return f'{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}'


def _results(root: Path, col: Column, method: str, seeds: Sequence[int]) -> list[dict]:
  out = []
  for s in seeds:
    f = run_dir(root, col, method, s) / 'result.json'
    if f.exists():
      out.append(json.loads(f.read_text()))
  return out


def _diverged(root: Path, col: Column, method: str, seeds: Sequence[int]) -> list[str]:
  """'seed S at step N' for each seed whose run diverged."""
  out = []
  for s in seeds:
    f = run_dir(root, col, method, s) / DIVERGED
    if f.exists():
      step = re.search(r'at step (\d+)', json.loads(f.read_text())['diverged'])
      out.append(f'seed {s} at step {step.group(1) if step else "?"}')
  return out


def _trained(results: list[dict], col: Column, diverged: Sequence[str] = ()) -> str:
  """How much training the accuracy reflects: epochs, or steps when partial; and which
  seeds diverged (their runs have no accuracy)."""
  if diverged:
    done = f'{_trained(results, col)}; ' if results else ''
    return f'{done}diverged: {", ".join(diverged)}'
  if not results:
    return ''
  r = results[0]
  steps = r['steps_per_epoch'] * r['epochs']
  full = full_epoch_steps(col.dataset, r['config']['batch_size'])
  if r['steps_per_epoch'] >= full:
    return f'{r["epochs"]} ep'
  return f'{steps} steps ({steps / full:.2f} ep)'


def _hardware_line(hw: dict) -> str:
  return (f'{hw["backend"]} ({", ".join(sorted(set(hw["devices"])))} x{hw["num_devices"]}), '
          f'{hw["cpu_count"]} CPU cores visible, {hw["platform"]}, jax {hw["jax"]}')


def _speeds(root: Path, table: int) -> dict[str, dict]:
  """Column id -> its speed file's content (columns not timed yet are left out)."""
  out = {}
  for col in TABLES[table]:
    f = root / f'speed_{col.id}.json'
    if f.exists():
      out[col.id] = json.loads(f.read_text())
  return out


def write_table(table: int, profile: Profile, root: Path, seeds: Sequence[int],
                command: str, log: Log) -> Path:
  cols = TABLES[table]
  speeds = _speeds(root, table)
  lines_rows = []
  curves: dict[str, tuple[str, dict[str, list[dict]]]] = {}
  speed_notes, targets = [], []
  hardware = train.hardware()
  for col in cols:
    speed = speeds.get(col.id)
    sm = dict(speed['methods']) if speed else {}
    if speed and speed.get('joint'):  # timed together: compare with any column's LDRL/BP
      for other in speed['joint']:
        for m, v in speeds.get(other, {}).get('methods', {}).items():
          sm.setdefault(m, v)
    if speed:
      hardware = speed['hardware']
      note = (f'{col.title}: measured {speed["date"]}, load average '
              f'{speed["loadavg_before"][0]:.1f} before / {speed["loadavg_after"][0]:.1f} '
              f'after')
      if speed.get('same_step_as'):
        note = (f'{col.title}: the same step as {DATASET_NAMES[speed["same_step_as"]]} '
                f'(same model, shapes and config), so its measurement is reused')
      if speed.get('joint'):
        note = (f'{col.title}: timed in one interleaved session with '
                f'{", ".join(c.title for c in cols if c.id != col.id)} '
                f'({speed["date"]}); speed vs BP is vs that session\'s BP')
      speed_notes.append(note)
    curves[col.id] = (col.title, {})
    for method in col.methods:
      res = _results(root, col, method, seeds)
      curves[col.id][1][col.label(method)] = res
      paper = PAPER_TEST_ACC.get((table, col.id, method))
      row = [col.title, col.label(method),
             _trained(res, col, _diverged(root, col, method, seeds)),
             _fmt_acc([r['train_accuracy'] for r in res if 'train_accuracy' in r]),
             _fmt_acc([r['test_accuracy'] for r in res]),
             f'{paper:.1f}' if paper is not None else '']
      if speed and method in speed['methods']:
        mine = speed['methods'][method]
        ms = mine['ms_per_step']
        gflop = mine.get('gflop_per_step')
        row += [f'{ms:.1f}', '' if gflop is None else f'{gflop:.2f}', f'{mine["epoch_s"]:.1f}',
                f'×{sm["ldrl"]["epoch_s"] / mine["epoch_s"]:.2f}' if 'ldrl' in sm else '',
                f'×{sm["bp"]["epoch_s"] / mine["epoch_s"]:.2f}' if 'bp' in sm else '']
      else:
        row += [''] * 5
      lines_rows.append('| ' + ' | '.join(row) + ' |')
    if table in TARGET_TJML_OVER_BP and 'tjml_dtp' in sm and 'bp' in sm:
      ratio = sm['tjml_dtp']['ms_per_step'] / sm['bp']['ms_per_step']
      lim = TARGET_TJML_OVER_BP[table]
      flops = [sm[m].get('gflop_per_step') for m in ('tjml_dtp', 'bp')]
      flop_note = f'; GFLOP ratio {flops[0] / flops[1]:.2f}' if all(flops) else ''
      targets.append(f'- {col.title}: TJML-DTP time per step / BP = {ratio:.2f}{flop_note} '
                     f'(target ≤ {lim}: {"met" if ratio <= lim else "NOT met"})')
    if table in TARGET_SPEEDUP_OVER_LDRL and 'tjml_dtp' in sm and 'ldrl' in sm:
      up = sm['ldrl']['epoch_s'] / sm['tjml_dtp']['epoch_s']
      lim = TARGET_SPEEDUP_OVER_LDRL[table]
      targets.append(f'- {col.title}: TJML-DTP speed per epoch vs LDRL = ×{up:.1f} '
                     f'(target ≥ ×{lim:g}: {"met" if up >= lim else "NOT met"})')

  speed_commands = sorted({s['command'] for s in speeds.values() if s.get('command')})
  epochs_desc = []
  for col in cols:
    for method in col.methods:
      cfg = make_config(col, method, profile, seeds[0])
      spe = full_epoch_steps(col.dataset, cfg.batch_size)
      steps = min(cfg.steps_per_epoch or spe, spe)
      what = f'{cfg.epochs} ep' if steps == spe else f'{cfg.epochs} × {steps} steps'
      item = f'{col.label(method)} {what}'
      if len({c.model_name for c in cols}) > 1:
        item = f'{col.model_name} {item}'
      if item not in epochs_desc:
        epochs_desc.append(item)
  plan = profile.speed
  head = [
      f'# {TABLE_TITLES[table]} ({profile.name} profile)', '',
      f'- profile: `{profile.name}`: {profile.description}',
      f'- command: `{command}`'
      + ''.join(f'; speed measured by `{c}`' for c in speed_commands if c != command),
      f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}',
      f'- hardware: {_hardware_line(hardware)}',
      f'- seeds: {", ".join(map(str, seeds))} (accuracy: mean ± sample std over seeds '
      f'when more than one)',
      f'- training (accuracy columns, planned): {"; ".join(epochs_desc)}; the "Trained" '
      f'column says what each finished run did (empty: not run yet). Train accuracy is '
      f'evaluated on the whole training set after training, test accuracy on the test set'
      + (f' (subsets: {profile.train_examples} train / {profile.test_examples} test '
         f'examples)' if profile.train_examples else '') + '.',
      f'- speed: every method\'s full jitted training step in one process, '
      f'{plan.describe()}; s/epoch = ms/step × steps of one full epoch (training set / '
      f'batch), excluding evaluation and compilation; speed vs X = X\'s time per epoch / '
      f'the method\'s (LDRL ×1.00, BP ×1.00 in their own rows); GFLOP/step = XLA\'s '
      f'cost analysis of the same step compiled with XLA\'s own convolution (XLA counts a '
      f'loop body once: the fast convolution\'s weight gradient loops over batch chunks; '
      f'blank for LDRL, whose feedback training is a loop).'
      + (' ' + '; '.join(speed_notes) + '.' if speed_notes else ''),
      '- paper: published test accuracy of Bao et al. (AAAI 2024) for TJML-DTP (Tables '
      '1-3); every other published cell is left blank, not guessed.',
      '',
      '| Model / data | Method | Trained | Train acc (%) | Test acc (%) | Paper test acc '
      '(%) | ms/step | GFLOP/step | s/epoch | Speed vs LDRL | Speed vs BP |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  text = '\n'.join(head + lines_rows)
  if targets:
    text += '\n\nPerformance targets (issue 4)'
    if profile.fast_compile:
      text += (' — smoke profile: compiled without optimisations at batch 8, so these '
               'ratios are not measurements')
    text += ':\n\n' + '\n'.join(targets)
  text += '\n'
  out = root.parent / f'table{table}.md'
  out.write_text(text)
  plot_curves(table, curves, root.parent / f'table{table}_curves.png')
  log(f'wrote {out}')
  return out


def plot_curves(table: int, curves: dict[str, tuple[str, dict[str, list[dict]]]],
                path: Path) -> None:
  """Test accuracy and training loss against epochs of data seen, per column."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cols = list(curves)
  fig, axes = plt.subplots(2, len(cols), figsize=(5 * len(cols), 7), squeeze=False)
  for j, col_id in enumerate(cols):
    title, by_method = curves[col_id]
    for label, results in by_method.items():
      if not results:
        continue
      n_train = data.info(results[0]['config']['dataset']).num_examples['train']
      by_step: dict[int, list[dict]] = {}
      for r in results:
        bs = r['config']['batch_size']
        for row in r['history']:
          by_step.setdefault(row['step'], []).append(row)
      steps = sorted(by_step)
      x = [s * bs / n_train for s in steps]
      for i, key in enumerate(('test_accuracy', 'train_loss')):
        y = [statistics.mean(row[key] for row in by_step[s]) for s in steps]
        if key == 'test_accuracy':
          y = [100 * v for v in y]
        axes[i, j].plot(x, y, marker='o', label=label)
    axes[0, j].set_title(title)
    axes[0, j].set_ylabel('test accuracy (%)')
    axes[1, j].set_ylabel('training loss (epoch mean)')
    for i in range(2):
      axes[i, j].set_xlabel('epochs of training data seen')
      axes[i, j].grid(alpha=0.3)
      if axes[i, j].lines:
        axes[i, j].legend()
  fig.suptitle(TABLE_TITLES[table])
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# --------------------------------------------------------------------------------------
# Entry points

@contextlib.contextmanager
def _compile_mode(profile: Profile, workdir: Path):
  """For ``fast_compile`` profiles: XLA optimisations off, and a persistent compilation
  cache under ``<workdir>/<profile>/jax_cache`` (identical programs, e.g. MNIST's and
  F-MNIST's steps or one model's evaluation under four methods, compile once).
  Restores the previous settings on exit."""
  if not profile.fast_compile:
    yield
    return
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  names = ('jax_disable_most_optimizations', 'jax_compilation_cache_dir',
           'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  old = {k: jax.config.values.get(k) for k in names}
  new = dict(zip(names, (True, str(workdir / profile.name / 'jax_cache'), 0.0, 0)))
  try:
    for k, v in new.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()
    yield
  finally:
    for k, v in old.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()


def run_table(table: int, profile: str | Profile, workdir: str | os.PathLike,
              seeds: Sequence[int] | None = None, what: str = 'all', source: str = 'real',
              command: str = '', log: Log = print) -> Path:
  """Runs (parts of) one table and writes ``<workdir>/<profile>/table<T>.md``."""
  profile = PROFILES[profile] if isinstance(profile, str) else profile
  if table not in TABLES:
    raise ValueError(f'unknown table {table}; valid: {sorted(TABLES)}')
  if what not in ('all', 'speed', 'accuracy', 'table'):
    raise ValueError(f"what must be 'all', 'speed', 'accuracy' or 'table', got {what!r}")
  seeds = tuple(seeds) if seeds else profile.seeds
  root = Path(workdir) / profile.name / f'table{table}'
  root.mkdir(parents=True, exist_ok=True)
  command = command or f'python -m experiments.reproduce --table={table} ' \
      f'--profile={profile.name}'
  with _compile_mode(profile, Path(workdir)):
    if what in ('all', 'speed'):
      run_speed(table, profile, root, source, log, command)
    if what in ('all', 'accuracy'):
      run_accuracy(table, profile, root, seeds, source, log)
  return write_table(table, profile, root, seeds, command, log)


def run_figure(figure: int, profile: str | Profile, workdir: str | os.PathLike,
               sizes: Sequence[int] | None = None, command: str = '',
               log: Log = print) -> Path:
  profile = PROFILES[profile] if isinstance(profile, str) else profile
  if figure != 2:
    raise ValueError(f'unknown figure {figure}; valid: [2]')
  out = Path(workdir) / profile.name
  header = '\n'.join([
      f'# Figure 2: inverse, pseudo-inverse and transpose of n x n float32 matrices '
      f'({profile.name} profile)', '',
      f'- command: `{command or "python -m experiments.reproduce --figure=2"}`',
      f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}',
      f'- hardware: {_hardware_line(train.hardware())}',
      f'- method: jitted jnp.linalg.inv / jnp.linalg.pinv / transpose (materialised), '
      f'compiled ahead of time, one warm-up call (skipped when a call takes over '
      f'{profile.figure_max_seconds / 10:g} s), then the median of up to '
      f'{profile.figure_repeats} calls with block_until_ready (at least 3; fewer than '
      f'the maximum once a point has taken {profile.figure_max_seconds:g} s)'])
  with _compile_mode(profile, Path(workdir)):
    figure2.run(out, sizes or profile.figure_sizes, profile.figure_repeats,
                profile.figure_max_seconds, log=log, header=header)
  log(f'wrote {out / "figure2.csv"}, {out / "figure2.png"}, {out / "figure2.md"}')
  return out / 'figure2.csv'


def main(argv):
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint at INFO
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not f.table and not f.figure:
    raise app.UsageError('give --table=1|2|3|4 or --figure=2')
  command = 'python -m experiments.reproduce ' + ' '.join(shlex.quote(a) for a in sys.argv[1:])
  seeds = [int(s) for s in f.seeds] if f.seeds else None
  if f.table:
    if f.table not in TABLES:
      raise app.UsageError(f'unknown table {f.table}; valid: {sorted(TABLES)}')
    path = run_table(f.table, f.profile, f.workdir, seeds, f.what, f.data, command)
    print(Path(path).read_text())
  if f.figure:
    sizes = [int(s) for s in f.figure_sizes] if f.figure_sizes else None
    run_figure(f.figure, f.profile, f.workdir, sizes, command)
  return 0


def define_flags() -> None:
  """Defined only when run as a program, so that importing this module (tests) never
  collides with another binary's flags of the same name."""
  flags.DEFINE_integer('table', None, 'Table to reproduce: 1, 2, 3 or 4.')
  flags.DEFINE_integer('figure', None, 'Figure to reproduce: 2.')
  flags.DEFINE_enum('profile', 'smoke', list(PROFILES), 'Run size.')
  flags.DEFINE_list('seeds', None, 'Seeds (default: the profile\'s).')
  flags.DEFINE_string('workdir', 'runs/reproduce', 'Output root; <workdir>/<profile>/...')
  flags.DEFINE_enum('what', 'all', ['all', 'speed', 'accuracy', 'table'],
                    'Which part of a table to run; the table file is always regenerated.')
  flags.DEFINE_enum('data', 'real', ['real', 'synthetic'],
                    'Real datasets, or random images of the same shapes (machinery only).')
  flags.DEFINE_list('figure_sizes', None, 'Matrix sizes for Figure 2 (default: the '
                    'profile\'s: 100..500, 1024, 2048, 4096).')


if __name__ == '__main__':
  define_flags()
  app.run(main)
