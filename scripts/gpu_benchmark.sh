#!/usr/bin/env bash
# GPU side of docs/performance.md, as one command on a machine with one H100/H200:
#   bash scripts/gpu_benchmark.sh [OUT_DIR]
# Runs, alternating, the peers' BASE-shape anchor (../shared/bench/gpu_bench.py: HF Marian,
# nn.Transformer, hand-written SDPA) and `nmtkit benchmark` on configs/bench-base.yaml at 16k-token
# batches (and 32k/64k for the best FLOP utilisation), eager and with train.compile, 3 rounds; every result is one JSON line in OUT_DIR.
# Needs torch with CUDA, sentencepiece, sacrebleu, pyyaml, tqdm, datasets (nmtkit) and transformers (peers).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-bench}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
SHARED=${SHARED:-../shared}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
for round in 1 2 3; do
  $PY "$SHARED/bench/gpu_bench.py" --max-tokens 16384 | tee -a "$OUT/peers.jsonl"
  for tokens in 16384 32768 65536; do
    $PY -m nmtkit benchmark --config configs/bench-base.yaml --device cuda --precision bf16 --json \
      --set train.max_tokens=$tokens $([ "$tokens" = 16384 ] || echo --no-decode) | tee -a "$OUT/nmtkit.jsonl"
    # the same with the encoder-decoder compiled (train.compile; the first steps compile it)
    $PY -m nmtkit benchmark --config configs/bench-base.yaml --device cuda --precision bf16 --json --no-decode \
      --set train.max_tokens=$tokens --set train.compile=true --steps 30 | tee -a "$OUT/nmtkit-compile.jsonl"
  done
done
$PY -m nmtkit benchmark --config configs/bench-base.yaml --device cuda --precision bf16 --json --no-train \
  --batch-size 256 | tee -a "$OUT/nmtkit-decode256.jsonl"
