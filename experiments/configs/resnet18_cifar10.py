r"""ResNet-18 on CIFAR-10: an extension of the paper (which studies skip connections
only empirically), with the CIFAR variant of ``models.resnet18``.

  python -m experiments.train --config=experiments/configs/resnet18_cifar10.py \
      --config.method=tjml_dtp --workdir=runs/resnet18_cifar10

Where each value comes from:
* dataset, augmentation (random crop with 4-pixel padding, horizontal flip), batch 128,
  90 epochs, forward SGD lr 0.05 momentum 0.9 wd 1e-4 with a cosine schedule, beta 0.7:
  as our Simplified-VGG config (scalingDTP's VGG defaults), not tuned for ResNet (ours).
* width 64 (64-512 channels): ResNet-18's (He et al. 2016; kuangliu/pytorch-cifar, the
  variant scalingDTP's ResNet adapts). ``--config.model_kwargs.width=16`` is the narrow
  variant for CPU runs (ours).
* ELU: as every other model here (scalingDTP's LeNet/VGG); ResNet's own is ReLU.
* LDRL (K, sigma, feedback lr per block, blocks 2..10 = the eight units and the
  head): scalingDTP has no ResNet configuration that we could find, so these are ours,
  VGG's per-block values mapped by stage: the two units of stage s take VGG block
  s + 1's values, the head takes VGG's head's.
"""

from tp_jax import config as config_lib

# VGG's LDRL values for its blocks 2..5 (one per stage here) and its head.
_VGG_STAGES = dict(iterations=(20, 30, 35, 55), noise=(0.4, 0.4, 0.2, 0.2),
                   lr=(1e-4, 3.5e-4, 8e-3, 8e-3))
_VGG_HEAD = dict(iterations=20, noise=0.08, lr=0.18)


def get_config():
  c = config_lib.default()
  c.model = 'resnet18'
  c.model_kwargs.width = 64
  c.dataset = 'cifar10'
  c.augment = True
  c.epochs = 90
  c.batch_size = 128
  c.beta = 0.7
  c.optimizer.lr = 0.05
  c.optimizer.schedule = 'cosine'
  for field in ('iterations', 'noise', 'lr'):
    per_unit = tuple(v for v in _VGG_STAGES[field] for _ in range(2))
    c.feedback[field] = per_unit + (_VGG_HEAD[field],)
  return c
