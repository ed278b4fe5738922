r"""Figure 2 of Bao et al. (2024): the time to compute the inverse, the pseudo-inverse
and the transpose of an n x n matrix, i.e. the feedback weights of IJML-DTP, PJML-DTP
and TJML-DTP.

  python -m experiments.reproduce --figure=2 --workdir=runs/reproduce

Each operation is one jitted function on a random float32 matrix (the same matrix for
the three operations at a given n), compiled ahead of time; after a warm-up call it is
timed ``repeats`` times with ``block_until_ready`` and the median is kept (see
``time_op``). The transpose is
materialised: a jitted ``a.T`` returns a new row-major buffer (XLA cannot hand back a
transposed view), so its time is that of the copy a training step would pay.

Writes ``figure2.csv`` (n, op, median_ms, min_ms, repeats) and ``figure2.png``.
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PAPER_SIZES = (100, 200, 300, 400, 500)
DEFAULT_SIZES = PAPER_SIZES + (1024, 2048, 4096)

OPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'inverse': jnp.linalg.inv,
    'pseudo-inverse': jnp.linalg.pinv,
    # ``a.T`` alone under jit is materialised: the result must be a fresh row-major
    # array. (``+ 0`` would be folded away by XLA's simplifier, so it adds nothing.)
    'transpose': jnp.transpose,
}


def time_op(fn: Callable, a: jax.Array, repeats: int, max_seconds: float) -> list[float]:
  """Seconds per call of jitted ``fn``: compiled ahead of time (not timed), then one
  warm-up call when it is cheap (under ``max_seconds / 10``: large pseudo-inverses take
  a minute a call on 2 cores), then up to ``repeats`` timed calls, stopping early
  (after at least 3) once ``max_seconds`` have been spent."""
  fn = fn.lower(a).compile()
  t0 = time.perf_counter()
  jax.block_until_ready(fn(a))
  first = time.perf_counter() - t0
  times: list[float] = [] if first < max_seconds / 10 else [first]
  start = time.perf_counter()
  while len(times) < repeats:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(a))
    times.append(time.perf_counter() - t0)
    if len(times) >= 3 and time.perf_counter() - start > max_seconds:
      break
  return times


def run(
    outdir: str | Path,
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 11,
    max_seconds_per_point: float = 30.0,
    seed: int = 0,
    log: Callable[[str], None] = print,
    header: str = '',
) -> list[dict]:
  """Times every op at every size; writes figure2.csv and figure2.png under outdir."""
  outdir = Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  rows = []
  key = jax.random.key(seed)
  for n in sizes:
    # A well-conditioned random matrix: I + N(0, 1/n), so inv and pinv are defined.
    a = jnp.eye(n) + jax.random.normal(jax.random.fold_in(key, n), (n, n)) / np.sqrt(n)
    a = jax.block_until_ready(a)
    for op, fn in OPS.items():
      times = time_op(jax.jit(fn), a, repeats, max_seconds_per_point)
      row = dict(
          n=n,
          op=op,
          median_ms=1e3 * statistics.median(times),
          min_ms=1e3 * min(times),
          repeats=len(times),
      )
      rows.append(row)
      log(
          f'figure 2: n={n:5d} {op:15s} median {row["median_ms"]:10.3f} ms '
          f'({len(times)} repeats)'
      )
  with open(outdir / 'figure2.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=['n', 'op', 'median_ms', 'min_ms', 'repeats'])
    w.writeheader()
    w.writerows(rows)
  plot(rows, outdir / 'figure2.png', header)
  (outdir / 'figure2.md').write_text(markdown(rows, header))
  return rows


def markdown(rows: list[dict], header: str = '') -> str:
  """A table n x op of median milliseconds, plus the ratios to the transpose."""
  sizes = sorted({r['n'] for r in rows})
  ms = {(r['n'], r['op']): r['median_ms'] for r in rows}
  lines = [header, ''] if header else []
  lines += [
      '| n | inverse (ms) | pseudo-inverse (ms) | transpose (ms) | inverse / transpose '
      '| pseudo-inverse / transpose |',
      '|---|---|---|---|---|---|',
  ]
  for n in sizes:
    inv, pinv, tr = (ms[(n, op)] for op in OPS)
    lines.append(
        f'| {n} | {inv:.3f} | {pinv:.3f} | {tr:.3f} | {inv / tr:.0f}× | ' f'{pinv / tr:.0f}× |'
    )
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], path: Path, title: str = '') -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  small = [n for n in sorted({r['n'] for r in rows}) if n <= max(PAPER_SIZES)]
  for ax, log_scale, keep in ((axes[0], False, set(small)), (axes[1], True, None)):
    for op in OPS:
      pts = sorted(
          (r['n'], r['median_ms'])
          for r in rows
          if r['op'] == op and (keep is None or r['n'] in keep)
      )
      if pts:
        ax.plot(*zip(*pts), marker='o', label=op)
    ax.set_xlabel('n (n x n matrix)')
    ax.set_ylabel('median time (ms)')
    if log_scale:
      ax.set_xscale('log')
      ax.set_yscale('log')
      ax.set_title('all sizes (log-log)')
    else:
      ax.set_title('n = 100..500 (paper range)')
    ax.legend()
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title.splitlines()[0].lstrip('# '), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
