"""`nmtkit benchmark`: the package's real training step and greedy decoder, timed on fixed work.

Training: `train_step` (forward, label-smoothed cross-entropy, backward, clipping, AdamW) on the
first batches of the config's training split, built by the same `epoch_batches` as training and
collated before the clock starts (as the peers' scripts do). Throughput counts non-pad target tokens.

Decoding: the first `n_sentences` test sentences in file order, batches of `batch_size`, exactly
`new_tokens` new tokens each (EOS ignored) unless `stop_at_eos`; with the per-token log off and on.

FLOP utilisation compares the matmul FLOPs of the timed steps with a matmul peak measured on the
same device and precision, so "mfu" says how much of the hardware the step uses.
"""

from __future__ import annotations

import copy
import logging
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import native
from .allocator import allocator_in_use
from .batching import Batch, read_batch
from .config import Config, ConfigError, ModelConfig
from .cpu_matmul import mm_nn
from .data import DataError, load_split
from .decode import GreedyOutput, greedy_decode
from .decode_workers import map_batches, resolve_workers, uses_processes
from .device import Runtime, choose_runtime, for_inference
from .encoded import encode_split, length_arrays
from .loss import TrainingObjective, chunk_kernel
from .model import Transformer, uses_sdpa
from .resume import TrainState, epoch_batches
from .rng import seed_everything
from .run_tokenizer import prepare_tokenizer
from .step import SkippedSteps, make_optimizer, train_step
from .tokenizer import EOS_ID, PAD_ID
from .translator import Translator, build_model

log = logging.getLogger(__name__)


@dataclass
class BenchmarkSettings:
    device: str = "auto"
    precision: str = "auto"
    warmup_steps: int = 5
    timed_steps: int = 30
    repeats: int = 3
    n_sentences: int = 512
    batch_size: int = 64
    top_k: int = 5  # alternatives per token in the runs with the per-token log
    new_tokens: int = 48
    stop_at_eos: bool = False
    decode: bool = True
    train: bool = True
    profile: str | None = None  # a file for the profiler's table of the training step's costliest ops
    profile_steps: int = 5


def forward_matmul_flops(cfg: ModelConfig, batch: Batch, vocab: int) -> float:
    """Matmul FLOPs of one forward pass (2 per multiply-add), attention scores and mixing included, as executed:
    on CPU the encoder's projections and FFN run on the real source tokens only (`Transformer.encode`)."""
    B, S = batch.src.shape
    T = batch.tgt_in.size(1)
    D, F = cfg.d_model, cfg.d_ff
    enc_rows = int((batch.src != PAD_ID).sum()) if batch.src.device.type == "cpu" else B * S
    enc = cfg.n_enc_layers * (enc_rows * 2 * (4 * D * D + 2 * D * F) + B * 4 * S * S * D)
    dec = cfg.n_dec_layers * (
        B * T * 2 * (6 * D * D + 2 * D * F)  # self q/k/v/out, cross q/out, FFN
        + B * S * 2 * 2 * D * D  # cross-attention keys and values
        + B * 4 * T * T * D  # self-attention scores and mixing
        + B * 4 * T * S * D  # cross-attention scores and mixing
    )
    return float(enc + dec + B * T * 2 * D * vocab)


def measure_matmul_peak(runtime: Runtime, seconds: float = 1.0) -> float:
    """FLOP/s of a large-ish matmul in the runtime's precision on its device, through the path the model's own
    products take (on CPU in fp32, `cpu_matmul`'s choice of BLAS or oneDNN)."""
    device, dtype = runtime.device, runtime.dtype
    m, k, n = (2048, 256, 1024) if device.type == "cpu" else (8192, 8192, 8192)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        mm_nn(a, b)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            mm_nn(a, b)
        _sync(device)
        best = max(best, 10 * 2 * m * k * n / (time.perf_counter() - t0))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory(runtime: Runtime, decoded_in_processes: bool = False) -> dict[str, float]:
    if runtime.device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if decoded_in_processes:  # the largest worker; its pages are mostly this process's, shared copy-on-write
        peak["peak_rss_worker_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return peak


def benchmark_training(cfg: Config, runtime: Runtime, batches: list[Batch], vocab: int, model: Transformer, s: BenchmarkSettings) -> dict:
    optimizer = make_optimizer(model, cfg, runtime)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.use_grad_scaler)
    objective = TrainingObjective(model, cfg.train.label_smoothing, runtime.dtype, compile=cfg.train.compile)
    model.train()
    # the benchmark writes no checkpoint; a diverging benchmark stops like training would
    skipped = SkippedSteps(TrainState(), cfg.train.max_bad_steps, Path(cfg.train.run_dir) / "checkpoints" / "last.pt")

    def run(group: list[Batch]) -> float:
        _sync(runtime.device)
        t0 = time.perf_counter()
        total = torch.zeros((), device=runtime.device)
        for i, b in enumerate(group):
            loss, is_bad = train_step(
                objective, optimizer, scaler, [b], b.n_tgt_tokens, runtime, cfg.train.lr, cfg.train.clip_norm,
                check_finite=cfg.train.skip_nonfinite,
            )
            total += loss
            if is_bad is not None:  # the non-finite flags, read back a step late as the training loop does
                skipped.add(i, is_bad, b.n_tgt_tokens)
                skipped.settle(keep_newest=True)
        total.item()  # one sync at the end, as the training loop does per log line
        skipped.settle()
        return time.perf_counter() - t0

    run(batches[: s.warmup_steps])
    timed = batches[s.warmup_steps : s.warmup_steps + s.timed_steps]
    tokens = sum(b.n_tgt_tokens for b in timed)
    flops = 3 * sum(forward_matmul_flops(cfg.model, b, vocab) for b in timed)  # backward is ~2x forward
    times = [run(timed) for _ in range(s.repeats)]
    median = statistics.median(times)
    if s.profile:
        write_profile(s.profile, lambda: run(timed[: s.profile_steps]), runtime.device)
    return {
        "train_tgt_tokens_per_s": tokens / median,
        "train_step_ms": 1000 * median / len(timed),
        "train_tflops_per_s": flops / median / 1e12,
        "train_runs_s": [round(t, 3) for t in times],
        "train_steps": len(timed),
        # each chunk of the loss's rows: nmtkit's CPU kernel (native.py) or torch ops (and on GPUs always torch's)
        "train_loss_kernel": "native" if chunk_kernel(runtime.device, runtime.dtype) is not None else "torch",
        "train_tgt_tokens": tokens,
        "_flops_per_s": flops / median,
    }


def write_profile(path: str, work, device: torch.device, rows: int = 40) -> None:
    """Runs `work` once under torch.profiler and writes its ops, costliest first by time on `device`
    (self time: an op's own kernels, not its children's), to `path`. Run after the timed runs, so the
    numbers reported are not the profiler's."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        work()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    Path(path).write_text(table + "\n")


def benchmark_decoding(
    model: Transformer,
    runtime: Runtime,
    sources: list[torch.Tensor],
    s: BenchmarkSettings,
    workers: int,
    cuda_graphs: bool = False,
    processes: bool = True,
) -> dict:
    """Greedy decoding of `sources` as `nmtkit translate` runs it: weights in the compute dtype, on CPU
    `workers` batches at once (decode_workers.py; forked processes unless `processes` is off), on CUDA each batch's
    step replayed as a CUDA graph unless decode.cuda_graphs is off. Each batch's whole output (tokens, and with the log
    its statistics) comes back to the caller, as `translate` needs it."""
    model = for_inference(copy.deepcopy(model), runtime)
    static = cuda_graphs and runtime.device.type == "cuda"

    def run(top_k: int) -> tuple[float, int]:
        def one_batch(src: torch.Tensor) -> GreedyOutput:
            with runtime.compute():
                return greedy_decode(model, src, s.new_tokens, top_k=top_k, stop_at_eos=s.stop_at_eos, static=static)

        _sync(runtime.device)
        t0 = time.perf_counter()
        outs = map_batches(one_batch, sources, workers, processes)
        _sync(runtime.device)
        elapsed = time.perf_counter() - t0
        return elapsed, sum(int(out.lengths.sum()) if s.stop_at_eos else out.tokens.numel() for out in outs)

    run(0)  # warm-up
    plain: list[tuple[float, int]] = []
    logged: list[tuple[float, int]] = []
    for i in range(s.repeats):  # alternating, each first in turn, so that a machine slowing down weighs on both alike
        for top_k in (0, s.top_k) if i % 2 == 0 else (s.top_k, 0):
            (logged if top_k else plain).append(run(top_k))
    t_plain = statistics.median(t for t, _ in plain)
    t_logged = statistics.median(t for t, _ in logged)
    n_sent = sum(src.size(0) for src in sources)
    return {
        "decode_sent_per_s": n_sent / t_plain,
        "decode_tokens_per_s": plain[0][1] / t_plain,
        "decode_sent_per_s_with_log": n_sent / t_logged,
        "decode_log_overhead": t_logged / t_plain - 1.0,
        "decode_sentences": n_sent,
        "decode_workers": min(workers, len(sources)),
        "decode_processes": uses_processes(min(workers, len(sources)), processes),  # GPUs have one worker: False
        "decode_cuda_graphs": static,
        # attention, argmax/top-k and the log's statistics: nmtkit's CPU kernels (native.py) or torch ops
        "decode_kernels": "native" if runtime.device.type == "cpu" and native.kernels() is not None else "torch",
        "decode_new_tokens": "stop at EOS" if s.stop_at_eos else s.new_tokens,
    }


def run_benchmark(cfg: Config, s: BenchmarkSettings, checkpoint: str | None = None) -> dict:
    """Everything `nmtkit benchmark` reports, as one dict."""
    runtime = choose_runtime(s.device, s.precision)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    cache_dir = Path(cfg.data.cache_dir or run_dir / "cache")
    train_raw = load_split(cfg.data, "train", cache_dir)
    tokenizer = prepare_tokenizer(cfg, run_dir, train_raw)
    if checkpoint:  # trained weights, so that --eos stops where a real model stops
        loaded = Translator.from_checkpoint(checkpoint, "cpu", "fp32")
        model, tokenizer, cfg.model = loaded.model, loaded.tokenizer, loaded.cfg.model
        if s.train and cfg.data.max_len + 1 > cfg.model.max_positions:
            raise ConfigError([
                f"--checkpoint {checkpoint}: its model.max_positions={cfg.model.max_positions} is shorter than the config's"
                f" data.max_len + 1 = {cfg.data.max_len + 1}; lower data.max_len with --set, or add --no-train"
            ])
    else:
        model = build_model(cfg, tokenizer, cfg.train.attention_kernel)
    model = model.to(runtime.device)
    result: dict = {
        "device": str(runtime.device), "precision": runtime.precision, "threads": torch.get_num_threads(),
        "runtime": runtime.reason, "compile": cfg.train.compile, "allocator": allocator_in_use(),
    }
    result["n_params"] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    if s.train:
        result["training_attention"] = "sdpa" if uses_sdpa(cfg.train.attention_kernel, runtime.device.type) else "matmuls"
        train_ds, _ = encode_split(train_raw, tokenizer, cfg.data, "train", apply_filters=True)
        lengths = length_arrays(train_ds)
        needed = s.warmup_steps + s.timed_steps
        index: list[np.ndarray] = []
        epoch = 0
        while len(index) < needed:  # large batches: a small corpus has fewer per epoch than the steps asked for
            plan = epoch_batches(cfg.train, *lengths, epoch=epoch)
            if not plan:
                raise DataError(f"data.train ({cfg.data.train}): no training pairs left after filtering; check data.max_len and data.max_len_ratio")
            index += plan
            epoch += 1
        batches = [read_batch(train_ds, i).to(runtime.device) for i in index[:needed]]
        # the training steps change the weights: decoding a checkpoint's (`--checkpoint`) takes a copy for them
        trained = copy.deepcopy(model) if checkpoint and s.decode else model
        result.update(benchmark_training(cfg, runtime, batches, tokenizer.tgt_vocab_size, trained, s))
        del trained
    if s.decode:
        test_raw = load_split(cfg.data, "test", cache_dir)
        texts = list(test_raw.select(range(min(s.n_sentences, len(test_raw))))["src"])
        ids = tokenizer.encode_src(texts)
        sources = []
        for i in range(0, len(ids), s.batch_size):
            rows = [torch.tensor(x[: cfg.model.max_positions - 1] + [EOS_ID]) for x in ids[i : i + s.batch_size]]
            sources.append(nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=PAD_ID).to(runtime.device))
        workers = resolve_workers(cfg.decode.workers, runtime.device)
        result.update(benchmark_decoding(model, runtime, sources, s, workers, cfg.decode.cuda_graphs, cfg.decode.processes))

    peak = measure_matmul_peak(runtime)
    result["matmul_peak_tflops"] = peak / 1e12
    result["mfu"] = result.pop("_flops_per_s", 0.0) / peak if s.train else None
    result.update(_peak_memory(runtime, bool(result.get("decode_processes"))))
    return result


def format_benchmark(r: dict) -> str:
    compiled = " | torch.compile (training)" if r.get("compile") else ""
    lines = [
        f"device {r['device']} | precision {r['precision']}{compiled} | {r['threads']} threads | {r['n_params'] / 1e6:.1f}M parameters"
        f" | {r['allocator']}"
    ]
    if "train_tgt_tokens_per_s" in r:
        lines.append(
            f"train:  {r['train_tgt_tokens_per_s']:,.0f} target tokens/s ({r['train_step_ms']:.0f} ms/step, median of {len(r['train_runs_s'])} runs of {r['train_steps']} steps)"
        )
        lines.append(
            f"        {r['train_tflops_per_s'] * 1e3:,.0f} GFLOP/s of matmuls = {100 * r['mfu']:.1f}% of the measured peak ({r['matmul_peak_tflops'] * 1e3:,.0f} GFLOP/s); "
            "loss chunks: " + ("nmtkit's kernel" if r.get("train_loss_kernel") == "native" else "torch ops")
        )
    if "decode_sent_per_s" in r:
        lines.append(
            f"decode: {r['decode_sent_per_s']:,.1f} sentences/s, {r['decode_tokens_per_s']:,.0f} tokens/s ({r['decode_sentences']} sentences, "
            f"new tokens: {r['decode_new_tokens']}, {r['decode_workers']} batch(es) at once{' in processes' if r.get('decode_processes') else ''})"
        )
        lines.append(
            f"        with the per-token log: {r['decode_sent_per_s_with_log']:,.1f} sentences/s ({100 * r['decode_log_overhead']:+.1f}% time); "
            "kernels: " + ("nmtkit's own" if r.get("decode_kernels") == "native" else "torch ops")
        )
    mem = f"peak RSS {r['peak_rss_mib']:,.0f} MiB" if "peak_rss_mib" in r else f"peak GPU memory {r['peak_mem_gib']:.2f} GiB"
    if "peak_rss_worker_mib" in r:
        mem += f" (largest decoding worker process: {r['peak_rss_worker_mib']:,.0f} MiB, shared pages included)"
    lines.append(mem)
    return "\n".join(lines)
