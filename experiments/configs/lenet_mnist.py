r"""LeNet on MNIST (Table 1), TJML-DTP by default.

  python -m experiments.train --config=experiments/configs/lenet_mnist.py \
      --config.method=tjml_dtp --workdir=runs/lenet_mnist

Hyper-parameters of the forward pass and LDRL: scalingDTP's LeNet config
(conf/model_network/dtp_lenet.yaml): batch 256, SGD lr 0.03618 momentum 0.9 wd 1e-4,
beta 0.4655, K = [41, 51, 24], sigma = [0.4164, 0.3826, 0.1395], feedback lr
[7.19e-4, 1.25e-4, 3.54e-2]. Expected: see BUILD_NOTES.md (measured, with command).
"""

from tp_jax import config as config_lib


def get_config():
  c = config_lib.default()
  c.model = 'lenet'
  c.dataset = 'mnist'
  c.epochs = 10
  return c
