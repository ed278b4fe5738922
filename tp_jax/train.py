"""The training loop shared by every method: data on device, fused jitted steps,
data-parallel sharding, evaluation, metrics, checkpoints and resume.

One epoch = ``steps_per_epoch`` steps over a permutation drawn from (seed, epoch); a
step's PRNG key is folded from (seed, global step). So the data order and noise of
any step are functions of the config alone, and a resumed run repeats them exactly.
"""

from __future__ import annotations

import json
import os
import platform
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
from tp_jax import models
from tp_jax import network

Array = jax.Array


class DivergenceError(RuntimeError):
  """A non-finite loss, target or parameter; the message names step and block."""


# --------------------------------------------------------------------------------------
# Jitted pieces


def make_train_step(algo: algorithms.Algorithm, cfg, mesh: Mesh) -> Callable:
  """(state, x_all, y_all, idx_B, key) -> (state, metrics), jitted.

  The dataset stays on device; the step gathers its batch, shards it over the mesh's
  data axis, augments it and takes one step. The host loop dispatches steps
  asynchronously and syncs only every ``check_every_steps``.
  """
  batch_sharding = NamedSharding(mesh, P('data'))

  def train_step(state, x_all, y_all, idx_B, key):
    k_aug, k_step = jax.random.split(jax.random.fold_in(key, state.step))
    x = jax.lax.with_sharding_constraint(x_all[idx_B], batch_sharding)
    y = jax.lax.with_sharding_constraint(y_all[idx_B], batch_sharding)
    if cfg.augment:
      x = data.augment(k_aug, x)
    new_state, metrics = algo.step(state, (x, y), k_step)
    if cfg.skip_nonfinite:  # keep the old state, but count the step
      new_state = jax.tree.map(lambda n, o: jnp.where(metrics['finite'], n, o),
                               new_state, state._replace(step=state.step + 1))
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,))


def make_evaluate(net: network.Net, batch_size: int) -> Callable:
  """(params, x, y) -> (mean loss, accuracy) over all examples, in fixed-size batches."""

  @jax.jit
  def evaluate(params, x, y):
    n = x.shape[0]
    num = -(-n // batch_size)
    pad = num * batch_size - n
    xb = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(num, batch_size,
                                                                      *x.shape[1:])
    yb = jnp.pad(y, (0, pad)).reshape(num, batch_size)
    mask = (jnp.arange(num * batch_size) < n).reshape(num, batch_size)

    def body(acc, b):
      xi, yi, mi = b
      logits = network.apply(net, params, xi)
      ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), yi[:, None], 1)[:, 0]
      return (acc[0] + jnp.sum(ce * mi), acc[1] + jnp.sum((logits.argmax(-1) == yi) * mi)), None

    (loss, correct), _ = jax.lax.scan(body, (0.0, 0), (xb, yb, mask))
    return loss / n, correct / n

  return evaluate


# --------------------------------------------------------------------------------------
# Checkpoints


class Checkpointer:
  """Orbax checkpoints of the full training state under ``workdir/checkpoints``.

  Orbax writes into a temporary directory and renames it when complete, so a run
  killed mid-write leaves a checkpoint that is never listed, let alone loaded.
  """

  def __init__(self, workdir: Path, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self._mngr = ocp.CheckpointManager(
        (workdir / 'checkpoints').absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  # The state is stored as its flat list of leaves: the tree structure comes from the
  # code (the config), so no container type has to survive the round trip.
  def save(self, step: int, state: algorithms.TrainState) -> None:
    self._mngr.save(step, args=self._ocp.args.StandardSave(jax.tree.leaves(state)))
    self._mngr.wait_until_finished()

  def restore(self, step: int, like: algorithms.TrainState) -> algorithms.TrainState:
    leaves = self._mngr.restore(
        step, args=self._ocp.args.StandardRestore(jax.tree.leaves(like)))
    return jax.tree.unflatten(jax.tree.structure(like), leaves)

  def close(self) -> None:
    self._mngr.close()


# --------------------------------------------------------------------------------------
# The loop


def hardware() -> dict[str, Any]:
  devs = jax.devices()
  return dict(backend=jax.default_backend(), devices=[d.device_kind for d in devs],
              num_devices=len(devs), cpu_count=os.cpu_count(), platform=platform.platform(),
              jax=jax.__version__)


def _check_finite(metrics: dict[str, np.ndarray], first_step: int) -> None:
  bad = np.flatnonzero(~metrics['finite'])
  if not bad.size:
    return
  i = int(bad[0])
  what = f'loss={float(metrics["loss"][i])}'
  if 'targets_finite' in metrics:
    blocks = np.flatnonzero(~metrics['targets_finite'][i])
    if blocks.size:
      what = f'non-finite targets at block(s) {[int(b) + 1 for b in blocks]} (1-based)'
  raise DivergenceError(f'training diverged at step {first_step + i + 1}: {what} '
                        f'(or non-finite parameters after the update); the last good '
                        f'checkpoint is kept. Lower the learning rate or beta, or set '
                        f'skip_nonfinite=True to skip such steps.')


def _check_workdir(workdir: Path) -> None:
  """Fail before training, not after an hour, when results cannot be written."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / '.write_probe'
    probe.write_bytes(b'\0' * 4096)
    probe.unlink()
  except OSError as e:
    raise OSError(f'workdir {workdir} is not writable ({e.strerror}); results and '
                  f'checkpoints could not be saved') from e


def check_input_shape(cfg, net: network.Net, image_shape: tuple[int, ...]) -> None:
  if cfg.model == 'mlp_mixer':
    want = tuple(cfg.model_kwargs.get('image_hw', (32, 32)))
    if tuple(image_shape[:2]) != want:
      raise ValueError(f'mlp_mixer was built for {want} images but {cfg.dataset} has '
                       f'shape {image_shape}; set model_kwargs.image_hw')
  try:
    jax.eval_shape(lambda k: network.init(net, k, jnp.zeros((1, *image_shape))),
                   jax.random.key(0))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{cfg.model} cannot take {cfg.dataset} images of shape '
                     f'{image_shape}: {e}') from e


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       dataset: data.Dataset | None = None,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains ``cfg.model`` with ``cfg.method``; writes metrics.jsonl and result.json.

  Resumes automatically from the newest complete checkpoint in ``workdir``.
  """
  workdir = Path(workdir)
  devices = jax.devices()
  config_lib.validate(cfg, num_devices=len(devices))
  _check_workdir(workdir)
  if dataset is None:
    dataset = data.load_dataset(cfg.dataset, cfg.data_dir or None,
                                verify=cfg.verify_checksums)
  net = models.get(cfg.model, **cfg.model_kwargs)
  check_input_shape(cfg, net, dataset.x_train.shape[1:])

  n_train = dataset.x_train.shape[0]
  if cfg.batch_size > n_train:
    raise config_lib.ConfigError(f'batch_size={cfg.batch_size} exceeds the {n_train} '
                                 f'training examples')
  steps_per_epoch = n_train // cfg.batch_size
  if cfg.steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
  chunk = cfg.check_every_steps or steps_per_epoch
  tx = algorithms.make_optimizer(cfg.optimizer, steps_per_epoch * cfg.epochs)
  algo = algorithms.make(net, cfg, tx)

  mesh = Mesh(np.array(devices), ('data',))
  replicated = NamedSharding(mesh, P())
  x_train, y_train, x_test, y_test = jax.device_put(
      (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test), replicated)

  root = jax.random.key(cfg.seed)
  k_init, k_data, k_steps = jax.random.split(root, 3)
  state = jax.device_put(algo.init(k_init, x_train[:cfg.batch_size]), replicated)

  ckpt = Checkpointer(workdir, cfg.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start:
    state = jax.device_put(ckpt.restore(start, state), replicated)
    log(f'resumed from checkpoint at step {start}')
  train_step = make_train_step(algo, cfg, mesh)
  evaluate = make_evaluate(net, cfg.eval_batch_size)

  history = _read_history(workdir / 'metrics.jsonl', start)
  _write_history(workdir / 'metrics.jsonl', history)  # drops rows a killed run left
  save_every = cfg.checkpoint_every_steps or steps_per_epoch
  t0 = time.perf_counter()  # compile outside the timed region
  train_step = train_step.lower(state, x_train, y_train, jnp.zeros(cfg.batch_size, jnp.int32),
                                k_steps).compile()
  compile_s = time.perf_counter() - t0
  try:
    for epoch in range(start // steps_per_epoch, cfg.epochs):
      idx = data.batches(jax.random.fold_in(k_data, epoch), n_train,
                         cfg.batch_size)[:steps_per_epoch]
      done = int(state.step) - epoch * steps_per_epoch
      first, train_s, chunks = done, 0.0, []
      while done < steps_per_epoch:
        next_save = (int(state.step) // save_every + 1) * save_every - epoch * steps_per_epoch
        stop = min(steps_per_epoch, done + chunk, next_save)
        t0 = time.perf_counter()
        ms = []
        for i in range(done, stop):
          state, m = train_step(state, x_train, y_train, idx[i], k_steps)
          ms.append(m)
        m = jax.device_get(jax.tree.map(lambda *a: jnp.stack(a), *ms))
        train_s += time.perf_counter() - t0
        if not cfg.skip_nonfinite:
          _check_finite(m, epoch * steps_per_epoch + done)
        chunks.append(m)
        done = stop
        if done < steps_per_epoch and int(state.step) % save_every == 0:
          ckpt.save(int(state.step), state)
      m = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
      test_loss, test_acc = jax.device_get(evaluate(state.params, x_test, y_test))
      row = dict(epoch=epoch + 1, step=int(state.step),
                 train_loss=float(np.mean(m['loss'])),
                 train_accuracy=float(np.mean(m['accuracy'])),
                 test_loss=float(test_loss), test_accuracy=float(test_acc),
                 epoch_train_s=train_s, steps=done - first,
                 ms_per_step=1e3 * train_s / max(done - first, 1),
                 skipped_steps=int(np.sum(~m['finite'])))
      if 'block_loss' in m:
        row['block_loss'] = [float(v) for v in np.mean(m['block_loss'], 0)]
      history.append(row)
      _write_history(workdir / 'metrics.jsonl', history)
      ckpt.save(int(state.step), state)
      log(f'epoch {epoch + 1}/{cfg.epochs}  loss {row["train_loss"]:.4f}  '
          f'train {100 * row["train_accuracy"]:.2f}%  test {100 * row["test_accuracy"]:.2f}%  '
          f'{row["ms_per_step"]:.1f} ms/step  ({train_s:.1f} s train)')
  finally:
    ckpt.close()

  train_loss, train_acc = jax.device_get(evaluate(state.params, x_train, y_train))
  timed = [r for r in history if r['steps'] == steps_per_epoch]
  result = dict(
      config=cfg.to_dict(), hardware=hardware(), epochs=len(history),
      steps_per_epoch=steps_per_epoch,
      train_accuracy=float(train_acc), train_loss=float(train_loss),
      test_accuracy=history[-1]['test_accuracy'] if history else None,
      epoch_train_s=float(np.median([r['epoch_train_s'] for r in timed])) if timed else None,
      ms_per_step=float(np.median([r['ms_per_step'] for r in history])) if history else None,
      compile_s=compile_s, history=history)
  (workdir / 'result.json').write_text(json.dumps(result, indent=1, default=str))
  return result


def _read_history(path: Path, upto_step: int) -> list[dict]:
  if not path.exists() or not upto_step:
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if r['step'] <= upto_step]


def _write_history(path: Path, rows: list[dict]) -> None:
  tmp = path.with_suffix('.tmp')
  tmp.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  os.replace(tmp, path)
