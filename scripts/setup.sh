#!/usr/bin/env bash
# Installs what tessera's build and tests need, into the project, idempotently:
#   - a C++20 compiler (g++, from apt when missing): the CUDA simulator compiles the kernels
#     for the host;
#   - Open MPI (openmpi-bin, libopenmpi-dev) and libclang-dev, from apt when missing: the `mpi`
#     feature (on by default) builds rsmpi against them, and the tests run mpirun;
#   - the pinned CUDA compiler wheels from PyPI into .toolchain/cuda (git-ignored), or into
#     $TESSERA_CUDA_TOOLCHAIN, or with --shared into ${XDG_DATA_HOME:-$HOME/.local/share}/tessera/cuda,
#     where the build also looks: the place for a crate that depends on tessera through git
#     (cargo builds it from its own checkout, which has no .toolchain).
#     nvidia-nvvm is pinned too: left free, pip takes 13.5, whose PTX (ISA 9.5) the
#     13.0 ptxas rejects.
# A second run with everything in place returns in well under a second.
# TESSERA_SKIP_CUDA_TOOLCHAIN=1 skips the wheels (the crate then builds without kernels).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.toolchain/cuda"
if [ "${1:-}" = "--shared" ]; then
  dest="${XDG_DATA_HOME:-$HOME/.local/share}/tessera/cuda"
elif [ -n "${1:-}" ]; then
  echo "setup: unknown argument $1 (use --shared, or no argument)" >&2
  exit 2
fi
if [ -n "${TESSERA_CUDA_TOOLCHAIN:-}" ]; then dest="$TESSERA_CUDA_TOOLCHAIN"; fi
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
stamp="$dest/.installed"

# System packages, installed with apt only when something is missing.
apt_missing=()
if ! command -v "${CXX:-g++}" >/dev/null 2>&1 && ! command -v c++ >/dev/null 2>&1; then
  apt_missing+=(g++)
fi
if ! command -v mpirun >/dev/null 2>&1; then apt_missing+=(openmpi-bin); fi
if ! command -v pgrep >/dev/null 2>&1; then apt_missing+=(procps); fi  # tests/mpi.rs finds rank processes
if ! command -v mpicc >/dev/null 2>&1; then apt_missing+=(libopenmpi-dev); fi
# What bindgen (rsmpi's build) really loads, searched as clang-sys searches: libclang-cpp.so.14,
# which other packages bring, is not it.
if ! "$root/scripts/find-libclang.sh" >/dev/null; then
  apt_missing+=(libclang-dev)
fi
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "setup: installing ${apt_missing[*]} with apt (the simulator needs a C++ compiler; MPI needs Open MPI and libclang)"
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${apt_missing[@]}" >/dev/null
  if [[ " ${apt_missing[*]} " == *" libclang-dev "* ]] && ! "$root/scripts/find-libclang.sh" >/dev/null; then
    echo "setup: libclang-dev is installed but no libclang that bindgen loads was found;" \
      "set LIBCLANG_PATH to the folder holding libclang.so" >&2
    exit 1
  fi
else
  echo "setup: g++, Open MPI and libclang present"
fi
want="${pins[*]}"

if [ "${TESSERA_SKIP_CUDA_TOOLCHAIN:-0}" = 1 ]; then
  echo "setup: TESSERA_SKIP_CUDA_TOOLCHAIN=1, not installing nvcc"
elif [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$dest/nvidia/cu13/bin/nvcc" ]; then
  echo "setup: CUDA toolchain already in $dest"
else
  py="$(command -v python3 || command -v python || true)"
  if [ -z "$py" ]; then
    echo "setup: python3 with pip is needed to install the CUDA compiler wheels" >&2
    exit 1
  fi
  echo "setup: installing ${pins[*]} into $dest"
  # Only a folder this script made (it holds the stamp), or an empty or new one, is replaced:
  # $TESSERA_CUDA_TOOLCHAIN may name any folder.
  if [ -e "$dest" ] && [ ! -f "$stamp" ] && [ -n "$(ls -A "$dest" 2>/dev/null)" ]; then
    echo "setup: $dest exists and was not made by scripts/setup.sh; give an empty or new folder" >&2
    exit 1
  fi
  rm -rf "$dest"
  mkdir -p "$dest"
  "$py" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" "${pins[@]}"
  echo "$want" > "$stamp"
fi
if [ -x "$dest/nvidia/cu13/bin/nvcc" ]; then
  "$dest/nvidia/cu13/bin/nvcc" --version | tail -n 2 | head -n 1
fi
