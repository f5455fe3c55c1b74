#!/usr/bin/env bash
# One prepared run of the speed benchmarks with GPU settings, for a machine with an NVIDIA GPU.
# Installs nothing (the project's venv must already exist: `make setup`, or wheels brought along); every step has
# its own time limit so the whole script stays under ~8 minutes; figures go to stdout and $OUT (or
# benchmarks/results/gpu/). Record them and the GPU model in ARCHITECTURE.md ("GPU figures").
#
#   bash benchmarks/gpu_check.sh            # all steps
#   STEPS="decode embed" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS=${OUT:-benchmarks/results/gpu}
mkdir -p "$RESULTS"
STEPS=${STEPS:-"env decode embed caption train"}
export RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false

step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log" | grep -v -E "^\s*$|INFO|WARNING" | tail -25
  echo "=== $name: rc ${PIPESTATUS[0]} in $((SECONDS - t0))s"
}

for s in $STEPS; do
  case $s in
    env) step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; \
         $PY -c 'import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))'" ;;
    # decode: ours batch 256 vs HF generate greedy and beam-5 (targets >= 1.0x and >= 1.2x)
    decode) step decode 100 "$PY" benchmarks/decode.py --device cuda --batch 256 --repeats 3 --ref-images 2 ;;
    # embed: ViT-B-32 from 256 px shards, our defaults on a GPU node (one actor per GPU, fp16 autocast) with
    # batch 256; the pure forward on the GPU; no clip-retrieval (its venv would need the internet)
    embed) step embed 180 "$PY" benchmarks/embed.py --images 8192 --per-shard 1024 --models ViT-B-32 \
           --batch-size 256 --extra-flags "--batch-size 256" --device cuda --pure-images 2048 --no-peer \
           --json "$RESULTS/embed.json" ;;
    # caption: ViT-B-32 + GPT-2 small, greedy 30 tokens, default flags (fused actor on the GPU) + batch 256
    caption) step caption 150 "$PY" benchmarks/caption.py --images 2048 --ref-images 2 --captioner-batch 256 \
             --extra-flags "--caption-batch-size 256 --clip-batch-size 256" --json "$RESULTS/caption.json" ;;
    # train: default resources (one worker on the GPU) vs the same model in memory on the GPU
    train) step train 90 "$PY" benchmarks/train.py --rows 20000 --epochs 1 --out "$RESULTS/train.json" ;;
    *) echo "unknown step $s" ;;
  esac
done
