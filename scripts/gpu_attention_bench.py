"""Times scaled_dot_product_attention forward + backward per backend at BASE sentence shapes (bf16): the
decoder's causal self-attention (no mask) and the encoder's padded self-attention (a boolean key mask).
Also the two matmuls and softmax that nmtkit.model.attention runs on CPU, here on the GPU, eager and compiled: the
candidate for short sentences. Prints a JSON line of milliseconds per call after the SDPA backends and another, with
the matmul variants added, at the end; a backend that refuses a case is reported as null.

    python scripts/gpu_attention_bench.py            # 512 sentences x 32 tokens, 8 heads of 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = (args.batch, 8, args.length, 64)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.ones(args.batch, 1, 1, args.length, dtype=torch.bool, device=device)
    for i in range(args.batch):  # padded sentences of varied length
        mask[i, ..., args.length - i % (args.length // 2) :] = False

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(attend, masked: bool) -> float:
        """Median milliseconds of forward + backward of attend(masked), after 3 warm-up calls."""
        times = []
        for i in range(23):
            sync()
            t0 = time.perf_counter()
            out = attend(masked)
            out.backward(torch.ones_like(out))
            q.grad = k.grad = v.grad = None  # else every call after the first also accumulates into them
            sync()
            if i >= 3:
                times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)

    def sdpa(masked: bool) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if masked else None, is_causal=not masked)

    def by_matmuls(masked: bool) -> torch.Tensor:
        scores = torch.matmul(q * q.size(-1) ** -0.5, k.transpose(-1, -2))
        if masked:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            future = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).triu_(1)
            scores = scores.masked_fill(future, float("-inf"))
        return torch.matmul(scores.softmax(dim=-1), v)

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    result: dict = {"batch": args.batch, "length": args.length}
    for name, backend in backends.items():
        for case in ("causal", "masked"):
            try:
                with sdpa_kernel([backend]):
                    result[f"{name}_{case}_ms"] = time_ms(sdpa, case == "masked")
            except RuntimeError:  # the backend refuses this case
                result[f"{name}_{case}_ms"] = None
    print(json.dumps(result), flush=True)  # the SDPA backends first: compiling below may be cut by the kit's limit
    compiled = torch.compile(by_matmuls, dynamic=False)
    for name, attend in (("matmuls", by_matmuls), ("matmuls_compiled", compiled)):
        for case in ("causal", "masked"):
            result[f"{name}_{case}_ms"] = time_ms(attend, case == "masked")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
