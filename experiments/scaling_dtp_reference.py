r"""The reference's own LDRL and BP training steps, from a local checkout of scalingDTP
(ernoult/scalingDTP, written against commit 19b0880), for ``bench_cpu --reference_dir``.

Nothing of the reference is vendored and none of its files is edited: ``load(path)`` puts
the checkout on ``sys.path`` (only when called) and imports its ``DTP`` (their L-DRL),
``BaselineModel`` (backprop) and ``LeNet``; ``ldrl_step`` and ``bp_step`` build them with
the LeNet config the checkout ships (``conf/model_network/dtp_lenet.yaml``, over the
classes' defaults, as its Hydra config does) and return ``k -> loss after k steps``
closures that call their ``training_step``. torch and the checkout's imports must be
installed by the user; tested with torch 2.13 (CPU), pytorch-lightning 1.9.5,
simple-parsing 0.0.21.post1, torchmetrics 0.10.3 (their ``Accuracy()`` predates
``task=``), wandb, rich, omegaconf and plotly:

  pip install torch pytorch-lightning==1.9.5 simple-parsing==0.0.21.post1 \
      'torchmetrics<0.11' wandb rich omegaconf plotly

What is set from outside, so that their steps run without a Lightning ``Trainer``:
- ``trainer`` is None. Their code checks ``self.trainer is not None`` before logging and
  plotting and falls back to ``loss.backward()`` (their unit-test path), but
  pytorch-lightning 1.9.5 raises on reading ``trainer`` of an unattached module (older
  versions returned None). The models are subclasses that only override that property.
- The optimisers are their own ``configure_optimizers()``, handed to the attributes their
  ``feedback_optimizers()`` / ``forward_optimizer`` read without a Trainer, in the order
  their Trainer branch assigns them.
- ``datamodule`` is a stand-in with the two fields their ``Model.__init__`` reads
  (``batch_size``, ``dims``).
- ``pl_bolts`` (only a type hint there) and ``meulemans_dtp`` (a git submodule, imported
  by their package's ``__init__`` for the Meulemans network and model, neither used here)
  are stand-in modules when no installed or checked-out copy provides them; a stand-in
  class refuses to be instantiated.
- Their constructors' prints go to stderr, so that bench_cpu's stdout stays the report.

A BP step is their ``training_step`` (forward and un-reduced cross-entropy), the batch mean
their ``shared_step_end`` takes, then ``zero_grad``, ``backward`` and ``step`` of their
optimiser, as Lightning's automatic optimisation does. An LDRL step is their
``training_step``: feedback training layer by layer (K SGD steps each, with their per-
iteration angle/distance metrics) then one forward update; it steps the optimisers itself.
Input is NCHW float32 with NCHW's own strides, as their ``forward_loss`` needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from absl import app
import numpy as np

Steps = Callable[[int], float]  # k -> the loss after k steps, blocking

# Files a scalingDTP checkout has, and that this module uses.
CHECKOUT_FILES = (
    'target_prop/models/dtp.py',
    'target_prop/models/baseline.py',
    'target_prop/networks/lenet.py',
    'conf/model_network/dtp_lenet.yaml',
)
LENET_CONFIG = 'conf/model_network/dtp_lenet.yaml'
# Top-level modules that importing their DTP, BaselineModel and LeNet needs, with the pip
# requirement that provides each.
REQUIREMENTS = {
    'torch': 'torch',
    'pytorch_lightning': 'pytorch-lightning==1.9.5',
    'simple_parsing': 'simple-parsing==0.0.21.post1',
    'torchmetrics': "'torchmetrics<0.11'",
    'yaml': 'pyyaml',
    'wandb': 'wandb',
    'rich': 'rich',
    'omegaconf': 'omegaconf',
    'plotly': 'plotly',
}
# Imported by their package but not on the LDRL / BP path: stand-ins when absent.
STAND_INS = ('pl_bolts', 'meulemans_dtp')


@dataclasses.dataclass(frozen=True)
class Reference:
  """The imported checkout: its directory, classes and modules."""

  path: Path
  dtp: type  # their DTP (L-DRL), with ``trainer`` None
  baseline: type  # their BaselineModel (BP), with ``trainer`` None
  lenet: type
  misc_config: type
  is_trainable: Callable[[Any], bool]
  torch: types.ModuleType
  versions: str  # 'torch 2.13.0+cpu, pytorch-lightning 1.9.5'
  stand_ins: tuple[str, ...]  # the STAND_INS that no installed copy provided

  def lenet_hparams(self) -> dict[str, Any]:
    """The ``model`` section of the checkout's LeNet config."""
    import yaml  # pylint: disable=g-import-not-at-top

    return yaml.safe_load((self.path / LENET_CONFIG).read_text())['model']


def check_checkout(path: str | os.PathLike) -> Path:
  """``path`` resolved, or app.UsageError naming what a scalingDTP checkout lacks there."""
  root = Path(path).expanduser().resolve()
  if not root.is_dir():
    raise app.UsageError(f'--reference_dir={path}: not a directory (want a scalingDTP checkout)')
  missing = [f for f in CHECKOUT_FILES if not (root / f).is_file()]
  if missing:
    raise app.UsageError(
        f'--reference_dir={path} does not look like a scalingDTP checkout '
        f'(ernoult/scalingDTP): missing {", ".join(missing)}'
    )
  return root


def missing_requirements() -> list[str]:
  """The modules of REQUIREMENTS that are not installed."""
  return [mod for mod in REQUIREMENTS if importlib.util.find_spec(mod) is None]


class _StandInClass:
  """A name imported from a stand-in module: a base class or type hint, never built."""

  def __init__(self, *args, **kwargs):
    del args, kwargs
    raise RuntimeError(
        f'{type(self).__module__}.{type(self).__qualname__} is a stand-in (the module is not '
        'installed); the reference path that bench_cpu uses does not build it'
    )


class _StandInModule(types.ModuleType):

  def __getattr__(self, name: str) -> type:
    if name.startswith('__'):
      raise AttributeError(name)
    cls = type(name, (_StandInClass,), {'__module__': self.__name__, '__qualname__': name})
    setattr(self, name, cls)
    return cls


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Last on ``sys.meta_path``: serves the names under ``roots`` that no finder before it
  (installed packages, the checkout) provides."""

  def __init__(self, roots: Sequence[str]):
    self.roots = tuple(roots)

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name.split('.')[0] not in self.roots:
      return None
    return importlib.machinery.ModuleSpec(name, self, is_package=True)

  def create_module(self, spec):
    return _StandInModule(spec.name)

  def exec_module(self, module):
    module.__path__ = []


@contextlib.contextmanager
def _stdout_to_stderr():
  with contextlib.redirect_stdout(sys.stderr):
    yield


def _unattached(cls: type) -> type:
  """``cls`` whose ``trainer`` is None, as in their Trainer-less unit tests."""
  return type(cls.__name__, (cls,), {'trainer': property(lambda self: None)})


def load(path: str | os.PathLike) -> Reference:
  """Imports the checkout at ``path`` (put first on ``sys.path``).

  Raises:
    app.UsageError: ``path`` is not a scalingDTP checkout, a requirement is missing or
      fails to import, or another ``target_prop`` was imported first.
  """
  root = check_checkout(path)
  missing = missing_requirements()
  if missing:
    raise app.UsageError(
        f"--reference_dir needs the reference's requirements; not installed: "
        f'{", ".join(missing)} (pip install {" ".join(REQUIREMENTS[m] for m in missing)})'
    )
  if str(root) not in sys.path:
    sys.path.insert(0, str(root))
  stand_ins = _StandIns(STAND_INS)
  sys.meta_path.append(stand_ins)
  try:
    with _stdout_to_stderr(), warnings.catch_warnings():
      warnings.simplefilter('ignore', DeprecationWarning)  # pkg_resources, etc.
      import pytorch_lightning  # pylint: disable=g-import-not-at-top
      import torch  # pylint: disable=g-import-not-at-top
      import target_prop  # pylint: disable=g-import-not-at-top
      from target_prop.config import MiscConfig  # pylint: disable=g-import-not-at-top
      from target_prop.models.baseline import BaselineModel  # pylint: disable=g-import-not-at-top
      from target_prop.models.dtp import DTP  # pylint: disable=g-import-not-at-top
      from target_prop.networks.lenet import LeNet  # pylint: disable=g-import-not-at-top
      from target_prop.utils.utils import is_trainable  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    # A missing module, or an installed one of a version their code predates.
    raise app.UsageError(
        f'--reference_dir={path}: importing the reference failed: {type(e).__name__}: {e}'
    ) from e
  finally:
    sys.meta_path.remove(stand_ins)
  where = Path(target_prop.__file__).resolve().parent
  if where != root / 'target_prop':
    raise app.UsageError(
        f'--reference_dir={path}: target_prop was imported from {where}, not from the checkout'
    )
  return Reference(
      path=root,
      dtp=_unattached(DTP),
      baseline=_unattached(BaselineModel),
      lenet=LeNet,
      misc_config=MiscConfig,
      is_trainable=is_trainable,
      torch=torch,
      versions=f'torch {torch.__version__}, pytorch-lightning {pytorch_lightning.__version__}',
      stand_ins=tuple(
          r
          for r in STAND_INS
          if any(
              isinstance(m, _StandInModule) and n.split('.')[0] == r
              for n, m in list(sys.modules.items())
          )
      ),
  )


def _batch(ref: Reference, x: np.ndarray, y: np.ndarray):
  """NHWC images and int labels as their NCHW float32 and int64 tensors, the images with
  NCHW's own strides. (A one-channel array merely transposed to NCHW counts as contiguous
  but has the channel stride 1 of channels-last; torch's convolutions then return
  channels-last outputs, on which their ``forward_loss``'s ``.view`` fails.)"""
  torch = ref.torch
  xt = torch.from_numpy(np.array(x, np.float32)).permute(0, 3, 1, 2)
  xt = xt.clone(memory_format=torch.contiguous_format)
  return xt, torch.from_numpy(np.array(y, np.int64))


def _build(ref: Reference, model_cls: type, hparams, image_shape: tuple[int, ...], seed: int):
  """``model_cls`` on their LeNet for ``image_shape`` (H, W, C) images, on the CPU."""
  torch = ref.torch
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(seed)
  h, w, c = image_shape
  datamodule = types.SimpleNamespace(batch_size=hparams.batch_size, dims=(c, h, w))
  with _stdout_to_stderr(), warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return model_cls(
        datamodule=datamodule,
        network=ref.lenet(in_channels=c, n_classes=10),
        hparams=hparams,
        config=ref.misc_config(device='cpu', seed=seed),
    )


def dtp_hparams(ref: Reference, iterations: Sequence[int] | None = None):
  """Their ``DTP.HParams`` with the checkout's LeNet config over the defaults (the optimiser
  sections merged field by field, as Hydra merges them); ``iterations`` replaces K."""
  base = ref.dtp.HParams()
  over = dict(ref.lenet_hparams())
  for name in ('b_optim', 'f_optim'):
    if name in over:
      over[name] = dataclasses.replace(getattr(base, name), **over[name])
  if iterations is not None:
    over['feedback_training_iterations'] = [int(k) for k in iterations]
  return dataclasses.replace(base, **over)


def ldrl_step(
    ref: Reference, x: np.ndarray, y: np.ndarray, iterations: Sequence[int] | None = None, seed=0
) -> Steps:
  """Their L-DRL (``DTP``) training step on LeNet with the LeNet config, on the one batch
  ``x`` (NHWC), ``y``; ``iterations`` replaces the config's K = [41, 51, 24]."""
  hp = dtp_hparams(ref, iterations)
  model = _build(ref, ref.dtp, hp, x.shape[1:], seed)
  optimizers = [c['optimizer'] for c in model.configure_optimizers()]
  # Their feedback_optimizers() with a Trainer: [G_N, ..., G_1, None], None where untrainable.
  feedback = [optimizers.pop(0) if ref.is_trainable(g) else None for g in model.backward_net[:-1]]
  if len(optimizers) != 1:
    raise RuntimeError(f'expected one forward optimiser left, got {len(optimizers)}')
  model._feedback_optimizers = feedback + [None]  # pylint: disable=protected-access
  model._forward_optimizer = optimizers[0]  # pylint: disable=protected-access
  model.train()
  batch = _batch(ref, x, y)

  def steps(k: int) -> float:
    with _stdout_to_stderr(), warnings.catch_warnings():
      warnings.simplefilter('ignore')  # self.log without a Trainer
      for _ in range(k):
        out = model.training_step(batch, 0)
    return float(out['loss'])

  return steps


def bp_step(ref: Reference, x: np.ndarray, y: np.ndarray, seed=0) -> Steps:
  """Their backprop (``BaselineModel``) training step on LeNet, on the one batch ``x``
  (NHWC), ``y``, with the forward optimiser of their LeNet LDRL config (SGD, lr, momentum
  and weight decay), as tp_jax's LeNet configs use for BP too."""
  f_optim = dtp_hparams(ref).f_optim
  hp = dataclasses.replace(
      ref.baseline.HParams(),
      f_optim=f_optim,
      batch_size=int(ref.lenet_hparams().get('batch_size', x.shape[0])),
  )
  model = _build(ref, ref.baseline, hp, x.shape[1:], seed)
  optimizer = model.configure_optimizers()['optimizer']
  model.train()
  batch = _batch(ref, x, y)

  def steps(k: int) -> float:
    for _ in range(k):
      loss = model.training_step(batch, 0)['loss'].mean()
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
    return loss.item()

  return steps
