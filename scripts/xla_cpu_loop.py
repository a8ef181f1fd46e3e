"""The VIM Transformer's training step and KV-cache decoding on a torch_xla device, without Ray.

Runs in the `tpu` environment (`make tpu-env`: torch 2.9.0 + torch_xla 2.9.0). With PJRT_DEVICE=CPU
it uses XLA's CPU device, so the TPU code path (lazy tensors, mark_step, xm.optimizer_step) is
exercised on any machine:

    PJRT_DEVICE=CPU .venv-tpu/bin/python scripts/xla_cpu_loop.py
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PJRT_DEVICE", "CPU")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline import device as devices  # noqa: E402
from pipeline.models.transformer import TransformerSettings, VIMTransformer  # noqa: E402
from pipeline.train.lm_step import accumulated_step, parameter_groups  # noqa: E402


def main(steps: int = 40) -> int:
    import torch_xla

    backend = devices.detect("xla")
    print(f"torch {torch.__version__}, torch_xla {torch_xla.__version__}, PJRT_DEVICE={os.environ['PJRT_DEVICE']}, "
          f"device {backend.device} ({backend.kind}, autocast {backend.autocast_dtype})", flush=True)
    torch.manual_seed(0)
    patterns = torch.randint(0, 64, (4, 16))
    labels = torch.arange(256) % 4
    tokens = patterns[labels]
    model = VIMTransformer(TransformerSettings(size="pico", vocab_size=64, grid=(4, 4), num_classes=4,
                                               dropout=0.0)).to(backend.device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=3e-3, betas=(0.9, 0.96))
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, 256, (32,))
        micro = [(tokens[index[:16]].to(backend.device), labels[index[:16]].to(backend.device)),
                 (tokens[index[16:]].to(backend.device), labels[index[16:]].to(backend.device))]
        loss, grad_norm = accumulated_step(model, micro, optimizer, backend, grad_clip=1.0)
        losses.append(loss)
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d} loss {loss:.4f} nats/token grad norm {grad_norm:.3f}", flush=True)
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        sample, sample_labels = tokens[:2].to(backend.device), labels[:2].to(backend.device)
        full = model(sample, sample_labels)
        cache = model.new_cache(2)
        steps_out = [model.prefill(sample_labels, cache)]
        for t in range(15):
            steps_out.append(model.decode_step(sample[:, t], cache))
        gap = float((torch.stack(steps_out, 1) - full).abs().max().cpu())
    print(f"{steps} steps in {seconds:.1f}s; loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          f"KV-cache decode vs full forward max |diff| {gap:.2e}", flush=True)
    ok = losses[-1] < 0.5 * losses[0] and gap < 1e-4
    print("XLA loop OK" if ok else "XLA loop FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
