"""``python -m experiments.reproduce``: the command line (see the package's doc)."""

import shlex
import sys
from pathlib import Path

from absl import app
from absl import flags
from absl import logging

from experiments.reproduce import commands
from experiments.reproduce.tables import PROFILES, TABLES


def main(argv):
  f = flags.FLAGS
  if not f['verbosity'].present:  # Orbax logs every checkpoint at INFO
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not f.table and not f.figure:
    raise app.UsageError('give --table=1|2|3|4|5 or --figure=2|scaling')
  command = 'python -m experiments.reproduce ' + ' '.join(shlex.quote(a) for a in sys.argv[1:])
  seeds = [int(s) for s in f.seeds] if f.seeds else None
  if f.num_seeds is not None:  # consecutive seeds from the first given (or the profile's)
    first = seeds[0] if seeds else PROFILES[f.profile].seeds[0]
    seeds = list(range(first, first + f.num_seeds))
  if f.table:
    if f.table not in TABLES:
      raise app.UsageError(f'unknown table {f.table}; valid: {sorted(TABLES)}')
    path = commands.run_table(
        f.table,
        f.profile,
        f.workdir,
        seeds,
        f.what,
        f.data,
        command,
        columns=f.columns,
        methods=f.methods,
        ldrl_seconds=f.ldrl_seconds,
    )
    print(Path(path).read_text())
  if f.figure == 'scaling':
    commands.run_scaling(
        f.profile,
        f.figure_out,
        f.methods,
        f.scaling_parts,
        command,
        workdir=f.workdir,
        rounds=f.scaling_rounds,
        inner=f.scaling_windows,
        steps=f.scaling_steps,
        ldrl_steps=f.scaling_ldrl_steps,
    )
  elif f.figure:
    if f.figure != '2':
      raise app.UsageError(f"unknown figure {f.figure}; valid: ['2', 'scaling']")
    sizes = [int(s) for s in f.figure_sizes] if f.figure_sizes else None
    commands.run_figure(2, f.profile, f.workdir, sizes, command)
  return 0


def define_flags() -> None:
  """Defined only when run as a program, so that importing the package (tests) never
  collides with another binary's flags of the same name."""
  flags.DEFINE_integer('table', None, 'Table to reproduce: 1-4, or 5 (ResNet-18, ours).')
  flags.DEFINE_string(
      'figure',
      None,
      "Figure to reproduce: 2, or 'scaling' (step time and memory against depth "
      'and batch size; experiments/reproduce/scaling.py).',
  )
  flags.DEFINE_enum('profile', 'smoke', list(PROFILES), 'Run size.')
  flags.DEFINE_list(
      'seeds', None, "Consecutive seeds, trained in one program per row (default: the profile's)."
  )
  flags.DEFINE_integer(
      'num_seeds',
      None,
      "Seeds per row (overrides the profile's): --seeds' first (or the profile's) onwards.",
      lower_bound=1,
  )
  flags.DEFINE_list(
      'columns', None, 'Columns to run and show, e.g. mnist,fashion_mnist (default: all).'
  )
  flags.DEFINE_list(
      'methods', None, 'Methods to run (tables, --figure=scaling), e.g. tjml_dtp,bp (default: all).'
  )
  flags.DEFINE_float(
      'ldrl_seconds',
      None,
      "LDRL's training wall-clock budget in seconds (default: the profile's: TJML-DTP's "
      'measured training seconds in the cpu profile, none otherwise).',
  )
  flags.DEFINE_string('workdir', 'runs/reproduce', 'Output root; <workdir>/<profile>/...')
  flags.DEFINE_enum(
      'what',
      'all',
      ['all', 'speed', 'accuracy', 'table'],
      'Which part of a table to run; the table file is always regenerated.',
  )
  flags.DEFINE_enum(
      'data',
      'real',
      ['real', 'synthetic'],
      'Real datasets, or random images of the same shapes (machinery only).',
  )
  flags.DEFINE_string(
      'figure_out',
      None,
      'Output folder of --figure=scaling (default: benchmarks/; <workdir>/smoke for the '
      'smoke profile).',
  )
  flags.DEFINE_list(
      'scaling_parts',
      None,
      'Parts of --figure=scaling: vgg_depth, resnet_depth, vgg_batch (default: all).',
  )
  lb = dict(lower_bound=1)
  flags.DEFINE_integer(
      'scaling_rounds', None, "--figure=scaling: timed rounds (default: the profile's).", **lb
  )
  flags.DEFINE_integer(
      'scaling_windows',
      None,
      "--figure=scaling: windows per round of each method but LDRL (default: the profile's).",
      **lb,
  )
  flags.DEFINE_integer(
      'scaling_steps',
      None,
      "--figure=scaling: steps per window of each method but LDRL (default: the profile's).",
      **lb,
  )
  flags.DEFINE_integer(
      'scaling_ldrl_steps',
      None,
      "--figure=scaling: LDRL steps per window, one window a round (default: the profile's).",
      **lb,
  )
  flags.DEFINE_list(
      'figure_sizes',
      None,
      'Matrix sizes for Figure 2 (default: the ' "profile's: 100..500, 1024, 2048, 4096).",
  )


if __name__ == '__main__':
  define_flags()
  app.run(main)
