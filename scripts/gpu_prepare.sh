#!/usr/bin/env bash
# Everything scripts/gpu_benchmark.sh needs on the device machine that the repository does not hold. Run here
# (with network to the package registry), once per checkout; every path it fills is ignored by git and must be
# named in the device call's `carry`: .whl .whl-pyarrow .peer peer-bench/spm/spm.model checkpoints/bench-base/tokenizer
#   .whl                    wheels of `datasets` and its pins that the GPU image lacks, for Python 3.12 (the image's)
#   .whl-pyarrow            pyarrow (55 MB), installed there only if the image's is older than datasets needs (24)
#   .peer                   a copy of the peers' scripts (../shared/bench), which do not travel with the repository
#   peer-bench/spm/spm.model  the peers' 8k SentencePiece model (../shared/bench/setup_peers.sh makes it)
#   checkpoints/bench-base/tokenizer  nmtkit's BASE tokenizer, trained here so the device spends no time on it
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SHARED=${SHARED:-../shared}
for p in /.whl/ /.whl-pyarrow/ /.peer/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
# the versions installed here, so the device runs what the suite ran with
pins=$($PY -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in ('datasets', 'dill', 'multiprocess', 'fsspec')))")
pyarrow=$($PY -c "import importlib.metadata as m; print('pyarrow==' + m.version('pyarrow'))")
download() {  # download DIR REQUIREMENT...
  local dir=$1; shift
  rm -rf "$dir" && mkdir "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "$@"
}
download .whl $pins
download .whl-pyarrow $pyarrow
rm -rf .peer && cp -r "$SHARED/bench" .peer
[ -f peer-bench/spm/spm.model ] || { echo "peer-bench/spm/spm.model is missing: run bash $SHARED/bench/setup_peers.sh /tmp/peer-venv first"; exit 1; }
# trains the BASE tokenizer into checkpoints/bench-base/tokenizer (2 CPU steps of a tiny budget; the figures are not used)
$PY -m nmtkit benchmark --config configs/bench-base.yaml --device cpu --precision fp32 --steps 1 --repeats 1 \
  --set train.max_tokens=512 --no-decode > /dev/null
du -shc .whl .whl-pyarrow .peer peer-bench/spm/spm.model checkpoints/bench-base/tokenizer
echo "ready: device run with carry [.whl, .whl-pyarrow, .peer, peer-bench/spm/spm.model, checkpoints/bench-base/tokenizer]" \
  "and command: bash scripts/gpu_benchmark.sh \$OUT"
