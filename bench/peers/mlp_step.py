#!/usr/bin/env python3
"""The peer of tessera's train_step bench: one MLP training step (forward, softmax
cross-entropy, backward, AdamW with lr 1e-3 and weight decay 0.01) in PyTorch (eager or
torch.compile) or JAX (jit), f32, timed over a few seconds after a warm-up. Prints one JSON
line: {"bench": "train_step", "peer": ..., "widths": ..., "batch": ..., "samples_per_s": ...}.

    python3 bench/peers/mlp_step.py --framework jax --device cpu
    python3 bench/peers/mlp_step.py --framework torch --device cuda --mode compile --widths 784,4096,4096,4096,10 --batch 1024
"""
import argparse
import json
import os
import time


def run_torch(widths, batch, device, mode, seconds):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # strict f32, as tessera's kernels
    torch.backends.cudnn.allow_tf32 = False
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
        if i + 2 < len(widths):
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    x = torch.randn(batch, widths[0], device=device)
    y = torch.randint(0, widths[-1], (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    if mode == "compile":
        step = torch.compile(step)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(10):
        step()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    sync()
    return n * batch / (time.perf_counter() - t0), f"pytorch {torch.__version__} {mode}"


def run_jax(widths, batch, seconds):
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    params = []
    for i in range(len(widths) - 1):
        key, k = jax.random.split(key)
        bound = (6.0 / widths[i]) ** 0.5
        params.append((jax.random.uniform(k, (widths[i], widths[i + 1]), jnp.float32, -bound, bound), jnp.zeros(widths[i + 1], jnp.float32)))
    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    v = jax.tree_util.tree_map(jnp.zeros_like, params)
    x = jax.random.normal(key, (batch, widths[0]), jnp.float32)
    y = jax.random.randint(key, (batch,), 0, widths[-1])

    def loss_fn(p):
        h = x
        for i, (w, b) in enumerate(p):
            h = h @ w + b
            if i + 1 < len(p):
                h = jax.nn.relu(h)
        logp = jax.nn.log_softmax(h)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    @jax.jit
    def step(p, m, v, t):
        loss, g = jax.value_and_grad(loss_fn)(p)
        b1, b2, lr, eps, wd = 0.9, 0.999, 1e-3, 1e-8, 0.01
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        p = jax.tree_util.tree_map(lambda w, m, v: w * (1 - lr * wd) - lr * (m / bc1) / (jnp.sqrt(v / bc2) + eps), p, m, v)
        return p, m, v, loss

    t = 1.0
    for _ in range(10):
        params, m, v, loss = step(params, m, v, t)
        t += 1
    loss.block_until_ready()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        params, m, v, loss = step(params, m, v, t)
        t += 1
        n += 1
    loss.block_until_ready()
    return n * batch / (time.perf_counter() - t0), f"jax {jax.__version__} jit"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--framework", choices=["torch", "jax"], required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--widths", default="784,512,512,10")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    widths = [int(w) for w in a.widths.replace("-", ",").split(",")]
    if a.framework == "torch":
        rate, peer = run_torch(widths, a.batch, a.device, a.mode, a.seconds)
    else:
        rate, peer = run_jax(widths, a.batch, a.seconds)
    print(json.dumps({"bench": "train_step", "peer": peer, "device": a.device, "widths": "-".join(map(str, widths)), "batch": a.batch, "samples_per_s": rate}))


if __name__ == "__main__":
    main()
