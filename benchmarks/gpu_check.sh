#!/usr/bin/env bash
# One call on a machine with an NVIDIA GPU: build fastbn for that GPU, run the whole test suite
# (CUDA tests included), compute-sanitizer memcheck over the CUDA tests, the benchmarks, and a
# CUDA training-step timing on synthetic data. Writes summary.md and logs to $OUT
# (default ./gpu-results). Needs python3 with torch (CUDA), pytest, matplotlib, tqdm; nvcc.
#   bash benchmarks/gpu_check.sh            # everything (~6 min on an H100)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 FASTBN_CUDA=1
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
summary="$OUT/summary.md"
status=0
step() {  # step NAME LOG COMMAND...: run, record pass/fail and duration in the summary
  local name=$1 log=$2; shift 2
  local t0=$(date +%s)
  "$@" > "$OUT/$log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && status=1
  echo "| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED ($rc)") | $(( $(date +%s) - t0 )) s | $log |" >> "$summary"
  tail -3 "$OUT/$log"
  return $rc
}
{
  echo "# fastbn GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
  echo "- $($PY -c 'import torch, sys; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}")')"
  echo "- nvcc: $(nvcc --version | tail -2 | head -1)"
  echo
  echo "| step | result | time | log |"
  echo "|---|---|---|---|"
} > "$summary"

# The local GPU's arch only: the build takes a fraction of the two-arch CI build.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
step build build.log $PY -m pip install --no-build-isolation --no-deps -v -e . || { cat "$summary"; exit 1; }
step "build_info" build_info.log $PY -c "import fastbn, json; print(json.dumps(fastbn.build_info()))"
step "tests (all, CUDA included)" tests.log $PY -m pytest -q -rs tests -p no:cacheprovider
step "compute-sanitizer memcheck (CUDA tests)" memcheck.log compute-sanitizer --tool memcheck --error-exitcode 1 \
  --target-processes all $PY -m pytest -q -x tests/test_batch_norm.py tests/test_linear_leaky_relu.py -k cuda -p no:cacheprovider
step "benchmarks" bench.log $PY -m benchmarks.run --device cuda --out "$OUT"
step "train steps (synthetic CIFAR-shaped data)" train.log bash -c "
  $PY -m fastbn.train cnn --device cuda --synthetic 20000 --max_steps 500 --eval_freq 500 --amp none --quiet --out $OUT/cnn-fastbn &&
  $PY -m fastbn.train cnn --device cuda --synthetic 20000 --max_steps 500 --eval_freq 500 --amp none --quiet --backend torch --out $OUT/cnn-torch &&
  $PY -m fastbn.train mlp --device cuda --synthetic 20000 --max_steps 1500 --eval_freq 1500 --quiet --out $OUT/mlp-fastbn &&
  $PY -m fastbn.train mlp --device cuda --synthetic 20000 --max_steps 1500 --eval_freq 1500 --quiet --backend torch --out $OUT/mlp-torch"
rm -rf "$OUT"/*/checkpoint.pt
{ echo; echo "Benchmark table: see the cuda-*.md file beside this summary."; } >> "$summary"
cat "$summary"
# GPU_CHECK_TAR=1: everything in one archive beside summary.md (for transports that take few files)
if [ "${GPU_CHECK_TAR:-0}" = 1 ]; then
  tar -C "$OUT" -czf /tmp/gpu-results.tar.gz . && find "$OUT" -mindepth 1 ! -name summary.md -delete &&
    mv /tmp/gpu-results.tar.gz "$OUT/"
fi
exit $status
