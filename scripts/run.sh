#!/usr/bin/env bash
# The main command: installs the toolchain if needed (scripts/setup.sh), builds tessera in
# release mode and runs it with the given arguments, e.g. `scripts/run.sh devices`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh >&2
exec cargo run --release --quiet -- "$@"
