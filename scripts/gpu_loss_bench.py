"""Times the fused output projection + label-smoothed cross-entropy (forward and backward) at the GPU benchmark's
shape: the eager chunk loop, the compiled chunk (`train.compile` on GPUs), and the materialised logits with
`F.cross_entropy` (the plain way). Prints one JSON line of milliseconds, medians of 20 after warm-up.

    python scripts/gpu_loss_bench.py                 # rows 16384, d_model 512, vocabulary 27696, bf16
    python scripts/gpu_loss_bench.py --device cpu --rows 512 --vocab 2000   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from nmtkit.loss import chunk_loss_and_grad, projected_cross_entropy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--vocab", type=int, default=27696)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    torch.manual_seed(0)
    hidden = torch.randn(args.rows, args.d_model, device=device, requires_grad=True)
    weight = (0.05 * torch.randn(args.vocab, args.d_model, device=device)).requires_grad_()
    targets = torch.randint(4, args.vocab, (args.rows,), device=device)
    targets[::9] = 0  # some padding
    fused = torch.compile(chunk_loss_and_grad, dynamic=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours(chunk=None):
        return lambda: projected_cross_entropy(hidden, weight, targets, ignore_index=0, label_smoothing=0.1, compute_dtype=dtype, fused_chunk=chunk)

    def plain():
        with torch.autocast(device.type, dtype=dtype):
            logits = hidden @ weight.T
        return F.cross_entropy(logits.float(), targets, ignore_index=0, label_smoothing=0.1, reduction="sum")

    def time_ms(fn) -> float:
        times = []
        for i in range(25):
            sync()
            t0 = time.perf_counter()
            fn().backward()
            sync()
            if i >= 5:
                times.append(1000 * (time.perf_counter() - t0))
            hidden.grad = weight.grad = None
        return statistics.median(times)

    result = {"rows": args.rows, "d_model": args.d_model, "vocab": args.vocab,
              "eager_chunks_ms": time_ms(ours()), "compiled_chunks_ms": time_ms(ours(fused)), "materialised_ms": time_ms(plain)}
    flops = 3 * 2 * args.rows * args.d_model * args.vocab
    result["compiled_chunks_tflops"] = flops / result["compiled_chunks_ms"] / 1e9
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
