r"""Reversible MLP-Mixer on CIFAR-10 (Table 4): the Table 3 Mixer (mixer_cifar10.py)
with each of its 4 Mixer blocks replaced by one additive coupling, trained by DTP with
the exact inverse as the feedback of the couplings (``tp_jax/reversible.py``).

  python -m experiments.train --config=experiments/configs/reversible_mixer_cifar10.py \
      --workdir=runs/reversible_mixer_cifar10

Only the analytical methods apply (tjml_dtp, or bp as the baseline): learned feedback
has no meaning for a block whose inverse is exact.
"""

from experiments.configs import mixer_cifar10


def get_config():
  c = mixer_cifar10.get_config()
  c.model = 'reversible_mixer'
  c.method = 'tjml_dtp'
  return c
