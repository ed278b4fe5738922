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
  head): scalingDTP has no ResNet configuration that we could find, so these are ours.
  K and sigma are VGG's per-block values mapped by stage (the two units of stage s take
  VGG block s + 1's, the head VGG's head's). The feedback lr per stage, 3e-6, 3e-6,
  1e-5, 3e-5 (the head keeps VGG's head's 0.18), sits a 3x step or more below where, on
  one CIFAR-10 batch of 128 from the initial weights, a block's feedback weights went
  non-finite within its K iterations or its gradient norm grew several-fold, at widths
  16 and 64 (the measurements: BUILD_NOTES). VGG's 1e-4 for every unit made stage 1's
  weights non-finite at width 16. These were measured before LDRL's noisy
  reconstruction took the clean input's linearisation (BUILD_NOTES, "LDRL and the
  linearisation point"), which removed the growth that made LDRL diverge here; not
  re-tuned since.
"""

from experiments.configs import vgg_cifar10

# LDRL values per stage (K and sigma VGG's for its blocks 2..5; the lr ours) and for the head.
_PER_STAGE = dict(
    iterations=(20, 30, 35, 55), noise=(0.4, 0.4, 0.2, 0.2), lr=(3e-6, 3e-6, 1e-5, 3e-5)
)
_HEAD = dict(iterations=20, noise=0.08, lr=0.18)


def get_config():
  c = vgg_cifar10.get_config()  # the training protocol: scalingDTP's VGG defaults
  c.model = 'resnet18'
  c.model_kwargs.width = 64
  for field in ('iterations', 'noise', 'lr'):
    per_unit = tuple(v for v in _PER_STAGE[field] for _ in range(2))
    c.feedback[field] = per_unit + (_HEAD[field],)
  return c
