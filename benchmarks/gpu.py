"""GPU speed of the models as the stages train them: VIM-Base training MFU at 1024 tokens (bf16 autocast,
fused SDPA attention with dropout, fused AdamW; eager and `torch.compile` as `transformer.compile` does),
and the ViT-VQGAN S/S tokenizer at 256 px (the stage's generator + discriminator step, and encoding).

    python benchmarks/gpu.py --out benchmarks/results/gpu-h200.json [--budget-s 420]

MFU = training FLOP/s (6 N + attention, `VIMTransformer.flops_per_token`) over the datasheet dense bf16 peak;
the measured rate of a large bf16 matmul on the same GPU is recorded beside it. Uses neither Ray nor MLflow,
so it runs on a bare GPU machine. Each part is skipped once the time budget is spent; the JSON is rewritten
after every part.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import write_report

from pipeline import device as devices
from pipeline.config import build_config
from pipeline.models.settings import TransformerSettings
from pipeline.models.transformer import VIMTransformer
from pipeline.train.lm_step import accumulated_step, parameter_groups
from pipeline.train.tokenizer_objective import TokenizerObjective


def reset_memory(backend) -> None:
    if backend.kind == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def max_memory_gib(backend) -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if backend.kind == "cuda" else float("nan")


def timed(step, steps: int, warmup: int, backend) -> tuple[float, float]:
    """(seconds of the first call, compile included; mean seconds per step after the warm-up)."""
    backend.synchronize()
    started = time.perf_counter()
    step()
    backend.synchronize()
    first = time.perf_counter() - started
    for _ in range(warmup - 1):
        step()
    backend.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    backend.synchronize()
    return first, (time.perf_counter() - started) / steps


def matmul_tflops(backend, size: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=backend.device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=backend.device, dtype=torch.bfloat16)
    _, seconds = timed(lambda: a @ b, repeats, 3, backend)
    return 2 * size**3 / seconds / 1e12


def vim_training(backend, size: str, batch: int, grid: int, vocab: int, compiled: bool, steps: int) -> dict:
    torch.manual_seed(0)
    reset_memory(backend)
    settings = TransformerSettings(size=size, vocab_size=vocab, grid=(grid, grid), num_classes=1000)
    core = VIMTransformer(settings).to(backend.device).train()  # paper dropout 0.1 stays on
    torch._dynamo.reset()  # each batch compiled afresh with static shapes, not as a dynamic-shape recompile
    model = torch.compile(core) if compiled else core
    optimizer = torch.optim.AdamW(parameter_groups(core, 0.01), lr=1e-4, betas=(0.9, 0.96),
                                  fused=backend.fused_adamw())
    tokens = torch.randint(0, vocab, (batch, grid * grid), device=backend.device)
    labels = torch.randint(0, 1000, (batch,), device=backend.device)
    losses = []
    first, seconds = timed(lambda: losses.append(accumulated_step(model, [(tokens, labels)], optimizer, backend, 1.0)[0]),
                           steps, 3, backend)
    tokens_per_s = batch * grid * grid / seconds
    peak, source = backend.peak_flops()
    result = {"size": size, "compiled": compiled, "batch": batch, "tokens_per_image": grid * grid, "vocab": vocab,
              "dropout": settings.dropout, "parameters_m": round(core.parameter_count(embeddings=True) / 1e6, 1),
              "first_step_s": round(first, 1), "step_ms": round(1000 * seconds, 1),
              "tokens_per_s": round(tokens_per_s), "mfu": round(tokens_per_s * core.flops_per_token() / peak, 4),
              "peak_flops": peak, "peak_source": source, "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
              "max_memory_gib": max_memory_gib(backend)}
    return result  # the model and optimizer go with this frame; the next part empties the allocator's cache


def tokenizer_speed(backend, batch: int, encode_batch: int, steps: int, size: int = 256, vit: str = "S") -> dict:
    """The paper's S/S at 256 px (patch 8: 1024 tokens, codebook 8192 x 32) with the discriminator; perceptual
    loss off (no VGG weights offline)."""
    torch.manual_seed(0)
    reset_memory(backend)
    cfg = build_config({"tokenizer": {"image_size": size, "patch_size": 8, "encoder": vit, "decoder": vit,
                                      "codebook_size": 8192, "codebook_dim": 32, "perceptual_weight": 0.0,
                                      "adversarial_weight": 0.1, "disc_start": 0}}).tokenizer
    objective = TokenizerObjective(cfg).to(backend.device)
    optimizer = torch.optim.AdamW(objective.model.parameters(), 1e-4, fused=backend.fused_adamw())
    d_optimizer = torch.optim.AdamW(objective.discriminator.parameters(), 1e-4, fused=backend.fused_adamw())
    images = torch.rand(batch, 3, size, size, device=backend.device)
    d_step = [0]

    def train_step():
        with backend.autocast():
            loss, _, reconstruction, _ = objective.generator_losses(objective.model, objective.discriminator,
                                                                     images, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        d_step[0] += 1
        with backend.autocast():
            d_loss, _ = objective.discriminator_losses(objective.discriminator, images, reconstruction, d_step[0])
        d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        d_optimizer.step()

    _, step_seconds = timed(train_step, steps, 3, backend)
    train_memory = max_memory_gib(backend)
    model = objective.model.eval()
    many = torch.rand(encode_batch, 3, size, size, device=backend.device)

    def encode():
        with torch.inference_mode(), backend.autocast():
            model.encode(many)

    _, encode_seconds = timed(encode, steps, 3, backend)
    return {"encoder": vit, "decoder": vit, "image_size": size, "patch_size": 8, "codebook": [8192, 32],
            "train_batch": batch, "train_images_per_s": round(batch / step_seconds, 1),
            "train_step_ms": round(1000 * step_seconds, 1), "train_max_memory_gib": train_memory,
            "encode_batch": encode_batch, "encode_images_per_s": round(encode_batch / encode_seconds, 1),
            "generator_params_m": round(sum(p.numel() for p in objective.model.parameters()) / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    parser.add_argument("--budget-s", type=float, default=420, help="parts that would start after this are skipped")
    parser.add_argument("--size", default="B")
    parser.add_argument("--batches", default="32", help="VIM batches, comma-separated")
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tokenizer-batch", type=int, default=32)
    parser.add_argument("--device", default="cuda", help="cpu only to check the script itself")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--tokenizer-size", type=int, default=256)
    parser.add_argument("--tokenizer-vit", default="S")
    parser.add_argument("--commit", default=None, help="recorded where the copy has no .git")
    args = parser.parse_args()
    backend = devices.detect(args.device)
    started = time.perf_counter()
    results: dict = {"device": torch.cuda.get_device_name(0) if backend.kind == "cuda" else backend.kind,
                     "bf16_matmul_tflops_8192": round(matmul_tflops(backend, args.matmul_size), 1),
                     "vim": [], "skipped": []}

    def save():
        write_report(args.out, "gpu", results, commit=args.commit)

    def vim(batch: int, compiled: bool):
        return (f"vim {args.size} batch {batch} {'compiled' if compiled else 'eager'}",
                lambda: results["vim"].append(vim_training(backend, args.size, batch, args.grid, args.vocab, compiled,
                                                           args.steps)))

    batches = [int(b) for b in args.batches.split(",")]
    parts = [vim(batches[0], False),
             ("tokenizer", lambda: results.__setitem__("tokenizer", tokenizer_speed(
                 backend, args.tokenizer_batch, 256, args.steps, args.tokenizer_size, args.tokenizer_vit))),
             *(vim(b, True) for b in batches)]
    for name, part in parts:
        if time.perf_counter() - started > args.budget_s:
            results["skipped"].append(name)
            continue
        print(f"[{time.perf_counter() - started:6.1f} s] {name}", flush=True)
        try:
            part()
        except Exception as error:  # noqa: BLE001 - one failing part must not lose the others' figures
            results.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"[:2000]
            reset_memory(backend)
        save()
    results["seconds"] = round(time.perf_counter() - started, 1)
    save()


if __name__ == "__main__":
    main()
