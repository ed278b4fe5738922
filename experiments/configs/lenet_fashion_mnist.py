r"""LeNet on Fashion-MNIST (Table 1); same hyper-parameters as lenet_mnist.py.

  python -m experiments.train --config=experiments/configs/lenet_fashion_mnist.py \
      --config.method=tjml_dtp --workdir=runs/lenet_fmnist
"""

from experiments.configs import lenet_mnist


def get_config():
  c = lenet_mnist.get_config()
  c.dataset = 'fashion_mnist'
  return c
