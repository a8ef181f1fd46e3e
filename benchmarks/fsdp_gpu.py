"""FSDP2 training speed and memory of the VIM Transformer at the Large preset's shape (width 2048, 32 heads,
MLP 8192, 1024 tokens, vocabulary 8192), at a reduced depth so it fits a short run on one GPU or a few.

It uses what the Transformer stage uses with `transformer.parallelism: fsdp`: `pipeline.train.sharding`
(every block, then the root; bf16 weights with fp32 gradient reduction on CUDA), optimizer groups built after
sharding, `accumulated_step` under bf16 autocast, fused AdamW. After the timed steps it gathers the full model
and optimizer state once as a checkpoint does, checks it against the shards, writes it with the stage's
`save_state`, loads it back on every rank and repeats the step taken after the save: the two losses agree.

    torchrun --nproc-per-node=8 benchmarks/fsdp_gpu.py --out benchmarks/results/fsdp-h200x8.json
    python benchmarks/fsdp_gpu.py --out bench-out/fsdp.json                       # one GPU
    python benchmarks/fsdp_gpu.py --device cpu --depth 1 --width 128 --grid 8 --batch 2 --out bench-out/f.json

Neither Ray nor MLflow is imported. MFU = training FLOP/s over all ranks (`VIMTransformer.flops_per_token`)
over (the device's peak from `pipeline.device` x ranks); memory is `torch.cuda.max_memory_allocated` per rank.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist

from common import write_report

from pipeline import device as devices
from pipeline.models.settings import VIM_SIZES, TransformerSettings, VimSize
from pipeline.models.transformer import VIMTransformer
from pipeline.train.lm_step import accumulated_step, parameter_groups
from pipeline.train.optim import set_lr
from pipeline.train.sharding import FullModelState, FullOptimizerState, shard_transformer
from pipeline.train.state import TrainState, all_rng_states, load_state, save_state

SHAPE_NAME = "fsdp-bench"  # this process's own entry in VIM_SIZES: the Large shape at the asked depth
LARGE = VIM_SIZES["L"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/fsdp_gpu.json")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only to check the script")
    parser.add_argument("--depth", type=int, default=8, help=f"blocks (the Large preset has {LARGE.depth})")
    parser.add_argument("--width", type=int, default=LARGE.dim, help="heads and MLP follow the Large ratios")
    parser.add_argument("--grid", type=int, default=32, help="tokens per image: grid x grid")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16, help="images per micro-batch per rank")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.1, help="the Large preset's")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the sharded model")
    parser.add_argument("--commit", default=None, help="recorded where the copy has no .git")
    return parser.parse_args()


def init_distributed(device: str) -> tuple[int, int]:
    """torchrun's process group, or a one-process group for plain `python` (FSDP2 needs a group)."""
    if "RANK" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def bench_settings(args: argparse.Namespace) -> TransformerSettings:
    head_dim = LARGE.dim // LARGE.heads
    VIM_SIZES[SHAPE_NAME] = VimSize(dim=args.width, depth=args.depth, heads=max(1, args.width // head_dim),
                                    mlp_dim=args.width * LARGE.mlp_dim // LARGE.dim)
    # model_construct: the size name is this script's, outside the presets the validator knows.
    return TransformerSettings.model_construct(size=SHAPE_NAME, vocab_size=args.vocab, grid=(args.grid, args.grid),
                                               num_classes=1000, dropout=args.dropout, label_dropout=0.0)


def synchronize(backend) -> None:
    backend.synchronize()
    dist.barrier()


def check_full_state(full: dict[str, torch.Tensor], core: torch.nn.Module, rank: int, world: int) -> dict:
    """Rank 0: every weight present at its unsharded shape, finite, and rank 0's shard equal to its slice."""
    problems = []
    for name, parameter in core.named_parameters():
        tensor = full.get(name)
        if tensor is None or tuple(tensor.shape) != tuple(parameter.shape):
            problems.append(f"{name}: {None if tensor is None else tuple(tensor.shape)} != {tuple(parameter.shape)}")
        elif not torch.isfinite(tensor).all():
            problems.append(f"{name}: not finite")
        elif not torch.equal(tensor.chunk(world)[rank], parameter.to_local().detach().cpu()):
            problems.append(f"{name}: rank {rank}'s shard differs from its slice of the full tensor")
    return {"tensors": len(full), "parameters": sum(t.numel() for t in full.values()), "problems": problems[:10],
            "ok": not problems}


def main() -> None:
    args = parse_args()
    rank, world = init_distributed(args.device)
    backend = devices.detect(args.device)  # after torchrun's LOCAL_RANK is known: one GPU per rank
    settings = bench_settings(args)
    torch.manual_seed(0)  # the same initial weights on every rank
    with backend.device:
        core = VIMTransformer(settings)
    parameters, flops_per_token = core.parameter_count(embeddings=True), core.flops_per_token()
    shard_transformer(core, backend)
    model = torch.compile(core) if args.compile else core
    optimizer = torch.optim.AdamW(parameter_groups(core, 0.01), lr=1e-4, betas=(0.9, 0.96),
                                  fused=backend.fused_adamw())
    set_lr(optimizer, 1e-4)
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own share of the global batch
    length = args.grid * args.grid
    micro_batches = [(torch.randint(0, args.vocab, (args.batch, length), generator=generator).to(backend.device),
                      torch.randint(0, 1000, (args.batch,), generator=generator).to(backend.device))
                     for _ in range(args.grad_accum)]

    def step() -> float:
        return accumulated_step(model, micro_batches, optimizer, backend, 1.0)[0]

    started = time.perf_counter()
    losses = [step() for _ in range(args.warmup)]
    synchronize(backend)
    warmup_seconds = time.perf_counter() - started
    started = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    synchronize(backend)
    step_seconds = (time.perf_counter() - started) / args.steps
    memory = {"max_allocated_gib": round(torch.cuda.max_memory_allocated(backend.device) / 2**30, 2),
              "max_reserved_gib": round(torch.cuda.max_memory_reserved(backend.device) / 2**30, 2)
              } if backend.kind == "cuda" else {}
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, memory)

    # A checkpoint as the stage takes it: full tensors gathered to rank 0, written, read back by every rank.
    state = TrainState(model=FullModelState(core), optimizer=FullOptimizerState(core, optimizer))
    started = time.perf_counter()
    saved = state.state_dict(all_rng_states(world))
    gather_seconds = time.perf_counter() - started
    check = check_full_state(saved["model"], core, rank, world) if rank == 0 else None
    with tempfile.TemporaryDirectory() as folder:
        shared = [folder]
        dist.broadcast_object_list(shared)  # rank 0's folder (one machine: torchrun's ranks share it)
        if rank == 0:
            save_state(shared[0], saved)
        del saved
        dist.barrier()
        after_save = step()
        started = time.perf_counter()
        state.load_state_dict(load_state(shared[0]), rank)
        synchronize(backend)
        load_seconds = time.perf_counter() - started
        dist.barrier()  # every rank has read the file before rank 0's folder goes
    after_load = step()

    if rank == 0:
        tokens_per_second = args.batch * args.grad_accum * length * world / step_seconds
        peak, peak_source = backend.peak_flops()
        results = {
            "device": torch.cuda.get_device_name(backend.device) if backend.kind == "cuda" else backend.kind,
            "world_size": world, "shape": {"depth": args.depth, "width": args.width,
                                           **{k: getattr(settings.shape, k) for k in ("heads", "mlp_dim")},
                                           "tokens_per_image": length, "vocab": args.vocab},
            "parameters_m": round(parameters / 1e6, 1), "flops_per_token": flops_per_token,
            "batch_per_rank": args.batch, "grad_accum": args.grad_accum, "dropout": args.dropout,
            "compiled": args.compile, "precision": "bf16 weights/compute, fp32 reduce" if backend.kind == "cuda"
            else "fp32", "warmup_steps": args.warmup, "timed_steps": args.steps,
            "warmup_s": round(warmup_seconds, 2), "step_ms": round(1000 * step_seconds, 1),
            "tokens_per_s": round(tokens_per_second), "tokens_per_s_per_rank": round(tokens_per_second / world),
            "mfu": round(tokens_per_second * flops_per_token / (peak * world), 4),
            "peak_flops_per_rank": peak, "peak_source": peak_source, "memory_per_rank": per_rank,
            "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
            "full_state": {**check, "gather_s": round(gather_seconds, 2), "load_s": round(load_seconds, 2)},
            "resume": {"loss_after_save": after_save, "loss_after_load": after_load,
                       "same": math.isclose(after_save, after_load, rel_tol=1e-5)},
        }
        write_report(args.out, "fsdp_gpu", results, commit=args.commit)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
