r"""LeNet on CIFAR-10 (Table 1); scalingDTP's LeNet hyper-parameters, with the
reference's augmentation (random crop with 4-pixel padding + horizontal flip).

  python -m experiments.train --config=experiments/configs/lenet_cifar10.py \
      --config.method=tjml_dtp --workdir=runs/lenet_cifar10
"""

from experiments.configs import lenet_mnist


def get_config():
  c = lenet_mnist.get_config()
  c.dataset = 'cifar10'
  c.augment = True
  c.epochs = 90
  c.optimizer.schedule = 'cosine'
  return c
