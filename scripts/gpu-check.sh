#!/usr/bin/env bash
# The one script to run on a machine with a GPU. It needs CUDA's driver (and cuBLAS for the
# baselines), not Rust: it runs the binaries that scripts/build-gpu-bins.sh built into
# gpu-bin/. It prints the devices and kernels, runs every test on the GPU (ops, training,
# the parallel oracle on logical devices of the GPU, NCCL with one rank: all-reduce, bus
# bandwidth and NCCL-backed training steps), the default training job on `cuda` and
# on cuda:0x4, the criterion groups with their cuBLAS and copy peers, and the kernel report
# table last.
#   usage: scripts/gpu-check.sh [quick]      (quick: tests, the training jobs and a short
#   report, about 3 minutes; the full run adds the cuda bench groups (gemm-kernels/cuda: each
#   GEMM family beside cuBLAS) and the PyTorch peers, about 9 minutes. With 15 minutes of device
#   time and a first start of a few minutes, run the full script once, directly)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# On the device tool's machine, everything printed also goes to $OUT/gpu-check.log, which comes
# back whole (the tool's reply keeps only the tail of the output).
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then exec > >(tee "$OUT/gpu-check.log") 2>&1; fi
bin=gpu-bin
if [ ! -x "$bin/tessera" ] && [ -f gpu-bin.tar.gz ]; then tar -xzf gpu-bin.tar.gz; fi
[ -x "$bin/tessera" ] || { echo "gpu-check: $bin/ is missing: run scripts/build-gpu-bins.sh where Rust is" >&2; exit 2; }

# The driver's library may sit outside the default search path; cuBLAS too (CUDA or PyTorch's wheels).
libdirs=""
for pat in 'libcuda.so.1' 'libcublas.so*' 'libcublasLt.so*' 'libnccl.so*'; do
  for f in $( (ldconfig -p 2>/dev/null | awk -v p="${pat%\*}" 'index($1,p)==1 {print $NF}'; \
               find /usr/lib /usr/lib64 /usr/local /opt /lib -name "$pat" 2>/dev/null; \
               python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null | xargs -r -I{} find {} -name "$pat" 2>/dev/null) | head -n 3); do
    d="$(dirname "$f")"
    # A toolkit's stubs/ folder holds a libcuda whose cuInit fails: never put it on the path.
    case "$d" in */stubs | */stubs/*) continue ;; esac
    case ":$libdirs:" in *":$d:"*) ;; *) libdirs="$libdirs:$d" ;; esac
  done
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== $(date -u +%Y-%m-%dT%H:%MZ) LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
echo "== glibc here: $(ldd --version 2>/dev/null | head -n 1); the binaries need: $(cat "$bin/GLIBC_FLOOR" 2>/dev/null || echo unknown)"
echo "== commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# The CLI tests run the prebuilt binary, the example test the prebuilt example. No Open MPI
# here: the mpirun tests skip (they run in CI); NCCL runs in process (tests/mpi.rs, one rank).
export TESSERA_BIN="$PWD/$bin/tessera" TESSERA_EXAMPLES_DIR="$PWD/$bin/examples" TESSERA_SKIP_MPI_TESTS=1
# Every GPU test, bench and example fails instead of skipping when no usable GPU is found.
export TESSERA_REQUIRE_GPU=1
status=0
run() { echo; echo "== $*"; "$@" || { echo "!! FAILED ($?): $*"; status=1; }; }
echo; echo "== $bin/tessera devices"
devs="$("$bin/tessera" devices 2>&1)"
echo "$devs"
if ! grep -q '^GPU 0: ' <<<"$devs"; then
  echo "gpu-check: tessera sees no usable GPU (above: the driver line says why); stopping before the tests" >&2
  exit 3
fi
run "$bin/tessera" kernels
for t in "$bin"/test-*; do
  [ -x "$t" ] || continue
  echo; echo "== $t --test-threads=1"
  if ! "$t" --test-threads=1; then
    # A kernel fault shows at the next blocking call under another op's name: rerun with every
    # launch synchronised, so the error names the kernel, its launch shape and its arguments.
    echo "!! FAILED: $t; again with TESSERA_SYNC_LAUNCHES=1 to name the kernel that faulted"
    status=1
    TESSERA_SYNC_LAUNCHES=1 "$t" --test-threads=1 || true
  fi
done
run "$bin/tessera" train --device cuda --json
run "$bin/tessera" train --device cuda:0x4 --dp 2 --pp 2 --microbatches 4 --steps 200 --json
if [ "${1:-}" != quick ]; then
  run "$bin/bench-gemm" --bench --warm-up-time 1 --measurement-time 1 cuda
  run "$bin/bench-elementwise" --bench --warm-up-time 1 --measurement-time 1 cuda
  run "$bin/bench-train_step" --bench --warm-up-time 1 --measurement-time 2 cuda
  run "$bin/bench-parallel" --bench --warm-up-time 1 --measurement-time 1 cuda
  # The large MLP's training step with pipelined GEMM families in place of the default
  # (kept apart from the main criterion output, so the table below holds the defaults).
  for fam in pipe16 wide8 wide16; do
    CRITERION_HOME=target/criterion-$fam TESSERA_GEMM_KERNEL=$fam \
      run "$bin/bench-train_step" --bench --warm-up-time 1 --measurement-time 2 "cuda/784-4096"
  done
  # The peers outside Rust, right after, on the same card: PyTorch eager and torch.compile.
  peers=target/peers-gpu.jsonl
  mkdir -p target && : > "$peers"
  for mode in eager compile; do
    for model in "784,512,512,10 128" "784,4096,4096,4096,10 1024"; do
      set -- $model
      python3 bench/peers/mlp_step.py --framework torch --device cuda --mode "$mode" --widths "$1" --batch "$2" | tee -a "$peers" \
        || echo "!! peer failed: pytorch $mode $1"
    done
  done
  run "$bin/bench-report" --bench
  card="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
  python3 bench/results.py --peers "$peers" --out "bench/results/$(date -u +%Y-%m-%d)-gpu.md" \
    --title "tessera on ${card:-a GPU}: kernels against cuBLAS and copies, training against PyTorch" --command "scripts/gpu-check.sh"
  if [ -n "${OUT:-}" ]; then
    cp bench/results/*-gpu.md "$OUT"/
    for d in target/criterion target/criterion-*; do [ -d "$d" ] && cp -r "$d" "$OUT/$(basename "$d")"; done
  fi
else
  TESSERA_REPORT_QUICK=1 run "$bin/bench-report" --bench
fi
echo
[ $status = 0 ] && echo "== gpu-check: all passed" || echo "== gpu-check: FAILURES above"
exit $status
