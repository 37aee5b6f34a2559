"""The peer row of the GPU decoding target: Hugging Face MarianMTModel `generate` at shape BASE.

Greedy (num_beams=1), KV cache, exactly `--new-tokens` new tokens per sentence, batches of `--batch-size`,
over the first `--sentences` sentences of the test split, bf16 weights (what a user does for fast GPU
inference). The model comes from the peers' own builder (`build_hf_marian` in ../shared/bench/gpu_bench.py,
random weights: speed does not depend on them when the length is fixed). Prints one JSON line.

    python scripts/gpu_decode_peer.py --peer-dir .peer --spm peer-bench/spm/spm.model
    python scripts/gpu_decode_peer.py --device cpu --tiny ...   # smoke test of the same code

Runs in the peers' environment (torch, transformers, sentencepiece), not nmtkit's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import sentencepiece as spm
import torch

PAD, BOS, EOS = 0, 2, 3


def load_sources(path: str, sp: spm.SentencePieceProcessor, n: int, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["translation"]["en"])
            if len(texts) == n:
                break
    ids = [row[:127] + [EOS] for row in sp.encode(texts)]
    batches = []
    for i in range(0, len(ids), batch_size):
        group = ids[i : i + batch_size]
        width = max(len(r) for r in group)
        batches.append(torch.tensor([r + [PAD] * (width - len(r)) for r in group], device=device))
    return batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer-dir", default=".peer", help="folder holding the peers' gpu_bench.py")
    p.add_argument("--spm", default="peer-bench/spm/spm.model", help="the peers' 8k SentencePiece model")
    p.add_argument("--test", default="data/tatoeba-en-zh/test.jsonl")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shape and 16 sentences (smoke test)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    sys.path.insert(0, os.path.abspath(args.peer_dir))
    import gpu_bench  # the peers' harness: BASE/TINY shapes and the MarianMTModel builder
    import transformers

    device = torch.device(args.device)
    shape = gpu_bench.TINY if args.tiny else gpu_bench.BASE
    n_sentences = 16 if args.tiny else args.sentences
    model = gpu_bench.build_hf_marian(shape)[0].to(device=device, dtype=torch.bfloat16).eval()
    sources = load_sources(args.test, spm.SentencePieceProcessor(model_file=args.spm), n_sentences, args.batch_size, device)

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            for src in sources:
                model.generate(
                    input_ids=src, attention_mask=(src != PAD).long(), num_beams=1, do_sample=False,
                    min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens, use_cache=True,
                    decoder_start_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run()  # warm-up
    times = [run() for _ in range(args.repeats)]
    record = {
        "system": "hf_marian_generate", "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "shape": "TINY" if args.tiny else "BASE", "dtype": "bf16", "batch_size": args.batch_size,
        "sentences": sum(s.size(0) for s in sources), "new_tokens": args.new_tokens,
        "decode_sent_per_s": sum(s.size(0) for s in sources) / statistics.median(times),
        "runs_s": [round(t, 3) for t in times], "torch": torch.__version__, "transformers": transformers.__version__,
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
