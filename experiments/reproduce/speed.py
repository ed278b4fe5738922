"""The speed part of a table: every method's training step, set up as the training
loop sets it up (``tp_jax.train.setup``), timed in interleaved windows
(``experiments.timing``), and its FLOP count."""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_collections

from experiments import timing
from experiments.reproduce.tables import (
    JOINT_SPEED,
    Profile,
    SpeedPlan,
    full_epoch_steps,
    get_dataset,
    make_config,
    select_columns,
    select_methods,
)
from tp_jax import algorithms
from tp_jax import data
from tp_jax import models
from tp_jax import train

Log = Callable[[str], None]


def step_gflop(cfg: ml_collections.ConfigDict, dataset: data.Dataset) -> float | None:
  """GFLOP of one training step of ``cfg`` on ``dataset`` by XLA's cost analysis of the
  compiled step (``train.setup``'s).

  XLA counts a loop body once. So the count is taken on the same step built with XLA's
  own convolution (``conv_impl='xla'``): the fast convolution's weight gradient is a
  loop over batch chunks. It is None for LDRL and DTP, whose K feedback-training
  iterations are a loop too.
  """
  if algorithms.trains_feedback(cfg.method):
    return None
  if 'conv_impl' in inspect.signature(models.MODELS[cfg.model]).parameters:
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.model_kwargs.conv_impl = 'xla'
  return compiled_gflop(train.setup(cfg, dataset).train_step)


def compiled_gflop(compiled) -> float | None:
  """XLA's FLOP count of a compiled program, in GFLOP (None where XLA gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['flops'] / 1e9 if cost and cost.get('flops') else None


def measure_speed(
    cfgs: dict[str, ml_collections.ConfigDict], dataset: data.Dataset, plan: SpeedPlan, log: Log
) -> dict[str, Any]:
  """Median ms per training step of each entry of ``cfgs`` (name -> config), from
  interleaved timing windows; entries whose ``method`` is LDRL get LDRL's windows.

  Each method runs the training loop's own compiled step (``train.setup``: batch
  gather from device-resident data, augmentation, the method's step, finiteness
  checks), compiled ahead of time (timed apart), on the same data: the program
  ``train_and_evaluate`` runs for the same config, so with a persistent compilation
  cache (smoke profile) the accuracy runs reuse it.
  """
  runs, states, gflop = {}, {}, {}
  for name, cfg in cfgs.items():
    runs[name] = train.setup(cfg, dataset)
    log(f'  compiled {name} step in {runs[name].compile_s:.1f} s')
    states[name] = train.init_state(runs[name])
    gflop[name] = step_gflop(cfg, dataset)

  def steps(name: str) -> timing.Steps:
    run, idx = runs[name], train.epoch_indices(runs[name], 0)

    def k_steps(k: int) -> None:
      state = states[name]
      for _ in range(k):
        state, _ = run.train_step(state, run.x_train, run.y_train, idx, run.step_key)
      states[name] = jax.block_until_ready(state)

    return k_steps

  slow = [name for name, cfg in cfgs.items() if cfg.method == 'ldrl']
  load_before = os.getloadavg()
  windows = timing.interleaved({name: steps(name) for name in runs}, plan.timing_plan(), slow, log)
  load_after = os.getloadavg()
  out = {}
  for name, cfg in cfgs.items():
    ms = statistics.median(windows[name])
    epoch_steps = full_epoch_steps(cfg.dataset, cfg.batch_size)
    out[name] = dict(
        ms_per_step=ms,
        windows_ms=windows[name],
        compile_s=runs[name].compile_s,
        gflop_per_step=gflop[name],
        batch_size=cfg.batch_size,
        full_epoch_steps=epoch_steps,
        epoch_s=ms * epoch_steps / 1e3,
        steps_per_window=plan.ldrl_steps if name in slow else plan.steps,
    )
  return dict(
      methods=out,
      plan=dataclasses.asdict(plan),
      hardware=train.hardware(),
      loadavg_before=load_before,
      loadavg_after=load_after,
      date=datetime.datetime.now().isoformat(timespec='seconds'),
  )


def run_speed(
    table: int,
    profile: Profile,
    root: Path,
    source: str,
    log: Log,
    command: str = '',
    columns: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
) -> None:
  """Writes ``speed_<column>.json`` per column: {'methods': {method: timing}, ...};
  ``columns`` and ``methods`` select what is timed."""
  root.mkdir(parents=True, exist_ok=True)
  cols = tuple(
      dataclasses.replace(c, methods=select_methods(c, methods))
      for c in select_columns(table, columns)
      if select_methods(c, methods)
  )
  if table in JOINT_SPEED:  # all columns in one session, then split per column
    if len({c.dataset for c in cols}) != 1:
      raise ValueError(f'table {table}: joint timing needs one dataset')
    log(
        f'table {table}: timing '
        + ', '.join(f'{c.title} {m}' for c in cols for m in c.methods)
        + ', interleaved'
    )
    cfgs = {
        f'{c.id}/{m}': make_config(c, m, profile, profile.seeds[0]) for c in cols for m in c.methods
    }
    res = measure_speed(cfgs, get_dataset(cols[0].dataset, profile, source), profile.speed, log)
    res['command'] = command
    for c in cols:
      part = dict(
          res,
          methods={m: res['methods'][f'{c.id}/{m}'] for m in c.methods},
          joint=[c2.id for c2 in cols],
      )
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
