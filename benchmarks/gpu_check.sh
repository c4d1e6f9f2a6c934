#!/usr/bin/env bash
# One call on a machine with an NVIDIA GPU: build fastbn for that GPU, run the whole test suite
# (CUDA tests included), the benchmarks, a per-kernel profile, the fused kernels against the split
# ones, eager steps split into ops and the rest, Nsight Compute counters of one training step's
# kernels, compute-sanitizer memcheck and racecheck over a slice of the CUDA tests, CUDA training
# runs on synthetic data. Each step has its own time limit, so that one slow step cannot eat the others. Writes at most 8 files to $OUT
# (default ./gpu-results): summary.md, build.log, tests.log, bench.log, the benchmark table and plot,
# profile.log, extra.log. Needs python3 with torch (CUDA), pytest, matplotlib, tqdm; nvcc.
#   bash benchmarks/gpu_check.sh      # over 8 min on an H100 (the benchmark alone ~4 min);
#   see benchmarks/results/gpu-2026-11-27/README.md for what fit a 15-minute lease (5.4 min)
# Environment: TEST_K (a pytest -k selection; default: the whole suite), BENCH_ARGS (default
# "--rounds 3 --min-run-time 0.05 --compile 0"), BENCH_LIMIT (s, default 240), MEMCHECK_TESTS
# (the -k terms of the tests memcheck runs), NCU=0 skips the Nsight Compute look at the kernels,
# RACECHECK=0 skips racecheck, TRAIN=0 skips the training runs, STEPS=0 skips the eager step
# breakdowns and the C++ nodes against the Python Functions.
# BASE=DIR: a second tree to compare the kernels against in the same call (e.g. here
# `mkdir .base && git archive REF | tar -x -C .base`, `.base` in .git/info/exclude, carried):
# built beside this one, then its kernel profile goes to extra.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 FASTBN_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${CUDA_HOME:-}" ]; then  # the real toolkit, not a wrapper nvcc on PATH
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
  else CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); fi
fi
export CUDA_HOME
summary="$OUT/summary.md"
status=0
step() {  # step NAME LOG SECONDS COMMAND...: run under a time limit, record result and duration
  local name=$1 log=$2 limit=$3; shift 3
  local t0=$(date +%s)
  echo "### $name" >> "$OUT/$log"
  timeout "$limit" "$@" >> "$OUT/$log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && status=1
  local res=ok; [ $rc -eq 124 ] && res="TIMED OUT (${limit} s)"; [ $rc -ne 0 ] && [ $rc -ne 124 ] && res="FAILED ($rc)"
  echo "| $name | $res | $(( $(date +%s) - t0 )) s | $log |" >> "$summary"
  echo "[$name: $res]"; tail -4 "$OUT/$log"
  return $rc
}
{
  echo "# fastbn GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
  echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
  echo "- $($PY -c 'import torch, sys; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}")')"
  echo "- nvcc: $(nvcc --version | tail -2 | head -1); C++ compiler: $(${CXX:-c++} --version | head -1)"
  echo
  echo "| step | result | time | log |"
  echo "|---|---|---|---|"
} > "$summary"

# The local GPU's arch only: the build takes a fraction of the two-arch CI build.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
if [ -n "${BASE:-}" ]; then  # its build runs while this tree's builds and tests
  base_log=$(mktemp)
  ( cd "$BASE" && timeout 400 $PY setup.py -q build_ext --inplace > "$base_log" 2>&1 ) &
  base_pid=$!
fi
step build build.log 300 $PY setup.py -q build_ext --inplace || { cat "$summary"; exit 1; }
step build_info build.log 60 $PY -c "import fastbn, json; print(json.dumps(fastbn.build_info()))"
xdist=""; $PY -c "import xdist" 2>/dev/null && xdist="-n 8"
step "tests (${TEST_K:-all, CUDA included})" tests.log 240 $PY -m pytest -q -rs --tb=short $xdist tests -p no:cacheprovider ${TEST_K:+-k "$TEST_K"}
step benchmarks bench.log "${BENCH_LIMIT:-240}" $PY -m benchmarks.run --device cuda --out "$OUT" ${BENCH_ARGS:---rounds 3 --min-run-time 0.05 --compile 0}
step "kernel profile" profile.log 90 $PY -m benchmarks.profile_kernels
step "fused kernels against the split ones" profile.log 90 $PY -m benchmarks.fused_threshold
# eager steps at the models' small shapes are host-bound: how much of a step is the ops, how much the rest
for shape in $([ "${STEPS:-1}" = 1 ] && echo 32x256x8x8 200x1000); do
step "step breakdown $shape (eager)" profile.log 60 $PY -m benchmarks.step_breakdown --device cuda --shape $shape --rounds 5 --min-run-time 0.05
done
if [ "${STEPS:-1}" = 1 ]; then  # the host time the C++ autograd nodes save against the Python Functions
step "autograd nodes against Functions (eager)" profile.log 60 $PY -m benchmarks.autograd_nodes --device cuda --rounds 5 --min-run-time 0.05
fi
if [ "${NCU:-1}" = 1 ]; then  # why the split reductions read below copy bandwidth (stalls, occupancy)
step "ncu: BatchNorm2d 128x64x32x32 fwd+bwd kernels" profile.log 120 \
  ncu --clock-control none --launch-skip 6 --launch-count 6 --kernel-name regex:"reduce|normalize|grad_input|finalize" \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section MemoryWorkloadAnalysis \
  $PY -c "import torch; from benchmarks.run import bn_case
step = bn_case((128, 64, 32, 32), torch.float32, torch.device('cuda'), False, 'fwd+bwd')[0]['fastbn']
for _ in range(3): step()
torch.cuda.synchronize()"
fi
memcheck_tests="${MEMCHECK_TESTS:-gradcheck or empty or constant or large_mean or fused_backward}"
step "compute-sanitizer memcheck (CUDA tests: $memcheck_tests)" extra.log 120 \
  compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
  $PY -m pytest -q -x tests/test_batch_norm.py tests/test_linear_leaky_relu.py -p no:cacheprovider \
  -k "cuda and ($memcheck_tests)"
if [ "${RACECHECK:-1}" = 1 ]; then
step "compute-sanitizer racecheck (fused kernels' shared memory)" extra.log 60 \
  compute-sanitizer --tool racecheck --error-exitcode 1 --target-processes all \
  $PY -m pytest -q -x tests/test_batch_norm.py -p no:cacheprovider -k "cuda and fused_backward"
fi
# The bad-input tests alone, in one process: a crash there is a finding (it was one, a statically
# linked libstdc++, until setup.py linked the shared one: benchmarks/results/gpu-2026-11-27).
if [ -n "${TEST_K:-}" ]; then
step "bad-input tests (one process)" tests.log 60 $PY -m pytest -q --tb=short tests -p no:cacheprovider -k bad_input
fi
if [ "${TRAIN:-1}" = 1 ]; then
step "train steps (synthetic CIFAR-shaped data)" extra.log 120 bash -c "
  $PY -m fastbn.train cnn --device cuda --synthetic 20000 --max_steps 300 --eval_freq 300 --amp none --quiet --out /tmp/cnn-fastbn &&
  $PY -m fastbn.train cnn --device cuda --synthetic 20000 --max_steps 300 --eval_freq 300 --amp none --quiet --backend torch --out /tmp/cnn-torch &&
  $PY -m fastbn.train mlp --device cuda --synthetic 20000 --max_steps 1000 --eval_freq 1000 --quiet --out /tmp/mlp-fastbn &&
  $PY -m fastbn.train mlp --device cuda --synthetic 20000 --max_steps 1000 --eval_freq 1000 --quiet --backend torch --out /tmp/mlp-torch"
fi
if [ -n "${BASE:-}" ]; then
  wait "$base_pid"; base_rc=$?
  step "base tree $BASE: build (rc $base_rc)" extra.log 5 tail -3 "$base_log"
  [ $base_rc -eq 0 ] && step "base tree $BASE: kernel profile" extra.log 90 \
    env PYTHONPATH="$(cd "$BASE" && pwd)" bash -c "cd '$BASE' && $PY -m benchmarks.profile_kernels"
fi
{ echo; echo "Benchmark table: the cuda-*.md file beside this summary."; } >> "$summary"
cat "$summary"
exit $status
