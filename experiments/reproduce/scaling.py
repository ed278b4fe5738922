r"""The scaling figure (issue #15 §4, not in the paper): step time and peak temporary
memory of BP, TJML-DTP, FWDTP and LDRL against depth and against batch size. The claim
it tests: TJML-DTP's step costs what BP's does at every depth, while LDRL's grows with
the depth times its K feedback iterations per block.

  python -m experiments.reproduce --figure=scaling --profile=cpu \
      [--methods=bp,tjml_dtp,fwdtp,ldrl] [--scaling_parts=vgg_depth,resnet_depth,vgg_batch] \
      [--scaling_rounds=R] [--scaling_windows=W] [--scaling_steps=S] \
      [--scaling_ldrl_steps=L] [--figure_out=benchmarks]

Parts (each a panel column of the figure, rows of axis ``depth`` or ``batch``):
  vgg_depth     Simplified-VGG with the first n = 2..5 of its conv blocks (channels 128,
                128, 256, 256, 512) and its dense head, at the config's batch (128)
  resnet_depth  ResNet-18 at width 16 with its first s = 1..4 stages (2s + 2 blocks), at
                the config's batch (128)
  vgg_batch     the full Simplified-VGG at batch 32, 64, 128, 256, 512

Every point is the training loop's own compiled step of the config
(``experiments/configs/vgg_cifar10.py``, ``resnet18_cifar10.py``: optimiser, beta,
augmentation) on one random CIFAR-shaped batch (``experiments.bench_step``), with the
default convolution (``conv_impl='auto'``). LDRL's per-block K, sigma and feedback lr
(one per trained block, blocks 2..N) are the config's: a truncated network keeps the
first entries of its body blocks and the head's own entry (VGG with n conv blocks: the
first n - 1 entries, then the head's; ResNet with s stages: the first 2s, then the
head's). The methods of one point are compiled (not timed), warmed up, then timed in
interleaved windows (``experiments.timing``: each round one LDRL window, then
``windows`` windows of every other method in rotating order); the median ms/step is
kept. Peak temporary memory is XLA's memory analysis of the same compiled step;
GFLOP is XLA's cost analysis of the step compiled with XLA's own convolution (left blank
for LDRL: XLA counts its K-iteration loop once, as it would the fast convolution's
chunk loop).

Writes ``scaling.csv`` (one row per point and method, rewritten after every point, so
an interrupted run keeps what it measured), ``scaling.md`` (command, date, hardware,
plan, and the table with the ratios to BP) and ``scaling.png`` (``tp_jax.plot``: per
part a column of step time, step time / BP's and peak temporary memory). The CSV's
columns: axis (depth | batch), model (simple_vgg | resnet18_w<width>), value (conv
blocks | stages | batch size), method, ms_per_step (median over windows),
peak_temp_mib, gflop (blank for LDRL, or with ``Plan.gflop`` off), batch, blocks (DTP
blocks of the net, head included), k_total (LDRL's K summed over the trained blocks;
0 for the others), windows (timed windows), compile_s.

Profiles (``PLANS``): ``cpu`` as above, one LDRL step per point (its first: with steps of
tens of seconds, no warm-up); ``smoke`` the same parts at widths of 4-16 channels, batch
8 and K = 1 (machinery: tens of seconds a point); ``paper`` the full-width ResNet and more
windows, for a GPU (not run yet).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import inspect
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from experiments import bench_step
from experiments import timing
from experiments.reproduce.tables import METHOD_NAMES, SpeedPlan
from tp_jax import algorithms
from tp_jax import models
from tp_jax import plot as plot_lib
from tp_jax.algorithms import feedback_training

Log = Callable[[str], None]

PARTS = ('vgg_depth', 'resnet_depth', 'vgg_batch')
METHODS = ('bp', 'tjml_dtp', 'fwdtp', 'ldrl')  # the figure's order
VGG_CHANNELS = inspect.signature(models.simple_vgg).parameters['channels'].default
FIELDS = (
    'axis',
    'model',
    'value',
    'method',
    'ms_per_step',
    'peak_temp_mib',
    'gflop',
    'batch',
    'blocks',
    'k_total',
    'windows',
    'compile_s',
)


def model_name(model: str) -> str:
  """'Simplified-VGG', 'ResNet-18 w16' (a row's ``model``)."""
  if model.startswith('resnet18_w'):
    return f'ResNet-18 w{model[len("resnet18_w"):]}'
  return {'simple_vgg': 'Simplified-VGG'}.get(model, model)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a profile measures: the points of each part, the models' sizes, and the
  timing. ``depth_batch`` None: the config's batch; ``ldrl_k`` None: the config's K
  per block (else this K for every trained block)."""

  vgg_blocks: tuple[int, ...]
  resnet_stages: tuple[int, ...]
  batches: tuple[int, ...]
  vgg_channels: tuple[int, ...]
  resnet_width: int
  speed: SpeedPlan
  depth_batch: int | None = None
  ldrl_k: int | None = None
  gflop: bool = True

  def describe(self) -> str:
    s = self.speed
    return (
        f'per point, every method compiled ahead of time (not timed), then {s.warmup} '
        f'warm-up step(s) per method (LDRL {s.ldrl_warmup}), then {s.rounds} round(s), '
        f'each one LDRL window of {s.ldrl_steps} step(s) then {s.inner} window(s) of '
        f'{s.steps} step(s) per other method in rotating order; median ms/step over '
        f'windows'
    )


# The cpu and paper plans' axes: every VGG depth, every ResNet stage, batch 32..512.
_FULL_AXES = dict(
    vgg_blocks=(2, 3, 4, 5),
    resnet_stages=(1, 2, 3, 4),
    batches=(32, 64, 128, 256, 512),
    vgg_channels=VGG_CHANNELS,
)
PLANS: dict[str, Plan] = {
    # Machinery only (tests, CI): tiny widths, batch 8 (4 and 8 on the batch axis), K = 1.
    'smoke': Plan(
        vgg_blocks=(2, 3),
        resnet_stages=(1, 2),
        batches=(4, 8),
        vgg_channels=(4, 4, 8, 8, 16),
        resnet_width=8,
        depth_batch=8,
        ldrl_k=1,
        speed=SpeedPlan(warmup=1, rounds=1, inner=1, steps=1, ldrl_steps=1, ldrl_warmup=0),
    ),
    # 2 CPU cores: one LDRL step per point (tens of seconds to minutes), 3 windows of the
    # others.
    'cpu': Plan(
        **_FULL_AXES,
        resnet_width=16,
        speed=SpeedPlan(warmup=2, rounds=1, inner=3, steps=2, ldrl_steps=1, ldrl_warmup=0),
    ),
    # A GPU: the full-width ResNet, more windows.
    'paper': Plan(
        **_FULL_AXES,
        resnet_width=64,
        speed=SpeedPlan(warmup=5, rounds=3, inner=3, steps=10, ldrl_steps=2, ldrl_warmup=1),
    ),
}


@dataclasses.dataclass(frozen=True)
class Point:
  """One x value of one part: ``bench_model`` (a key of ``bench_step.CONFIGS``) with
  ``overrides`` (config fields, nested dicts)."""

  part: str
  axis: str  # 'depth' | 'batch'
  model: str  # the figure's name of the model: 'simple_vgg', 'resnet18_w<width>'
  value: int  # conv blocks, stages, or batch size
  bench_model: str
  overrides: dict[str, Any]


def truncated_feedback(full: dict[str, Sequence], trained: int, k: int | None) -> dict:
  """The per-block feedback fields of a truncated network with ``trained`` trained
  blocks (blocks 2..N): the first ``trained - 1`` entries of the full network's (its
  body blocks') and the head's own (the last); ``k`` replaces every K when given."""
  out = {f: tuple(v[: trained - 1]) + tuple(v[-1:]) for f, v in full.items()}
  if k is not None:
    out['iterations'] = (k,) * trained
  return out


def _feedback_of(bench_model: str) -> dict[str, tuple]:
  fb = bench_step.CONFIGS[bench_model]().feedback
  return {f: tuple(fb[f]) for f in ('iterations', 'noise', 'lr')}


def points(plan: Plan, parts: Sequence[str] = PARTS) -> list[Point]:
  """Every point of ``parts``, in part then x order."""
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    raise ValueError(f'unknown scaling parts {unknown}; valid: {list(PARTS)}')
  batch = {} if plan.depth_batch is None else {'batch_size': plan.depth_batch}
  vgg_fb, resnet_fb = _feedback_of('simple_vgg'), _feedback_of('resnet18_w16')
  out = []
  if 'vgg_depth' in parts:
    for n in plan.vgg_blocks:  # n conv blocks + the head: n trained blocks
      out.append(
          Point(
              'vgg_depth',
              'depth',
              'simple_vgg',
              n,
              'simple_vgg',
              dict(
                  model_kwargs=dict(channels=tuple(plan.vgg_channels[:n])),
                  feedback=truncated_feedback(vgg_fb, n, plan.ldrl_k),
                  **batch,
              ),
          )
      )
  if 'resnet_depth' in parts:
    for s in plan.resnet_stages:  # stem, 2s units, head: 2s + 1 trained blocks
      out.append(
          Point(
              'resnet_depth',
              'depth',
              f'resnet18_w{plan.resnet_width}',
              s,
              'resnet18_w16',
              dict(
                  model_kwargs=dict(width=plan.resnet_width, stages=s),
                  feedback=truncated_feedback(resnet_fb, 2 * s + 1, plan.ldrl_k),
                  **batch,
              ),
          )
      )
  if 'vgg_batch' in parts:
    n = len(plan.vgg_channels)
    full = dict(
        model_kwargs=dict(channels=tuple(plan.vgg_channels)),
        feedback=truncated_feedback(vgg_fb, n, plan.ldrl_k),
    )
    for b in plan.batches:
      out.append(
          Point('vgg_batch', 'batch', 'simple_vgg', b, 'simple_vgg', dict(batch_size=b, **full))
      )
  return out


def measure(point: Point, methods: Sequence[str], plan: Plan, log: Log) -> list[dict]:
  """One row per method of ``point``: its methods compiled, then timed interleaved."""
  steps, rows = {}, {}
  for method in methods:
    run = bench_step.setup(point.bench_model, 'auto', method=method, **point.overrides)
    k = (
        sum(feedback_training.per_block(run.cfg, 'iterations', run.net))
        if algorithms.trains_feedback(method)
        else 0
    )
    gflop = None
    if plan.gflop and not algorithms.trains_feedback(method):
      gflop = bench_step.step_cost(point.bench_model, method=method, **point.overrides)[0]
    rows[method] = dict(
        axis=point.axis,
        model=point.model,
        value=point.value,
        method=method,
        peak_temp_mib=bench_step.temp_mib(run.train_step),
        gflop=gflop,
        batch=run.cfg.batch_size,
        blocks=len(run.net),
        k_total=k,
        compile_s=run.compile_s,
    )
    steps[method] = bench_step.stepper(run)
    log(
        f'scaling {point.part} {point.value}: compiled {method} in {run.compile_s:.1f} s, '
        f'peak temp {rows[method]["peak_temp_mib"]:.1f} MiB'
    )
  slow = [m for m in methods if m == 'ldrl']
  windows = timing.interleaved(steps, plan.speed.timing_plan(), slow, log)
  for method, ms in windows.items():
    rows[method].update(ms_per_step=statistics.median(ms), windows=len(ms))
  return [rows[m] for m in methods]


def write_csv(rows: Sequence[dict], path: Path) -> None:
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=FIELDS)
    w.writeheader()
    w.writerows({k: ('' if r.get(k) is None else r[k]) for k in FIELDS} for r in rows)


def read_csv(path: str | os.PathLike) -> list[dict]:
  """scaling.csv's rows, numbers as numbers (blank: None)."""
  types = dict.fromkeys(('value', 'batch', 'blocks', 'k_total', 'windows'), int)
  types.update(dict.fromkeys(('ms_per_step', 'peak_temp_mib', 'gflop', 'compile_s'), float))
  parse = lambda k, v: None if v == '' else types.get(k, str)(v)
  with open(path) as f:
    return [{k: parse(k, v) for k, v in r.items()} for r in csv.DictReader(f)]


def _groups(rows: Sequence[dict]) -> list[tuple[str, str]]:
  """(axis, model) of each panel column, in the rows' order."""
  return list(dict.fromkeys((r['axis'], r['model']) for r in rows))


def _xlabel(axis: str, model: str) -> str:
  if axis == 'batch':
    return 'batch size'
  return 'conv blocks (+ dense head)' if model == 'simple_vgg' else 'stages (2 units each)'


def _where(axis: str, model: str, rows: Sequence[dict]) -> str:
  """A panel column's title: the model, and what stays fixed along its x axis."""
  if axis == 'batch':
    blocks = {r['blocks'] for r in rows}
    fixed = f'{blocks.pop() - 1} conv blocks' if len(blocks) == 1 else 'by batch'
  else:
    batch = {r['batch'] for r in rows}
    fixed = f'batch {batch.pop()}' if len(batch) == 1 else 'by depth'
  return f'{model_name(model)} ({fixed})'


def _bp_ratio(rows: Sequence[dict], key: str) -> dict[tuple, float]:
  """(axis, model, value, method) -> the row's ``key`` / BP's at the same point."""
  bp = {(r['axis'], r['model'], r['value']): r[key] for r in rows if r['method'] == 'bp'}
  return {
      (r['axis'], r['model'], r['value'], r['method']): r[key]
      / bp[r['axis'], r['model'], r['value']]
      for r in rows
      if bp.get((r['axis'], r['model'], r['value'])) and r[key] is not None
  }


def plot(rows: Sequence[dict], path: Path, title: str = '') -> Path:
  """Per (axis, model) a column of panels: ms/step, its ratio to BP's (when BP was
  measured), and peak temporary MiB, one line per method (log scales)."""
  ratio = _bp_ratio(rows, 'ms_per_step')
  columns = []
  for axis, model in _groups(rows):
    mine = [r for r in rows if (r['axis'], r['model']) == (axis, model)]
    where, xlabel = _where(axis, model, mine), _xlabel(axis, model)
    methods = list(dict.fromkeys(r['method'] for r in mine))
    xs = sorted({r['value'] for r in mine})

    def lines(value_of):
      out = []
      for m in methods:
        pts = sorted(
            (r['value'], value_of(r)) for r in mine if r['method'] == m and value_of(r) is not None
        )
        if pts:
          out.append(plot_lib.Line(METHOD_NAMES.get(m, m), *zip(*pts), style='o-'))
      return out

    panel = lambda what, ylabel, lines: plot_lib.Panel(
        f'{where}: {what}',
        xlabel,
        ylabel,
        lines,
        log_y=True,
        log_x=axis == 'batch',
        xticks=xs,
        plain_numbers=True,
    )
    key = lambda r: (r['axis'], r['model'], r['value'], r['method'])
    columns.append(
        [
            panel('step time', 'ms/step (median)', lines(lambda r: r['ms_per_step'])),
            panel('step time / BP', '× BP', lines(lambda r: ratio.get(key(r)))),
            panel('temp memory', 'MiB (XLA memory analysis)', lines(lambda r: r['peak_temp_mib'])),
        ]
    )
  grid = [list(row) for row in zip(*columns)]  # rows: quantity; columns: (axis, model)
  return plot_lib.save_figure(grid, path, title or None, panel_size=(4.6, 3.4))


def markdown(rows: Sequence[dict], header: str = '') -> str:
  """The table of every row with its step time and memory as multiples of BP's."""
  t, mem = _bp_ratio(rows, 'ms_per_step'), _bp_ratio(rows, 'peak_temp_mib')
  fmt = lambda v, spec: '' if v is None else format(v, spec)
  lines = [header, ''] if header else []
  lines += [
      '| axis | model | value | batch | blocks | method | ms/step | × BP | peak temp MiB | '
      '× BP | GFLOP/step | K total | windows |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    key = (r['axis'], r['model'], r['value'], r['method'])
    lines.append(
        f'| {r["axis"]} | {model_name(r["model"])} | {r["value"]} | '
        f'{r["batch"]} | {r["blocks"]} | {METHOD_NAMES.get(r["method"], r["method"])} | '
        f'{r["ms_per_step"]:.1f} | {fmt(t.get(key), ".2f")} | {r["peak_temp_mib"]:.1f} | '
        f'{fmt(mem.get(key), ".2f")} | {fmt(r["gflop"], ".2f")} | {r["k_total"] or ""} | '
        f'{r["windows"]} |'
    )
  return '\n'.join(lines) + '\n'


def run(
    outdir: str | os.PathLike,
    plan: Plan,
    methods: Sequence[str] = METHODS,
    parts: Sequence[str] = PARTS,
    log: Log = print,
    header: str = '',
) -> list[dict]:
  """Measures every point of ``parts`` for ``methods``; writes scaling.csv (after each
  point), then scaling.md and scaling.png, under ``outdir``."""
  unknown = sorted(set(methods) - set(METHODS))
  if unknown or not methods:
    raise ValueError(f'scaling methods {list(methods)}: give some of {list(METHODS)}')
  methods = [m for m in METHODS if m in methods]
  pts = points(plan, parts)  # bad parts fail before anything compiles
  outdir = Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  rows: list[dict] = []
  load_before, t0 = os.getloadavg()[0], time.perf_counter()
  for i, point in enumerate(pts):
    log(f'scaling: point {i + 1}/{len(pts)}: {point.part} = {point.value}')
    rows += measure(point, methods, plan, log)
    write_csv(rows, outdir / 'scaling.csv')
  took = time.perf_counter() - t0
  header = '\n'.join(
      filter(
          None,
          [
              header,
              f'- finished: {datetime.datetime.now().isoformat(timespec="seconds")}, '
              f'{took / 60:.1f} min in all (compilation included); load average '
              f'{load_before:.1f} before / {os.getloadavg()[0]:.1f} after',
          ],
      )
  )
  (outdir / 'scaling.md').write_text(markdown(rows, header))
  plot(rows, outdir / 'scaling.png', 'Step time and peak temporary memory against depth and batch')
  return rows
