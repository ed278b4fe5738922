"""Benchmark tp_jax.conv.conv2d: impl='xla' vs impl='fast' (and PyTorch).

Times, for one conv layer, the forward pass, the input gradient and the weight
gradient, and a whole SimpleVGG-shaped backprop step (conv3x3 SAME
128-128-256-256-512, ReLU, 2x2 max-pool after each, dense 10, softmax CE, SGD),
with every variant jitted and all variants run round-robin in one process
(interleaved), reporting medians and ratios.  If torch is importable, the same
SimpleVGG step in PyTorch (CPU, NCHW) joins the interleaved timing.

  python experiments/bench_conv.py --batch 128 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tp_jax.conv import conv2d  # noqa: E402

VGG_CHANNELS = (128, 128, 256, 256, 512)


# ----------------------------------------------------------------------------
# Minimal SimpleVGG in JAX.
# ----------------------------------------------------------------------------

def vgg_init(key, in_ch=3, channels=VGG_CHANNELS, num_classes=10, size=32):
    params = []
    c = in_ch
    for co in channels:
        key, k = jax.random.split(key)
        w = jax.random.normal(k, (3, 3, c, co), jnp.float32) * np.sqrt(2.0 / (9 * c))
        params.append((w, jnp.zeros((co,), jnp.float32)))
        c = co
        size //= 2
    key, k = jax.random.split(key)
    d = size * size * c
    params.append((jax.random.normal(k, (d, num_classes), jnp.float32) / np.sqrt(d),
                   jnp.zeros((num_classes,), jnp.float32)))
    return params


def vgg_apply(params, x, impl):
    for w, b in params[:-1]:
        x = jax.nn.relu(conv2d(x, w, (1, 1), "SAME", impl=impl) + b)
        x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    w, b = params[-1]
    return x.reshape(x.shape[0], -1) @ w + b


def make_vgg_step(impl, lr=0.01):
    def loss_fn(params, x, y):
        logits = vgg_apply(params, x, impl)
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, -1))

    @jax.jit
    def step(params, x, y):
        loss, g = jax.value_and_grad(loss_fn)(params, x, y)
        return jax.tree.map(lambda p, d: p - lr * d, params, g), loss

    return step


# ----------------------------------------------------------------------------
# Optional: the same step in PyTorch.
# ----------------------------------------------------------------------------

def make_torch_step(batch, size, threads):
    try:
        import torch
    except Exception:  # pragma: no cover - torch is optional
        return None, None
    torch.set_num_threads(threads)
    layers = []
    c = 3
    s = size
    for co in VGG_CHANNELS:
        layers += [torch.nn.Conv2d(c, co, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        c = co
        s //= 2
    model = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(c * s * s, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    lossf = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = lossf(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step, torch.__version__


# ----------------------------------------------------------------------------

def timed_interleaved(cases, repeats, warmup):
    """cases: name -> zero-arg callable that blocks until done."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32, help="layer / image spatial size")
    ap.add_argument("--cin", type=int, default=128)
    ap.add_argument("--cout", type=int, default=128)
    ap.add_argument("--kernel", type=int, default=3)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no_layer", action="store_true", help="skip the single-layer timings")
    ap.add_argument("--no_vgg", action="store_true", help="skip the SimpleVGG step")
    ap.add_argument("--no_torch", action="store_true", help="skip PyTorch even if importable")
    args = ap.parse_args(argv)

    ncpu = os.cpu_count()
    print(f"jax {jax.__version__}  backend={jax.default_backend()}  devices={jax.devices()}")
    print(f"cpu count={ncpu}  processor={platform.processor() or platform.machine()}  "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"batch={args.batch} repeats={args.repeats} (medians of interleaved runs)\n")

    impls = ("xla", "fast")
    rows = []  # (group, impl, ms)

    if not args.no_layer:
        k = jax.random.split(jax.random.PRNGKey(0), 3)
        b, s, ci, co, ks, st = args.batch, args.size, args.cin, args.cout, args.kernel, args.stride
        x = jax.random.normal(k[0], (b, s, s, ci), jnp.float32)
        w = jax.random.normal(k[1], (ks, ks, ci, co), jnp.float32) * 0.05
        ho = -(-s // st)
        g = jax.random.normal(k[2], (b, ho, ho, co), jnp.float32)
        cases, names = {}, {}
        for impl in impls:
            f = lambda x, w, impl=impl: conv2d(x, w, (st, st), "SAME", impl=impl)
            fwd = jax.jit(f)
            xg = jax.jit(lambda x, w, g, f=f: jax.vjp(lambda x: f(x, w), x)[1](g)[0])
            wg = jax.jit(lambda x, w, g, f=f: jax.vjp(lambda w: f(x, w), w)[1](g)[0])
            cases[("forward", impl)] = lambda fwd=fwd: jax.block_until_ready(fwd(x, w))
            cases[("input-grad", impl)] = lambda xg=xg: jax.block_until_ready(xg(x, w, g))
            cases[("weight-grad", impl)] = lambda wg=wg: jax.block_until_ready(wg(x, w, g))
        # correctness spot check
        ref = jax.jit(lambda x, w, g: jax.vjp(lambda x, w: conv2d(x, w, (st, st), "SAME", impl="xla"), x, w)[1](g))(x, w, g)
        new = jax.jit(lambda x, w, g: jax.vjp(lambda x, w: conv2d(x, w, (st, st), "SAME", impl="fast"), x, w)[1](g))(x, w, g)
        errs = [float(jnp.max(jnp.abs(a - c)) / jnp.max(jnp.abs(a))) for a, c in zip(ref, new)]
        print(f"layer {ks}x{ks} {ci}->{co} on {s}x{s} stride {st}: rel.err dx={errs[0]:.1e} dw={errs[1]:.1e}")
        res = timed_interleaved(cases, args.repeats, args.warmup)
        for (grp, impl), ms in res.items():
            rows.append((f"layer {grp}", impl, ms))

    if not args.no_vgg:
        key = jax.random.PRNGKey(1)
        params = vgg_init(key)
        x = jax.random.normal(jax.random.PRNGKey(2), (args.batch, 32, 32, 3), jnp.float32)
        y = jax.nn.one_hot(jax.random.randint(jax.random.PRNGKey(3), (args.batch,), 0, 10), 10)
        cases = {}
        for impl in impls:
            step = make_vgg_step(impl)
            cases[("SimpleVGG BP step", impl)] = (
                lambda step=step: jax.block_until_ready(step(params, x, y)))
        _, l0 = make_vgg_step("xla")(params, x, y)
        _, l1 = make_vgg_step("fast")(params, x, y)
        print(f"SimpleVGG loss xla={float(l0):.6f} fast={float(l1):.6f}")
        if not args.no_torch:
            tstep, tver = make_torch_step(args.batch, 32, ncpu)
            if tstep is not None:
                cases[("SimpleVGG BP step", f"torch {tver}")] = tstep
        res = timed_interleaved(cases, args.repeats, args.warmup)
        for (grp, impl), ms in res.items():
            rows.append((grp, impl, ms))

    print(f"\n{'what':24s} {'impl':18s} {'median ms':>10s} {'xla/impl':>9s}")
    base = {grp: ms for grp, impl, ms in rows if impl == "xla"}
    for grp, impl, ms in rows:
        print(f"{grp:24s} {impl:18s} {ms:10.1f} {base[grp] / ms:9.2f}x")


if __name__ == "__main__":
    main()
