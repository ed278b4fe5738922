"""The accuracy part of a table: one ``tp_jax.train.train_and_evaluate`` run per
(column, method, seed), each in its own directory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

from experiments.reproduce.tables import Column, Profile, TABLES, get_dataset, make_config
from tp_jax import data
from tp_jax import train

Log = Callable[[str], None]


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
      raise RuntimeError(
          f'{workdir} holds a run with another config (fields {diff}); '
          f'use a fresh --workdir or delete that directory'
      )
    for name in ('result.json', DIVERGED):
      if (workdir / name).exists():
        log(f'reusing finished run {workdir}')
        return json.loads((workdir / name).read_text())
  workdir.mkdir(parents=True, exist_ok=True)
  cfg_file.write_text(json.dumps(want, indent=1))
  try:
    return train.train_and_evaluate(
        cfg, workdir, dataset=dataset, log=lambda s: log(f'  [{workdir}] {s}')
    )
  except train.DivergenceError as e:
    out = {'diverged': str(e)}
    (workdir / DIVERGED).write_text(json.dumps(out, indent=1))
    return out


def run_accuracy(
    table: int, profile: Profile, root: Path, seeds: Sequence[int], source: str, log: Log
) -> None:
  total = sum(len(col.methods) for col in TABLES[table]) * len(seeds)
  done, start = 0, time.perf_counter()
  for col in TABLES[table]:
    ds = get_dataset(col.dataset, profile, source)
    for method in col.methods:
      for seed in seeds:
        cfg = make_config(col, method, profile, seed)
        done += 1
        log(
            f'table {table} run {done}/{total}: training {col.model_name}/{col.dataset} '
            f'{method} seed {seed} ({(time.perf_counter() - start) / 60:.0f} min so far)'
        )
        t0 = time.perf_counter()
        r = train_one(cfg, run_dir(root, col, method, seed), ds, log)
        if 'diverged' in r:
          log(f'  -> {r["diverged"]}')
          continue
        log(
            f'  -> train {100 * r["train_accuracy"]:.2f}%  test '
            f'{100 * r["test_accuracy"]:.2f}%  ({time.perf_counter() - t0:.0f} s)'
        )
