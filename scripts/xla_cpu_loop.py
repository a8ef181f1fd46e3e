"""The VIM Transformer's training step under torch_xla SPMD on several XLA CPU devices, without Ray.

Runs in the `tpu` environment (`make tpu-env`: torch 2.9.0 + torch_xla 2.9.0). torch_xla's CPU client
exposes `--devices` devices (CPU_NUM_DEVICES), and the TPU code path runs on them as it would on the chips of
a host: `pipeline.device.detect("xla")` (SPMD), `xla_spmd.shard_model` (replicated, or FSDPv2 with
`--parallelism fsdp`), `Backend.batch_to_device` (the batch split over the devices) and the stage's
`accumulated_step`. It checks, and writes to `--report` (JSON):

- the parameters after two optimizer steps against plain PyTorch on the CPU (one device, no torch_xla) given
  the same global batches;
- the loss over `--steps` steps of a small pattern task (it must fall), and the number of XLA compilations
  after the first steps and at the end: a changing learning rate must not compile a new program;
- a checkpoint (`TrainState` with `xla_spmd.ModelState`/`OptimizerState`) written after the last step, and the
  next step's loss; a fresh model resumed from it in this process must give that loss again, and
  `--resume DIR` resumes it in another process, on any device count and either parallelism;
- with fsdp, each parameter's sharding and the shape every device holds;
- KV-cache decoding against the full forward (`--decode-check`).

    PJRT_DEVICE=CPU .venv-tpu/bin/python scripts/xla_cpu_loop.py --devices 4 --parallelism fsdp --save /tmp/ckpt
    PJRT_DEVICE=CPU .venv-tpu/bin/python scripts/xla_cpu_loop.py --devices 2 --resume /tmp/ckpt
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, GRID, CLASSES, PATTERNS = 64, (4, 4), 4, 256
MICRO_BATCHES, MICRO_BATCH = 2, 16  # one step: 2 accumulated micro-batches of 16 sequences (global)
LR, WEIGHT_DECAY, BETAS, CLIP = 3e-3, 0.01, (0.9, 0.96), 1.0
WARMUP, DECAY_START, LR_FLOOR = 2, 20, 1e-3  # the stage's schedule, so the lr changes at (almost) every step
EXPECTED = "expected.json"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=4, help="XLA CPU devices (CPU_NUM_DEVICES)")
    parser.add_argument("--parallelism", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save", type=Path, help="write the checkpoint after the last step here")
    parser.add_argument("--resume", type=Path, help="resume from this checkpoint and take one step only")
    parser.add_argument("--decode-check", action="store_true")
    parser.add_argument("--noble-rank", type=int, default=0, help="NOBLE branches on the blocks' linear layers")
    parser.add_argument("--report", type=Path)
    return parser.parse_args()


def task():
    """Sequences of 4 fixed token patterns, labelled by pattern: learnable in a few dozen steps."""
    import torch

    generator = torch.Generator().manual_seed(1234)
    patterns = torch.randint(0, VOCAB, (CLASSES, GRID[0] * GRID[1]), generator=generator)
    labels = torch.arange(PATTERNS) % CLASSES
    return patterns[labels], labels


def step_batch(tokens, labels, step: int):
    """Step `step`'s global batch, the same in every process: micro-batches of (tokens, labels) on the CPU."""
    import torch

    index = torch.randint(0, PATTERNS, (MICRO_BATCHES * MICRO_BATCH,), generator=torch.Generator().manual_seed(step))
    return [(tokens[part], labels[part]) for part in index.split(MICRO_BATCH)]


def build(backend, parallelism: str, noble_rank: int = 0):
    """The pico VIM Transformer on the device (sharded per `parallelism`), its AdamW, and an identical
    copy with its own AdamW on the CPU as the single-device reference."""
    import torch

    from pipeline.models.transformer import TransformerSettings, VIMTransformer
    from pipeline.train import xla_spmd
    from pipeline.train.lm_step import parameter_groups

    torch.manual_seed(0)
    reference = VIMTransformer(TransformerSettings(size="pico", vocab_size=VOCAB, grid=GRID, num_classes=CLASSES,
                                                   dropout=0.0, noble_rank=noble_rank)).train()
    core = copy.deepcopy(reference).to(backend.device)
    model = xla_spmd.shard_model(core, fully_sharded=parallelism == "fsdp")
    optimizer = torch.optim.AdamW(parameter_groups(core, WEIGHT_DECAY), lr=LR, betas=BETAS)
    reference_optimizer = torch.optim.AdamW(parameter_groups(reference, WEIGHT_DECAY), lr=LR, betas=BETAS)
    return core, model, optimizer, reference, reference_optimizer


def train_state(core, optimizer):
    from pipeline.train import xla_spmd
    from pipeline.train.state import TrainState

    return TrainState(model=xla_spmd.ModelState(core), optimizer=xla_spmd.OptimizerState(optimizer))


def compilations() -> int:
    import torch_xla.debug.metrics as metrics

    data = metrics.metric_data("CompileTime")
    return int(data[0]) if data else 0


def set_schedule(optimizer, step: int, total: int) -> None:
    from pipeline.train.lm_step import lr_at
    from pipeline.train.optim import set_lr

    set_lr(optimizer, lr_at(step, LR, LR_FLOOR, WARMUP, DECAY_START, total))


def xla_step(model, optimizer, backend, batch) -> float:
    from pipeline.train.lm_step import accumulated_step

    micro = [(backend.batch_to_device(tokens), backend.batch_to_device(labels)) for tokens, labels in batch]
    return accumulated_step(model, micro, optimizer, backend, CLIP)[0]


def shard_report(core, optimizer) -> dict:
    """Every parameter's shape, sharding and per-device shapes; the same for its AdamW moments."""
    from pipeline.train import xla_spmd

    report = {}
    for name, parameter in core.named_parameters():
        moments = {key: {"sharding": xla_spmd.sharding_of(value), "local_shapes": xla_spmd.local_shard_shapes(value)}
                   for key, value in optimizer.state.get(parameter, {}).items() if value.shape == parameter.shape}
        report[name] = {"shape": list(parameter.shape), "sharding": xla_spmd.sharding_of(parameter),
                        "local_shapes": xla_spmd.local_shard_shapes(parameter), "moments": moments}
    return report


def max_difference(module, reference) -> float:
    return max(float((mine.detach().cpu() - theirs.detach()).abs().max())
               for mine, theirs in zip(module.parameters(), reference.parameters()))


def decode_gap(core, tokens, labels, backend) -> float:
    """KV-cache decoding against the full forward, on the first two sequences (max |logit difference|)."""
    import torch

    core.eval()
    with torch.no_grad():
        sample, sample_labels = tokens[:2].to(backend.device), labels[:2].to(backend.device)
        full = core(sample, sample_labels)
        cache = core.new_cache(2)
        logits = [core.prefill(sample_labels, cache)]
        for position in range(sample.shape[1] - 1):
            logits.append(core.decode_step(sample[:, position], cache))
        gap = float((torch.stack(logits, 1) - full).abs().max().cpu())
    core.train()
    return gap


def train(args, backend, report: dict) -> None:
    import torch

    from pipeline.device import Backend
    from pipeline.train import xla_spmd
    from pipeline.train.lm_step import accumulated_step
    from pipeline.train.state import rng_state, save_state

    xla_spmd.check_one_mesh(workers=1)  # this process holds every device of the mesh
    try:  # two workers cannot share one process's devices: the stage's guard against unsynchronised hosts
        xla_spmd.check_one_mesh(workers=2)
        report["two_workers_refused"] = False
    except RuntimeError:
        report["two_workers_refused"] = True
    tokens, labels = task()
    core, model, optimizer, reference, reference_optimizer = build(backend, args.parallelism, args.noble_rank)
    cpu = Backend("cpu", torch.device("cpu"))
    first = step_batch(tokens, labels, 0)
    report["batch_local_shapes"] = xla_spmd.local_shard_shapes(backend.batch_to_device(first[0][0]))
    losses, reference_losses = [], []
    started = time.perf_counter()
    for step in range(args.steps):
        batch = step_batch(tokens, labels, step)
        set_schedule(optimizer, step, args.steps)
        losses.append(xla_step(model, optimizer, backend, batch))
        if step < 2:  # the single-device reference: plain PyTorch on the CPU, same batches
            set_schedule(reference_optimizer, step, args.steps)
            reference_losses.append(accumulated_step(reference, batch, reference_optimizer, cpu, CLIP)[0])
            report[f"param_max_abs_diff_after_step_{step + 1}"] = max_difference(core, reference)
        if step == 2:
            report["compilations_after_3_steps"] = compilations()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d} loss {losses[-1]:.4f} nats/token", flush=True)
    report.update(losses=losses, reference_losses=reference_losses, seconds=time.perf_counter() - started,
                  compilations_at_the_end=compilations())
    report["shards"] = shard_report(core, optimizer)

    state = train_state(core, optimizer)
    state.step = args.steps
    saved = state.state_dict([rng_state()])
    next_batch = step_batch(tokens, labels, args.steps)
    set_schedule(optimizer, args.steps, args.steps)
    report["next_loss"] = xla_step(model, optimizer, backend, next_batch)
    if args.save:
        save_state(args.save, saved)
        (args.save / EXPECTED).write_text(json.dumps({"next_loss": report["next_loss"], "devices": args.devices,
                                                      "parallelism": args.parallelism}))
    # A fresh model and optimizer resumed from that state in this process, on the same devices.
    fresh_core, fresh_model, fresh_optimizer, _, _ = build(backend, args.parallelism, args.noble_rank)
    train_state(fresh_core, fresh_optimizer).load_state_dict(saved, rank=0)
    set_schedule(fresh_optimizer, args.steps, args.steps)
    report["resumed_next_loss_same_devices"] = xla_step(fresh_model, fresh_optimizer, backend, next_batch)
    if args.decode_check:
        report["decode_max_abs_diff"] = decode_gap(core, tokens, labels, backend)


def resume(args, backend, report: dict) -> None:
    from pipeline.train.state import load_state

    tokens, labels = task()
    core, model, optimizer, _, _ = build(backend, args.parallelism, args.noble_rank)
    state = train_state(core, optimizer)
    state.load_state_dict(load_state(args.resume), rank=0)
    report["resumed_from"] = json.loads((args.resume / EXPECTED).read_text())
    report["resumed_step"] = state.step
    set_schedule(optimizer, state.step, state.step)  # past the schedule's end: the floor, as in the run
    report["resumed_next_loss"] = xla_step(model, optimizer, backend, step_batch(tokens, labels, state.step))
    report["shards"] = shard_report(core, optimizer)


def main() -> int:
    args = parse()
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    os.environ["CPU_NUM_DEVICES"] = str(args.devices)  # read when torch_xla's CPU client starts
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's notice that GSPMD is deprecated, at every compile
    import torch
    import torch_xla

    from pipeline import device as devices

    backend = devices.detect("xla")
    report = {"devices": backend.mesh_chips, "parallelism": args.parallelism, "torch": torch.__version__,
              "torch_xla": torch_xla.__version__, "autocast": str(backend.autocast_dtype)}
    print(f"torch {torch.__version__}, torch_xla {torch_xla.__version__}, {backend.xla_platform} x "
          f"{backend.mesh_chips} devices in the SPMD mesh ({backend.chips} in this process), {args.parallelism}",
          flush=True)
    (resume if args.resume else train)(args, backend, report)
    for key, value in report.items():
        if key not in ("shards", "losses"):
            print(f"{key}: {value}", flush=True)
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
