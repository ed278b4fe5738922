r"""MLP-Mixer on CIFAR-10 (Table 3): patch 4, hidden 128, channel MLP 256, 4 Mixer
blocks (8 skip units), LeakyReLU.

  python -m experiments.train --config=experiments/configs/mixer_cifar10.py \
      --config.method=tjml_dtp --workdir=runs/mixer_cifar10

The paper gives no LDRL hyper-parameters for the Mixer; ours reuse the VGG values
(first two), one value for every trained block (8 units, the mean block and the head),
our own choice, stated here.
"""

from experiments.configs import vgg_cifar10


def get_config():
  c = vgg_cifar10.get_config()  # the training protocol: scalingDTP's VGG defaults
  c.model = 'mlp_mixer'
  c.model_kwargs = {'act': 'leaky_relu', 'num_blocks': 4}
  c.feedback.iterations = (20,)
  c.feedback.noise = (0.2,)
  c.feedback.lr = (1e-4,)
  return c
