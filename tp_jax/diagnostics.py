"""How a TP method's updates relate to backprop, per DTP block, on one batch.

For a state and a batch, per block n:

  bp_angle[n]       the angle in degrees between the block's TP update direction (the
                    gradient of its local loss that the method's step applies,
                    ``dtp.local_grads``) and BP's gradient of the mean cross-entropy at
                    the same parameters and batch; all of the block's parameters are
                    one vector.
  bp_norm_ratio[n]  ||TP gradient|| / (beta ||BP gradient||). With exact feedback the
                    TP gradient tends to beta times BP's as beta -> 0 (the first target
                    is h_N - beta dL/dh_N), so 1 means "the size of gradient descent
                    on beta L".
  tjml[n]           the relative TJML ||J_G - J_F^T||_F / ||J_F||_F of the block's
                    feedback, blocks 2..N only (block 1's feedback is never used), so
                    the list is one shorter. Matrix-free (``jml``'s estimator) with
                    ``NUM_PROBES`` Gaussian probes per example drawn from an explicit
                    key, on the batch's first ``TJML_EXAMPLES`` examples; the mean of
                    the per-example ratios, as ``jml.block_jml``.

The analytical methods' feedback is built from the forward parameters; LDRL, DTP and
FWDTP use their feedback weights ``state.fb_params`` in ``layers.LEARNED`` mode. For
LDRL and DTP these are the weights before the step's feedback training on this
batch (the step trains them first). BP has no DTP blocks: it gets no diagnostics.

``compile_for_run`` compiles the diagnostics as their own program, off the training
step's path. It reads the state without changing it and draws its probes from a key
of its own (folded from the step), so training is unchanged by it. The batch is
the epoch's row ``state.step % steps_per_epoch`` (within an epoch the batch of the
next step; at an epoch's end its first one), without augmentation.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tp_jax import algorithms
from tp_jax import dtp
from tp_jax import jml
from tp_jax import layers
from tp_jax import network

Array = jax.Array

NUM_PROBES = 4
"""Probes per example for the TJML estimate: enough averaged over examples, cheap."""

TJML_EXAMPLES = 32
"""The TJML estimate takes the batch's first (at most) this many examples: on LeNet a
probe of the second block costs about a training step of the whole batch."""

FIRST_BLOCK = {'bp_angle': 1, 'bp_norm_ratio': 1, 'tjml': 2}
"""The per-block lists ``block_diagnostics`` returns (metrics.jsonl keys), and the
(1-based) block each list starts at."""

_KEY_SEED = 0xD1A6  # the probes' own key, folded with the step: no training key is used


def angle_degrees(a: Array, b: Array) -> Array:
  """The angle between vectors a and b in degrees; NaN if either is zero.

  2 atan2(|u - v|, |u + v|) of the unit vectors: accurate near 0 and 180 degrees,
  where arccos of the cosine loses float32's digits."""
  na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
  u, v = a / na, b / nb
  angle = 2.0 * jnp.arctan2(jnp.linalg.norm(u - v), jnp.linalg.norm(u + v))
  return jnp.where((na > 0) & (nb > 0), jnp.degrees(angle), jnp.nan)


def _flat(tree) -> Array:
  leaves = jax.tree.leaves(tree)
  return jnp.concatenate([jnp.ravel(a) for a in leaves]) if leaves else jnp.zeros((0,))


def relative_tjml(
    net: network.Net,
    params: network.Params,
    fb_params: network.Params,
    n: int,
    h_in: Array,
    mode: layers.FeedbackMode,
    key: Array,
    num_probes: int = NUM_PROBES,
) -> Array:
  """Block n's (0-based) relative TJML on the batch h_in (its input), estimated
  matrix-free with ``num_probes`` probes per example; traceable (probes from ``key``)."""
  f, g = jml.block_fns(net, params, fb_params, n, mode)
  y, ctx = f(h_in)
  probes = jax.random.normal(key, (num_probes, *y.shape), y.dtype)
  a2, t2 = jml.probe_stats(lambda h: f(h)[0], g, h_in, y, ctx, probes)
  return jnp.mean(jnp.sqrt(jnp.mean(a2, 0) / jnp.mean(t2, 0)))


def block_diagnostics(
    net: network.Net,
    params: network.Params,
    fb_params: network.Params | None,
    mode: layers.FeedbackMode,
    beta: float,
    x: Array,
    labels: Array,
    key: Array,
    num_probes: int = NUM_PROBES,
) -> dict[str, Array]:
  """``bp_angle`` and ``bp_norm_ratio`` of shape (N,), ``tjml`` of shape (N - 1,).

  ``fb_params`` None: the feedback is built from ``params`` (the analytical methods,
  as in ``dtp.local_grads``). ``tjml`` takes the first ``TJML_EXAMPLES`` of ``x``."""
  tp, _ = dtp.local_grads(net, params, fb_params, mode, beta, x, labels)
  bp = algorithms.bp.gradient(net, params, x, labels)
  flat = [(_flat(t), _flat(b)) for t, b in zip(tp, bp)]
  hs, _ = network.forward(net, params, x)
  fb = params if fb_params is None else fb_params
  keys = jax.random.split(key, len(net))
  return dict(
      bp_angle=jnp.stack([angle_degrees(t, b) for t, b in flat]),
      bp_norm_ratio=jnp.stack([jnp.linalg.norm(t) / (beta * jnp.linalg.norm(b)) for t, b in flat]),
      tjml=jnp.stack(
          [
              relative_tjml(
                  net, params, fb, n, hs[n - 1][:TJML_EXAMPLES], mode, keys[n], num_probes
              )
              for n in range(1, len(net))
          ]
      ),
  )


def method_feedback(cfg, state) -> tuple[network.Params | None, layers.FeedbackMode] | None:
  """(feedback params or None for "the forward params", mode) of ``cfg.method``, or
  None for BP."""
  mode = algorithms.feedback_mode(cfg)
  if mode is None:
    return None
  return (state.fb_params if algorithms.has_feedback_weights(cfg.method) else None), mode


def compile_for_run(run, state) -> Callable[[object, Array], dict[str, list[float]]] | None:
  """``diagnose(state, idx_epoch) -> {key: per-block list of floats}`` for a
  ``train.Run``, compiled for ``state``'s shapes; None for BP.

  The batch is row ``state.step % steps_per_epoch`` of ``idx_epoch``, gathered and
  sharded over the mesh's data axis as the training step does. The probes' key is
  folded from a fixed key and the step (not from the seed: the seed's keys are the
  training's). With several members (seeds) the diagnostics are vmapped over the member
  axis of the state and ``idx_epoch`` and each key holds one per-block list per member,
  member m's those of its separate run (a metrics row's per-member layout). A sweep gets
  None: its members' feedback and updates differ in their hyper-parameters, which the
  diagnostics program does not take. The call waits for its result: the next training step
  donates ``state``'s buffers."""
  cfg = run.cfg
  if cfg.sweep or method_feedback(cfg, state) is None:
    return None
  replicated, batch = NamedSharding(run.mesh, P()), NamedSharding(run.mesh, P('data'))

  def diagnose(state, x_all, y_all, idx_epoch):
    idx = jax.lax.with_sharding_constraint(idx_epoch[state.step % run.steps_per_epoch], batch)
    x = jax.lax.with_sharding_constraint(x_all[idx], batch)
    y = jax.lax.with_sharding_constraint(y_all[idx], batch)
    fb_params, mode = method_feedback(cfg, state)
    key = jax.random.fold_in(jax.random.key(_KEY_SEED), state.step)
    return block_diagnostics(run.net, state.params, fb_params, mode, cfg.beta, x, y, key)

  member_axis = () if run.num_members == 1 else (run.num_members,)
  if member_axis:  # the dataset is shared, as in the training step
    diagnose = jax.vmap(diagnose, in_axes=(0, None, None, 0))
  idx_spec = jax.ShapeDtypeStruct(
      (*member_axis, run.steps_per_epoch, cfg.batch_size), jnp.int32, sharding=replicated
  )
  compiled = (
      jax.jit(diagnose, in_shardings=replicated, out_shardings=replicated)
      .lower(state, run.x_train, run.y_train, idx_spec)
      .compile()
  )

  def call(state, idx_epoch):
    out = compiled(state, run.x_train, run.y_train, idx_epoch)
    return {k: np.asarray(a.addressable_data(0)).tolist() for k, a in out.items()}

  return call


def scalars(values: dict, prefix: str) -> dict[str, float]:
  """TensorBoard tags ``<prefix>/<key>/block<n>`` of the diagnostics in ``values`` (a
  metrics row, or a ``compile_for_run`` result), n the block's 1-based number."""
  return {
      f'{prefix}/{k}/block{n}': v
      for k, first in FIRST_BLOCK.items()
      for n, v in enumerate(values.get(k, ()), first)
  }
