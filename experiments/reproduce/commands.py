"""The commands of ``python -m experiments.reproduce``: a table (speed, accuracy, then
its files), Figure 2 and the scaling figure."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from pathlib import Path
from typing import Callable, Sequence

import jax

from experiments.reproduce import accuracy
from experiments.reproduce import figure2
from experiments.reproduce import report
from experiments.reproduce import scaling
from experiments.reproduce import speed
from experiments.reproduce.tables import PROFILES, TABLES, Profile, select_columns, select_methods
from tp_jax import train

Log = Callable[[str], None]


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

  names = (
      'jax_disable_most_optimizations',
      'jax_compilation_cache_dir',
      'jax_persistent_cache_min_compile_time_secs',
      'jax_persistent_cache_min_entry_size_bytes',
  )
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


def run_table(
    table: int,
    profile: str | Profile,
    workdir: str | os.PathLike,
    seeds: Sequence[int] | None = None,
    what: str = 'all',
    source: str = 'real',
    command: str = '',
    log: Log = print,
    columns: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    ldrl_seconds: float | None = None,
) -> Path:
  """Runs (parts of) one table and writes ``<workdir>/<profile>/table<T>.md``.

  ``seeds`` (consecutive; default: the profile's) train in one program per row.
  ``columns`` (column ids, e.g. 'mnist') and ``methods`` select the rows run and shown;
  ``ldrl_seconds`` is LDRL's training budget (default: the profile's, see
  ``Profile.ldrl_budget``)."""
  profile = PROFILES[profile] if isinstance(profile, str) else profile
  if table not in TABLES:
    raise ValueError(f'unknown table {table}; valid: {sorted(TABLES)}')
  if what not in ('all', 'speed', 'accuracy', 'table'):
    raise ValueError(f"what must be 'all', 'speed', 'accuracy' or 'table', got {what!r}")
  seeds = tuple(seeds) if seeds else profile.seeds
  accuracy.check_seeds(seeds)
  select_columns(table, columns)  # bad names fail before any training
  for col in TABLES[table]:
    select_methods(col, methods)
  root = Path(workdir) / profile.name / f'table{table}'
  root.mkdir(parents=True, exist_ok=True)
  command = (
      command or f'python -m experiments.reproduce --table={table} ' f'--profile={profile.name}'
  )
  with _compile_mode(profile, Path(workdir)):
    if what in ('all', 'speed'):
      speed.run_speed(table, profile, root, source, log, command, columns, methods)
    if what in ('all', 'accuracy'):
      accuracy.run_accuracy(
          table, profile, root, seeds, source, log, columns, methods, ldrl_seconds
      )
  return report.write_table(table, profile, root, seeds, command, log, columns)


def run_figure(
    figure: int | str,
    profile: str | Profile,
    workdir: str | os.PathLike,
    sizes: Sequence[int] | None = None,
    command: str = '',
    log: Log = print,
) -> Path:
  profile = PROFILES[profile] if isinstance(profile, str) else profile
  if str(figure) == 'scaling':
    return run_scaling(profile, command=command, log=log)
  if str(figure) != '2':
    raise ValueError(f"unknown figure {figure}; valid: ['2', 'scaling']")
  out = Path(workdir) / profile.name
  header = '\n'.join(
      [
          f'# Figure 2: inverse, pseudo-inverse and transpose of n x n float32 matrices '
          f'({profile.name} profile)',
          '',
          f'- command: `{command or "python -m experiments.reproduce --figure=2"}`',
          f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}',
          f'- hardware: {report.hardware_line(train.hardware())}',
          f'- method: jitted jnp.linalg.inv / jnp.linalg.pinv / transpose (materialised), '
          f'compiled ahead of time, one warm-up call (skipped when a call takes over '
          f'{profile.figure_max_seconds / 10:g} s), then the median of up to '
          f'{profile.figure_repeats} calls with block_until_ready (at least 3; fewer than '
          f'the maximum once a point has taken {profile.figure_max_seconds:g} s)',
      ]
  )
  with _compile_mode(profile, Path(workdir)):
    figure2.run(
        out,
        sizes or profile.figure_sizes,
        profile.figure_repeats,
        profile.figure_max_seconds,
        log=log,
        header=header,
    )
  log(f'wrote {out / "figure2.csv"}, {out / "figure2.png"}, {out / "figure2.md"}')
  return out / 'figure2.csv'


def run_scaling(
    profile: str | Profile,
    out: str | os.PathLike | None = None,
    methods: Sequence[str] | None = None,
    parts: Sequence[str] | None = None,
    command: str = '',
    log: Log = print,
    workdir: str | os.PathLike = 'runs/reproduce',
    plan: scaling.Plan | None = None,
    **speed_overrides: int | None,
) -> Path:
  """The scaling figure (``scaling``) of ``plan`` (default: ``profile``'s,
  ``scaling.PLANS``) into ``out``: by default ``benchmarks/``, and ``<workdir>/smoke``
  for the smoke profile (a machinery check never overwrites the measured figure).
  ``speed_overrides`` (None: unchanged) replace fields of the plan's ``SpeedPlan``
  (rounds, inner, steps, ldrl_steps); the profile's ``fast_compile`` applies."""
  profile = PROFILES[profile] if isinstance(profile, str) else profile
  plan = plan or scaling.PLANS[profile.name]
  speed_overrides = {k: v for k, v in speed_overrides.items() if v is not None}
  if speed_overrides:
    plan = dataclasses.replace(plan, speed=dataclasses.replace(plan.speed, **speed_overrides))
  if out is None:
    out = Path(workdir) / 'smoke' if profile.name == 'smoke' else Path('benchmarks')
  out = Path(out)
  methods = tuple(methods) if methods else scaling.METHODS
  parts = tuple(parts) if parts else scaling.PARTS
  k = (
      "the configs' (a truncated net keeps its body blocks' first entries and the head's)"
      if plan.ldrl_k is None
      else f"K = {plan.ldrl_k} for every block, sigma and lr the configs'"
  )
  default_command = f'python -m experiments.reproduce --figure=scaling --profile={profile.name}'
  header = '\n'.join(
      [
          f'# Scaling: step time and peak temporary memory against depth and batch size '
          f'({profile.name} profile)',
          '',
          f'- command: `{command or default_command}`',
          f'- started: {datetime.datetime.now().isoformat(timespec="seconds")}',
          f'- hardware: {report.hardware_line(train.hardware())}',
          f'- methods: {", ".join(methods)}; parts: {", ".join(parts)}',
          f'- timing: {plan.describe()}',
          '- memory: XLA memory analysis (temp_size_in_bytes) of the timed compiled step; '
          "GFLOP: XLA cost analysis of the step compiled with XLA's own convolution "
          '(blank for LDRL, whose K-iteration loop XLA counts once)',
          f'- LDRL K, sigma, feedback lr per trained block: {k}; TJML-DTP with the '
          "configs' activation feedback (varsigma, feedback_act='integral')",
      ]
  )
  with _compile_mode(profile, Path(workdir)):
    scaling.run(out, plan, methods, parts, log=log, header=header)
  log(f'wrote {out / "scaling.csv"}, {out / "scaling.png"}, {out / "scaling.md"}')
  return out / 'scaling.csv'
