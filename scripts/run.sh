#!/usr/bin/env bash
# The main command: installs the toolchain if needed (scripts/setup.sh), builds tessera in
# release mode and runs it with the given arguments, e.g. `scripts/run.sh devices`.
# It runs in the caller's directory, so relative paths (--save, --data, --timeline) are the
# caller's.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" >&2
exec cargo run --release --quiet --manifest-path "$root/Cargo.toml" -- "$@"
