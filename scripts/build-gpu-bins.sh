#!/usr/bin/env bash
# Builds, here (where Rust is), every binary that scripts/gpu-check.sh runs on a GPU machine
# (which may have CUDA but no Rust toolchain), stripped, into gpu-bin/, and packs them into
# gpu-bin.tar.gz (both git-ignored; about 37 MB). Pass gpu-bin.tar.gz to the device tool's
# `carry` (its limit is 64 MiB); scripts/gpu-check.sh unpacks it.
# Built without the `mpi` feature: the GPU machine has no Open MPI (the binaries would not load
# without libmpi.so); NCCL is loaded at run time and needs no feature.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
rm -rf gpu-bin && mkdir -p gpu-bin
export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_BENCH_DEBUG=false
# The lent machines are H100/H200 (sm_90): SASS for sm_90 only keeps each binary's fatbins (and
# the tarball) a quarter of the size. Set TESSERA_CUDA_ARCHS to build for other cards.
export TESSERA_CUDA_ARCHS="${TESSERA_CUDA_ARCHS:-sm_90,compute_90}"
nompi=--no-default-features
cargo build --release $nompi --bin tessera
cp target/release/tessera gpu-bin/
collect() { # copy each executable cargo reports, named after its target
  python3 -c '
import json, os, shutil, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    kind = m.get("target", {}).get("kind", [])
    if m.get("reason") == "compiler-artifact" and m.get("executable") and kind not in (["bin"], ["example"]):
        # Tests and benches may share a name (tests/parallel.rs, bench/parallel.rs): prefix them.
        name = os.environ["PREFIX"] + m["target"]["name"] + ("-lib" if "lib" in kind else "")
        shutil.copy(m["executable"], "gpu-bin/" + name)
        print("gpu-bin/" + name)
'
}
cargo test --release $nompi --no-run --message-format=json 2>/dev/null | PREFIX=test- collect
cargo bench $nompi --no-run --message-format=json 2>/dev/null | PREFIX=bench- collect
cargo build --release $nompi --examples
mkdir -p gpu-bin/examples && cp target/release/examples/custom_loop gpu-bin/examples/
strip gpu-bin/* gpu-bin/examples/* 2>/dev/null || true
tar -czf gpu-bin.tar.gz gpu-bin
ls -la gpu-bin.tar.gz
du -sh gpu-bin
ls -la gpu-bin
