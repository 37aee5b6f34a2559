"""Times the host's work before each training step: turning a planned batch (row indices) into padded tensors, the
way the loop does it (`batching.read_batch`: Arrow's gather and vectorised padding) against `collate(ds[indices])`
(`datasets` rows as Python lists). Prints one JSON line of milliseconds per batch, medians of 3 passes.

    python scripts/batch_read_bench.py --config configs/bench-base.yaml --max-tokens 16384
    python scripts/batch_read_bench.py --config configs/bench-small.yaml --max-tokens 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from nmtkit.batching import collate, read_batch
from nmtkit.config import load_config
from nmtkit.data import load_split
from nmtkit.encoded import encode_split, length_arrays
from nmtkit.resume import epoch_batches
from nmtkit.run_tokenizer import prepare_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/bench-base.yaml")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--batches", type=int, default=60, help="batches timed per pass (from the first epochs' plans)")
    args = p.parse_args()
    cfg = load_config(args.config, [f"train.max_tokens={args.max_tokens}"])
    run_dir = Path(cfg.train.run_dir)
    raw = load_split(cfg.data, "train", Path(cfg.data.cache_dir or run_dir / "cache"))
    ds, _ = encode_split(raw, prepare_tokenizer(cfg, run_dir, raw), cfg.data, "train", apply_filters=True)
    lengths = length_arrays(ds)
    plan: list[np.ndarray] = []
    for epoch in range(100):  # large batches: a small corpus has fewer per epoch than asked for
        plan += epoch_batches(cfg.train, *lengths, epoch=epoch)
        if len(plan) >= args.batches:
            break
    plan = plan[: args.batches]
    ways = {"read_batch_ms": lambda i: read_batch(ds, i), "collate_rows_ms": lambda i: collate(ds[i])}
    passes: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(3):  # alternating
        for name, make in ways.items():
            t0 = time.perf_counter()
            for index in plan:
                make(index)
            passes[name].append(1000 * (time.perf_counter() - t0) / len(plan))
    result = {"config": args.config, "max_tokens": args.max_tokens, "batches": len(plan),
              "pairs_per_batch": float(np.mean([len(b) for b in plan]))}
    result.update({name: statistics.median(times) for name, times in passes.items()})
    result["passes_ms"] = passes
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
