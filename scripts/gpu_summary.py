"""The GPU targets of docs/performance.md, from the JSON lines that scripts/gpu_benchmark.sh wrote.

    python scripts/gpu_summary.py gpu-bench      # prints a Markdown table and writes gpu-bench/summary.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def read_lines(path: Path) -> list[dict]:
    """Every JSON object in `path` (one per line; other lines, e.g. warnings, are skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def train_loop_tokens_per_s(path: Path) -> float | None:
    """The median target tokens/s of a training run's log lines (metrics.jsonl), leaving out the first (compilation)."""
    rates = [r["tgt_tokens_per_s"] for r in read_lines(path) if "tgt_tokens_per_s" in r][1:]
    return statistics.median(rates) if rates else None


def main(out_dir: str) -> None:
    out = Path(out_dir)
    peers = {r["system"]: r for r in read_lines(out / "peers.jsonl") if "system" in r}  # its first line is the matmul peak
    hf_decode = next(iter(read_lines(out / "hf_decode.jsonl")), None)
    runs = {name: next(iter(read_lines(out / f"{name}.jsonl")), None) for name in
            ("nmtkit-16k", "nmtkit-16k-compile", "nmtkit-16k-compile-matmul", "nmtkit-16k-compile-nocheck", "nmtkit-64k",
             "nmtkit-64k-compile", "nmtkit-64k-compile-matmul")}
    hf = peers.get("hf_marian")
    hf_64k = next(iter(r for r in read_lines(out / "peers-64k.jsonl") if r.get("system") == "hf_marian"), None)
    nominal = hf["peak_tflops"] if hf else 989.0

    rows = ["| run | target tokens/s | vs HF Marian (16k) | matmul FLOP utilisation (measured peak / nominal) |", "|---|---|---|---|"]
    if hf:
        rows.append(f"| HF Marian, 16k | {hf['tgt_tokens_per_s']:,.0f} | 1.00x | – / {100 * hf['mfu_matmul']:.1f}% |")
    if hf_64k:
        ratio = f"{hf_64k['tgt_tokens_per_s'] / hf['tgt_tokens_per_s']:.2f}x" if hf else "–"
        rows.append(f"| HF Marian, 64k | {hf_64k['tgt_tokens_per_s']:,.0f} | {ratio} | – / {100 * hf_64k['mfu_matmul']:.1f}% |")
    best_mfu = 0.0
    for name, r in runs.items():
        if not r or "train_tgt_tokens_per_s" not in r:
            rows.append(f"| {name} | no result | | |")
            continue
        ratio = f"{r['train_tgt_tokens_per_s'] / hf['tgt_tokens_per_s']:.2f}x" if hf else "–"
        nominal_mfu = r["train_tflops_per_s"] / nominal
        best_mfu = max(best_mfu, r["mfu"])
        rows.append(f"| {name} | {r['train_tgt_tokens_per_s']:,.0f} | {ratio} | {100 * r['mfu']:.1f}% / {100 * nominal_mfu:.1f}% |")
    loop = train_loop_tokens_per_s(out / "train-loop-16k.metrics.jsonl")
    if loop is not None:
        ratio = f"{loop / hf['tgt_tokens_per_s']:.2f}x" if hf else "–"
        rows.append(f"| `nmtkit train` (compiled, 16k; median of its log lines after the first) | {loop:,.0f} | {ratio} | |")
    decode = runs["nmtkit-16k"]
    if decode and "decode_sent_per_s" in decode:
        d_ratio = f"{decode['decode_sent_per_s'] / hf_decode['decode_sent_per_s']:.2f}x" if hf_decode else "–"
        hf_d = f"{hf_decode['decode_sent_per_s']:,.1f}" if hf_decode else "no result"
        rows.append("")
        rows.append("| decoding, batch 256, 48 new tokens | sentences/s |")
        rows.append("|---|---|")
        rows.append(f"| HF Marian `generate` (bf16) | {hf_d} |")
        graphs = " (CUDA graphs)" if decode.get("decode_cuda_graphs") else ""
        rows.append(f"| nmtkit greedy (bf16){graphs} | {decode['decode_sent_per_s']:,.1f} ({d_ratio}); with the per-token log {decode['decode_sent_per_s_with_log']:,.1f} |")
        eager = next(iter(read_lines(out / "nmtkit-decode-eager.jsonl")), None)
        if eager and "decode_sent_per_s" in eager:
            e_ratio = f"{eager['decode_sent_per_s'] / hf_decode['decode_sent_per_s']:.2f}x" if hf_decode else "–"
            rows.append(f"| nmtkit greedy (bf16), eager steps | {eager['decode_sent_per_s']:,.1f} ({e_ratio}) |")
    print("\n".join(rows))
    summary = {"hf_train": hf, "hf_train_64k": hf_64k, "hf_decode": hf_decode, "nmtkit": runs, "train_loop_16k": loop, "best_mfu_measured_peak": best_mfu}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu-bench")
