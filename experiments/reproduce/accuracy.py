"""The accuracy part of a table: one ``tp_jax.train.train_and_evaluate`` run per
(column, method), training all the table's seeds in one program (``num_seeds``), each
in its own directory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from experiments.reproduce.tables import (
    Column,
    Profile,
    get_dataset,
    make_config,
    select_columns,
    select_methods,
)
from tp_jax import data
from tp_jax import train

Log = Callable[[str], None]


def _jsonable(cfg) -> dict:
  return json.loads(json.dumps(cfg.to_dict(), default=str))


DIVERGED = 'diverged.json'  # written instead of result.json by a run that diverged


def run_dir(root: Path, col: Column, method: str, seeds: Sequence[int]) -> Path:
  """The directory of the one run training ``seeds`` (consecutive) of a row."""
  seeds = list(seeds)
  name = f'seed{seeds[0]}' if len(seeds) == 1 else f'seeds{seeds[0]}-{seeds[-1]}'
  return root / col.id / method / name


def check_seeds(seeds: Sequence[int]) -> None:
  """Seeds train in one program (``num_seeds``): they must be consecutive."""
  if not seeds or list(seeds) != list(range(seeds[0], seeds[0] + len(seeds))):
    raise ValueError(
        f'seeds must be consecutive integers (one program trains seed, seed + 1, ...), '
        f'got {list(seeds)}'
    )


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


def run_order(methods: Sequence[str]) -> list[str]:
  """The rows' training order: TJML-DTP first, so that its training seconds are known
  when LDRL gets them as its budget."""
  return sorted(methods, key=lambda m: m != 'tjml_dtp')


def ldrl_budget(
    root: Path, col: Column, profile: Profile, seeds: Sequence[int], ldrl_seconds: float | None
) -> float | None:
  """LDRL's ``train_seconds``: ``ldrl_seconds`` when given, else (``profile.ldrl_budget``)
  the training seconds of the column's finished TJML-DTP run, None when that run has
  no result; 0 (no budget) otherwise."""
  if ldrl_seconds:
    return float(ldrl_seconds)
  if not profile.ldrl_budget:
    return 0.0
  f = run_dir(root, col, 'tjml_dtp', seeds) / 'result.json'
  return json.loads(f.read_text())['train_s'] if f.exists() else None


def run_accuracy(
    table: int,
    profile: Profile,
    root: Path,
    seeds: Sequence[int],
    source: str,
    log: Log,
    columns: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    ldrl_seconds: float | None = None,
) -> None:
  """One run per (column, method), all ``seeds`` in it (``num_seeds``); ``columns`` and
  ``methods`` select rows; ``ldrl_seconds`` overrides LDRL's budget."""
  check_seeds(seeds)
  cols = select_columns(table, columns)
  total = sum(len(select_methods(col, methods)) for col in cols)
  done, start = 0, time.perf_counter()
  for col in cols:
    ds = get_dataset(col.dataset, profile, source)
    for method in run_order(select_methods(col, methods)):
      done += 1
      budget = ldrl_budget(root, col, profile, seeds, ldrl_seconds) if method == 'ldrl' else 0.0
      if budget is None:
        log(
            f'table {table} run {done}/{total}: {col.model_name}/{col.dataset} LDRL skipped: '
            f"its budget is TJML-DTP's training seconds, and TJML-DTP has no result yet"
        )
        continue
      cfg = make_config(col, method, profile, seeds[0], len(seeds), budget)
      log(
          f'table {table} run {done}/{total}: training {col.model_name}/{col.dataset} '
          f'{method} seeds {", ".join(map(str, seeds))}'
          + (f' for {budget:.1f} s' if budget else '')
          + f' ({(time.perf_counter() - start) / 60:.0f} min so far)'
      )
      t0 = time.perf_counter()
      r = train_one(cfg, run_dir(root, col, method, seeds), ds, log)
      if 'diverged' in r:
        log(f'  -> {r["diverged"]}')
        continue
      mean = lambda k: 100 * float(np.mean(r[k]))  # over seeds
      log(
          f'  -> train {mean("train_accuracy"):.2f}%  test {mean("test_accuracy"):.2f}%  '
          f'({time.perf_counter() - t0:.0f} s)'
      )
