r"""Simplified-VGG on CIFAR-10 (Table 2).

  python -m experiments.train --config=experiments/configs/vgg_cifar10.py \
      --config.method=tjml_dtp --workdir=runs/vgg_cifar10

scalingDTP's VGG defaults: batch 128, 90 epochs, forward SGD lr 0.05 momentum 0.9
wd 1e-4 with a cosine schedule, beta 0.7; LDRL K = [20, 30, 35, 55, 20],
sigma = [0.4, 0.4, 0.2, 0.2, 0.08], feedback lr [1e-4, 3.5e-4, 8e-3, 8e-3, 0.18]
(listed from block 2 to block 6, the reference's per-layer order).
"""

from tp_jax import config as config_lib


def get_config():
  c = config_lib.default()
  c.model = 'simple_vgg'
  c.dataset = 'cifar10'
  c.augment = True
  c.epochs = 90
  c.batch_size = 128
  c.beta = 0.7
  c.optimizer.lr = 0.05
  c.optimizer.schedule = 'cosine'
  c.feedback.iterations = (20, 30, 35, 55, 20)
  c.feedback.noise = (0.4, 0.4, 0.2, 0.2, 0.08)
  c.feedback.lr = (1e-4, 3.5e-4, 8e-3, 8e-3, 0.18)
  return c
