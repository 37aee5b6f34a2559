"""scripts/gpu_summary.py: the GPU target table is computed from the JSON lines the device run wrote,
and a run cut short (missing files, warnings between JSON lines) still gives a table of what came back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "scripts" / "gpu_summary.py")
gpu_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_summary)


def write(path: Path, *records: dict, noise: str = "") -> None:
    path.write_text(noise + "".join(json.dumps(r) + "\n" for r in records))


def nmtkit_record(tokens_per_s: float, tflops: float, mfu: float, decode: float | None = None) -> dict:
    r = {"train_tgt_tokens_per_s": tokens_per_s, "train_tflops_per_s": tflops, "mfu": mfu}
    if decode is not None:
        r.update(decode_sent_per_s=decode, decode_sent_per_s_with_log=0.9 * decode)
    return r


def test_summary_divides_nmtkit_by_hf_and_keeps_the_best_utilisation(tmp_path: Path, capsys) -> None:
    write(tmp_path / "peers.jsonl", {"matmul_bf16_tflops": 802.0}, {"system": "hf_marian", "tgt_tokens_per_s": 100_000.0, "mfu_matmul": 0.07, "peak_tflops": 1000.0},
          noise="a warning line\n")
    write(tmp_path / "hf_decode.jsonl", {"system": "hf_marian_generate", "decode_sent_per_s": 200.0})
    write(tmp_path / "nmtkit-16k.jsonl", nmtkit_record(250_000.0, 300.0, 0.38, decode=700.0))
    write(tmp_path / "nmtkit-64k-compile.jsonl", nmtkit_record(300_000.0, 400.0, 0.51))
    write(tmp_path / "nmtkit-decode-b64.jsonl", {"decode_sent_per_s": 900.0})  # its eager twin was cut: no result
    # the attention script's first line (SDPA backends) and its last (the matmul variants added): the last is read
    write(tmp_path / "attention.jsonl", {"batch": 512, "length": 32, "efficient_causal_ms": 0.32, "efficient_masked_ms": 0.37},
          {"batch": 512, "length": 32, "efficient_causal_ms": 0.32, "efficient_masked_ms": 0.37, "flash_causal_ms": 0.67,
           "flash_masked_ms": None, "matmuls_compiled_causal_ms": 0.1, "matmuls_compiled_masked_ms": 0.12})
    write(tmp_path / "nmtkit-decode-eager.jsonl", {"decode_sent_per_s": 300.0})
    write(tmp_path / "peers-64k.jsonl", {"system": "hf_marian", "tgt_tokens_per_s": 160_000.0, "mfu_matmul": 0.11, "peak_tflops": 1000.0})
    # the training loop's log lines: the first (compilation) is left out of the median
    write(tmp_path / "train-loop-16k.metrics.jsonl", *({"step": 10 * i, "tgt_tokens_per_s": v} for i, v in enumerate([9_000.0, 240_000.0, 260_000.0, 250_000.0], 1)),
          {"step": 40, "valid_loss": 5.0})

    gpu_summary.main(str(tmp_path))
    table = capsys.readouterr().out
    assert "| nmtkit-16k | 250,000 | 2.50x | 38.0% / 30.0% |" in table
    assert "| nmtkit-64k-compile | 300,000 | 3.00x | 51.0% / 40.0% |" in table
    assert "| nmtkit greedy (bf16), CUDA graphs | 900.0 |" in table and "| nmtkit greedy (bf16), eager steps | no result |" in table
    assert "| flash | 0.670 | – |" in table and "| matmuls_compiled | 0.100 | 0.120 |" in table
    assert "| nmtkit-16k-compile | no result | | |" in table
    assert "700.0 (3.50x)" in table
    assert "| HF Marian, 64k | 160,000 | 1.60x | – / 11.0% |" in table
    assert "| nmtkit greedy (bf16), eager steps | 300.0 (1.50x) |" in table
    assert "| `nmtkit train` (compiled, 16k; median of its log lines after the first) | 250,000 | 2.50x | |" in table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_mfu_measured_peak"] == 0.51 and summary["train_loop_16k"] == 250_000.0


def test_summary_of_a_run_cut_before_any_nmtkit_result_lists_the_peer_alone(tmp_path: Path, capsys) -> None:
    write(tmp_path / "peers.jsonl", {"system": "hf_marian", "tgt_tokens_per_s": 123_000.0, "mfu_matmul": 0.069, "peak_tflops": 989.0})
    (tmp_path / "nmtkit-16k.jsonl").write_text("Traceback (most recent call last):\n")

    gpu_summary.main(str(tmp_path))
    table = capsys.readouterr().out
    assert "| HF Marian, 16k | 123,000 | 1.00x | – / 6.9% |" in table
    assert "| nmtkit-16k | no result | | |" in table
    assert "decoding" not in table and "nmtkit train" not in table
