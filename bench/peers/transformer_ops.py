#!/usr/bin/env python3
"""The peer of tessera's `transformer/cpu` and `transformer/cuda` bench groups: LayerNorm
forward and backward, causal attention forward and the token + position embedding, at the same
shapes and counting the same bytes as bench/common/mod.rs (n floats: rows of 128 and 768
channels; attention over sequences of 64 with 4 heads). On the CPU in JAX (jit, n = 2^22); on a
GPU in PyTorch (F.layer_norm, F.scaled_dot_product_attention with is_causal, n = 2^26).
Prints one JSON line per case:
{"bench": "transformer", "device": ..., "case": ..., "peer": ..., "bytes_per_s": ...}.

    python3 bench/peers/transformer_ops.py [--seconds 1]
    python3 bench/peers/transformer_ops.py --framework torch --device cuda
"""
import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="floats per case (2^22 on the CPU, 2^26 on a GPU)")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--framework", choices=["jax", "torch"], default="jax")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.n is None:
        args.n = 1 << (22 if args.device == "cpu" else 26)
    if args.framework == "torch":
        return run_torch(args)

    import jax
    import jax.numpy as jnp

    peer = f"jax-{jax.__version__}-jit"
    key = jax.random.PRNGKey(0)

    def timed(f, *xs):
        out = f(*xs)
        jax.block_until_ready(out)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds or n < 3:
            out = f(*xs)
            jax.block_until_ready(out)
            n += 1
        return (time.perf_counter() - t0) / n

    def layernorm(x, g, b):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) * jax.lax.rsqrt(v + 1e-5) * g + b

    def report(case, nbytes, secs):
        print(json.dumps({"bench": "transformer", "device": "cpu", "case": case, "peer": peer,
                          "bytes_per_s": nbytes / secs}), flush=True)

    for c in (128, 768):
        rows = max(args.n // c, 1)
        x = jax.random.normal(key, (rows, c), jnp.float32)
        g, b = jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)
        fwd = jax.jit(layernorm)
        report(f"layernorm fwd {rows}x{c}", 4 * (2 * rows * c + 2 * rows), timed(fwd, x, g, b))
        dy = jax.random.normal(jax.random.PRNGKey(1), (rows, c), jnp.float32)
        bwd = jax.jit(lambda x, g, b, dy: jax.vjp(layernorm, x, g, b)[1](dy))
        report(f"layernorm bwd {rows}x{c}", 4 * 5 * rows * c, timed(bwd, x, g, b, dy))

        t, heads = 64, 4
        seqs = max(rows // t, 1)
        d = c // heads
        qkv = jax.random.normal(key, (seqs, t, 3 * c), jnp.float32)
        mask = jnp.tril(jnp.ones((t, t), bool))

        def attention(qkv):
            q, k, v = (a.reshape(seqs, t, heads, d).transpose(0, 2, 1, 3) for a in jnp.split(qkv, 3, axis=-1))
            s = jnp.where(mask, (q @ k.transpose(0, 1, 3, 2)) / jnp.sqrt(d), -jnp.inf)
            return (jax.nn.softmax(s, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(seqs, t, c)

        report(f"attention fwd {seqs}x{t}x{c} heads {heads}", 4 * 4 * seqs * t * c, timed(jax.jit(attention), qkv))

        vocab = 65
        erows = max(rows // t, 1) * t
        ids = (jnp.arange(erows) * 7 % vocab).reshape(-1, t)
        wte = jax.random.normal(key, (vocab, c), jnp.float32)
        wpe = jax.random.normal(key, (t, c), jnp.float32)
        embed = jax.jit(lambda ids, wte, wpe: wte[ids] + wpe[None, :, :])
        report(f"embedding fwd {erows}x{c}", 4 * 3 * erows * c, timed(embed, ids, wte, wpe))


def shapes(n):
    """(c, rows, seqs, t, heads, erows) per width, as bench/common/mod.rs sizes them."""
    for c in (128, 768):
        rows = max(n // c, 1)
        t, heads = 64, 4
        yield c, rows, max(rows // t, 1), t, heads, max(rows // t, 1) * t


def run_torch(args):
    import torch
    import torch.nn.functional as F

    torch.backends.cuda.matmul.allow_tf32 = False  # strict f32, as tessera's kernels
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(args.device)
    peer = f"torch-{torch.__version__}"

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(f):
        f()
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds or n < 3:
            f()
            n += 1
        sync()
        return (time.perf_counter() - t0) / n

    def report(case, nbytes, secs):
        print(json.dumps({"bench": "transformer", "device": args.device, "case": case, "peer": peer,
                          "bytes_per_s": nbytes / secs}), flush=True)

    for c, rows, seqs, t, heads, erows in shapes(args.n):
        x = torch.randn(rows, c, device=dev)
        g, b = torch.ones(c, device=dev), torch.zeros(c, device=dev)
        with torch.no_grad():
            report(f"layernorm fwd {rows}x{c}", 4 * (2 * rows * c + 2 * rows), timed(lambda: F.layer_norm(x, (c,), g, b, 1e-5)))
        xg, gg, bg = x.clone().requires_grad_(), g.clone().requires_grad_(), b.clone().requires_grad_()
        y = F.layer_norm(xg, (c,), gg, bg, 1e-5)
        dy = torch.randn_like(y)
        report(f"layernorm bwd {rows}x{c}", 4 * 5 * rows * c,
               timed(lambda: torch.autograd.grad(y, (xg, gg, bg), dy, retain_graph=True)))
        d = c // heads
        qkv = torch.randn(seqs, t, 3 * c, device=dev)

        def attention():
            q, k, v = (a.view(seqs, t, heads, d).transpose(1, 2) for a in qkv.split(c, dim=-1))
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(seqs, t, c)

        with torch.no_grad():
            report(f"attention fwd {seqs}x{t}x{c} heads {heads}", 4 * 4 * seqs * t * c, timed(attention))
            vocab = 65
            ids = (torch.arange(erows, device=dev) * 7 % vocab).view(-1, t)
            wte, wpe = torch.randn(vocab, c, device=dev), torch.randn(t, c, device=dev)
            report(f"embedding fwd {erows}x{c}", 4 * 3 * erows * c, timed(lambda: F.embedding(ids, wte) + wpe))


if __name__ == "__main__":
    main()
