"""The training loop shared by every method: data on device, fused jitted steps,
data-parallel sharding, evaluation, metrics, checkpoints and resume.

Layout. ``setup(cfg)`` builds a ``Run`` (data on the mesh, model, algorithm, keys,
the compiled step); ``train_and_evaluate`` is that set-up, the epoch loop
(``_train_epochs``) and the summary (``_summary``). The speed harness and the benches
of ``experiments/`` step the same ``Run``. No compiled program is kept between runs
here: a second run of a config compiles again, unless JAX's persistent compilation
cache (``jax_compilation_cache_dir``) is enabled, which serves identical programs.

Reproducibility. One epoch = ``steps_per_epoch`` steps over a permutation drawn from
(seed, epoch); a step's PRNG key is folded from (seed, global step). So the data order
and noise of any step are functions of the config alone, the checkpoint needs to hold
only the ``TrainState`` (forward and feedback parameters, optimiser states, step) and
the metrics of the epoch in progress, and a resumed run repeats the uninterrupted one
exactly: same parameters, same metrics.jsonl (timing fields aside).

Data parallelism. All devices form a 1-D ``Mesh`` with axis ``'data'``. The state and
the dataset are replicated; the jitted step gathers its global batch (``batch_size``
examples, whatever the device count) from the on-device dataset with the index array
sharded over ``'data'``, so each device gathers and processes only its
``batch_size / num_devices`` examples, and XLA all-reduces the gradients (and the
feedback-training gradients of LDRL/DTP). Random numbers are partitionable
(``jax_threefry_partitionable``), so 1 and 8 devices draw the same noise and reach the
same parameters up to float32 summation order.

Members. A config trains M runs in one program, its *members* (``tp_jax.sweep``): the
``num_seeds`` seeds ``seed .. seed + S - 1`` of each setting of ``sweep``'s scalar
hyper-parameters. With M > 1 the state, the epoch indices and the step keys get a
leading member axis and the step is ``jax.vmap``-ed over it (the axis is replicated over
the mesh; each member's batch is sharded over ``'data'``). Member m has the keys of the
separate run with its seed and carries its swept values in ``TrainState.hparams``, from
which the step builds its algorithm and optimiser; so it equals the separate run of
``sweep.member_config(cfg, m)`` to float32 tolerance. Each member is evaluated on its
own. metrics.jsonl rows and result.json hold per-member lists (``merge_members``; for
seeds alone result.json adds ``<name>_mean`` and the sample ``<name>_std``, with a sweep
``members`` names each index), TensorBoard tags end with ``/seed_<seed>`` (after the
setting's name with a sweep). M = 1 is the unvmapped program of before.

Multi-host. With ``num_processes > 1`` the loop first calls
``jax.distributed.initialize(num_processes=..., process_id=$TP_JAX_PROCESS_ID)``: on
Cloud TPU, SLURM, Open MPI or Kubernetes the coordinator and process id are detected;
elsewhere set ``JAX_COORDINATOR_ADDRESS=host:port`` and ``TP_JAX_PROCESS_ID`` on every
process (CPU processes talk over gloo). The mesh then spans every process's devices
in process order. Each host loads the dataset and feeds its own devices: a device
gathers only its shard of each global batch, so host p supplies exactly examples
``[p B/P, (p+1) B/P)`` of every batch, and the results equal a single-host run's.
Every process must run the same command with the same workdir (a shared file
system): Orbax coordinates the checkpoint writes; only process 0 writes
metrics.jsonl, result.json and the TensorBoard events.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tp_jax import algorithms
from tp_jax import config as config_lib
from tp_jax import data
from tp_jax import diagnostics
from tp_jax import layers
from tp_jax import metrics_writer
from tp_jax import models
from tp_jax import network
from tp_jax import sweep
from tp_jax.algorithms import common

Array = jax.Array

# Fields of a metrics.jsonl row that measure time: they differ between runs.
TIMING_KEYS = ('epoch_train_s', 'ms_per_step', 'steps', 'train_s', 'eval_s')

# The eval_every_steps evaluations: one row per evaluation (step, cumulative training and
# evaluation seconds, test loss and accuracy).
EVALS_FILE = 'evals.jsonl'

# Config fields that may differ between a run and its resumption: none of them changes
# what is computed (``epochs`` extends or shortens the run).
RESUMABLE_CHANGES = (
    'epochs',
    'members_per_vmap',
    'check_every_steps',
    'log_every_steps',
    'keep_checkpoints',
    'checkpoint_every_steps',
    'data_dir',
    'verify_checksums',
    'skip_nonfinite',
    'eval_batch_size',
    'num_processes',
    'eval_every_steps',
)


class DivergenceError(RuntimeError):
  """A non-finite loss, target or parameter; the message names step, block, quantity."""


class WorkdirError(OSError):
  """The workdir cannot hold the run's results (unwritable, or too little space)."""


# Errors whose message is the whole diagnosis: the binaries print them as one line.
REPORTED_ERRORS = (
    config_lib.ConfigError,
    data.DataError,
    layers.FeedbackError,
    WorkdirError,
    DivergenceError,
)


# --------------------------------------------------------------------------------------
# Multi-host


def maybe_initialize_distributed(cfg) -> None:
  """``jax.distributed.initialize`` when ``cfg.num_processes > 1`` (see module doc).

  Must run before anything touches a JAX backend; idempotent.
  """
  n = cfg.num_processes
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise config_lib.ConfigError(f'num_processes must be a positive integer, got {n!r}')
  if n == 1:
    return
  if not jax.distributed.is_initialized():
    pid = os.environ.get('TP_JAX_PROCESS_ID')
    jax.distributed.initialize(num_processes=n, process_id=int(pid) if pid is not None else None)
  if jax.process_count() != n:
    raise config_lib.ConfigError(
        f'num_processes={n} but JAX runs {jax.process_count()} ' f'processes'
    )


def _put(x, sharding: NamedSharding) -> Array:
  """A global array with ``sharding`` from a value every process holds in full."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


def _fetch(tree):
  """Host copies of replicated (possibly multi-process) arrays."""
  return jax.tree.map(
      lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else np.asarray(a),
      tree,
  )


# --------------------------------------------------------------------------------------
# Jitted pieces


def _keys(seed: int):
  """(init, data order, step noise) keys of a run."""
  return jax.random.split(jax.random.key(seed), 3)


def _run_keys(cfg):
  """(init, data order, step noise) keys of ``cfg``; with M > 1 members each is an [M]
  key array whose row m is the key of member m's separate run (its seed's)."""
  members = sweep.members(cfg)
  if len(members) == 1:
    return _keys(members[0].seed)
  keys = jnp.stack([_keys(m.seed) for m in members])
  return keys[:, 0], keys[:, 1], keys[:, 2]


def num_members(cfg) -> int:
  """The runs ``cfg`` trains in one program: sweep settings x ``num_seeds``."""
  return len(sweep.members(cfg))


def member_algorithm(net: network.Net, cfg, total_steps: int) -> Callable:
  """hparams -> the algorithm of a member whose swept hyper-parameters are ``hparams``
  (``TrainState.hparams``, traced; {} is ``cfg``'s own run), forward optimiser included."""

  def algorithm(hparams) -> algorithms.Algorithm:
    tx = algorithms.make_optimizer(cfg.optimizer, total_steps, hparams)
    return algorithms.make(net, cfg, tx, hparams)

  return algorithm


def _key_data(key, sharding: NamedSharding) -> Array:
  """A key as a replicated uint32 array: jitted functions take the seed as an input, so
  one executable serves every seed (and works across processes)."""
  return _put(np.asarray(jax.random.key_data(key)), sharding)


def make_init(algorithm: Callable, mesh: Mesh, num_members: int = 1) -> Callable:
  """(init key data, hparams, x_example) -> state, replicated over ``mesh``.

  ``algorithm``: ``member_algorithm``'s hparams -> Algorithm; the state keeps hparams.
  ``num_members`` > 1: the key data and hparams have a leading member axis, and so has
  the state. Initialisation runs once: on CPU it compiles without LLVM's optimisations
  (LeNet: about 4x faster to compile), which gives the same values.
  """
  fast = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None

  def init(k, hparams, x):
    state = algorithm(hparams).init(jax.random.wrap_key_data(k), x)
    return state._replace(hparams=hparams)

  if num_members > 1:  # one state per member; the example batch (shapes only) shared
    init = jax.vmap(init, in_axes=(0, 0, None))
  return jax.jit(init, out_shardings=NamedSharding(mesh, P()), compiler_options=fast)


def make_train_step(algorithm: Callable, cfg, mesh: Mesh, steps_per_epoch: int) -> Callable:
  """(state, x_all, y_all, idx_epoch, step_key) -> (state, metrics), jitted.

  ``idx_epoch`` [steps_per_epoch, batch_size] holds the epoch's example indices; the
  step takes row ``state.step % steps_per_epoch``, so the host passes nothing per step
  and the loop dispatches steps asynchronously, syncing every ``check_every_steps``.
  The index row is sharded over the mesh's data axis before the gather: each device
  gathers and processes its own slice of the global batch. The step's key is folded
  from (``step_key``, step); ``step_key`` is the raw data of the run's step key. Metrics add ``params_finite`` (one bool per block, after the
  update) to the algorithm's.

  ``algorithm``: ``member_algorithm``; the step runs the algorithm of the state's
  hparams. M > 1 members (``num_members``): the step is vmapped over a leading member
  axis of the state, ``idx_epoch`` and ``step_key`` (the dataset is shared), so M runs
  train in one program; the member axis is replicated over the mesh and each member's
  batch is still sharded over ``'data'``. Metrics get the member axis too.
  """
  batch = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())

  def train_step(state, x_all, y_all, idx_epoch, step_key):
    k_step_root = jax.random.wrap_key_data(step_key)
    idx_B = jax.lax.with_sharding_constraint(idx_epoch[state.step % steps_per_epoch], batch)
    x = jax.lax.with_sharding_constraint(x_all[idx_B], batch)
    y = jax.lax.with_sharding_constraint(y_all[idx_B], batch)
    k_aug, k_step = jax.random.split(jax.random.fold_in(k_step_root, state.step))
    if cfg.augment:
      x = data.augment(k_aug, x)
    new_state, metrics = algorithm(state.hparams).step(state, (x, y), k_step)
    metrics['params_finite'] = jnp.stack([common.all_finite(p) for p in new_state.params])
    if cfg.skip_nonfinite:  # keep the old state, but count the step
      new_state = jax.tree.map(
          lambda n, o: jnp.where(metrics['finite'], n, o),
          new_state,
          state._replace(step=state.step + 1),
      )
    return new_state, metrics

  if num_members(cfg) > 1:
    train_step = _over_members(train_step, cfg.members_per_vmap)
  return jax.jit(train_step, in_shardings=replicated, out_shardings=replicated, donate_argnums=(0,))


def _over_members(train_step: Callable, members_per_vmap: int) -> Callable:
  """``train_step`` over the leading member axis of the state, ``idx_epoch`` and
  ``step_key`` (the dataset shared): vmapped over all members at once (0), or a loop over
  chunks of ``members_per_vmap`` members vmapped within a chunk (``jax.lax.map``; for 1,
  a scan of the step itself, since a one-member vmap is still a batched program). On
  XLA:CPU a vmapped convolution with per-member kernels runs far slower than the members'
  convolutions one by one (BUILD_NOTES, "Seeds in one program"), so conv nets on CPU
  want 1."""
  vmapped = jax.vmap(train_step, in_axes=(0, None, None, 0, 0))
  if not members_per_vmap:
    return vmapped

  def looped(state, x_all, y_all, idx_epoch, step_key):
    return jax.lax.map(
        lambda m: train_step(m[0], x_all, y_all, m[1], m[2]),
        (state, idx_epoch, step_key),
        batch_size=None if members_per_vmap == 1 else members_per_vmap,
    )

  return looped


def make_evaluate(net: network.Net, batch_size: int, mesh: Mesh | None = None) -> Callable:
  """(params, x, y) -> (mean loss, accuracy) over all examples, in fixed-size batches.

  Batches are ``min(batch_size, n)`` rounded up to a multiple of the device count and
  sharded over the mesh's data axis (padding is masked out).
  """
  ndev = 1 if mesh is None else mesh.devices.size
  shard = None if mesh is None else NamedSharding(mesh, P(None, 'data'))

  @jax.jit
  def evaluate(params, x, y):
    n = x.shape[0]
    bs = -(-min(batch_size, n) // ndev) * ndev
    num = -(-n // bs)
    pad = num * bs - n
    xb = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(num, bs, *x.shape[1:])
    yb = jnp.pad(y, (0, pad)).reshape(num, bs)
    mask = (jnp.arange(num * bs) < n).reshape(num, bs)
    if shard is not None:
      xb, yb, mask = (jax.lax.with_sharding_constraint(a, shard) for a in (xb, yb, mask))

    def body(acc, b):
      xi, yi, mi = b
      logits = network.apply(net, params, xi)
      ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), yi[:, None], 1)[:, 0]
      return (acc[0] + jnp.sum(ce * mi), acc[1] + jnp.sum((logits.argmax(-1) == yi) * mi)), None

    (loss, correct), _ = jax.lax.scan(body, (0.0, 0), (xb, yb, mask))
    return loss / n, correct / n

  return evaluate


# --------------------------------------------------------------------------------------
# Set-up: everything a run computes with


@dataclasses.dataclass(frozen=True)
class Run:
  """A config's training run, ready to step: built once by ``setup`` and used by the
  training loop, the speed harness and the benches alike.

  The datasets live on the mesh (replicated); ``train_step`` is compiled ahead of time
  for them (see ``make_train_step``); ``init`` and ``evaluate`` are jitted and compile
  on their first call (jax.jit's own cache serves later calls of the same run).
  """

  cfg: ml_collections.ConfigDict
  mesh: Mesh
  net: network.Net
  algo: algorithms.Algorithm
  x_train: Array
  y_train: Array
  x_test: Array
  y_test: Array
  steps_per_epoch: int
  init: Callable  # (init_key, hparams, x batch) -> TrainState
  train_step: Callable  # (state, x_train, y_train, epoch indices, step_key) -> (state, metrics)
  evaluate: Callable  # (params, x, y) -> (mean loss, accuracy)
  # With M > 1 members each key below and hparams have a leading member axis [M].
  init_key: Array  # raw key data, replicated: the seed is an input, not a constant
  data_key: Array  # folded with the epoch: that epoch's permutation
  step_key: Array  # raw key data, replicated; folded with the step inside the step
  hparams: common.HParams  # the members' swept values (sweep.hyper_parameters), replicated
  compile_s: float  # seconds to compile ``train_step``
  members: tuple[sweep.Member, ...]  # what each index of the member axis trains

  @property
  def n_train(self) -> int:
    return self.x_train.shape[0]

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.cfg.epochs

  @property
  def num_members(self) -> int:
    return len(self.members)


def steps_per_epoch(cfg, n_train: int) -> int:
  """Full batches in the training set, capped by ``cfg.steps_per_epoch`` when set."""
  if cfg.batch_size > n_train:
    raise config_lib.ConfigError(
        f'batch_size={cfg.batch_size} exceeds the {n_train} ' f'training examples'
    )
  steps = n_train // cfg.batch_size
  return min(steps, cfg.steps_per_epoch) if cfg.steps_per_epoch else steps


def setup(
    cfg: ml_collections.ConfigDict,
    dataset: data.Dataset | None = None,
    *,
    before_compile: Callable[[Any], None] = lambda state_spec: None,
) -> Run:
  """Data on the mesh, model, algorithm, keys and the compiled step of ``cfg``.

  ``dataset``: the default loads ``cfg.dataset``. ``before_compile`` gets the
  ``TrainState``'s shapes before the step compiles (checks that should not wait for a
  compile).
  Raises:
    ConfigError / ValueError: a bad config or a dataset the model cannot take.
  """
  maybe_initialize_distributed(cfg)
  devices = jax.devices()
  config_lib.validate(cfg, num_devices=len(devices))
  if dataset is None:
    dataset = data.load_dataset(
        cfg.dataset, cfg.data_dir or None, verify=cfg.verify_checksums, backend=cfg.data_backend
    )
  net = models.for_config(cfg)
  check_input_shape(cfg, net, dataset.x_train.shape[1:])
  spe = steps_per_epoch(cfg, dataset.x_train.shape[0])

  mesh = Mesh(np.array(devices), ('data',))
  replicated = NamedSharding(mesh, P())
  x_train, y_train, x_test, y_test = (
      _put(a, replicated)
      for a in (
          dataset.x_train,
          dataset.y_train.astype(jnp.int32),
          dataset.x_test,
          dataset.y_test.astype(jnp.int32),
      )
  )
  algorithm = member_algorithm(net, cfg, spe * cfg.epochs)
  members = tuple(sweep.members(cfg))
  init = make_init(algorithm, mesh, len(members))
  k_init, k_data, k_steps = _run_keys(cfg)
  init_key, step_key = _key_data(k_init, replicated), _key_data(k_steps, replicated)
  hparams = jax.tree.map(lambda a: _put(a, replicated), sweep.hyper_parameters(cfg, net))
  state_spec = jax.eval_shape(init, init_key, hparams, x_train[: cfg.batch_size])
  state_spec = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), state_spec
  )
  idx_spec = jax.ShapeDtypeStruct(
      (*_member_axis(cfg), spe, cfg.batch_size), jnp.int32, sharding=replicated
  )
  before_compile(state_spec)
  t0 = time.perf_counter()
  step = (
      make_train_step(algorithm, cfg, mesh, spe)
      .lower(state_spec, x_train, y_train, idx_spec, step_key)
      .compile()
  )
  compile_s = time.perf_counter() - t0
  return Run(
      cfg=cfg,
      mesh=mesh,
      net=net,
      algo=algorithm({}),
      x_train=x_train,
      y_train=y_train,
      x_test=x_test,
      y_test=y_test,
      steps_per_epoch=spe,
      init=init,
      train_step=step,
      evaluate=make_evaluate(net, cfg.eval_batch_size, mesh),
      init_key=init_key,
      data_key=k_data,
      step_key=step_key,
      hparams=hparams,
      compile_s=compile_s,
      members=members,
  )


def _member_axis(cfg) -> tuple[int, ...]:
  """The leading axis the state, epoch indices and step metrics get from the members."""
  m = num_members(cfg)
  return () if m == 1 else (m,)


def init_state(run: Run) -> algorithms.TrainState:
  """The run's initial ``TrainState`` (a function of the seeds and swept values alone)."""
  return run.init(run.init_key, run.hparams, run.x_train[: run.cfg.batch_size])


def member_states(state, num_members: int) -> list:
  """Each member's ``TrainState``: [state] when ``num_members`` is 1, else the slices of
  the member axis (each as the member's separate run holds it, hparams aside)."""
  if num_members == 1:
    return [state]
  return [jax.tree.map(lambda a, m=m: a[m], state) for m in range(num_members)]


def epoch_indices(run: Run, epoch: int) -> Array:
  """[steps_per_epoch, batch_size] example indices of (0-based) ``epoch``, replicated;
  with M > 1 members, [M, steps_per_epoch, batch_size]: each member's seed's order."""

  def order(data_key):
    idx = data.batches(jax.random.fold_in(data_key, epoch), run.n_train, run.cfg.batch_size)
    return np.asarray(idx)[: run.steps_per_epoch].astype(np.int32)

  idx = (
      order(run.data_key)
      if run.num_members == 1
      else np.stack([order(run.data_key[m]) for m in range(run.num_members)])
  )
  return _put(idx, NamedSharding(run.mesh, P()))


# --------------------------------------------------------------------------------------
# Checkpoints


class Checkpointer:
  """Orbax checkpoints under ``workdir/checkpoints``: item ``state`` holds the flat
  list of the ``TrainState``'s leaves (the tree structure comes from the config, so no
  container type has to survive the round trip), item ``meta`` (JSON) the config and
  the metrics of the epoch in progress.

  Orbax writes a checkpoint into a temporary directory and renames it when complete,
  so a run killed mid-write leaves a directory that is never listed, let alone
  loaded; it is deleted when the next run opens the manager.
  """

  def __init__(self, workdir: Path, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    self._ocp = ocp
    self.directory = (Path(workdir) / 'checkpoints').absolute()
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep or None,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
        ),
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: algorithms.TrainState, meta: dict) -> None:
    ocp = self._ocp
    self._mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(jax.tree.leaves(state)), meta=ocp.args.JsonSave(meta)
        ),
    )
    self._mngr.wait_until_finished()

  def restore_meta(self, step: int) -> dict:
    if not (self.directory / str(step) / 'meta').exists():
      raise RuntimeError(
          f'{self.directory / str(step)} has no meta item: it was written by '
          f'an older tp_jax (before metrics and config were checkpointed). '
          f'Resume it with that version, or use a new workdir'
      )
    out = self._mngr.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))
    return dict(out['meta'])

  def restore(self, step: int, like: algorithms.TrainState) -> algorithms.TrainState:
    out = self._mngr.restore(
        step,
        args=self._ocp.args.Composite(state=self._ocp.args.StandardRestore(jax.tree.leaves(like))),
    )
    return jax.tree.unflatten(jax.tree.structure(like), out['state'])

  def close(self) -> None:
    self._mngr.close()


def _encode_metrics(chunks: list[dict[str, np.ndarray]]) -> dict:
  """Per-step metrics of the epoch in progress, bit-exact and JSON-safe (NaN too)."""
  if not chunks:
    return {}
  out = {}
  for k in chunks[0]:
    a = np.ascontiguousarray(np.concatenate([c[k] for c in chunks]))
    out[k] = dict(
        dtype=a.dtype.str, shape=list(a.shape), data=base64.b64encode(a.tobytes()).decode()
    )
  return out


def _decode_metrics(enc: dict) -> list[dict[str, np.ndarray]]:
  if not enc:
    return []
  return [
      {
          k: np.frombuffer(base64.b64decode(v['data']), np.dtype(v['dtype']))
          .reshape(v['shape'])
          .copy()
          for k, v in enc.items()
      }
  ]


def _flat(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = list(v) if isinstance(v, (list, tuple)) else v
  return out


def _check_resumable(saved: dict, cfg, workdir: Path, step: int) -> None:
  now = _flat(json.loads(cfg.to_json_best_effort()))
  # Checkpoints from before num_seeds / sweep / train_seconds: one seed, no sweep, no budget.
  saved = {'num_seeds': 1, 'sweep': '', 'train_seconds': 0.0, **_flat(saved)}
  diff = sorted(
      k
      for k in set(now) | set(saved)
      if now.get(k) != saved.get(k) and k.split('.')[0] not in RESUMABLE_CHANGES
  )
  if diff:
    what = ', '.join(f'{k}: {saved.get(k)!r} -> {now.get(k)!r}' for k in diff)
    raise config_lib.ConfigError(
        f'{workdir} holds a checkpoint (step {step}) of a different config ({what}); '
        f'resuming would mix two experiments. Use a new --workdir, or the original '
        f'values. Fields that may change on resume: {list(RESUMABLE_CHANGES)}'
    )


# --------------------------------------------------------------------------------------
# Checks


def hardware() -> dict[str, Any]:
  devs = jax.devices()
  return dict(
      backend=jax.default_backend(),
      devices=[d.device_kind for d in devs],
      num_devices=len(devs),
      num_processes=jax.process_count(),
      cpu_count=os.cpu_count(),
      platform=platform.platform(),
      jax=jax.__version__,
  )


def divergence_message(metrics: dict[str, np.ndarray], first_step: int) -> str | None:
  """None if every step of the chunk is finite, else what went wrong where (1-based
  steps and blocks)."""
  bad = np.flatnonzero(~metrics['finite'])
  if not bad.size:
    return None
  i = int(bad[0])
  what = []
  if not np.isfinite(metrics['loss'][i]):
    what.append(f'loss = {float(metrics["loss"][i])}')
  for key, name in (('targets_finite', 'targets'), ('params_finite', 'parameters')):
    if key in metrics:
      blocks = np.flatnonzero(~metrics[key][i])
      if blocks.size:
        what.append(f'non-finite {name} at block(s) {[int(b) + 1 for b in blocks]}')
  if not what:
    what.append('non-finite values')
  return f'training diverged at step {first_step + i + 1}: {"; ".join(what)}'


def _check_workdir(workdir: Path) -> None:
  """Fail before training, not after an hour, when results cannot be written."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f'.write_probe.{jax.process_index()}'
    probe.write_bytes(b'\0' * 4096)
    probe.unlink()
  except OSError as e:
    raise WorkdirError(
        f'workdir {workdir} is not writable ({e.strerror or e}); results '
        f'and checkpoints could not be saved'
    ) from e


def _check_disk_space(workdir: Path, state, keep: int) -> None:
  """Room for ``keep`` checkpoints plus the one being written, and a margin."""
  state_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(state))
  need = state_bytes * ((keep or 2) + 1) + (16 << 20)
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise WorkdirError(
        f'workdir {workdir} has {free / 2**20:.1f} MiB free but the '
        f'checkpoints need about {need / 2**20:.1f} MiB '
        f'({(keep or 2) + 1} x {state_bytes / 2**20:.1f} MiB + margin)'
    )


def check_input_shape(cfg, net: network.Net, image_shape: tuple[int, ...]) -> None:
  if cfg.model == 'mlp_mixer':
    want = tuple(cfg.model_kwargs.get('image_hw', (32, 32)))
    if tuple(image_shape[:2]) != want:
      raise ValueError(
          f'mlp_mixer was built for {want} images but {cfg.dataset} has '
          f'shape {image_shape}; set model_kwargs.image_hw'
      )
  try:
    jax.eval_shape(lambda k: network.init(net, k, jnp.zeros((1, *image_shape))), jax.random.key(0))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'{cfg.model} cannot take {cfg.dataset} images of shape '
        f'{image_shape}: {type(e).__name__}: {e}'
    ) from e


# --------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(
    cfg: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    dataset: data.Dataset | None = None,
    log: Callable[[str], None] = print,
    *,
    until_step: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
  """Trains ``cfg.model`` with ``cfg.method``; writes into ``workdir``:

    metrics.jsonl        one row per epoch (rewritten atomically)
    result.json          the final summary (when the run completes)
    events.out.tfevents.*  the same metrics for TensorBoard
    checkpoints/         Orbax checkpoints (every ``checkpoint_every_steps`` and epoch)

  Resumes automatically from the newest complete checkpoint in ``workdir`` (refusing
  one of a different config). ``until_step`` stops early, after checkpointing that
  step; calling again resumes. ``progress``: a ``\\r`` progress line with ETA on
  stderr (default: when stderr is a terminal or in Jupyter).

  Returns the result dict (as in result.json, plus ``complete`` and the final
  ``state``, a ``TrainState``).
  Raises:
    ConfigError / ValueError: a bad config or a dataset the model cannot take.
    WorkdirError: the workdir is unwritable or too full (before any training).
    DivergenceError: a non-finite loss, target or parameter (unless ``skip_nonfinite``).
  """
  maybe_initialize_distributed(cfg)
  workdir = Path(workdir)
  config_lib.validate(cfg, num_devices=jax.device_count())
  _check_workdir(workdir)
  opened: list[_Resume] = []

  def before_compile(state_spec):  # refuse another config's checkpoint, or a full disk
    opened.append(_Resume.open(workdir, cfg))
    _check_disk_space(workdir, state_spec, cfg.keep_checkpoints)

  try:
    run = setup(cfg, dataset, before_compile=before_compile)
    resume = opened[0]
    state = resume.restore(init_state(run), log)
    log(_start_line(run))
    history, state, step = _train_epochs(run, state, resume, workdir, log, until_step, progress)
  finally:
    if opened:
      opened[0].ckpt.close()
  return _summary(run, state, step, history, workdir)


@dataclasses.dataclass
class _Resume:
  """The workdir's checkpoints and where the run resumes: ``start`` (0: from scratch),
  the metrics and training seconds of the epoch in progress at ``start``."""

  ckpt: Checkpointer
  start: int
  partial: list[dict[str, np.ndarray]]
  partial_s: float

  @classmethod
  def open(cls, workdir: Path, cfg) -> '_Resume':
    ckpt = Checkpointer(workdir, cfg.keep_checkpoints)
    try:
      start = ckpt.latest_step() or 0
      if not start:
        return cls(ckpt, 0, [], 0.0)
      try:
        meta = ckpt.restore_meta(start)
      except Exception as e:  # pylint: disable=broad-except
        raise RuntimeError(
            f'could not read the checkpoint at step {start} in '
            f'{ckpt.directory}: {type(e).__name__}: {e}'
        ) from e
      _check_resumable(meta.get('config', {}), cfg, workdir, start)
      return cls(
          ckpt,
          start,
          _decode_metrics(meta.get('epoch_metrics', {})),
          meta.get('epoch_train_s', 0.0),
      )
    except BaseException:
      ckpt.close()
      raise

  def restore(self, state, log):
    if not self.start:
      return state
    try:
      state = self.ckpt.restore(self.start, state)
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError(
          f'could not restore the checkpoint at step {self.start} in '
          f'{self.ckpt.directory}: {type(e).__name__}: {e}'
      ) from e
    log(f'resumed from checkpoint at step {self.start}')
    return state


def _start_line(run: Run) -> str:
  cfg = run.cfg
  return (
      f'{cfg.method} on {cfg.model}/{cfg.dataset}: {run.n_train} training examples, '
      f'batch {cfg.batch_size} over {run.mesh.devices.size} device(s)'
      + (f' in {jax.process_count()} processes' if jax.process_count() > 1 else '')
      + f', {run.steps_per_epoch} steps/epoch x {cfg.epochs} epochs'
      + (
          f', seeds {cfg.seed}..{cfg.seed + cfg.num_seeds - 1} in one program'
          if cfg.num_seeds > 1 and not cfg.sweep
          else ''
      )
      + (f', {run.num_members} members of a sweep in one program' if cfg.sweep else '')
      + (f'; step compiled in {run.compile_s:.1f} s' if run.compile_s else '')
  )


def _train_epochs(
    run: Run, state, resume: _Resume, workdir: Path, log, until_step, progress
) -> tuple[list[dict], Any, int]:
  """Epochs from ``resume.start`` to the end (or ``until_step``, or the spent
  ``train_seconds`` budget): steps in chunks of ``check_every_steps``, checkpoints, one
  metrics row and log line per epoch (a budget's last, partial epoch gets its row too),
  test-set evaluations every ``eval_every_steps`` into evals.jsonl.
  Returns (history, state, step)."""
  cfg, spe = run.cfg, run.steps_per_epoch
  primary = jax.process_index() == 0
  stop_step = run.total_steps if until_step is None else min(until_step, run.total_steps)
  chunk = cfg.check_every_steps or spe
  save_every = cfg.checkpoint_every_steps or spe
  eval_every = cfg.eval_every_steps or run.total_steps + 1  # past the end: never
  start, ckpt = resume.start, resume.ckpt
  step, last_saved = start, start or None
  history = _rows_until(workdir / 'metrics.jsonl', start)
  evals = _rows_until(workdir / EVALS_FILE, start) if cfg.eval_every_steps else []
  # Training and evaluation clocks over the whole run (resumes included): the finished
  # epochs' (and a budget's partial epoch's) training seconds, the evaluations' seconds.
  done_train_s = float(sum(r['epoch_train_s'] for r in history))
  eval_s = evals[-1]['eval_s'] if evals else 0.0
  writer = None
  if primary:
    _write_history(workdir / 'metrics.jsonl', history)  # drops rows a killed run left
    writer = metrics_writer.EventWriter(workdir, start_step=start)
  bar = metrics_writer.Progress(progress if primary else False)
  config_json = json.loads(cfg.to_json_best_effort())
  # Compiled before the loop, a program of its own: the step is not changed by it.
  diagnose = diagnostics.compile_for_run(run, state) if cfg.diagnostics else None

  def save(chunks, train_s):
    nonlocal last_saved
    ckpt.save(
        step,
        state,
        dict(
            config=config_json,
            step=step,
            epoch_metrics=_encode_metrics(chunks),
            epoch_train_s=train_s,
        ),
    )
    last_saved = step

  def evaluate_test(train_s):  # the eval_every_steps evaluation, timed apart
    nonlocal eval_s
    t0 = time.perf_counter()
    results = [
        _fetch(run.evaluate(st.params, run.x_test, run.y_test))
        for st in member_states(state, run.num_members)
    ]
    eval_s += time.perf_counter() - t0
    evals.append(
        merge_members(
            [
                dict(
                    step=step,
                    epoch=step / spe,
                    train_s=done_train_s + train_s,
                    eval_s=eval_s,
                    test_loss=float(loss),
                    test_accuracy=float(acc),
                )
                for loss, acc in results
            ]
        )
    )
    if writer is not None:
      _write_history(workdir / EVALS_FILE, evals)
      writer.scalars(
          step,
          {
              f'eval/test_accuracy{_member_suffix(cfg, m)}': r['test_accuracy']
              for m, r in enumerate(split_members(evals[-1], run.num_members))
          },
      )

  out_of_time = lambda train_s: cfg.train_seconds and done_train_s + train_s >= cfg.train_seconds
  try:
    if cfg.eval_every_steps and not start:  # the curve starts at the initial state
      evaluate_test(0.0)
    for epoch in range(start // spe, cfg.epochs):
      if step >= stop_step:
        break
      idx = epoch_indices(run, epoch)
      done = step - epoch * spe
      first, chunks, train_s = (
          done,
          (resume.partial if done else []),
          (resume.partial_s if done else 0.0),
      )
      this_s = 0.0
      while done < spe and step < stop_step and not out_of_time(train_s):
        next_save = (step // save_every + 1) * save_every
        next_eval = (step // eval_every + 1) * eval_every
        stop = min((epoch + 1) * spe, step + chunk, next_save, next_eval, stop_step)
        t0 = time.perf_counter()
        ms = []
        step_diagnostics = []
        for s in range(step + 1, stop + 1):
          state, m = run.train_step(state, run.x_train, run.y_train, idx, run.step_key)
          ms.append(m)
          if diagnose and cfg.log_every_steps and s % cfg.log_every_steps == 0:
            step_diagnostics.append((s, diagnose(state, idx)))
        ms = _fetch(ms)
        dt = time.perf_counter() - t0
        train_s, this_s = train_s + dt, this_s + dt
        m = {k: np.stack([s[k] for s in ms]) for k in ms[0]}
        msg = _members_divergence_message(cfg, m, step)
        if msg and not cfg.skip_nonfinite:
          bar.clear()
          where = (
              f'the last good checkpoint (step {last_saved}) is kept in ' f'{ckpt.directory}'
              if last_saved
              else 'no checkpoint was saved yet'
          )
          raise DivergenceError(
              f'{msg}; {where}. Lower the learning rate or beta, or set '
              f'skip_nonfinite=True to skip (and count) such steps.'
          )
        chunks.append(m)
        for s, values in step_diagnostics if writer is not None else ():
          for member, member_values in enumerate(split_members(values, run.num_members)):
            suffix = _member_suffix(cfg, member)
            writer.scalars(
                s, {k + suffix: v for k, v in diagnostics.scalars(member_values, 'step').items()}
            )
        if cfg.log_every_steps:
          for s, m_seed in enumerate(_member_metrics(cfg, m)):
            _log_steps(m_seed, step, cfg.log_every_steps, log, writer, bar, _member_suffix(cfg, s))
        step, done = stop, stop - epoch * spe
        if step % eval_every == 0:
          evaluate_test(train_s)
        bar.update(
            metrics_writer.progress_line(
                epoch + 1,
                cfg.epochs,
                done,
                spe,
                this_s / max(done - first, 1) * done,
                run_steps_left=run.total_steps - step,
                loss=float(np.mean(m['loss'])),
            )
        )
        if done < spe and (step % save_every == 0 or step == stop_step):
          save(chunks, train_s)
      budget_spent = done < spe and out_of_time(train_s)
      if done < spe and not (budget_spent and done > first):
        break  # stopped at until_step, or the budget was spent before this epoch's steps
      m = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
      row = merge_members(
          [
              _epoch_row(run, state_s, m_s, epoch, step, train_s, this_s, done - first)
              for state_s, m_s in zip(
                  member_states(state, run.num_members), _member_metrics(cfg, m)
              )
          ]
      )
      done_train_s += train_s
      row.update(train_s=done_train_s, eval_s=eval_s)
      if diagnose:
        row.update(diagnose(state, idx))
      history.append(row)
      if primary:
        _write_history(workdir / 'metrics.jsonl', history)
        writer.scalars(
            step,
            {
                f'{k}{_member_suffix(cfg, s)}': v
                for s, r in enumerate(split_members(row, run.num_members))
                for k, v in _tb_scalars(r).items()
            },
        )
        writer.flush()
      save([], 0.0)
      bar.clear()
      seed_mean = lambda k: float(np.mean(row[k]))  # the run's value with one member
      skipped = int(np.sum(row['skipped_steps']))
      log(
          f'epoch {epoch + 1}/{cfg.epochs}  loss {seed_mean("train_loss"):.4f}  '
          f'train {100 * seed_mean("train_accuracy"):.2f}%  '
          f'test {100 * seed_mean("test_accuracy"):.2f}%  '
          f'{row["ms_per_step"]:.1f} ms/step  ({this_s:.1f} s train)'
          + (f'  {skipped} steps skipped' if skipped else '')
          + (f'  (means of {run.num_members} members)' if run.num_members > 1 else '')
          + (
              f'  training budget of {cfg.train_seconds:g} s spent after {done} steps'
              if budget_spent
              else ''
          )
      )
      if budget_spent:
        break
  finally:
    bar.clear()
    if writer is not None:
      writer.close()
  return history, state, step


def _rows_until(path: Path, start: int) -> list[dict]:
  """The rows of a jsonl file of the run (metrics, evals) up to step ``start`` (none
  when starting from scratch): those a resumed run keeps."""
  return [r for r in read_history(path) if r['step'] <= start] if start and path.exists() else []


def _epoch_row(
    run: Run,
    state,
    m: dict[str, np.ndarray],
    epoch: int,
    step: int,
    train_s: float,
    this_s: float,
    steps: int,
) -> dict[str, Any]:
  """The metrics.jsonl row of a finished epoch; ``m`` holds its per-step metrics."""
  test_loss, test_acc = _fetch(run.evaluate(state.params, run.x_test, run.y_test))
  ok = m['finite']  # the epoch's means leave out skipped (non-finite) steps
  mean = lambda a: np.mean(a[ok], 0) if ok.any() else np.full(a.shape[1:], np.nan)
  row = dict(
      epoch=epoch + 1,
      step=step,
      train_loss=float(mean(m['loss'])),
      train_accuracy=float(mean(m['accuracy'])),
      test_loss=float(test_loss),
      test_accuracy=float(test_acc),
      epoch_train_s=train_s,
      steps=steps,
      ms_per_step=1e3 * this_s / max(steps, 1),
      skipped_steps=int(np.sum(~m['finite'])),
  )
  for k in ('block_loss', 'feedback_loss'):
    if k in m:
      row[k] = [float(v) for v in mean(m[k])]
  return row


# Fields of a metrics row that every member shares; with M > 1 members each other field
# is a list with one value per member.
MEMBER_SHARED_KEYS = ('epoch', 'step') + TIMING_KEYS


def merge_members(rows: list[dict]) -> dict:
  """One metrics row from each member's row: the shared fields once, the others as lists
  (a single member's row unchanged)."""
  if len(rows) == 1:
    return rows[0]
  return {k: rows[0][k] if k in MEMBER_SHARED_KEYS else [r[k] for r in rows] for k in rows[0]}


def split_members(row: dict, num_members: int) -> list[dict]:
  """Each member's row of a ``merge_members`` row (its inverse)."""
  if num_members == 1:
    return [row]
  return [
      {k: v if k in MEMBER_SHARED_KEYS else v[m] for k, v in row.items()}
      for m in range(num_members)
  ]


def _member_metrics(cfg, m: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
  """Each member's per-step metrics of a chunk ([steps, M, ...] -> M x [steps, ...])."""
  members = num_members(cfg)
  if members == 1:
    return [m]
  return [{k: v[:, i] for k, v in m.items()} for i in range(members)]


def _member_suffix(cfg, i: int) -> str:
  """The TensorBoard tag suffix of member ``i``: '' for a single member, else
  '/seed_<seed>', after '/<setting>' with a sweep."""
  if num_members(cfg) == 1:
    return ''
  member = sweep.members(cfg)[i]
  hyper = sweep.name(member.hyper_setting)
  return (f'/{hyper}' if hyper else '') + f'/seed_{member.seed}'


def _members_divergence_message(cfg, m: dict[str, np.ndarray], first_step: int) -> str | None:
  msgs = [divergence_message(m_i, first_step) for m_i in _member_metrics(cfg, m)]
  if len(msgs) == 1:
    return msgs[0]
  members = sweep.members(cfg)
  return '; '.join(f'{members[i].label}: {msg}' for i, msg in enumerate(msgs) if msg) or None


def _summary(run: Run, state, step: int, history: list[dict], workdir: Path) -> dict[str, Any]:
  """The result dict; written to result.json when the run is complete.

  With M > 1 members the accuracies, losses and skipped steps are per-member lists; for
  seeds alone ``<name>_mean`` / ``<name>_std`` (sample std) summarise the final
  accuracies and train loss over the seeds, with a sweep ``members`` labels each index.
  ``train_s`` / ``eval_s``: the run's training and (``eval_every_steps``) evaluation
  seconds; ``evals``: the evaluations' rows. A run whose ``train_seconds`` budget is spent
  is complete (``budget_spent``).
  """
  num_members = run.num_members
  timed = [r for r in history if r['steps'] == run.steps_per_epoch]
  train_s = float(sum(r['epoch_train_s'] for r in history))  # rows of older runs lack train_s
  budget_spent = bool(run.cfg.train_seconds) and train_s >= run.cfg.train_seconds
  evals = read_history(workdir / EVALS_FILE) if (workdir / EVALS_FILE).exists() else []
  evals = [r for r in evals if r['step'] <= step]
  seed_histories = [[split_members(r, num_members)[m] for r in history] for m in range(num_members)]
  result = dict(
      config=run.cfg.to_dict(),
      hardware=hardware(),
      epochs=len(history),
      steps_per_epoch=run.steps_per_epoch,
      step=step,
      complete=step >= run.total_steps or budget_spent,
      **merge_members(
          [
              dict(
                  test_accuracy=h[-1]['test_accuracy'] if h else None,
                  skipped_steps=sum(r['skipped_steps'] for r in h),
              )
              for h in seed_histories
          ]
      ),
      epoch_train_s=float(np.median([r['epoch_train_s'] for r in timed])) if timed else None,
      ms_per_step=float(np.median([r['ms_per_step'] for r in history])) if history else None,
      compile_s=run.compile_s,
      train_s=train_s,
      eval_s=evals[-1]['eval_s'] if evals else 0.0,
      history=history,
  )
  if run.cfg.train_seconds:
    result['budget_spent'] = budget_spent
  if run.cfg.eval_every_steps:
    result['evals'] = evals
  if result['complete']:
    train = merge_members(
        [
            dict(
                zip(
                    ('train_loss', 'train_accuracy'),
                    map(float, _fetch(run.evaluate(st.params, run.x_train, run.y_train))),
                )
            )
            for st in member_states(state, num_members)
        ]
    )
    result.update(train_accuracy=train['train_accuracy'], train_loss=train['train_loss'])
  if run.cfg.sweep:
    result['members'] = [m.label for m in run.members]
  elif num_members > 1:
    for k in ('test_accuracy', 'train_accuracy', 'train_loss'):
      if None not in result.get(k, [None]):
        result.update(
            {f'{k}_mean': float(np.mean(result[k])), f'{k}_std': float(np.std(result[k], ddof=1))}
        )
  if result['complete']:
    if jax.process_index() == 0:
      tmp = workdir / 'result.json.tmp'
      tmp.write_text(json.dumps(result, indent=1, default=str))
      os.replace(tmp, workdir / 'result.json')
  result['state'] = state
  return result


def _tb_scalars(row: dict) -> dict[str, float]:
  out = {
      'train/loss': row['train_loss'],
      'train/accuracy': row['train_accuracy'],
      'test/loss': row['test_loss'],
      'test/accuracy': row['test_accuracy'],
      'perf/ms_per_step': row['ms_per_step'],
      'train/skipped_steps': row['skipped_steps'],
  }
  for k in ('block_loss', 'feedback_loss'):
    for n, v in enumerate(row.get(k, ()), 1):
      out[f'train/{k}/block{n}'] = v
  out.update(diagnostics.scalars(row, 'train'))
  return out


def _log_steps(m, first_step, every, log, writer, bar, suffix: str = '') -> None:
  """Per-step TensorBoard scalars and log lines of a chunk (of one seed: tags and lines
  end with ``suffix``)."""
  for i in range(len(m['loss'])):
    s = first_step + i + 1
    if s % every:
      continue
    values = {'step/loss': float(m['loss'][i]), 'step/accuracy': float(m['accuracy'][i])}
    for n, v in enumerate(m.get('block_loss', [[]] * (i + 1))[i], 1):
      values[f'step/block_loss/block{n}'] = float(v)
    bar.clear()
    log(
        f'step {s}{suffix}  loss {values["step/loss"]:.4f}  '
        f'accuracy {values["step/accuracy"]:.3f}'
    )
    if writer is not None:
      writer.scalars(s, {f'{k}{suffix}': v for k, v in values.items()})
  if writer is not None:
    writer.flush()


def read_history(path: str | os.PathLike) -> list[dict]:
  """The rows of a metrics.jsonl file: one per finished epoch, in order."""
  return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _write_history(path: Path, rows: list[dict]) -> None:
  tmp = path.with_suffix('.tmp')
  tmp.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  os.replace(tmp, path)
