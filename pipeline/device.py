"""cpu / cuda / xla behind one object that holds most of what differs between them.

It answers: which device, which autocast dtype (bf16 on CUDA and TPU, none on CPU, where bf16 matmul is
far slower than fp32), whether to use fused AdamW, where a collective's tensor lives, whether a model is
wrapped for data parallelism, the peak FLOP/s for model FLOPs utilisation, and the few calls that differ
under torch_xla (optimizer step, mark_step, a batch onto the device), so the training loops need not branch
on the device.

torch_xla runs SPMD (`pipeline/train/xla_spmd.py`): one process per host drives all of its chips, and one
program spans every chip of every host, so `chips` (this process's) and `mesh_chips` (all hosts') exceed 1
only there.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch

from pipeline.models.cpu_linear import linear

# Dense bf16 peaks from the datasheets (FLOP/s per GPU or TPU chip), for model FLOPs utilisation.
DATASHEET_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12,
                       "T4": 65e12, "v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
# TPU accelerator types name v5e "v5litepod" (v5litepod-8); the others by their generation (v4-8, v6e-8).
TPU_TYPE_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
# The torch.distributed group Ray Train starts per device kind. On XLA it only coordinates the hosts' Python
# (epoch ends, RNG states): the chips' collectives are compiled into the SPMD program.
PROCESS_GROUP_BACKEND = {"cpu": "gloo", "cuda": "nccl", "xla": "gloo"}


def _xla_requested() -> bool:
    return bool(os.environ.get("PJRT_DEVICE")) or bool(os.environ.get("TPU_NAME"))


@dataclass
class Backend:
    kind: str  # cpu | cuda | xla
    device: torch.device
    chips: int = 1  # devices this process drives: every chip of its host under torch_xla SPMD
    mesh_chips: int = 1  # devices one training step runs on, over all hosts
    xla_platform: str = ""  # the PJRT device under torch_xla: TPU, CPU...

    @property
    def spans_processes(self) -> bool:
        """Whether one compiled step runs in several processes (SPMD over several hosts): then every rank
        must run every device computation, validation included, in the same order."""
        return self.kind == "xla" and self.mesh_chips > self.chips

    @property
    def collective_device(self) -> torch.device:
        """Where a small tensor for a gloo/nccl collective lives (nccl needs the GPU, gloo the CPU)."""
        return self.device if self.kind == "cuda" else torch.device("cpu")

    @property
    def wraps_for_data_parallel(self) -> bool:
        """DDP/FSDP wrap the model on CPU and CUDA; under torch_xla SPMD shards it (`xla_spmd.shard_model`)."""
        return self.kind != "xla"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 on GPU and TPU; none on a CPU, torch_xla's CPU device included."""
        return None if self.kind == "cpu" or self.xla_platform == "CPU" else torch.bfloat16

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = "cuda" if self.kind == "cuda" else "xla"
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Under SPMD the gradients are already summed over every chip (one program over the global batch):
        # no `xm.optimizer_step` all-reduce on top.
        optimizer.step()

    def batch_to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """This worker's share of a training batch onto the device; under SPMD split over its chips and
        joined with the other hosts' shares into one global batch."""
        if self.kind == "xla":
            from pipeline.train import xla_spmd

            return xla_spmd.shard_batch(tensor)
        return tensor.to(self.device, non_blocking=True)

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
        """(FLOP/s of every chip this process drives, how it was obtained): datasheet bf16 on accelerators, a
        measured matmul on CPU (torch_xla's CPU device included)."""
        if self.kind == "cuda":
            name = torch.cuda.get_device_name(self.device)
            for key, value in DATASHEET_BF16_PEAK.items():
                if key in name:
                    return value, f"datasheet bf16 ({name})"
            return float("nan"), f"unknown GPU {name}"
        if self.kind == "xla" and self.xla_platform != "CPU":
            version = tpu_generation()
            per_chip = DATASHEET_BF16_PEAK.get(version, float("nan"))
            return per_chip * self.chips, f"datasheet bf16 ({version}) x {self.chips} chips"
        return measure_cpu_matmul_flops(), "measured fp32 matmul"


def tpu_generation() -> str:
    """v4, v5e, v5p, v6e... from the accelerator type (TPU_ACCELERATOR_TYPE, else the TPU VM's metadata)."""
    accelerator = os.environ.get("TPU_ACCELERATOR_TYPE", "")
    if not accelerator:
        try:
            from torch_xla._internal import tpu

            accelerator = tpu.get_tpu_type()
        except Exception:  # not on a TPU VM: the peak is unknown, MFU NaN
            return "unknown TPU"
    name = accelerator.split("-")[0].lower()
    return TPU_TYPE_ALIASES.get(name, name)


def measure_cpu_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    """fp32 matmul FLOP/s through the kernel the models' linear layers use (`pipeline.models.cpu_linear`)."""
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG alone: a resumed run draws as before
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    with torch.no_grad():
        linear(a, b)  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            linear(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def detect(preference: str = "auto") -> Backend:
    """preference: auto | cpu | cuda | xla."""
    if preference == "xla" or (preference == "auto" and _xla_requested()):
        import torch_xla
        import torch_xla.runtime as xr

        from pipeline.train import xla_spmd

        xla_spmd.enable()
        mesh_chips, chips = xla_spmd.device_counts()
        return Backend("xla", torch_xla.device(), chips=chips, mesh_chips=mesh_chips, xla_platform=xr.device_type())
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
