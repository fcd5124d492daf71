#!/usr/bin/env bash
# zig as the C and C++ compiler and the linker of the GPU binaries (scripts/build-gpu-bins.sh),
# so that they run on an older glibc than this machine's: `zig-cc.sh cc|c++ ARGS...`.
# Targets glibc $TESSERA_GLIBC (default 2.28); C++ is zig's libc++, linked statically, so the
# binaries need no libstdc++ (GLIBCXX) at all. Drops or maps what zig does not take from cargo,
# rustc and the cc crate.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
zig="${TESSERA_ZIG:-$here/.toolchain/zig/ziglang/zig}"
mode="$1"; shift
args=()
for a in "$@"; do
  case "$a" in
    --target=*) continue ;;               # the cc crate's target triple: zig takes -target below
    -lgcc_s) args+=("-lunwind") ;;        # zig ships libunwind, not libgcc_s
    # Instrumentation only: the simulator's runtime (kernels/sim/runtime.cc) defines the
    # callbacks; zig's driver would otherwise add its own thread-sanitizer runtime.
    -fsanitize=thread) args+=("-Xclang" "-fsanitize=thread") ;;
    *) args+=("$a") ;;
  esac
done
exec "$zig" "$mode" -target "x86_64-linux-gnu.${TESSERA_GLIBC:-2.28}" "${args[@]}"
