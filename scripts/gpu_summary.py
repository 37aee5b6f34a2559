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


def first(path: Path) -> dict | None:
    return next(iter(read_lines(path)), None)


def decoding_rows(out: Path, decode: dict | None, hf_decode: dict | None) -> list[str]:
    """Batch 256 against HF `generate`, with and without CUDA graphs; batch 64, where each batch pays a capture."""
    def rate(r: dict | None, against: dict | None = None) -> str:
        if not r or "decode_sent_per_s" not in r:
            return "no result"
        ratio = f" ({r['decode_sent_per_s'] / against['decode_sent_per_s']:.2f}x)" if against and against.get("decode_sent_per_s") else ""
        return f"{r['decode_sent_per_s']:,.1f}{ratio}"

    if not decode or "decode_sent_per_s" not in decode:
        return []
    graphs = " (CUDA graphs)" if decode.get("decode_cuda_graphs") else ""
    rows = ["", "| decoding, batch 256, 48 new tokens | sentences/s |", "|---|---|"]
    rows.append(f"| HF Marian `generate` (bf16) | {rate(hf_decode)} |")
    rows.append(f"| nmtkit greedy (bf16){graphs} | {rate(decode, hf_decode)}; with the per-token log {decode['decode_sent_per_s_with_log']:,.1f} |")
    rows.append(f"| nmtkit greedy (bf16), eager steps | {rate(first(out / 'nmtkit-decode-eager.jsonl'), hf_decode)} |")
    b64 = first(out / "nmtkit-decode-b64.jsonl"), first(out / "nmtkit-decode-b64-eager.jsonl")
    if any(b64):  # HF was measured at batch 256 only: no ratios
        rows += ["", "| decoding, batch 64 (one CUDA-graph capture per batch) | sentences/s |", "|---|---|"]
        rows.append(f"| nmtkit greedy (bf16), CUDA graphs | {rate(b64[0])} |")
        rows.append(f"| nmtkit greedy (bf16), eager steps | {rate(b64[1])} |")
    return rows


def attention_rows(out: Path) -> list[str]:
    """scripts/gpu_attention_bench.py's milliseconds per forward + backward call (its last, most complete line)."""
    lines = read_lines(out / "attention.jsonl")
    if not lines:
        return []
    r = lines[-1]
    rows = ["", f"| attention, {r['batch']} sentences x {r['length']} tokens, fwd + bwd | causal ms | padded ms |", "|---|---|---|"]
    for name in dict.fromkeys(k.rsplit("_", 2)[0] for k in r if k.endswith("_ms")):
        cells = [f"{r[f'{name}_{case}_ms']:.3f}" if r.get(f"{name}_{case}_ms") is not None else "–" for case in ("causal", "masked")]
        rows.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return rows


def main(out_dir: str) -> None:
    out = Path(out_dir)
    peers = {r["system"]: r for r in read_lines(out / "peers.jsonl") if "system" in r}  # its first line is the matmul peak
    hf_decode = first(out / "hf_decode.jsonl")
    runs = {name: first(out / f"{name}.jsonl") for name in
            ("nmtkit-16k", "nmtkit-16k-compile", "nmtkit-16k-compile-matmul", "nmtkit-16k-compile-nocheck",
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
    rows += decoding_rows(out, runs["nmtkit-16k"], hf_decode) + attention_rows(out)
    print("\n".join(rows))
    extra = {name: first(out / f"{name}.jsonl") for name in ("nmtkit-decode-eager", "nmtkit-decode-b64", "nmtkit-decode-b64-eager")}
    attention = read_lines(out / "attention.jsonl")
    summary = {"hf_train": hf, "hf_train_64k": hf_64k, "hf_decode": hf_decode, "nmtkit": runs | extra, "train_loop_16k": loop,
               "best_mfu_measured_peak": best_mfu, "attention_ms": attention[-1] if attention else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu-bench")
