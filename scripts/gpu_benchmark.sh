#!/usr/bin/env bash
# The GPU side of docs/performance.md as ONE command for the device machine (about 6 minutes on one H100/H200,
# under the 10-minute limit of a single command there):
#   here, once:  bash scripts/gpu_prepare.sh
#   there:       bash scripts/gpu_benchmark.sh "$OUT"
#                carrying .whl .peer peer-bench/spm checkpoints/bench-base (the device copies only the repository)
# Alternates nothing: one machine, one sitting, each figure the median of 3 timed runs inside its process.
#   1. peers:  HF Marian training at 16k-token batches (../shared/bench/gpu_bench.py, copied to .peer by gpu_prepare.sh)
#              HF Marian `generate` at batch 256 (scripts/gpu_decode_peer.py)
#   2. nmtkit: `nmtkit benchmark` on configs/bench-base.yaml: 16k-token batches with decoding at batch 256, then
#              --no-decode at 16k with train.compile, and at 64k eager and compiled (the best FLOP utilisation)
#   3. scripts/gpu_summary.py: the target table (OUT/summary.md, OUT/summary.json); it can also be run here later on
#      whatever came back, and the JSON lines alone hold every figure
#   4. the test suite with a GPU visible (the CUDA-only test, and `device: auto` resolving to cuda), while time is left
# A run that would start after BUDGET_S seconds (default 420) is skipped, so the command ends inside its limit.
# SMOKE=1 runs every command at a tiny size on this CPU (compiled runs skipped), to check the plumbing here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-bench}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
  PY=${PY:-.venv/bin/python}; PEER_PY=${PEER_PY:-/tmp/peer-venv/bin/python}; DEV=cpu
  PEER_ARGS="--device cpu --tiny"
  NMT_ARGS="--device cpu --steps 2 --repeats 1 --sentences 16 --set train.max_tokens=1024"
  SIZES="16k"
else
  PY=${PY:-python3}; PEER_PY=${PEER_PY:-python3}; DEV=cuda
  PEER_ARGS=""
  NMT_ARGS="--device cuda"
  SIZES="16k 64k"
  if [ -d .whl ]; then  # packages the GPU image lacks (datasets and its pins), fetched by gpu_prepare.sh
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nmtkit-site .whl/*.whl \
      || { echo "installing .whl failed"; exit 1; }
    export PYTHONPATH=/tmp/nmtkit-site
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
SPM=peer-bench/spm/spm.model
$PY -c "
import importlib.metadata as m, torch
def v(p):
    try: return m.version(p)
    except m.PackageNotFoundError: return 'absent'
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())
print(' '.join(f'{p} {v(p)}' for p in ('datasets', 'pyarrow', 'fsspec', 'transformers', 'sentencepiece')))" 2>&1 | tee "$OUT/versions.txt"
step() { echo "== $(date +%T) ${SECONDS}s $1" | tee -a "$OUT/progress.txt"; }
time_left() { [ "$SECONDS" -lt "${BUDGET_S:-420}" ] || { step "skipped (budget spent): $1"; return 1; }; }

step "peers: HF Marian training, 16k-token batches"
timeout 240 $PEER_PY .peer/gpu_bench.py $PEER_ARGS --systems hf_marian --max-tokens 16384 \
  --data data/tatoeba-en-zh/train.jsonl --spm $SPM > "$OUT/peers.jsonl" 2> "$OUT/peers.err"
step "peers: HF Marian generate, batch 256"
timeout 180 $PEER_PY scripts/gpu_decode_peer.py $PEER_ARGS --peer-dir .peer --spm $SPM > "$OUT/hf_decode.jsonl" 2> "$OUT/hf_decode.err"

for size in $SIZES; do
  tokens=$([ $size = 16k ] && echo 16384 || echo 65536)
  [ "${SMOKE:-0}" = 1 ] && tokens=1024
  decode=$([ $size = 16k ] && echo "--batch-size 256" || echo "--no-decode")
  time_left "$size eager" || continue
  step "nmtkit: $size eager"
  timeout 240 $PY -m nmtkit benchmark --config configs/bench-base.yaml --precision bf16 --json $NMT_ARGS \
    --set train.max_tokens=$tokens $decode > "$OUT/nmtkit-$size.jsonl" 2> "$OUT/nmtkit-$size.err"
  if [ "${SMOKE:-0}" != 1 ] && time_left "$size compiled"; then
    step "nmtkit: $size compiled (train.compile; the first steps compile)"
    timeout 300 $PY -m nmtkit benchmark --config configs/bench-base.yaml --precision bf16 --json $NMT_ARGS \
      --set train.max_tokens=$tokens --set train.compile=true --no-decode > "$OUT/nmtkit-$size-compile.jsonl" 2> "$OUT/nmtkit-$size-compile.err"
  fi
done
step "summary"
$PY scripts/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
if [ "$DEV" = cuda ] && time_left "test suite"; then
  step "test suite with the GPU visible"
  timeout $((${BUDGET_S:-420} + 120 - SECONDS)) $PY -m pytest -q -x -p no:cacheprovider tests > "$OUT/tests.txt" 2>&1
  tail -3 "$OUT/tests.txt"
fi
step "done"
