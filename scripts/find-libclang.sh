#!/usr/bin/env bash
# Prints the libclang that bindgen (through clang-sys 1.x with its `runtime` feature, as rsmpi's
# build uses it) would load, and exits 0; exits 1, printing nothing, when it would find none.
#
# It searches what clang-sys searches, in its order, with its file names, and validates the same
# way:
#   - only $LIBCLANG_PATH when that is set (a file, or a directory);
#   - else `llvm-config --prefix`/{bin,lib,lib64}, $LD_LIBRARY_PATH, $LIBRARY_PATH, then the
#     directory globs /usr/local/llvm*/lib*, /usr/local/lib*/*/*, /usr/local/lib*/*, /usr/local/lib*,
#     /usr/lib*/*/*, /usr/lib*/*, /usr/lib*;
#   - file names libclang.so, libclang-*.so, libclang.so.*, libclang-*.so.*, skipping any name
#     containing "-cpp." (libclang-cpp.so.14 is Clang's C++ library, which bindgen cannot use:
#     a machine with only that one fails in rsmpi's build with "Unable to find libclang");
#   - a file counts only when it starts with a 64-bit ELF header.
#
# TESSERA_SYSROOT (for tests only) is put in front of the fixed directory globs, as clang-sys's
# own tests do, so fake directory layouts can be checked without touching the machine.
set -uo pipefail
shopt -s nullglob

root="${TESSERA_SYSROOT:-}"
names=('libclang.so' 'libclang-*.so' 'libclang.so.*' 'libclang-*.so.*')

# A 64-bit ELF shared object, as clang-sys's validate_library checks (magic, then class 2).
is_elf64() {
  local hdr=""
  [ -f "$1" ] && [ -r "$1" ] || return 1
  LC_ALL=C IFS= read -r -d '' -N 5 hdr <"$1" 2>/dev/null
  [ "$hdr" = $'\x7fELF\x02' ]
}

# Prints the first valid library in directory $1 (nothing and status 1 when there is none).
search_dir() {
  local dir="$1" pat f base
  [ -d "$dir" ] || return 1
  for pat in "${names[@]}"; do
    for f in "$dir"/$pat; do
      base="${f##*/}"
      case "$base" in *-cpp.*) continue ;; esac
      if is_elf64 "$f"; then
        echo "$f"
        return 0
      fi
    done
  done
  return 1
}

if [ -n "${LIBCLANG_PATH:-}" ]; then
  # A file that matches one of the names, or a directory that holds one; nothing else.
  if [ -f "$LIBCLANG_PATH" ]; then
    dir="$(dirname "$LIBCLANG_PATH")"
    base="$(basename "$LIBCLANG_PATH")"
    for pat in "${names[@]}"; do
      # shellcheck disable=SC2053 # the pattern is meant to match as a glob
      if [[ "$base" == $pat ]] && [[ "$base" != *-cpp.* ]] && is_elf64 "$LIBCLANG_PATH"; then
        echo "$dir/$base"
        exit 0
      fi
    done
  fi
  search_dir "$LIBCLANG_PATH" && exit 0
  exit 1
fi

if [ -z "$root" ] && command -v llvm-config >/dev/null 2>&1; then
  prefix="$(llvm-config --prefix 2>/dev/null | head -n 1)"
  if [ -n "$prefix" ]; then
    for sub in bin lib lib64; do
      search_dir "$prefix/$sub" && exit 0
    done
  fi
fi

for var in LD_LIBRARY_PATH LIBRARY_PATH; do
  IFS=: read -r -a dirs <<<"${!var:-}"
  for d in "${dirs[@]}"; do
    [ -n "$d" ] && search_dir "$d" && exit 0
  done
done

for pattern in '/usr/local/llvm*/lib*' '/usr/local/lib*/*/*' '/usr/local/lib*/*' '/usr/local/lib*' \
  '/usr/lib*/*/*' '/usr/lib*/*' '/usr/lib*'; do
  # Directory patterns match case-insensitively in clang-sys; file names do not.
  shopt -s nocaseglob
  dirs=("$root"$pattern)
  shopt -u nocaseglob
  for d in "${dirs[@]}"; do
    [ -d "$d" ] && search_dir "$d" && exit 0
  done
done
exit 1
