"""cpu / cuda / xla behind one object that holds most of what differs between them.

It answers: which device, which autocast dtype (bf16 on CUDA and TPU, none on CPU, where bf16 matmul is
far slower than fp32), whether to use fused AdamW, where a collective's tensor lives, whether a model is
wrapped for data parallelism, the peak FLOP/s for model FLOPs utilisation, and the few calls that differ
under torch_xla (optimizer step, mark_step), so the training loops need not branch on the device.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch

# Dense bf16 peaks from the datasheets (FLOP/s), for model FLOPs utilisation.
DATASHEET_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12,
                       "T4": 65e12, "v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}


def _xla_requested() -> bool:
    return bool(os.environ.get("PJRT_DEVICE")) or bool(os.environ.get("TPU_NAME"))


@dataclass
class Backend:
    kind: str  # cpu | cuda | xla
    device: torch.device

    @property
    def collective_device(self) -> torch.device:
        """Where a small tensor for a gloo/nccl collective lives (nccl needs the GPU, gloo the CPU)."""
        return self.device if self.kind == "cuda" else torch.device("cpu")

    @property
    def wraps_for_data_parallel(self) -> bool:
        """DDP/FSDP wrap the model on CPU and CUDA; under torch_xla the optimizer step all-reduces instead."""
        return self.kind != "xla"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.kind == "cpu" else torch.bfloat16

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = "cuda" if self.kind == "cuda" else "xla"
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.kind == "xla":
            import torch_xla.core.xla_model as xm

            xm.optimizer_step(optimizer)  # all-reduces gradients across XLA replicas, then steps
        else:
            optimizer.step()

    def mark_step(self) -> None:
        if self.kind == "xla":
            import torch_xla.core.xla_model as xm

            xm.mark_step()

    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
        self.mark_step()

    def fused_adamw(self) -> bool:
        """One fused kernel for the whole parameter set: on CPU too (torch >= 2.4), where the per-tensor loop
        and foreach are both slower; results agree with the loop to float rounding."""
        return self.kind in ("cuda", "cpu")

    def peak_flops(self) -> tuple[float, str]:
        """(FLOP/s, how it was obtained): datasheet bf16 on accelerators, a measured matmul on CPU."""
        if self.kind == "cuda":
            name = torch.cuda.get_device_name(self.device)
            for key, value in DATASHEET_BF16_PEAK.items():
                if key in name:
                    return value, f"datasheet bf16 ({name})"
            return float("nan"), f"unknown GPU {name}"
        if self.kind == "xla":
            version = os.environ.get("TPU_ACCELERATOR_TYPE", "v4").split("-")[0]
            return DATASHEET_BF16_PEAK.get(version, float("nan")), f"datasheet bf16 ({version}, per chip)"
        return measure_cpu_matmul_flops(), "measured fp32 matmul"


def measure_cpu_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG alone: a resumed run draws as before
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    a @ b  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def detect(preference: str = "auto") -> Backend:
    """preference: auto | cpu | cuda | xla."""
    if preference == "xla" or (preference == "auto" and _xla_requested()):
        import torch_xla.core.xla_model as xm

        return Backend("xla", xm.xla_device())
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        index = local_rank % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(index)
        return Backend("cuda", torch.device("cuda", index))
    return Backend("cpu", torch.device("cpu"))


def exact_fp32() -> None:
    """Full fp32 on CUDA for this process: no TF32 in matmuls nor in cuDNN convolutions (the tokenizer's patch
    embedding), where codes are meant to match the CPU's. Process-wide, so only for processes that do nothing
    else (an encoding actor, a benchmark)."""
    # The allow_tf32 switches, not the newer fp32_precision ones: after those, reading cudnn.allow_tf32 (as
    # torch.compile's convolutions do) raises, while these set the new flags consistently.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def inference_device(threads: int, use_gpu: bool) -> torch.device:
    """For a batch-inference actor: sets its torch CPU threads; CUDA only when asked for and visible."""
    torch.set_num_threads(threads)
    return detect("cuda" if use_gpu and torch.cuda.is_available() else "cpu").device
