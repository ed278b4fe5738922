"""experiments.timing: warm-up, window order and per-step times of the interleaved timer."""

from __future__ import annotations

import pytest

from experiments import timing


def _recorder(names, ms_per_step=None):
  """Variants that log (name, k) and advance a fake clock by k x their ms per step."""
  calls, now = [], [0.0]
  ms_per_step = ms_per_step or {n: 1.0 for n in names}

  def variant(name):
    def steps(k):
      calls.append((name, k))
      now[0] += k * ms_per_step[name] / 1e3

    return steps

  return {n: variant(n) for n in names}, calls, lambda: now[0]


def test_windows_rotate_after_warm_up():
  variants, calls, clock = _recorder('abc')
  plan = timing.Plan(rounds=3, steps=2, warmup=2)
  times = timing.interleaved(variants, plan, clock=clock)
  assert {n: len(v) for n, v in times.items()} == {'a': 3, 'b': 3, 'c': 3}
  assert calls[:3] == [('a', 2), ('b', 2), ('c', 2)]  # warm-up
  timed = [n for n, k in calls[3:]]
  assert timed == list('abc' 'bca' 'cab'), timed
  assert all(k == plan.steps for _, k in calls[3:])


def test_slow_variants_get_their_own_windows_first_in_each_round():
  variants, calls, clock = _recorder(['ldrl', 'bp', 'fwdtp'])
  plan = timing.Plan(rounds=2, steps=3, warmup=1, inner=2, slow_steps=1, slow_warmup=0)
  times = timing.interleaved(variants, plan, slow=['ldrl'], clock=clock)
  assert calls[:2] == [('bp', 1), ('fwdtp', 1)]  # no warm-up for ldrl (slow_warmup=0)
  assert calls[2:] == [
      ('ldrl', 1),
      ('bp', 3),
      ('fwdtp', 3),
      ('fwdtp', 3),
      ('bp', 3),
      ('ldrl', 1),
      ('bp', 3),
      ('fwdtp', 3),
      ('fwdtp', 3),
      ('bp', 3),
  ]
  assert {n: len(v) for n, v in times.items()} == {'ldrl': 2, 'bp': 4, 'fwdtp': 4}


@pytest.mark.parametrize('steps', [1, 4])
def test_times_are_milliseconds_per_step(steps):
  ms = {'fast': 2.0, 'slow': 50.0}
  variants, _, clock = _recorder(ms, ms)
  times = timing.interleaved(variants, timing.Plan(rounds=2, steps=steps, warmup=0), clock=clock)
  for name, values in times.items():
    assert values == pytest.approx([ms[name]] * 2)


def test_log_reports_warm_up_and_rounds():
  variants, _, clock = _recorder('ab')
  logs = []
  timing.interleaved(
      variants, timing.Plan(rounds=2, steps=1, warmup=1), log=logs.append, clock=clock
  )
  assert [l.split(':')[0].strip() for l in logs] == [
      'warm-up a',
      'warm-up b',
      'round 1/2',
      'round 2/2',
  ]


def test_unknown_slow_variant_is_refused():
  variants, _, clock = _recorder('ab')
  with pytest.raises(ValueError, match=r"\['c'\]"):
    timing.interleaved(variants, timing.Plan(rounds=1, steps=1, warmup=0), slow=['c'], clock=clock)
