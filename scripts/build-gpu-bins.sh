#!/usr/bin/env bash
# Builds, here (where Rust is), every binary that scripts/gpu-check.sh runs on a GPU machine
# (which may have CUDA but no Rust toolchain), stripped, into gpu-bin/ (git-ignored). Pass
# gpu-bin to the device tool's `carry`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
rm -rf gpu-bin && mkdir -p gpu-bin
export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_BENCH_DEBUG=false
cargo build --release --bin tessera
cp target/release/tessera gpu-bin/
collect() { # copy each executable cargo reports, named after its target
  python3 -c '
import json, shutil, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"]:
        name = m["target"]["name"] + ("_lib" if "lib" in m["target"]["kind"] else "")
        shutil.copy(m["executable"], "gpu-bin/" + name)
        print("gpu-bin/" + name)
'
}
cargo test --release --no-run --message-format=json 2>/dev/null | collect
cargo bench --no-run --message-format=json 2>/dev/null | collect
cargo build --release --examples
mkdir -p gpu-bin/examples && cp target/release/examples/custom_loop gpu-bin/examples/
strip gpu-bin/* gpu-bin/examples/* 2>/dev/null || true
du -sh gpu-bin
ls -la gpu-bin
