#!/usr/bin/env python3
"""The CPU peer of tessera's GEMM: numpy's matmul (its bundled OpenBLAS) in f32 at the shapes of
the gemm/cpu bench group. Prints one JSON line per shape:
{"bench": "gemm", "peer": "numpy ...", "shape": "nn MxNxK", "flops_per_s": ...}.
Run it with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (scripts/bench.sh does): they slow a
current numpy. The BLAS in use is printed (threadpoolctl) so the record says what ran."""
import json
import time

import numpy as np

SHAPES = [(256, 256, 256, False, False), (512, 512, 512, False, False), (1024, 1024, 1024, False, False),
          (128, 512, 784, False, False), (128, 512, 512, False, False), (128, 10, 512, False, False),
          (784, 512, 128, True, False), (128, 784, 512, False, True),
          (1024, 1024, 1024, False, True), (1024, 1024, 1024, True, False), (1024, 1024, 1024, True, True)]


def main():
    rng = np.random.default_rng(0)
    try:
        from threadpoolctl import threadpool_info
        blas = "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} threads={i.get('num_threads')}" for i in threadpool_info())
    except ImportError:
        blas = "threadpoolctl not installed"
    for m, n, k, ta, tb in SHAPES:
        a = rng.uniform(-1, 1, (k, m) if ta else (m, k)).astype(np.float32)
        b = rng.uniform(-1, 1, (n, k) if tb else (k, n)).astype(np.float32)
        oa = a.T if ta else a
        ob = b.T if tb else b
        for _ in range(3):
            oa @ ob
        reps = max(3, int(2e9 / (2 * m * n * k)))
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                oa @ ob
            best = min(best, (time.perf_counter() - t0) / reps)
        tag = ("t" if ta else "n") + ("t" if tb else "n")
        print(json.dumps({"bench": "gemm", "peer": f"numpy {np.__version__}", "blas": blas, "shape": f"{tag} {m}x{n}x{k}", "flops_per_s": 2 * m * n * k / best}))


if __name__ == "__main__":
    main()
