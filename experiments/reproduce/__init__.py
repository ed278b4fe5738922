r"""Regenerates the paper's tables and Figure 2 (Bao et al., AAAI 2024), one command each.

  python -m experiments.reproduce --table=1 --profile=cpu [--seeds=0,1,2 | --num_seeds=3] \
      [--workdir=runs/reproduce] [--what=all|speed|accuracy|table] \
      [--columns=mnist,cifar10] [--methods=tjml_dtp,bp] [--ldrl_seconds=T]
  python -m experiments.reproduce --figure=2 --profile=cpu
  python -m experiments.reproduce --figure=scaling --profile=cpu [--figure_out=benchmarks]

Tables (methods LDRL, FWDTP, TJML-DTP, BP in every column of Tables 1-3):
  1  LeNet on MNIST, Fashion-MNIST, CIFAR-10
  2  Simplified-VGG on CIFAR-10
  3  MLP-Mixer on CIFAR-10
  4  reversible MLP-Mixer (4 additive-coupling Mixer blocks,
     ``experiments/configs/reversible_mixer_cifar10.py``) trained by DTP with the exact
     inverse as feedback, vs TJML-DTP and BP on the MLP-Mixer; the three timed together

Each table has two independent parts:

* accuracy: one ``tp_jax.train.train_and_evaluate`` run per (column, method), all the
  (consecutive) seeds in one program (``num_seeds``), in its own directory
  ``<workdir>/<profile>/table<T>/<dataset>/<method>/seed<S>`` (``seeds<a>-<b>`` for
  several; its ``result.json``, ``metrics.jsonl``, ``evals.jsonl``, checkpoints). A
  finished run with the same config is reused, an interrupted one resumes, one with a
  different config is refused. TJML-DTP runs first in each column: with
  ``Profile.ldrl_budget`` (cpu) LDRL trains for TJML-DTP's measured training seconds.
* speed: every method's run is set up by ``tp_jax.train.setup`` (the training loop's
  own compiled step: batch gather, augmentation, the method's step) in this process, warmed up, then timed in interleaved windows so that all methods see
  the same machine load; the median ms/step times the steps of a full epoch is the
  epoch time. LDRL's windows alternate with rounds of windows of the other methods
  (its steps are ~100x longer). Written to ``speed_<dataset>.json``.

Then ``<workdir>/<profile>/table<T>.md`` (header: profile, hardware, epochs, seeds,
date, command; the paper's published numbers beside ours; mean ± sample std over seeds;
each method's final BP angle), ``table<T>_curves.png`` and ``table<T>_time.png`` (test
accuracy against training wall-clock seconds) are generated from whatever results exist, so ``--what=speed`` and ``--what=accuracy``
can run at different times and ``--what=table`` only regenerates the files.

Profiles (config overrides; see ``PROFILES``):
  smoke  seconds per method: 2 steps of batch 8 on 32 examples, LDRL K = 1; checks the
         machinery (CI), not accuracy or speed.
  cpu    the largest honest run for hours on 2 CPU cores: 3 seeds, a few epochs (LDRL:
         TJML-DTP's training seconds); speed from a few interleaved windows.
  paper  the full protocol for a GPU: 5 seeds, the configs' epochs (the reference's);
         ``benchmarks/gpu.sh`` runs it on one GPU.

Modules: ``tables`` (what each table, column and profile is), ``accuracy`` and
``speed`` (running the two parts), ``report`` (the table and curve files written from
the results), ``figure2``, ``scaling`` (step time and memory against depth and batch
size, not in the paper), ``commands`` (``run_table``, ``run_figure``, ``run_scaling``) and
``__main__`` (the command line).
"""
