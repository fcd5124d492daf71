#!/usr/bin/env python3
"""The peer of tessera's GPT job: the same character-level GPT (GPT-2's architecture with
biases, tanh GELU, the head tied to the token embedding, GPT-2's initialisation) trained the
same way (AdamW lr 1e-3, beta2 0.99, weight decay 0.1 on the matrices, clip 1.0, 100 warm-up
steps then cosine to 1e-4) on the vendored tiny Shakespeare, in JAX (jit) on the CPU.

Two uses:

    # steps per second over a few seconds after a warm-up: one JSON line
    python3 bench/peers/gpt_step.py --seconds 10
    # the whole job: the validation loss on the same fixed windows tessera uses
    python3 bench/peers/gpt_step.py --train-steps 2000
    # the same start as a tessera run: its initial parameters (a checkpoint of
    # `tessera train --model gpt --lr-schedule constant --steps 0 --save init.st`) and the
    # windows tessera draws for --seed, so the two loss curves can be laid side by side
    python3 bench/peers/gpt_step.py --train-steps 60 --eval-every 1 --init init.st --tessera-windows

The validation loss is the mean cross-entropy over 200 windows of the context, evenly spaced
over the last 10% of the text (the windows of `TextCorpus::val_windows(200, t)`), so the two
figures are the same measurement. Batches are drawn from numpy's generator, not tessera's.
"""
import argparse
import gzip
import json
import math
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "data", "tinyshakespeare", "input.txt.gz")


def load(path):
    with open(path, "rb") as f:
        raw = f.read()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    import numpy as np

    ids = np.array([index[ch] for ch in text], dtype=np.int32)
    n = len(ids) * 9 // 10
    return vocab, ids[:n], ids[n:]


M64 = (1 << 64) - 1


class SplitMix64:
    """tessera's `Rng` (host/rng.rs): SplitMix64 with its seed offset."""

    def __init__(self, seed):
        self.state = (seed ^ 0x5DEECE66D1CE4E5B) & M64

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def below(self, n):
        u = (self.next_u64() >> 11) * (1.0 / (1 << 53))
        return int(u * n) % max(n, 1)


def tessera_starts(seed, step, batch, span):
    """The window starts of `TextCorpus::train_batch(seed, step, batch, t)`."""
    x = (step * 0x9E3779B97F4A7C15) & M64
    rot = ((x << 17) | (x >> 47)) & M64
    rng = SplitMix64(seed ^ rot ^ 0x5EED7E47)
    return [rng.below(span) for _ in range(batch)]


def read_safetensors(path):
    """{name: float32 array} of a safetensors file (F32 tensors only)."""
    import numpy as np

    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", f"{name}: {t['dtype']}"
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype="<f4").reshape(t["shape"]).copy()
    return out


def from_checkpoint(path, p):
    """The parameter tree `p` with its values from a tessera GPT checkpoint (GPT-2's names)."""
    import jax.numpy as jnp

    t = read_safetensors(path)
    q = {"wte": t["wte"], "wpe": t["wpe"], "ln_f.weight": t["ln_f.weight"], "ln_f.bias": t["ln_f.bias"], "h": []}
    for i, blk in enumerate(p["h"]):
        q["h"].append({k: t[f"h.{i}.{k}"] for k in blk})
    for a, b in zip(jax_leaves(p), jax_leaves(q)):
        assert a.shape == b.shape, (a.shape, b.shape)
    import jax

    return jax.tree_util.tree_map(jnp.asarray, q)


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gelu", choices=["tanh", "erf"], default="tanh")
    ap.add_argument("--no-bias", action="store_true", help="no biases in the linear maps and LayerNorms (nanoGPT's bias=False)")
    ap.add_argument("--seconds", type=float, default=10.0, help="timed run (without --train-steps)")
    ap.add_argument("--train-steps", type=int, default=0, help="train this many steps and print the validation loss")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--init", help="start from the parameters of this tessera checkpoint (safetensors)")
    ap.add_argument("--tessera-windows", action="store_true",
                    help="draw the training windows tessera draws for --seed (TextCorpus::train_batch)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    vocab, train, val = load(args.data)
    V, T, C, H, L = len(vocab), args.context, args.width, args.heads, args.layers
    D = C // H

    def init(key):
        keys = iter(jax.random.split(key, 2 + 4 * L))

        def normal(shape, std):
            return std * jax.random.normal(next(keys), shape, jnp.float32)

        zeros, ones = (lambda n: jnp.zeros((n,), jnp.float32)), (lambda n: jnp.ones((n,), jnp.float32))
        p = {"wte": normal((V, C), 0.02), "wpe": normal((T, C), 0.02), "h": []}
        for _ in range(L):
            p["h"].append({
                "ln_1.weight": ones(C), "ln_1.bias": zeros(C),
                "attn.c_attn.weight": normal((C, 3 * C), 0.02), "attn.c_attn.bias": zeros(3 * C),
                "attn.c_proj.weight": normal((C, C), 0.02 / math.sqrt(2 * L)), "attn.c_proj.bias": zeros(C),
                "ln_2.weight": ones(C), "ln_2.bias": zeros(C),
                "mlp.c_fc.weight": normal((C, 4 * C), 0.02), "mlp.c_fc.bias": zeros(4 * C),
                "mlp.c_proj.weight": normal((4 * C, C), 0.02 / math.sqrt(2 * L)), "mlp.c_proj.bias": zeros(C),
            })
        p["ln_f.weight"], p["ln_f.bias"] = ones(C), zeros(C)
        return p

    def layernorm(x, w, b):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) * jax.lax.rsqrt(v + 1e-5) * w + b

    mask = jnp.tril(jnp.ones((T, T), bool))

    def forward(p, idx):
        b, t = idx.shape
        x = p["wte"][idx] + p["wpe"][:t]
        for blk in p["h"]:
            h = layernorm(x, blk["ln_1.weight"], blk["ln_1.bias"])
            qkv = h @ blk["attn.c_attn.weight"] + blk["attn.c_attn.bias"]
            q, k, v = (a.reshape(b, t, H, D).transpose(0, 2, 1, 3) for a in jnp.split(qkv, 3, axis=-1))
            s = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(D)
            s = jnp.where(mask[:t, :t], s, -jnp.inf)
            a = (jax.nn.softmax(s, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, t, C)
            x = x + a @ blk["attn.c_proj.weight"] + blk["attn.c_proj.bias"]
            h = layernorm(x, blk["ln_2.weight"], blk["ln_2.bias"])
            f = jax.nn.gelu(h @ blk["mlp.c_fc.weight"] + blk["mlp.c_fc.bias"], approximate=args.gelu == "tanh")
            x = x + f @ blk["mlp.c_proj.weight"] + blk["mlp.c_proj.bias"]
        x = layernorm(x, p["ln_f.weight"], p["ln_f.bias"])
        return x @ p["wte"].T

    def loss_fn(p, x, y):
        logits = forward(p, x)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, y[..., None], axis=-1).mean()

    lr_max, lr_min, warmup, b1, b2, eps, wd, clip = 1e-3, 1e-4, 100, 0.9, 0.99, 1e-8, 0.1, 1.0
    total = args.train_steps or 2000

    def lr_at(step):  # tessera's LrSchedule::Cosine (step counts from 0)
        if step < warmup:
            return lr_max * (step + 1) / warmup
        ratio = min(1.0, (step - warmup) / max(1, total - warmup))
        return lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos(math.pi * ratio))

    @jax.jit
    def step(p, m, v, t, x, y, lr):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        leaves = jax.tree_util.tree_leaves(g)
        norm = jnp.sqrt(sum(jnp.sum(l * l) for l in leaves))
        scale = jnp.minimum(1.0, clip / (norm + 1e-6))
        g = jax.tree_util.tree_map(lambda l: l * scale, g)
        if args.no_bias:  # biases start at 0 and never move: the model has none
            g = jax.tree_util.tree_map_with_path(
                lambda path, l: l * 0 if str(path[-1]).find("bias") >= 0 else l, g)
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t

        def upd(w, m, v):
            decay = 1 - lr * wd if w.ndim >= 2 else 1.0
            return w * decay - lr / bc1 * m / (jnp.sqrt(v / bc2) + eps)

        return jax.tree_util.tree_map(upd, p, m, v), m, v, loss

    eval_loss = jax.jit(loss_fn)
    rng = np.random.default_rng(args.seed)
    drawn = [0]

    def batch():
        if args.tessera_windows:
            starts = tessera_starts(args.seed, drawn[0], args.batch, len(train) - T)
        else:
            starts = rng.integers(0, len(train) - T, args.batch)
        drawn[0] += 1
        x = np.stack([train[s:s + T] for s in starts])
        y = np.stack([train[s + 1:s + T + 1] for s in starts])
        return jnp.asarray(x), jnp.asarray(y)

    span = len(val) - T
    starts = [i * span // 200 for i in range(200)]
    vx = jnp.asarray(np.stack([val[s:s + T] for s in starts]))
    vy = jnp.asarray(np.stack([val[s + 1:s + T + 1] for s in starts]))

    p = init(jax.random.PRNGKey(args.seed))
    if args.init:
        p = from_checkpoint(args.init, p)
    if args.no_bias:
        p = jax.tree_util.tree_map_with_path(lambda path, l: l * 0 if str(path[-1]).find("bias") >= 0 else l, p)
    m = jax.tree_util.tree_map(jnp.zeros_like, p)
    v = jax.tree_util.tree_map(jnp.zeros_like, p)
    params = sum(l.size for l in jax.tree_util.tree_leaves(p))
    peer = f"jax-{jax.__version__}-jit"
    if args.train_steps:
        t0 = time.perf_counter()
        val_losses = []
        for s in range(args.train_steps):
            x, y = batch()
            p, m, v, loss = step(p, m, v, s + 1, x, y, lr_at(s))
            if (s + 1) % args.eval_every == 0 or s + 1 == args.train_steps:
                vl = float(eval_loss(p, vx, vy))
                val_losses.append([s + 1, vl])
                print(f"step {s + 1:>5}: train loss {float(loss):.4f}, validation loss {vl:.4f} "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
        wall = time.perf_counter() - t0
        # The whole validation text, each character predicted once: windows at 0, T, 2T, ...
        starts_all = list(range(0, len(val) - T, T))
        total = 0.0
        for i in range(0, len(starts_all), 256):
            chunk = starts_all[i:i + 256]
            xa = jnp.asarray(np.stack([val[s:s + T] for s in chunk]))
            ya = jnp.asarray(np.stack([val[s + 1:s + T + 1] for s in chunk]))
            total += float(eval_loss(p, xa, ya)) * len(chunk)
        print(f"validation loss over the whole validation text ({len(starts_all)} windows): "
              f"{total / len(starts_all):.4f}", flush=True)
        print(json.dumps({"bench": "gpt_train", "peer": peer, "params": params, "steps": args.train_steps,
                          "val_loss": val_losses[-1][1], "val_loss_all": total / len(starts_all),
                          "val_losses": val_losses, "wall_s": wall,
                          "steps_per_s": args.train_steps / wall}))
        return
    for s in range(5):  # compile and warm up
        x, y = batch()
        p, m, v, loss = step(p, m, v, s + 1, x, y, lr_at(s))
    loss.block_until_ready()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        x, y = batch()
        p, m, v, loss = step(p, m, v, n + 6, x, y, lr_at(n + 5))
        n += 1
    loss.block_until_ready()
    dt = time.perf_counter() - t0
    print(json.dumps({"bench": "gpt_step", "peer": peer, "params": params, "layers": L, "width": C, "heads": H,
                      "context": T, "batch": args.batch, "steps_per_s": n / dt}))


if __name__ == "__main__":
    main()
