#!/usr/bin/env bash
# The one script to run on a machine with a GPU. It needs CUDA's driver (and cuBLAS for the
# baselines), not Rust: it runs the binaries that scripts/build-gpu-bins.sh built into
# gpu-bin/. It prints the devices and kernels, runs every test on the GPU (ops, training,
# the parallel oracle on logical devices of the GPU, NCCL with one rank: all-reduce, bus
# bandwidth and NCCL-backed training steps), the default training job on `cuda` and
# on cuda:0x4, the GPT job on `cuda` and text sampled from it, the kernel report (each op
# against the f64 reference, timed beside cuBLAS or a device copy), the PyTorch peers (the
# training step; layer_norm and scaled_dot_product_attention beside the transformer kernels),
# then the criterion groups while time is left, and ends with a one-screen summary.
#   usage: scripts/gpu-check.sh [quick]      (quick: tests, the training jobs and a short
#   report, about 3 minutes.) The full run keeps to a budget of TESSERA_GPU_BUDGET_S seconds
#   (default 480: 8 minutes): each optional part starts only if its estimate fits in what is
#   left, and the summary names what was skipped.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# On the device tool's machine, everything printed also goes to $OUT/gpu-check.log, which comes
# back whole (the tool's reply keeps only the tail of the output).
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then exec > >(tee "$OUT/gpu-check.log") 2>&1; fi
bin="${TESSERA_GPU_BIN:-gpu-bin}"
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
start=$SECONDS
budget="${TESSERA_GPU_BUDGET_S:-480}"
summary=()
note() { summary+=("$*"); }
left() { echo $((budget - (SECONDS - start))); }
# fits SECONDS WHAT: whether an optional part estimated at SECONDS fits in the budget (else noted).
fits() { if [ "$(left)" -ge "$1" ]; then return 0; fi; note "SKIPPED (budget): $2 (~$1 s, $(left) s left)"; return 1; }
run() { echo; echo "== $*"; "$@" || { echo "!! FAILED ($?): $*"; status=1; note "FAILED: $*"; }; }
echo; echo "== $bin/tessera devices"
devs="$("$bin/tessera" devices 2>&1)"
echo "$devs"
if ! grep -q '^GPU 0: ' <<<"$devs"; then
  echo "gpu-check: tessera sees no usable GPU (above: the driver line says why); stopping before the tests" >&2
  exit 3
fi
note "$(grep -m1 '^GPU 0: ' <<<"$devs")"
run "$bin/tessera" kernels
mkdir -p target
for t in "$bin"/test-*; do
  [ -x "$t" ] || continue
  echo; echo "== $t --test-threads=1"
  log="target/$(basename "$t").log"
  if "$t" --test-threads=1 2>&1 | tee "$log"; [ "${PIPESTATUS[0]}" = 0 ]; then
    note "tests $(basename "$t"): $(grep -m1 '^test result' "$log" | sed 's/; finished.*//')"
  else
    # A kernel fault shows at the next blocking call under another op's name: rerun with every
    # launch synchronised, so the error names the kernel, its launch shape and its arguments.
    echo "!! FAILED: $t; again with TESSERA_SYNC_LAUNCHES=1 to name the kernel that faulted"
    status=1
    note "FAILED tests $(basename "$t"): $(grep -E '^test .* FAILED|panicked' "$log" | head -n 3 | tr '\n' ' ')"
    TESSERA_SYNC_LAUNCHES=1 "$t" --test-threads=1 || true
  fi
  # The op suites on the GPU: each one checks its kernels against the f64 reference.
  if [ "$(basename "$t")" = test-ops ]; then
    note "kernels verified on this GPU (tests/ops.rs cuda suites): $(grep -E '^test cuda::' "$log" | sed -E 's/^test cuda::([a-z_]+) \.\.\. (ok|FAILED).*/\1 \2/' | tr '\n' ';')"
  fi
done
job() { # job LABEL ARGS...: a training run whose JSON result goes to the summary
  local label="$1"; shift
  echo; echo "== $bin/tessera train $* --json"
  local out
  if out="$("$bin/tessera" train "$@" --json)"; then
    echo "$out"
    note "train $label: $(tail -n 1 <<<"$out" | python3 -c 'import json,sys; j=json.load(sys.stdin); print("test accuracy %.2f%%, %.0f samples/s" % (100*j.get("test_accuracy", float("nan")), j.get("samples_per_second", float("nan"))))' 2>/dev/null || tail -c 200 <<<"$out")"
  else
    echo "!! FAILED: train $*"; status=1; note "FAILED train $label"
  fi
}
job "default on cuda" --device cuda
job "cuda:0x4 dp2 pp2" --device cuda:0x4 --dp 2 --pp 2 --microbatches 4 --steps 200
# Tensor parallelism and ZeRO 1 on logical devices of the card (a stream each).
job "cuda:0x4 dp2 tp2 zero1" --device cuda:0x4 --dp 2 --tp 2 --zero 1 --steps 200
echo; echo "== $bin/tessera train --model gpt --device cuda:0x8 --dp 2 --pp 2 --tp 2 --zero 1 --steps 200 --json"
if out="$("$bin/tessera" train --model gpt --device cuda:0x8 --dp 2 --pp 2 --tp 2 --zero 1 --steps 200 --val-windows 200 --json)"; then
  echo "$out"
  note "train gpt on cuda:0x8 dp2 pp2 tp2 zero1: $(tail -n 1 <<<"$out" | python3 -c 'import json,sys; j=json.load(sys.stdin); print("validation loss %.4f after %d steps" % (j["val_loss"], j["steps"]))' 2>/dev/null || tail -c 200 <<<"$out")"
else
  echo "!! FAILED: train --model gpt on cuda:0x8 dp2 pp2 tp2 zero1"; status=1; note "FAILED train gpt on the cuda mesh"
fi
# The GPT job on the card (nanoGPT's CPU configuration, 2,000 steps), then text from it.
echo; echo "== $bin/tessera train --model gpt --device cuda --save target/gpt.st --json"
if out="$("$bin/tessera" train --model gpt --device cuda --save target/gpt.st --json)"; then
  echo "$out"
  note "train gpt on cuda: $(tail -n 1 <<<"$out" | python3 -c 'import json,sys; j=json.load(sys.stdin); print("validation loss %.4f after %d steps, %.1f steps/s" % (j["val_loss"], j["steps"], j["steps_per_second"]))' 2>/dev/null || tail -c 200 <<<"$out")"
  echo; echo "== $bin/tessera sample --checkpoint target/gpt.st --prompt ROMEO: --tokens 300 --seed 1"
  "$bin/tessera" sample --checkpoint target/gpt.st --prompt "ROMEO:" --tokens 300 --seed 1 || { status=1; note "FAILED sample"; }
else
  echo "!! FAILED: train --model gpt"; status=1; note "FAILED train gpt on cuda"
fi
report=target/kernel-report.md
if [ "${1:-}" != quick ]; then
  # The kernel report first: each op verified against the reference and timed beside its peer.
  if fits 90 "the kernel report"; then
    echo; echo "== $bin/bench-report --bench"
    "$bin/bench-report" --bench | tee "$report" || { status=1; note "FAILED: bench-report"; }
  fi
  # The peers outside Rust, on the same card: PyTorch eager, then torch.compile.
  peers=target/peers-gpu.jsonl
  : > "$peers"
  for mode in eager compile; do
    est=40; [ "$mode" = compile ] && est=120
    fits "$est" "PyTorch $mode peers" || continue
    for model in "784,512,512,10 128" "784,4096,4096,4096,10 1024"; do
      set -- $model
      python3 bench/peers/mlp_step.py --framework torch --device cuda --mode "$mode" --widths "$1" --batch "$2" | tee -a "$peers" \
        || echo "!! peer failed: pytorch $mode $1"
    done
  done
  if fits 30 "PyTorch layer_norm / scaled_dot_product_attention peers"; then
    python3 bench/peers/transformer_ops.py --framework torch --device cuda | tee -a "$peers" \
      || echo "!! peer failed: pytorch transformer ops"
  fi
  [ -s "$peers" ] && note "PyTorch peers (samples/s): $(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    j=json.loads(l)
    if j.get("bench") == "train_step": print("%s %s b%s %.0f;" % (j.get("peer"), j.get("widths"), j.get("batch"), j.get("samples_per_s", 0)), end=" ")
    if j.get("bench") == "transformer": print("%s %s %.0f GB/s;" % (j.get("peer"), j.get("case"), j.get("bytes_per_s", 0) / 1e9), end=" ")' "$peers" 2>/dev/null)"
  fits 60 "criterion gemm (each family beside cuBLAS)" && run "$bin/bench-gemm" --bench --warm-up-time 1 --measurement-time 1 cuda
  fits 40 "criterion elementwise" && run "$bin/bench-elementwise" --bench --warm-up-time 1 --measurement-time 1 cuda
  fits 60 "criterion train_step" && run "$bin/bench-train_step" --bench --warm-up-time 1 --measurement-time 2 cuda
  fits 40 "criterion parallel" && run "$bin/bench-parallel" --bench --warm-up-time 1 --measurement-time 1 cuda
  # The large MLP's training step with pipelined GEMM families in place of the default.
  for fam in pipe16 wide8 wide16; do
    fits 30 "train_step with TESSERA_GEMM_KERNEL=$fam" || continue
    CRITERION_HOME=target/criterion-$fam TESSERA_GEMM_KERNEL=$fam \
      run "$bin/bench-train_step" --bench --warm-up-time 1 --measurement-time 2 "cuda/784-4096"
  done
  card="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
  python3 bench/results.py --peers "$peers" --out "bench/results/$(date -u +%Y-%m-%d)-gpu.md" \
    --title "tessera on ${card:-a GPU}: kernels against cuBLAS and copies, training against PyTorch" --command "scripts/gpu-check.sh"
  if [ -n "${OUT:-}" ]; then
    cp bench/results/*-gpu.md "$OUT"/
    for d in target/criterion target/criterion-*; do [ -d "$d" ] && cp -r "$d" "$OUT/$(basename "$d")"; done
  fi
else
  echo; echo "== $bin/bench-report --bench (quick)"
  TESSERA_REPORT_QUICK=1 "$bin/bench-report" --bench | tee "$report" || { status=1; note "FAILED: bench-report"; }
fi
# One screen: what passed, what was skipped, and each kernel's check and ratio.
echo
echo "== summary ($((SECONDS - start)) s of a ${budget} s budget)"
for l in "${summary[@]}"; do echo "- $l"; done
[ -s "$report" ] && grep -E '^\|' "$report"
[ -n "${OUT:-}" ] && [ -s "$report" ] && cp "$report" "$OUT"/
echo
[ $status = 0 ] && echo "== gpu-check: all passed" || echo "== gpu-check: FAILURES above"
exit $status
