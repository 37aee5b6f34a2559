#!/usr/bin/env bash
# The GPU side of docs/performance.md as ONE command for the device machine (8-9.5 minutes on one H100/H200,
# inside the 10-minute limit of a single command there):
#   here, once:  bash scripts/gpu_prepare.sh
#   there:       bash scripts/gpu_benchmark.sh "$OUT"
#                carrying .whl .whl-pyarrow .peer peer-bench/spm/spm.model checkpoints/bench-base/tokenizer
#                (the device copies only the repository; 60 MiB in all, under its 64 MiB limit)
# One machine, one sitting, each figure the median of 3 timed runs inside its process. In order of importance,
# so that a run cut short still answers the main questions:
#   1. SDPA backends at sentence shapes (scripts/gpu_attention_bench.py)
#   2. nmtkit 16k-token batches, eager, with decoding at batch 256 (CUDA graphs) and a profile of 5 training steps
#   3. peers: HF Marian `generate` at batch 256 (scripts/gpu_decode_peer.py), nmtkit 16k with train.compile
#      (profiled), tests/test_cuda.py (loss, attention, training and decoding on the GPU against the CPU; CUDA_TESTS_K
#      selects some), HF Marian training at 16k (../shared/bench/gpu_bench.py, copied to .peer by gpu_prepare.sh)
#   4. decoding without CUDA graphs, the loss alone (scripts/gpu_loss_bench.py), 16k compiled without the non-finite
#      check (what the check still costs), 64k compiled (the best FLOP utilisation), decoding at batch 64 with and
#      without CUDA graphs (what a capture per batch costs), `nmtkit train` itself (compiled, 16k: batches made in the
#      loop, the tables of step 2 reused). 64k eager and HF at 64k, measured in the fifth session's run B (213k and
#      201k), are left out for time. Compiled runs log recompilations and graph breaks (TORCH_LOGS) into their .err.
#   5. scripts/gpu_summary.py: the target table; it can also be run here later on what came back
#   6. the test suite with a GPU visible, while time is left
# Every log and JSON line goes to a work folder packed into OUT/results.tar.gz after each step (the device returns
# at most 8 files); OUT also gets progress.txt and summary.md. No step starts after START_BY seconds (default 460)
# and every step is cut at END_BY (default 560; SIGKILL 15 s after the cut's SIGTERM, which `nmtkit train` takes as
# a request to finish its step and save), so the command ends inside its limit with what it measured.
# SMOKE=1 runs every command at a tiny size on this CPU (compiled runs skipped), to check the plumbing here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-bench}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
W=$(mktemp -d)  # the work folder
START_BY=${START_BY:-460}
END_BY=${END_BY:-560}
if [ "${SMOKE:-0}" = 1 ]; then
  PY=${PY:-.venv/bin/python}; PEER_PY=${PEER_PY:-/tmp/peer-venv/bin/python}; DEV=cpu
  PEER_ARGS="--device cpu --tiny"
  NMT_ARGS="--device cpu --steps 2 --repeats 1 --sentences 16"
  LOOP_ARGS="--set train.max_steps=4 --set train.log_every=2 --set train.compile=false"
else
  PY=${PY:-python3}; PEER_PY=${PEER_PY:-python3}; DEV=cuda
  PEER_ARGS=""
  NMT_ARGS="--device cuda"
  LOOP_ARGS="--set train.max_steps=60 --set train.log_every=10 --set train.compile=true"
  if [ -d .whl ]; then  # packages the GPU image lacks (datasets and its pins), fetched by gpu_prepare.sh
    wheels=(.whl/*.whl)
    # datasets needs pyarrow >= 24; the image's is used unless it is older
    python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null \
      || { echo "the image's pyarrow is missing or older than 24: installing the carried one"; wheels+=(.whl-pyarrow/*.whl); }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nmtkit-site "${wheels[@]}" \
      || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/nmtkit-site
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$W/gpu.txt"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
SPM=peer-bench/spm/spm.model
$PY -c "
import importlib.metadata as m, torch
def v(p):
    try: return m.version(p)
    except m.PackageNotFoundError: return 'absent'
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())
print(' '.join(f'{p} {v(p)}' for p in ('datasets', 'pyarrow', 'fsspec', 'transformers', 'sentencepiece')))" 2>&1 | tee "$W/versions.txt"

pack() { tar -czf "$OUT/results.tar.gz" -C "$W" . ; cp "$W/progress.txt" "$OUT/progress.txt" 2>/dev/null; }
step() { echo "== $(date +%T) ${SECONDS}s $1" | tee -a "$W/progress.txt"; pack; }
# run NAME SECONDS CMD...: CMD's stdout to NAME.jsonl and stderr to NAME.err, cut at SECONDS or at END_BY
run() {
  local name=$1 limit=$2; shift 2
  if [ "$SECONDS" -ge "$START_BY" ]; then step "skipped (time spent): $name"; return; fi
  local left=$((END_BY - SECONDS)); [ "$limit" -lt "$left" ] || limit=$left
  step "$name (at most ${limit}s)"
  timeout -k 15 "$limit" "$@" > "$W/$name.jsonl" 2> "$W/$name.err"
  local rc=$?
  [ $rc = 0 ] || { echo "   exit $rc; the end of $name.err:"; tail -5 "$W/$name.err"; } | tee -a "$W/progress.txt"
  pack
}
NMTKIT="$PY -m nmtkit benchmark --config configs/bench-base.yaml --precision bf16 --json $NMT_ARGS"
# compiled runs log each recompilation and graph break into their .err: a layer past Dynamo's recompile limit runs
# eagerly without a word, and compile time spilling into the timed runs shows only as a slow first repeat
COMPILED="env TORCH_LOGS=recompiles,graph_breaks $NMTKIT"
tokens() { if [ "${SMOKE:-0}" = 1 ]; then echo 1024; else echo 16384; fi; }  # the 16k runs' batch budget

run attention 90 $PY scripts/gpu_attention_bench.py $([ "${SMOKE:-0}" = 1 ] && echo "--device cpu --batch 16")
run nmtkit-16k 150 $NMTKIT --set train.max_tokens=$(tokens) --batch-size 256 --profile "$W/profile-16k.txt"
run hf_decode 120 $PEER_PY scripts/gpu_decode_peer.py $PEER_ARGS --peer-dir .peer --spm $SPM
if [ "${SMOKE:-0}" != 1 ]; then
  # the first steps compile (dynamic shapes); the warm-up steps and the first of the 3 timed runs absorb recompiles
  run nmtkit-16k-compile 200 $COMPILED --set train.max_tokens=16384 --set train.compile=true --no-decode --profile "$W/profile-16k-compile.txt"
  # attention as two matmuls and a softmax that Inductor fuses, instead of SDPA's kernels (42% of a compiled step in
  # the fifth session's run B)
  run nmtkit-16k-compile-matmul 200 $COMPILED --set train.max_tokens=16384 --set train.compile=true \
    --set train.attention_kernel=matmul --no-decode --profile "$W/profile-16k-compile-matmul.txt"
fi
if [ "$DEV" = cuda ]; then  # the package's numbers on the GPU equal its CPU numbers (tests/test_cuda.py)
  run cuda-tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "${CUDA_TESTS_K:-}"
fi
run peers 150 $PEER_PY .peer/gpu_bench.py $PEER_ARGS --systems hf_marian --max-tokens $(tokens) \
  --data data/tatoeba-en-zh/train.jsonl --spm $SPM
run nmtkit-decode-eager 90 $NMTKIT --no-train --batch-size 256 --set decode.cuda_graphs=false  # what the graphs buy
run loss 90 $PY scripts/gpu_loss_bench.py $([ "${SMOKE:-0}" = 1 ] && echo "--device cpu --rows 512 --vocab 2000")
if [ "${SMOKE:-0}" != 1 ]; then
  # the non-finite check: a flag per step, read back a step late (it used to stall every step: 10% on an H200)
  run nmtkit-16k-compile-nocheck 150 $COMPILED --set train.max_tokens=16384 --set train.compile=true \
    --set train.skip_nonfinite=false --no-decode
  run nmtkit-64k-compile 200 $COMPILED --set train.max_tokens=65536 --set train.compile=true --no-decode
  run nmtkit-64k-compile-matmul 200 $COMPILED --set train.max_tokens=65536 --set train.compile=true \
    --set train.attention_kernel=matmul --no-decode
fi
# each batch's CUDA-graph capture has a fixed cost (torch.cuda.graph empties the allocator's cache first): at batch 64,
# eight captures for 512 sentences, against eager steps
run nmtkit-decode-b64 60 $NMTKIT --no-train --batch-size 64
run nmtkit-decode-b64-eager 60 $NMTKIT --no-train --batch-size 64 --set decode.cuda_graphs=false
# the loop users run (`nmtkit train`, compiled, 16k): batches made inside the loop, logging and the late flag included,
# against the benchmark's pre-made batches; its metrics.jsonl (target tokens/s per 10 steps) comes back
LOOP=$(mktemp -d); mkdir -p "$LOOP/run" && cp -r checkpoints/bench-base/tokenizer "$LOOP/run/"
run train-loop-16k 150 $PY -m nmtkit train --config configs/bench-base.yaml --set train.run_dir="$LOOP/run" \
  --set train.device=$DEV --set train.precision=bf16 --set train.max_tokens=$(tokens) $LOOP_ARGS \
  --set data.cache_dir="$PWD/checkpoints/bench-base/cache" \
  --set train.eval_every=1000000 --set train.save_every=1000000 --set train.progress_bar=false
cp "$LOOP/run/metrics.jsonl" "$W/train-loop-16k.metrics.jsonl" 2>/dev/null; rm -rf "$LOOP"  # not the checkpoint
step "summary"
$PY scripts/gpu_summary.py "$W" | tee "$OUT/summary.md"
pack
if [ "$DEV" = cuda ] && [ "$SECONDS" -lt "$START_BY" ]; then
  step "test suite with the GPU visible"
  timeout $((END_BY + 20 - SECONDS)) $PY -m pytest -q --maxfail=5 -p no:cacheprovider tests > "$W/tests.txt" 2>&1
  tail -3 "$W/tests.txt"
fi
step "done"
rm -rf "$W"
