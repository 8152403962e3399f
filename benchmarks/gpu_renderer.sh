#!/usr/bin/env bash
# One GPU call for splat_cuda (issue 3): the GPU tests, the full benchmark (every variant against the PyTorch
# reference, in one run), the register-budget sweep, an interleaved A/B against the previous kernels when a copy
# of the previous package is carried in .oldpkg/ (splat_cuda/ and benchmarks/renderer.py of an earlier commit:
# `git archive <commit> splat_cuda | tar x -C .oldpkg`), and Nsight Compute's summary of the first case.
# Logs and tables go to $OUT.  Usage: CUDA_VISIBLE_DEVICES=0 bash benchmarks/gpu_renderer.sh
# RENDERER_STEPS picks the steps (default: "tests bench sweep old ncu"; "source" adds per-instruction counts).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export SPLAT_CUDA_CACHE=/tmp/splat_cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/renderer_gpu.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/renderer_steps.txt"
}
STEPS=" ${RENDERER_STEPS:-tests bench sweep old ncu} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
want tests && step renderer_tests 240 python3 -m pytest tests/test_render_cuda.py -q -m "not slow" -p no:cacheprovider
want bench && step renderer_bench 180 python3 benchmarks/renderer.py --markdown "$OUT/renderer.md"
want sweep && step renderer_sweep 200 python3 benchmarks/renderer.py --cases 0 1 --reps 20 \
  --sweep-min-blocks 3,3 4,3 3,2 --markdown "$OUT/renderer_sweep.md"
if want old && [ -d .oldpkg/splat_cuda ]; then  # interleaved: old, new, old, new (the machine drifts between calls)
  for run in 1 2; do
    step renderer_old$run 90 env SPLAT_CUDA_CACHE=/tmp/splat_cache_old python3 .oldpkg/benchmarks/renderer.py \
      --cases 0 1 2 --quick --reps 20 --markdown "$OUT/renderer_old$run.md"
    step renderer_new$run 90 python3 benchmarks/renderer.py --cases 0 1 2 --quick --reps 20 \
      --markdown "$OUT/renderer_new$run.md"
  done
fi
if want ncu && command -v ncu > /dev/null; then
  step renderer_ncu 120 ncu --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats -k regex:render_ -c 6 python3 benchmarks/renderer.py --profile 1
fi
if want source && command -v ncu > /dev/null; then  # per-instruction counts and stall samples of the first case
  step renderer_source 120 ncu --section SourceCounters --section InstructionStats --section WarpStateStats \
    -k regex:render_ -c 2 -o "$OUT/renderer_profile" python3 benchmarks/renderer.py --profile 1
  ncu --import "$OUT/renderer_profile.ncu-rep" --page source --print-source sass --csv > "$OUT/renderer_sass.csv" 2>&1
fi
