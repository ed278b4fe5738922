"""Sweeps: a grid of config values, and the member axis that trains many runs in one program.

Syntax. ``'optimizer.lr=[0.01,0.03,0.1] beta=[0.3,0.5]'``: fields separated by spaces, each
``<config path>=[v1, v2, ...]`` with Python literals (numbers, tuples, quoted strings; a
bare word such as ``ldrl`` is a string). The grid is every combination, the first field
varying slowest. It is ``config.sweep`` (or ``experiments.sweep --sweep=...``).

Members. A run has a leading *member* axis when it trains more than one run: each setting
of the grid's vmapped fields (``VMAPPED``) times the ``num_seeds`` seeds, seeds varying
fastest. Member m has the keys of its own seed (``seed + s``, or the swept seed plus s) and
its own values of the swept scalars, ``TrainState.hparams`` (config path -> traced value,
``hyper_parameters``), which the algorithms and optimisers read in place of the config's
values. So member m computes what the separate run of ``member_config(cfg, m)`` computes.
Without a sweep the members are the seeds, and hparams is empty: the program is the one of
before. Every other field (model, K, batch size, method, ...) changes shapes, loop lengths
or code: ``experiments.sweep`` runs one program per setting of those (``programs``).
"""

from __future__ import annotations

import ast
import difflib
import itertools
import re
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from tp_jax import config as config_lib
from tp_jax import network
from tp_jax.algorithms import feedback_training

# Scalars a member may hold its own value of (trained in one program). Per-block fields
# take a number (every trained block) or a tuple (one per block), like the config.
VMAPPED = (
    'seed',
    'beta',
    'optimizer.lr',
    'optimizer.momentum',
    'optimizer.weight_decay',
    'feedback.noise',
    'feedback.lr',
    'feedback.momentum',
)
PER_BLOCK = ('feedback.noise', 'feedback.lr')

Grid = dict[str, tuple]  # config path -> its values, in the order given


class Member(NamedTuple):
  """One run of a member axis: its seed and its setting of the swept vmapped fields."""

  seed: int
  setting: dict[str, Any]

  @property
  def hyper_setting(self) -> dict[str, Any]:
    """The setting's hyper-parameters: its values other than the seed."""
    return {k: v for k, v in self.setting.items() if k != 'seed'}

  @property
  def label(self) -> str:
    """'seed 5', or 'optimizer.lr=0.1,beta=0.3 seed 5'."""
    return f'{name(self.hyper_setting)} seed {self.seed}'.strip()


def parse(text: str) -> Grid:
  """The grid of ``text`` (see the module doc). Raises ConfigError for bad syntax, a
  field given twice, a field without values or an empty grid."""
  grid: Grid = {}
  pos = 0
  head = re.compile(r'\s*([A-Za-z_][\w.]*)\s*=\s*\[')
  while text[pos:].strip():
    m = head.match(text, pos)
    if not m:
      raise config_lib.ConfigError(
          f'cannot read the sweep at {text[pos:].strip()[:40]!r}: write '
          f"fields as <field>=[v1,v2,...] separated by spaces, e.g. 'beta=[0.3,0.5]'"
      )
    field, (body, pos) = m.group(1), _bracketed(text, m.end())
    if field in grid:
      raise config_lib.ConfigError(f'sweep field {field!r} is given twice')
    values = tuple(_literal(field, v) for v in _split_top_level(body))
    if not values:
      raise config_lib.ConfigError(f'sweep field {field!r} has no values: {field}=[]')
    grid[field] = values
  if not grid:
    raise config_lib.ConfigError(
        "the sweep grid is empty: give at least one field, e.g. 'beta=[0.3,0.5]'"
    )
  return grid


def _bracketed(text: str, start: int) -> tuple[str, int]:
  """The text up to the ']' that closes the '[' before ``start``, and the position after."""
  depth = 1
  for i in range(start, len(text)):
    depth += {'[': 1, '(': 1, ']': -1, ')': -1}.get(text[i], 0)
    if depth == 0:
      return text[start:i], i + 1
  raise config_lib.ConfigError(f'the sweep has an unclosed [: {text[start - 1:][:40]!r}')


def _split_top_level(body: str) -> list[str]:
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(body):
    depth += {'[': 1, '(': 1, ']': -1, ')': -1}.get(ch, 0)
    if ch == ',' and depth == 0:
      parts.append(body[start:i])
      start = i + 1
  parts.append(body[start:])
  return [p.strip() for p in parts if p.strip()]


def _literal(field: str, text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if re.fullmatch(r'[\w.\-]+', text):
      return text  # a bare word: method=[tjml_dtp,ldrl]
    raise config_lib.ConfigError(f'sweep field {field!r}: cannot read the value {text!r}') from None


def text(grid: Grid) -> str:
  """The sweep syntax of ``grid`` (``parse``'s inverse)."""
  return ' '.join(f'{k}=[{",".join(repr(v) for v in vs)}]' for k, vs in grid.items())


def settings(grid: Grid) -> list[dict[str, Any]]:
  """Every combination of ``grid``'s values, the first field varying slowest."""
  return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def name(setting: dict[str, Any]) -> str:
  """A setting's label: 'optimizer.lr=0.01,beta=0.3' ('' for the empty setting)."""
  return ','.join(f'{k}={v!r}' if isinstance(v, str) else f'{k}={v}' for k, v in setting.items())


def _paths(d: dict, prefix: str = '') -> list[str]:
  out = []
  for k, v in d.items():
    out += _paths(v, f'{prefix}{k}.') if isinstance(v, dict) else [f'{prefix}{k}']
  return out


def check_fields(cfg, grid: Grid) -> None:
  """Raises ConfigError for a field that is not in ``cfg``, the sweep itself, or a
  non-numeric value of a vmapped field."""
  known = _paths(cfg.to_dict())
  for field, values in grid.items():
    if field == 'sweep':
      raise config_lib.ConfigError('the sweep cannot sweep its own field sweep')
    if field not in known:
      close = difflib.get_close_matches(field, known, n=3)
      raise config_lib.ConfigError(
          f'unknown sweep field {field!r}'
          + (f'; did you mean {" or ".join(map(repr, close))}?' if close else '')
      )
    if field not in VMAPPED:
      continue
    for v in values:
      numbers = v if field in PER_BLOCK and isinstance(v, tuple) else (v,)
      if not numbers or not all(config_lib.is_number(x, integer=field == 'seed') for x in numbers):
        kind = (
            'an integer'
            if field == 'seed'
            else 'a number'
            + (' or a tuple of numbers (one per block)' if field in PER_BLOCK else '')
        )
        raise config_lib.ConfigError(
            f'sweep field {field!r} is trained in one program, so each value must be '
            f'{kind}; got {v!r}'
        )


def split(grid: Grid) -> tuple[Grid, Grid]:
  """(structural fields, vmapped fields) of ``grid``, each in the given order."""
  structural = {k: v for k, v in grid.items() if k not in VMAPPED}
  return structural, {k: v for k, v in grid.items() if k in VMAPPED}


def apply(cfg: ml_collections.ConfigDict, setting: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``cfg`` with ``setting``'s values; ConfigError for a value of the wrong type."""
  out = cfg.copy_and_resolve_references()
  with out.unlocked():
    for path, value in setting.items():
      if isinstance(config_lib.get_field(out, path), tuple) and not isinstance(value, tuple):
        value = (value,)  # one value for every block, as --config.<field>=<value> gives
      try:
        config_lib.set_field(out, path, value)
      except (TypeError, ValueError) as e:
        raise config_lib.ConfigError(f'sweep field {path!r} cannot take {value!r}: {e}') from None
  return out


def grid_of(cfg) -> Grid:
  """The grid of ``cfg.sweep``; {} when there is none."""
  return parse(cfg.sweep) if cfg.sweep.strip() else {}


def members(cfg) -> list[Member]:
  """The runs ``cfg`` trains in one program: each setting of its (vmapped) sweep times
  its ``num_seeds`` seeds, seeds fastest."""
  return [
      Member(setting.get('seed', cfg.seed) + s, setting)
      for setting in settings(grid_of(cfg))
      for s in range(cfg.num_seeds)
  ]


def member_config(cfg, member: Member) -> ml_collections.ConfigDict:
  """The config of ``member``'s separate run: its setting, its seed, no sweep, one seed."""
  out = apply(cfg, {**member.setting, 'seed': member.seed})
  out.num_seeds, out.sweep = 1, ''
  return out


def validate(cfg, num_devices: int = 1) -> None:
  """``cfg.sweep``: readable, known fields, only vmapped ones, numbers, fields the method
  reads, and each setting's config valid (``config.validate``). Raises ConfigError."""
  grid = grid_of(cfg)
  check_fields(cfg, grid)
  structural, _ = split(grid)
  if structural:
    raise config_lib.ConfigError(
        f'sweep fields {sorted(structural)} change the program (shapes, loop lengths or '
        f'code), so one program cannot train them together: run python -m '
        f'experiments.sweep, which trains one program per setting of them. Fields one '
        f'program can sweep: {list(VMAPPED)}'
    )
  unread = [f for f in grid if not reads(cfg, f)]
  if unread:
    raise config_lib.ConfigError(
        f'method={cfg.method!r} with optimizer {cfg.optimizer.name!r} does not read '
        f'{unread}: every setting would train the same run'
    )
  for setting in settings(grid):
    one = apply(cfg, setting)  # keeps num_seeds: its last seed is checked too
    one.sweep = ''
    config_lib.validate(one, num_devices)


def reads(cfg, field: str) -> bool:
  """Does a run of ``cfg`` read vmapped ``field``?"""
  from tp_jax import algorithms  # pylint: disable=g-import-not-at-top (imports config)

  if field == 'beta':
    return cfg.method != 'bp'
  if field.startswith('feedback.'):
    return algorithms.trains_feedback(cfg.method)
  if field == 'optimizer.momentum':
    return cfg.optimizer.name == 'sgd'
  return True


def hyper_parameters(cfg, net: network.Net) -> dict[str, Any]:
  """``TrainState.hparams`` of ``cfg``'s members: swept config path -> float32 array
  with the member axis (a scalar with one member); a per-block field is a tuple of them,
  one per trained block. {} when nothing but seeds is swept."""
  ms = members(cfg)
  out = {}
  for field in grid_of(cfg):
    if field == 'seed':
      continue  # the member's keys
    configs = [member_config(cfg, m) for m in ms]
    if field in PER_BLOCK:  # one value per trained block, broadcast as the run does
      values = [feedback_training.per_block(c, field.split('.')[1], net) for c in configs]
      out[field] = tuple(_stacked(column, len(ms)) for column in zip(*values))
    else:
      out[field] = _stacked([config_lib.get_field(c, field) for c in configs], len(ms))
  return out


def _stacked(values, num_members: int) -> np.ndarray:
  a = np.asarray(values, np.float32)
  return a if num_members > 1 else a[0]


def programs(cfg) -> list[tuple[dict[str, Any], ml_collections.ConfigDict]]:
  """``experiments.sweep``'s programs: (structural setting, its config, whose ``sweep``
  holds the vmapped fields) for each setting of ``cfg.sweep``'s structural fields.
  Raises ConfigError (before anything is compiled) for a bad grid or a bad config of
  any setting."""
  grid = grid_of(cfg)
  if not grid:
    parse(cfg.sweep)  # says the grid is empty
  check_fields(cfg, grid)
  structural, vmapped = split(grid)
  out = []
  for setting in settings(structural):
    program = apply(cfg, setting)
    program.sweep = text(vmapped)
    config_lib.validate(program)
    out.append((setting, program))
  return out
