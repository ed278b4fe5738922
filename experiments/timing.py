"""The interleaved timer of every speed measurement (reproduce's tables, bench_cpu).

Variants are timed in alternating windows, so that all of them see the same machine
load: a slow drift of the load moves every variant's times together instead of
biasing the ones timed last.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping, Sequence

# Runs k steps of one variant and returns (any value) when they are done (blocking).
Steps = Callable[[int], object]


@dataclasses.dataclass(frozen=True)
class Plan:
  """``rounds`` x (one window of ``slow_steps`` steps of each slow variant, then
  ``inner`` windows of ``steps`` steps of each other variant, in an order that rotates
  by one at every window), after ``warmup`` steps of every variant (``slow_warmup``
  for the slow ones)."""

  rounds: int
  steps: int
  warmup: int
  inner: int = 1
  slow_steps: int = 1
  slow_warmup: int = 0


def interleaved(
    variants: Mapping[str, Steps],
    plan: Plan,
    slow: Sequence[str] = (),
    log: Callable[[str], None] = lambda s: None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
  """ms per step of each variant, one value per timed window, in window order."""
  if set(slow) - set(variants):
    raise ValueError(f'slow variants {sorted(set(slow) - set(variants))} are not timed')

  def window(name: str, k: int) -> float:
    t0 = clock()
    variants[name](k)
    return 1e3 * (clock() - t0) / k

  for name in variants:  # caches, page faults, thread pools
    w = plan.slow_warmup if name in slow else plan.warmup
    if w:
      log(f'  warm-up {name}: {window(name, w):.1f} ms/step')
  others = [n for n in variants if n not in slow]
  out: dict[str, list[float]] = {n: [] for n in variants}
  rot = 0
  for rnd in range(plan.rounds):
    for name in slow:
      out[name].append(window(name, plan.slow_steps))
    for _ in range(plan.inner):
      if others:
        for name in others[rot % len(others) :] + others[: rot % len(others)]:
          out[name].append(window(name, plan.steps))
      rot += 1
    log(
        f'  round {rnd + 1}/{plan.rounds}: '
        + ', '.join(f'{n} {v[-1]:.1f}' for n, v in out.items() if v)
        + ' ms/step'
    )
  return out
