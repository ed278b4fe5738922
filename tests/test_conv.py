"""tp_jax.conv.conv2d(impl='fast') must match lax.conv_general_dilated."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tp_jax import conv as conv_mod  # noqa: E402
from tp_jax.conv import conv2d, resolve_impl  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")
RTOL = 2e-5


def _ref(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


def _rand(rng, shape, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def _close(a, b, rtol=RTOL):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  scale = max(np.abs(a).max(), 1e-6)
  err = np.abs(a - b).max() / scale
  assert err < rtol, f"max rel err {err:.3e} >= {rtol}"


# (N, H, W, Cin, Cout, k, stride, padding)
CASES = [
    (3, 9, 7, 4, 6, 3, 1, "SAME"),
    (2, 9, 8, 5, 3, 3, 2, "SAME"),
    (2, 10, 11, 3, 6, 5, 1, "VALID"),
    (3, 11, 9, 4, 7, 5, 2, "VALID"),
    (2, 8, 8, 4, 5, 3, 2, ((2, 0), (1, 3))),
    (2, 7, 7, 3, 4, 3, 1, ((-1, 2), (1, 0))),  # negative padding = crop
    (2, 2, 2, 8, 5, 3, 1, "SAME"),  # kernel > output: dot path
    (3, 4, 3, 4, 5, 5, 2, "SAME"),  # kernel > output, stride 2
    (2, 6, 6, 300, 7, 3, 1, "SAME"),  # wide: per-tap weight grad
    (2, 8, 8, 4, 4, 1, 1, "VALID"),  # 1x1 kernel
    (2, 6, 5, 3, 4, 3, 1, ((3, 4), (2, 3))),  # padding > k - 1: windows of zeros
    (2, 6, 5, 3, 4, 3, 2, ((4, 3), (3, 2))),  # the same, stride 2
]


def _check_all(n, h, w_, ci, co, k, s, pad, seed, rtol=RTOL):
  """Forward, input grad and weight grad of impl='fast' vs lax (one jit)."""
  rng = np.random.default_rng(seed)
  x = _rand(rng, (n, h, w_, ci))
  w = _rand(rng, (k, k, ci, co), 1.0 / np.sqrt(k * k * ci))
  strides = (s, s)
  out_shape = jax.eval_shape(lambda x, w: _ref(x, w, strides, pad), x, w).shape
  g = _rand(rng, out_shape)

  @jax.jit
  def both(x, w, g):
    res = []
    for f in (
        lambda x, w: _ref(x, w, strides, pad),
        lambda x, w: conv2d(x, w, strides, pad, impl="fast"),
    ):
      y, vjp = jax.vjp(f, x, w)
      res.append((y,) + vjp(g))
    return res

  (y_r, dx_r, dw_r), (y_f, dx_f, dw_f) = both(x, w, g)
  _close(y_r, y_f, rtol)
  _close(dx_r, dx_f, rtol)
  _close(dw_r, dw_f, rtol)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[str(c) for c in CASES])
def test_forward_and_grads_match_lax(i):
  _check_all(*CASES[i], seed=i)


@pytest.mark.parametrize("seed", range(3))
def test_random_shapes(seed):
  rng = np.random.default_rng(100 + seed)
  k = int(rng.choice([3, 5]))
  s = int(rng.choice([1, 2]))
  h, w_ = (int(v) for v in rng.integers(k, 12, size=2))
  ci, co = (int(v) for v in rng.integers(1, 9, size=2))
  pad = ["SAME", "VALID", ((int(rng.integers(0, k)), int(rng.integers(0, k))),) * 2][seed % 3]
  _check_all(int(rng.integers(1, 4)), h, w_, ci, co, k, s, pad, seed)


@pytest.mark.parametrize(
    "shape",
    [
        # LeNet: 5x5 1->32 on 28x28 pad 2, then 32->64 on 14x14 pad 2.
        (4, 28, 28, 1, 32, 5, 1, ((2, 2), (2, 2))),
        (4, 14, 14, 32, 64, 5, 1, ((2, 2), (2, 2))),
        # SimpleVGG: 3x3 SAME 3-128-128-256-256-512 on 32, 16, 8, 4, 2.
        (2, 32, 32, 3, 128, 3, 1, "SAME"),
        (2, 16, 16, 128, 128, 3, 1, "SAME"),
        (2, 8, 8, 128, 256, 3, 1, "SAME"),
        (2, 4, 4, 256, 256, 3, 1, "SAME"),
        (2, 2, 2, 256, 512, 3, 1, "SAME"),
    ],
)
def test_model_shapes(shape):
  _check_all(*shape, seed=7)


def test_weight_grad_chunking_with_ragged_batch(monkeypatch):
  # Force 2 images per scan chunk with a batch of 5 (3 chunks, last padded).
  monkeypatch.setattr(conv_mod, "_WGRAD_ROWS", 2 * 4 * 4)
  _check_all(5, 7, 7, 40, 3, 3, 2, "SAME", seed=3)


@pytest.mark.parametrize("s,pad", [((1, 1), "SAME"), ((2, 2), ((1, 2), (0, 1)))])
def test_second_order(s, pad):
  rng = np.random.default_rng(0)
  x = _rand(rng, (2, 6, 5, 3))
  w = _rand(rng, (3, 3, 3, 4), 0.3)
  tx, tw = _rand(rng, x.shape), _rand(rng, w.shape)
  fr = lambda x, w: _ref(x, w, s, pad)
  ff = lambda x, w: conv2d(x, w, s, pad, impl="fast")
  g = _rand(rng, fr(x, w).shape)

  def jv(f):  # jvp of the forward, and jvp of the vjp (forward-over-reverse)
    y_dot = jax.jvp(f, (x, w), (tx, tw))[1]
    return (y_dot,) + jax.jvp(lambda x, w: jax.vjp(f, x, w)[1](g), (x, w), (tx, tw))[1]

  def gg(f):  # grad of grad (reverse-over-reverse) through a nonlinearity
    inner = lambda x, w: jnp.sum(jnp.tanh(f(x, w)))
    outer = lambda x, w: jnp.sum(jax.grad(inner, argnums=1)(x, w) ** 2)
    return jax.grad(outer, argnums=(0, 1))(x, w)

  both = jax.jit(lambda: (jv(fr), jv(ff), gg(fr), gg(ff)))
  jr, jf, gr, gf = both()
  for a, b in zip(jr, jf):
    _close(a, b)
  for a, b in zip(gr, gf):
    _close(a, b, 1e-4)


def test_vmap():
  rng = np.random.default_rng(1)
  xb = _rand(rng, (3, 2, 6, 6, 3))
  w = _rand(rng, (3, 3, 3, 4))
  wb = _rand(rng, (3, 3, 3, 3, 4))
  fr = lambda x, w: _ref(x, w, (1, 1), "SAME")
  ff = lambda x, w: conv2d(x, w, (1, 1), "SAME", impl="fast")
  _close(jax.vmap(fr, (0, None))(xb, w), jax.vmap(ff, (0, None))(xb, w))
  _close(jax.vmap(fr, (0, 0))(xb, wb), jax.vmap(ff, (0, 0))(xb, wb))
  loss = lambda f: (lambda w, x: jnp.sum(f(x, w) ** 2))
  _close(
      jax.vmap(jax.grad(loss(fr)), (None, 0))(w, xb), jax.vmap(jax.grad(loss(ff)), (None, 0))(w, xb)
  )


def test_impl_selection():
  assert resolve_impl("xla") == "xla"
  assert resolve_impl("fast") == "fast"
  expected = "fast" if jax.default_backend() == "cpu" else "xla"
  assert resolve_impl("auto") == expected
  with pytest.raises(ValueError):
    resolve_impl("cudnn")
  x = jnp.ones((1, 5, 5, 2))
  w = jnp.ones((3, 3, 2, 2))
  # 'fast' stages the custom primitive, 'xla' the plain convolution.
  fast_jaxpr = str(jax.make_jaxpr(lambda x, w: conv2d(x, w, impl="fast"))(x, w))
  xla_jaxpr = str(jax.make_jaxpr(lambda x, w: conv2d(x, w, impl="xla"))(x, w))
  assert "tp_conv2d" in fast_jaxpr and "conv_general_dilated" not in fast_jaxpr
  assert "conv_general_dilated" in xla_jaxpr and "tp_conv2d" not in xla_jaxpr
  auto_jaxpr = str(jax.make_jaxpr(lambda x, w: conv2d(x, w))(x, w))
  assert ("tp_conv2d" in auto_jaxpr) == (expected == "fast")


def test_fast_backward_avoids_backward_filter_conv():
  """The weight gradient must be computed with dots, not a convolution."""
  x = jnp.ones((4, 8, 8, 16))
  w = jnp.ones((3, 3, 16, 16))
  f = lambda x, w: jnp.sum(conv2d(x, w, impl="fast") ** 2)
  jaxpr = str(jax.make_jaxpr(jax.grad(f, argnums=1))(x, w))
  # forward conv only (the primitive), weight grad = dot_general in a scan
  assert jaxpr.count("tp_conv2d") == 1
  assert "dot_general" in jaxpr
  assert "conv_general_dilated" not in jaxpr


def test_eager_and_bad_args():
  rng = np.random.default_rng(2)
  x = _rand(rng, (2, 5, 5, 3))
  w = _rand(rng, (3, 3, 3, 2))
  _close(_ref(x, w, (1, 1), "SAME"), conv2d(x, w, impl="fast"))  # no jit
  with pytest.raises(ValueError):
    conv2d(x, w, (1, 1, 1), impl="fast")
  with pytest.raises(ValueError):
    conv2d(x, w, impl="nope")


@pytest.mark.parametrize(
    "kwargs,fast",
    [
        (dict(strides=(2, 2), padding="SAME"), True),
        (dict(strides=(1, 2), padding=((1, 0), (0, 2))), True),
        (dict(padding="VALID", use_bias=False), True),
        (dict(kernel_dilation=(2, 2)), False),  # beyond conv2d: lax's own convolution
        (dict(feature_group_count=2), False),
        (dict(padding="SAME", one_d=True), False),  # a 1-d conv (3-d input): lax's
    ],
)
def test_flax_conv_general_dilated_is_nn_conv_with_the_fast_derivatives(kwargs, fast):
  """nn.Conv(conv_general_dilated=flax_conv_general_dilated('fast')) has the values and
  the input and parameter gradients of the plain nn.Conv, stages tp_conv2d where conv2d
  covers the call, and falls back to lax where it does not."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(len(str(kwargs)))
  n, h, w_, c, f = (int(v) for v in rng.integers(2, 9, size=5))
  c, f = 2 * c, 2 * f  # even, for feature_group_count=2
  one_d = kwargs.pop("one_d", False)
  kernel = tuple(int(k) for k in rng.integers(1, 4, size=1 if one_d else 2))
  plain = nn.Conv(f, kernel, **kwargs)
  ours = nn.Conv(
      f, kernel, conv_general_dilated=conv_mod.flax_conv_general_dilated("fast"), **kwargs
  )
  x = _rand(rng, (n, h + 4, c) if one_d else (n, h + 4, w_ + 4, c))
  params = plain.init(jax.random.key(0), x)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  _close(ours.apply(params, x), plain.apply(params, x))
  got, want = (jax.jit(jax.grad(loss(m), argnums=(0, 1)))(params, x) for m in (ours, plain))
  jax.tree.map(lambda a, b: _close(a, b, rtol=1e-4), got, want)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(ours)))(params, x))
  assert ("tp_conv2d" in jaxpr) == fast
  with pytest.raises(ValueError, match="impl must be one of"):
    conv_mod.flax_conv_general_dilated("cudnn")
