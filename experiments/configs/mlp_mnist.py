r"""The FWDTP paper's MLP (784-256x5-10, tanh) on MNIST, for FWDTP and PJML-DTP.

  python -m experiments.train --config=experiments/configs/mlp_mnist.py \
      --config.method=fwdtp --workdir=runs/mlp_mnist

FWDTP reference defaults: batch 256, lr 1e-3 (plain SGD), stepsize (beta) 1e-2,
B ~ U(-1e-3, 1e-3), 100 epochs.
"""

from tp_jax import config as config_lib


def get_config():
  c = config_lib.default()
  c.model = 'mlp'
  c.model_kwargs = {'act': 'tanh', 'widths': (256,) * 5}
  c.dataset = 'mnist'
  c.epochs = 100
  c.beta = 1e-2
  c.optimizer.lr = 1e-3
  c.optimizer.momentum = 0.0
  c.optimizer.weight_decay = 0.0
  c.feedback.iterations = (1,)  # one value for each of the 5 trained blocks
  c.feedback.noise = (0.1,)
  c.feedback.lr = (1e-3,)
  return c
