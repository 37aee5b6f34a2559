"""Device and precision: chosen in one place, and logged with the reason for the choice."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import cpu_matmul, native

if TYPE_CHECKING:
    from .model import Transformer

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(RuntimeError):
    """The requested device or precision is not available here."""


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul units (AVX-512 BF16 or AMX), via oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def compute(self) -> contextlib.ExitStack:
        """The context model code runs in: mixed precision (matmuls in bf16/fp16, reductions and
        the loss in fp32). Attention picks its CPU or GPU path itself (`model.attention`)."""
        stack = contextlib.ExitStack()
        if self.precision != "fp32":
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=self.dtype))
        return stack

    @property
    def use_grad_scaler(self) -> bool:
        return self.precision == "fp16"


def for_inference(model: Transformer, runtime: Runtime) -> Transformer:
    """The model in eval mode with its weights in the compute dtype, packed for oneDNN on CPU (`pack_for_cpu`).

    Autocast casts every weight at every op; a decoding loop runs thousands of small ops, so
    storing bf16/fp16 weights once is much faster there. (Training keeps fp32 master weights.)
    """
    model = model.eval().to(runtime.device)
    if runtime.precision != "fp32":
        model = model.to(runtime.dtype)
    if runtime.device.type == "cpu":
        model.pack_for_cpu()
        native.kernels()  # built (or found) now, before decoding forks its workers
    return model


def choose_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Resolve `auto` for device and precision, or fail clearly when a request can't be met."""
    if device not in ("auto", "cpu", "cuda"):  # the Python API takes any string; anything else was taken for the CPU
        hint = "; to pick one GPU, set CUDA_VISIBLE_DEVICES" if device.lower().startswith(("cuda", "gpu")) else ""
        raise DeviceError(f"device {device!r}: expected 'auto', 'cpu' or 'cuda'{hint}")
    if precision not in ("auto", *DTYPES):
        raise DeviceError(f"precision {precision!r}: expected 'auto', {', '.join(repr(p) for p in DTYPES)}")
    reasons = []
    if device == "auto":
        if torch.cuda.is_available():
            dev = torch.device("cuda")
            reasons.append(f"device auto -> cuda ({torch.cuda.get_device_name(0)})")
        else:
            dev = torch.device("cpu")
            reasons.append("device auto -> cpu (no CUDA device visible to torch)")
    elif device == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "device 'cuda' was asked for (train.device or --device) but torch sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                "use device: cpu or device: auto"
            )
        dev = torch.device("cuda")
        reasons.append("device cuda (asked for)")
    else:
        dev = torch.device("cpu")
        reasons.append("device cpu (asked for)")

    if dev.type == "cpu":
        # Denormal floats are 10-100x slower in CPU arithmetic. AdamW's moments of embedding rows whose
        # token is absent from a batch decay geometrically into that range: 15 batches repeated made a
        # training step go from 0.26 s to 6 s. Flushing them to zero (as oneDNN does) keeps steps flat.
        torch.set_flush_denormal(True)
    else:
        # Attention at sentence lengths (tens of tokens, thousands of heads per batch) on an H200: the
        # memory-efficient kernel beat cuDNN's (which torch picks first on Hopper) and flash (which it picks
        # next for causal attention) in forward + backward, and flash's backward took 1.35 ms per call in
        # a BASE step against 0.44 ms for the efficient kernel (docs/performance.md). Leave it that one.
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_flash_sdp(False)
        reasons.append("SDPA calls: the memory-efficient kernel (cuDNN and flash off process-wide)")
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            reasons.append(f"precision auto -> {precision} (CUDA{' with' if precision == 'bf16' else ' without'} bf16)")
        elif cpu_has_fast_bf16():
            precision = "bf16"
            reasons.append("precision auto -> bf16 (this CPU has native bf16 matmuls: AVX-512 BF16/AMX)")
        else:
            precision = "fp32"
            reasons.append("precision auto -> fp32 (this CPU has no native bf16 matmuls)")
    else:
        if precision == "fp16" and dev.type == "cpu":
            raise DeviceError("precision fp16 (train.precision or --precision) is for CUDA; on CPU use bf16 (where supported) or fp32")
        if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("precision bf16 (train.precision or --precision): this GPU has no bf16 support; use fp16 or fp32")
        reasons.append(f"precision {precision} (as set)")
    if dev.type == "cpu":
        cpu_matmul.wanted()  # a bad NMTKIT_CPU_MATMUL fails here, whatever the precision
        if precision == "fp32":
            reasons.append(f"fp32 matmuls -> {cpu_matmul.describe()}")
    return Runtime(dev, precision, "; ".join(reasons))


def free_memory(runtime: Runtime) -> str:
    """Release cached blocks and describe what is free, for out-of-memory messages."""
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(runtime.device)
        return f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free on {runtime.device}"
    return "CPU memory"
