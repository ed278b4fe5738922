"""Models built from ``tp_jax.layers``, looked up by name. The DTP blocks are part of
each definition; the feedback path is derived from it (``tp_jax.network``)."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import flax.linen as nn

from tp_jax import conv as conv_lib
from tp_jax import data
from tp_jax import derived
from tp_jax import layers as L
from tp_jax import reversible as reversible_lib
from tp_jax.network import Net

_POOL_3x3 = dict(window=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
_PAD_2 = ((2, 2), (2, 2))


def lenet(
    num_classes: int = 10, act: str = 'elu', negative_slope: float = 0.01, conv_impl: str = 'auto'
) -> Net:
  """The reference TP LeNet (scalingDTP / Meulemans et al.): works on 28x28 and 32x32.

  Blocks: (conv 5x5 32, act, pool 3x3/2 pad 1), (conv 5x5 64, act, pool),
  (flatten, dense 512, act), (dense num_classes). ``conv_impl``: see ``layers.Conv``.
  """
  a = lambda: L.Activation(act, negative_slope)
  conv = lambda c: L.Conv(c, (5, 5), padding=_PAD_2, impl=conv_impl)
  return Net(
      (
          L.Sequential([conv(32), a(), L.MaxPool(**_POOL_3x3)]),
          L.Sequential([conv(64), a(), L.MaxPool(**_POOL_3x3)]),
          L.Sequential([L.Reshape((-1,)), L.Dense(512), a()]),
          L.Sequential([L.Dense(num_classes)]),
      ),
      name='lenet',
  )


def simple_vgg(
    num_classes: int = 10,
    act: str = 'elu',
    negative_slope: float = 0.01,
    channels: tuple[int, ...] = (128, 128, 256, 256, 512),
    conv_impl: str = 'auto',
) -> Net:
  """Simplified VGG: blocks (conv 3x3 SAME, act, max-pool 2x2/2) then (flatten, dense)."""
  blocks = tuple(
      L.Sequential(
          [
              L.Conv(c, (3, 3), padding='SAME', impl=conv_impl),
              L.Activation(act, negative_slope),
              L.MaxPool((2, 2), (2, 2), 'VALID'),
          ]
      )
      for c in channels
  )
  head = L.Sequential([L.Reshape((-1,)), L.Dense(num_classes)])
  return Net(blocks + (head,), name='simple_vgg')


def _mixer_token_mlp(tokens: int, act: L.Activation) -> L.Sequential:
  """Act(FC(Norm(x)^T))^T: the token-mixing map of a Mixer block (Norm, transpose and FC
  as one ``NormDense``, regrouped: one product less in the block's backward)."""
  return L.Sequential([L.NormDense(tokens, mix_tokens=True), act, L.Transpose((2, 1))])


def _mixer_channel_mlp(channel_dim: int, out: int, act: L.Activation) -> L.Sequential:
  """FC(Act(FC(Norm(x)))): the channel-mixing map of a Mixer block (Norm then FC as one
  ``NormDense``, regrouped: one product less in the block's backward)."""
  return L.Sequential([L.NormDense(channel_dim), act, L.Dense(out)])


def _mixer(name: str, mixing_blocks, num_classes: int, patch: int, hidden: int, tokens: int) -> Net:
  """Patch embedding, ``mixing_blocks``, (Norm, mean over tokens), dense head."""
  embed = L.Sequential(
      [L.Conv(hidden, (patch, patch), (patch, patch), 'VALID'), L.Reshape((tokens, hidden))]
  )
  pool = L.Sequential([L.LayerNorm(), L.Mean(axis=1)])
  head = L.Sequential([L.Dense(num_classes)])
  return Net((embed, *mixing_blocks, pool, head), name=name)


def mlp_mixer(
    num_classes: int = 10,
    act: str = 'leaky_relu',
    negative_slope: float = 0.01,
    patch: int = 4,
    hidden: int = 128,
    channel_dim: int = 256,
    num_blocks: int = 4,
    image_hw: tuple[int, int] = (32, 32),
    reversible: bool = False,
) -> Net:
  """MLP-Mixer as in the paper: patch embedding, then per Mixer block a token unit
  Act(FC(Norm(x)^T))^T + x (eq. 46) and a channel unit FC(Act(FC(Norm(x)))) + x
  (eq. 44); then (Norm, mean over tokens) and a dense head. Each unit is a DTP block.

  ``reversible`` (``reversible_mixer``, the paper's Table 4 model): each Mixer block
  (token + channel unit) is instead one additive coupling (``reversible.Coupling``)
  whose f is the token-mixing map and g the channel-mixing map, each on half of the
  ``hidden`` channels; each coupling is one DTP block whose feedback is its exact inverse.
  """
  name = 'reversible_mixer' if reversible else 'mlp_mixer'
  if reversible and hidden % 2:
    raise ValueError(f'{name}: hidden must be even to split into two halves, got {hidden}')
  tokens = (image_hw[0] // patch) * (image_hw[1] // patch)
  a = lambda: L.Activation(act, negative_slope)
  blocks = []
  for _ in range(num_blocks):
    if reversible:
      blocks.append(
          reversible_lib.Coupling(
              _mixer_token_mlp(tokens, a()), _mixer_channel_mlp(channel_dim, hidden // 2, a())
          )
      )
    else:
      blocks.append(L.Residual(_mixer_token_mlp(tokens, a())))
      blocks.append(L.Residual(_mixer_channel_mlp(channel_dim, hidden, a())))
  return _mixer(name, blocks, num_classes, patch, hidden, tokens)


reversible_mixer = functools.partial(mlp_mixer, reversible=True)


def mlp(
    num_classes: int = 10,
    act: str = 'tanh',
    negative_slope: float = 0.01,
    widths: tuple[int, ...] = (256, 256, 256, 256, 256),
) -> Net:
  """The FWDTP paper's MLP: (flatten, dense, act) blocks, then a dense head.

  IJML-DTP needs every block after the first to be square (W^-1 must exist); set
  ``widths`` equal to each other and to ``num_classes`` for that.
  """
  a = lambda: L.Activation(act, negative_slope)
  first = L.Sequential([L.Reshape((-1,)), L.Dense(widths[0]), a()])
  rest = tuple(L.Sequential([L.Dense(w), a()]) for w in widths[1:])
  return Net((first, *rest, L.Sequential([L.Dense(num_classes)])), name='mlp')


MODELS: dict[str, Callable[..., Net]] = {
    'lenet': lenet,
    'simple_vgg': simple_vgg,
    'mlp_mixer': mlp_mixer,
    'mlp': mlp,
    'reversible_mixer': reversible_mixer,
}


def get(name: str, **kwargs) -> Net:
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; valid models: {sorted(MODELS)}')
  return MODELS[name](**kwargs)


def for_config(cfg) -> Net:
  """``cfg.model`` built with ``cfg.model_kwargs`` for ``cfg.dataset``'s classes."""
  num_classes = data.info(cfg.dataset).num_classes
  if 'num_classes' in cfg.model_kwargs:
    raise ValueError(
        f'model_kwargs.num_classes: the number of classes comes from the '
        f'dataset ({cfg.dataset}: {num_classes}); remove it'
    )
  net = get(cfg.model, num_classes=num_classes, **cfg.model_kwargs)
  return with_derived_feedback(net) if cfg.derived_feedback else net


def with_derived_feedback(net: Net) -> Net:
  """``net`` with every block wrapped as ``derived.Derived``: the same forward, each
  block's feedback its exact J^T by autodiff instead of its layers' closed forms (a
  block's params move under ``'module'``)."""
  return Net(tuple(derived.Derived(b, parent=None) for b in net.blocks), name=net.name)


def input_shape(cfg) -> tuple[int, int, int]:
  """The image shape ``cfg``'s model is built for: ``cfg.dataset``'s, at the model's own
  ``image_hw`` where it has one (the Mixers: their token count is fixed)."""
  h, w, c = data.info(cfg.dataset).image_shape
  image_hw = inspect.signature(MODELS[cfg.model]).parameters.get('image_hw')
  if image_hw is not None:
    h, w = cfg.model_kwargs.get('image_hw', image_hw.default)
  return h, w, c


# --------------------------------------------------------------------------------------
# ResNet-18 (an extension of the paper: it studies skip connections empirically only)


def _group_norm(channels: int) -> nn.GroupNorm:
  """GroupNorm with 32 groups (Wu & He 2018), fewer where the width has fewer channels.
  Not BatchNorm: its batch statistics make a block's output depend on the other
  examples and on running state, so a target for one example is not defined."""
  return nn.GroupNorm(num_groups=math.gcd(32, channels))


class PreActDownsample(nn.Module):
  """The pre-activation unit that changes resolution and width (He et al. 2016b, with
  the projection shortcut on the pre-activated input): a = act(GN(x)),
  F(x) = conv3x3(act(GN(conv3x3/s(a)))) + conv1x1/s(a). A plain Flax module: its
  feedback (g* + P^T, with P the projection) is derived by autodiff. Its ``nn.Conv``s
  run on ``tp_jax.conv`` (``conv_impl`` as ``layers.Conv``'s): XLA:CPU's own weight
  gradient made LDRL's step 9-17x slower at 2-4 stages (BENCHMARKS)."""

  features: int
  strides: tuple[int, int] = (2, 2)
  act: str = 'elu'
  negative_slope: float = 0.01
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    sigma = L.ACTIVATIONS[self.act](self.negative_slope).f
    conv = lambda k, s, **kw: nn.Conv(
        self.features,
        k,
        s,
        padding='SAME',
        kernel_init=L.torch_default_init,
        conv_general_dilated=conv_lib.flax_conv_general_dilated(self.conv_impl),
        **kw,
    )
    a = sigma(_group_norm(x.shape[-1])(x))
    y = conv((3, 3), self.strides)(a)
    y = conv((3, 3), (1, 1))(sigma(_group_norm(self.features)(y)))
    return y + conv((1, 1), self.strides, use_bias=False)(a)


def resnet18(
    num_classes: int = 10,
    act: str = 'elu',
    negative_slope: float = 0.01,
    width: int = 64,
    conv_impl: str = 'auto',
    stages: int = 4,
) -> Net:
  """ResNet-18, CIFAR variant (3x3 stem, no max-pool; four stages of two basic units,
  ``width`` x (1, 2, 4, 8) channels, strides 1, 2, 2, 2), pre-activation (He et al.
  2016b) so that every unit with an identity skip is exactly F = f + id, one DTP block
  with G* = g* + id (``layers.Residual``): f = conv(act(GN(conv(act(GN(x)))))), its
  convs closed-form, its GroupNorms derived. The three units that downsample are one
  DTP block each too (``PreActDownsample``, derived). Blocks: the stem conv, the eight
  units, and the head (GN, act, global average pooling, dense): 10 in all.

  ``stages`` < 4 keeps only the first ``stages`` stages (the head then pools
  ``width`` x 2^(stages - 1) channels): 2 x ``stages`` + 2 blocks, a depth knob for the
  scaling figure (``experiments.reproduce.scaling``); the default is the full network.
  """
  if isinstance(stages, bool) or stages not in (1, 2, 3, 4):
    raise ValueError(f'resnet18: stages must be 1, 2, 3 or 4, got {stages!r}')
  a = lambda: L.Activation(act, negative_slope)
  conv = lambda c, s=(1, 1): L.Conv(c, (3, 3), s, padding='SAME', impl=conv_impl)
  blocks = [L.Sequential([conv(width)])]
  for stage, c in enumerate(width * m for m in (1, 2, 4, 8)[:stages]):
    for unit in range(2):
      if stage > 0 and unit == 0:
        blocks.append(PreActDownsample(c, (2, 2), act, negative_slope, conv_impl))
      else:
        blocks.append(
            L.Residual(L.Sequential([_group_norm(c), a(), conv(c), _group_norm(c), a(), conv(c)]))
        )
  top = width * 2 ** (stages - 1)  # the last stage's channels
  blocks.append(L.Sequential([_group_norm(top), a(), L.Mean(axis=(1, 2)), L.Dense(num_classes)]))
  return Net(tuple(blocks), name='resnet18')


MODELS['resnet18'] = resnet18
