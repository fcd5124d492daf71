#!/usr/bin/env bash
# Builds, here (where Rust is), every binary that scripts/gpu-check.sh runs on a GPU machine
# (which may have CUDA but no Rust toolchain), stripped, into gpu-bin/, and packs them into
# gpu-bin.tar.gz (both git-ignored; about 37 MB). Pass gpu-bin.tar.gz to the device tool's
# `carry` (its limit is 64 MiB); scripts/gpu-check.sh unpacks it.
# Built without the `mpi` feature: the GPU machine has no Open MPI (the binaries would not load
# without libmpi.so); NCCL is loaded at run time and needs no feature.
# Linked by zig (the pinned `ziglang` wheel, installed into .toolchain/zig) for glibc
# $TESSERA_GLIBC (default 2.28) with C++ linked statically: the GPU machine's glibc may be older
# than this one's, and its libstdc++ too. The floor the binaries need is printed at the end and
# written to gpu-bin/GLIBC_FLOOR. TESSERA_NO_ZIG=1 links with this machine's toolchain instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
target_dir=target
if [ "${TESSERA_NO_ZIG:-0}" != 1 ]; then
  zig_pin="ziglang==0.13.0"
  zdir=.toolchain/zig
  if [ ! -x "$zdir/ziglang/zig" ] || [ "$(cat "$zdir/.tessera-pin" 2>/dev/null)" != "$zig_pin" ]; then
    echo "build-gpu-bins: installing $zig_pin into $zdir"
    rm -rf "$zdir" && mkdir -p "$zdir"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$zdir" "$zig_pin"
    echo "$zig_pin" > "$zdir/.tessera-pin"
  fi
  export CC_x86_64_unknown_linux_gnu="$PWD/scripts/zig-cc" CXX_x86_64_unknown_linux_gnu="$PWD/scripts/zig-cxx"
  export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER="$PWD/scripts/zig-cxx" CXXSTDLIB=c++
  # Its own target folder: objects compiled by gcc must not meet zig's link.
  target_dir=target/gpu-bins
fi
export CARGO_TARGET_DIR="$target_dir"
rm -rf gpu-bin && mkdir -p gpu-bin
export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_BENCH_DEBUG=false
# The lent machines are H100/H200 (sm_90): SASS for sm_90 only keeps each binary's fatbins (and
# the tarball) a quarter of the size. Set TESSERA_CUDA_ARCHS to build for other cards.
export TESSERA_CUDA_ARCHS="${TESSERA_CUDA_ARCHS:-sm_90,compute_90}"
nompi=--no-default-features
cargo build --release $nompi --bin tessera
cp "$target_dir"/release/tessera gpu-bin/
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
mkdir -p gpu-bin/examples && cp "$target_dir"/release/examples/custom_loop "$target_dir"/release/examples/own_layer gpu-bin/examples/
strip gpu-bin/* gpu-bin/examples/* 2>/dev/null || true
# The newest glibc and libstdc++ symbol versions any binary asks for: the oldest system it runs on.
floor() { objdump -T gpu-bin/* gpu-bin/examples/* 2>/dev/null | grep -o "$1_[0-9][0-9.]*" | sort -t_ -k2 -V | uniq | tail -n 1 || true; }
glibc="$(floor GLIBC)"; cxx="$(floor GLIBCXX)"
echo "${glibc:-GLIBC_?} ${cxx:-no libstdc++}" > gpu-bin/GLIBC_FLOOR
echo "build-gpu-bins: the binaries need ${glibc:-an unknown glibc} and ${cxx:-no libstdc++ (C++ linked statically)}"
tar -czf gpu-bin.tar.gz gpu-bin
ls -la gpu-bin.tar.gz
du -sh gpu-bin
ls -la gpu-bin
