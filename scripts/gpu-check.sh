#!/usr/bin/env bash
# The one script to run on a machine with a GPU. It needs CUDA's driver (and cuBLAS for the
# baselines), not Rust: it runs the binaries that scripts/build-gpu-bins.sh built into
# gpu-bin/. It prints the devices and kernels, runs every test on the GPU, the criterion GEMM
# and memory-bound groups with their cuBLAS and copy peers, and the kernel report table last.
#   usage: scripts/gpu-check.sh [quick]      (quick: tests and a short report only)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=gpu-bin
[ -x "$bin/tessera" ] || { echo "gpu-check: $bin/ is missing: run scripts/build-gpu-bins.sh where Rust is" >&2; exit 2; }

# The driver's library may sit outside the default search path; cuBLAS too (CUDA or PyTorch's wheels).
libdirs=""
for pat in 'libcuda.so.1' 'libcublas.so*' 'libcublasLt.so*'; do
  for f in $( (ldconfig -p 2>/dev/null | awk -v p="${pat%\*}" 'index($1,p)==1 {print $NF}'; \
               find /usr/lib /usr/lib64 /usr/local /opt /lib -name "$pat" 2>/dev/null; \
               python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null | xargs -r -I{} find {} -name "$pat" 2>/dev/null) | head -n 3); do
    d="$(dirname "$f")"
    case ":$libdirs:" in *":$d:"*) ;; *) libdirs="$libdirs:$d" ;; esac
  done
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== $(date -u +%Y-%m-%dT%H:%MZ) LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
echo "== commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

status=0
run() { echo; echo "== $*"; "$@" || { echo "!! FAILED ($?): $*"; status=1; }; }
run "$bin/tessera" devices
run "$bin/tessera" kernels
for t in "$bin"/ops "$bin"/tessera_lib "$bin"/cli; do
  [ -x "$t" ] && run "$t" --test-threads=1
done
if [ "${1:-}" != quick ]; then
  run "$bin/gemm" --bench --warm-up-time 1 --measurement-time 2
  run "$bin/elementwise" --bench --warm-up-time 1 --measurement-time 2
  run "$bin/report" --bench
else
  TESSERA_REPORT_QUICK=1 run "$bin/report" --bench
fi
echo
[ $status = 0 ] && echo "== gpu-check: all passed" || echo "== gpu-check: FAILURES above"
exit $status
