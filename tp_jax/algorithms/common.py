"""What every training algorithm shares: the state, the step signature, optimisers."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tp_jax import config as config_lib
from tp_jax import layers
from tp_jax import network

Array = jax.Array
Batch = tuple[Array, Array]  # (x_NHWC float32, labels int32)
# A sweep member's own values of scalar hyper-parameters, by config path ('beta',
# 'optimizer.lr', 'feedback.noise': a tuple, one per trained block); see tp_jax.sweep.
HParams = dict[str, Any]


class TrainState(NamedTuple):
  """Everything a step changes. ``fb_*`` are () for methods without feedback weights."""

  step: Array
  params: network.Params
  opt_state: Any
  fb_params: Any = ()
  fb_opt_state: Any = ()
  # The member's swept hyper-parameters (HParams), traced; set by tp_jax.train's init
  # ({} without a sweep), read there to build the member's algorithm.
  hparams: Any = ()


class Algorithm(NamedTuple):
  """``init(key, x) -> state``; ``step(state, batch, key) -> (state, metrics)``, pure.

  Metrics always hold scalar ``loss`` (mean cross-entropy of the forward pass before
  the update), ``accuracy`` and ``finite`` (bool: loss, targets and new parameters
  all finite); TP methods add per-block ``block_loss`` and ``targets_finite``.
  """

  init: Callable[[Array, Array], TrainState]
  step: Callable[[TrainState, Batch, Array], tuple[TrainState, dict[str, Array]]]


def check_feedback_defined(
    method: str, net: network.Net, mode: layers.FeedbackMode, input_shape: tuple[int, ...]
) -> None:
  """Traces the feedback of blocks 2..N in ``mode`` on shapes only (nothing is computed),
  so that a feedback one of net's layers refuses (GELU's integral, IJMC of a conv or of a
  non-square dense, feedback weights on an exactly invertible coupling) is a ConfigError
  before anything is compiled."""

  def forward(key, x):
    params = network.init(net, key, x)
    return params, network.forward(net, params, x)

  def feedbacks(params, hs, ctxs):
    return [
        network.block_feedback(net, n, params[n], hs[n], ctxs[n], mode) for n in range(1, len(net))
    ]

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  try:
    params, (hs, ctxs) = jax.eval_shape(forward, jax.random.key(0), x)
  except Exception:  # pylint: disable=broad-except
    return  # net does not take these images: the run's input check says so, with its data
  try:
    jax.eval_shape(feedbacks, params, hs, ctxs)
  except layers.FeedbackError as e:
    raise config_lib.ConfigError(
        f'method={method!r} propagates targets with {mode}, '
        f'which {net.name} does not define: {e}'
    ) from None


def make_optimizer(
    opt: ml_collections.ConfigDict, total_steps: int, hparams: HParams | None = None
) -> optax.GradientTransformation:
  """SGD with momentum (the reference TP code's choice) or Adam, L2 weight decay,
  constant or cosine learning rate (cosine decays to ``lr * cosine_alpha``).

  ``hparams``: a sweep member's traced values (``TrainState.hparams``), which replace
  ``opt``'s lr, momentum and weight decay where given. A traced momentum always keeps a
  momentum state (one of 0 then adds nothing); the config's 0 means none."""
  hparams = hparams or {}
  lr = hparams.get('optimizer.lr', opt.lr)
  if opt.schedule == 'cosine':
    lr = optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=opt.cosine_alpha)
  if opt.name == 'sgd':
    base = optax.sgd(lr, momentum=hparams.get('optimizer.momentum', opt.momentum or None))
  else:
    base = optax.adam(lr)
  weight_decay = hparams.get('optimizer.weight_decay', opt.weight_decay)
  return optax.chain(optax.add_decayed_weights(weight_decay), base)


def apply_grads(tx: optax.GradientTransformation, params, opt_state, grads):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def all_finite(tree) -> Array:
  leaves = jax.tree.leaves(tree)
  return (
      jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves])) if leaves else jnp.array(True)
  )


def init_forward(
    net: network.Net, tx: optax.GradientTransformation, key: Array, x: Array
) -> TrainState:
  params = network.init(net, key, x)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def finish_tp_step(
    tx: optax.GradientTransformation, state: TrainState, grads, metrics: dict[str, Array], **changes
) -> tuple[TrainState, dict]:
  """Applies a TP method's forward gradients and completes its metrics."""
  params, opt_state = apply_grads(tx, state.params, state.opt_state, grads)
  metrics['finite'] = (
      jnp.isfinite(metrics['loss']) & jnp.all(metrics['targets_finite']) & all_finite(params)
  )
  return state._replace(step=state.step + 1, params=params, opt_state=opt_state, **changes), metrics
