#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/setup.sh; a one-node Slurm cluster
# with scripts/slurm-local.sh, as root), then runs formatting,
# lints, every test, checks that the crate builds and explains itself without nvcc, and
# builds the benches. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

scripts/setup.sh

# A one-node Slurm cluster for the srun tests of tests/mpi.rs (root only: it starts daemons).
# Where it cannot start, those tests say they were skipped; TESSERA_SKIP_SLURM=1 skips it.
if [ "${TESSERA_SKIP_SLURM:-0}" != 1 ] && [ "$(id -u)" = 0 ]; then
  if scripts/slurm-local.sh | grep -v '^export '; then
    export SLURM_CONF="$PWD/.toolchain/slurm/slurm.conf"
    export TESSERA_SLURM_TESTS=1
  else
    echo "WARNING: scripts/slurm-local.sh failed; the srun tests will be skipped" >&2
  fi
fi

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== without the mpi feature (as the GPU binaries are built): clippy"
cargo clippy --no-default-features --all-targets --target-dir target/no-mpi -- -D warnings
echo "== cargo doc (rustdoc warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
echo "== cargo test"
cargo test -- --show-output
echo "== a researcher's crate outside the package, depending on tessera by path: builds and trains"
# tessera's lock pins the versions (cargo adds the crate itself); the target folder is shared.
cp Cargo.lock tests/downstream/Cargo.lock
cargo run --quiet --manifest-path tests/downstream/Cargo.toml --target-dir target
echo "== without nvcc: the crate builds and says how to build the kernels"
out="$(TESSERA_NO_NVCC=1 cargo run --quiet --target-dir target/no-nvcc -- devices 2>&1)"
echo "$out"
grep -q "NOT BUILT: nvcc was not found" <<<"$out"
grep -q "scripts/setup.sh" <<<"$out"
echo "== cargo bench --no-run"
cargo bench --no-run
echo "== all checks passed"
