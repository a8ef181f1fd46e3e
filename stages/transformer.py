"""Transformer: fit the VIM Transformer on the pretokenized code arrays with Ray Train.

Workers stream the Parquet codes through Ray Data. An image stored in several views contributes one
of them per epoch, picked by a hash of its key and the epoch, so every epoch sees each image once and
the views rotate. Steps accumulate micro-batches; the device (CPU/gloo, CUDA/nccl + bf16, TPU/torch_xla)
comes from `pipeline.device`. Rank 0 logs loss in nats and bits per token, tokens/s and model FLOPs
utilisation, and checkpoints model, optimizer, step and data position, so a restarted worker group or
a re-submitted job continues at the next step.
"""
from __future__ import annotations

import os
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from pipeline import device as devices
from pipeline.config import PipelineConfig, TransformerConfig
from pipeline.models.transformer import (CONFIG_FILE, WEIGHTS_FILE, TransformerSettings, VIMTransformer,
                                         save_transformer)
from pipeline.stage import StageContext, StageResult
from pipeline.storage import RunDir
from pipeline.tracking import Tracker
from pipeline.train.lm_step import LN2, accumulated_step, lr_at, next_token_loss, parameter_groups
from pipeline.train.state import rng_state, set_rng_state

FINAL_METRICS = "final_metrics.json"
COLUMNS = ["codes", "label", "view", "image_id"]


def with_image_ids(table: pa.Table) -> pa.Table:
    """A stable integer per image (crc32 of its key), so workers can pick views without string columns."""
    ids = np.fromiter((zlib.crc32(k.encode()) for k in table.column("key").to_pylist()), np.int64, table.num_rows)
    return table.drop_columns(["key"]).append_column("image_id", pa.array(ids, pa.int64()))


def pick_views(image_ids: torch.Tensor, views: torch.Tensor, view_ids: list[int], epoch: int) -> torch.Tensor:
    """Mask of the rows holding each image's view for this epoch (a hash of image and epoch)."""
    if len(view_ids) == 1:
        return torch.ones_like(image_ids, dtype=torch.bool)
    mixed = (image_ids * 0x9E3779B1 + (epoch + 1) * 0x85EBCA6B) & 0x7FFFFFFF
    chosen = torch.tensor(view_ids, device=views.device)[(mixed >> 7) % len(view_ids)]
    return views == chosen


def training_batches(shard, cfg: TransformerConfig, view_ids: list[int], epoch: int, rank: int):
    """Exactly `batch_size` images per micro-batch for one epoch, each image in one view."""
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    held = 0
    read_size = cfg.batch_size * len(view_ids)
    for batch in shard.iter_torch_batches(batch_size=read_size, dtypes={c: torch.int64 for c in COLUMNS},
                                          local_shuffle_buffer_size=read_size * 8,
                                          local_shuffle_seed=cfg.seed * 100_003 + epoch * 101 + rank):
        keep = pick_views(batch["image_id"], batch["view"], view_ids, epoch)
        pending.append((batch["codes"][keep], batch["label"][keep]))
        held += int(keep.sum())
        while held >= cfg.batch_size:
            codes, labels = torch.cat([c for c, _ in pending]), torch.cat([lab for _, lab in pending])
            yield codes[:cfg.batch_size], labels[:cfg.batch_size]
            pending, held = [(codes[cfg.batch_size:], labels[cfg.batch_size:])], held - cfg.batch_size


@torch.no_grad()
def validation_loss(model: VIMTransformer, shard, cfg: TransformerConfig, backend) -> float:
    """Mean NLL in nats per token over up to `val_images` plain-view val images."""
    model.eval()
    total, tokens_seen, images = 0.0, 0, 0
    for batch in shard.iter_torch_batches(batch_size=256, dtypes={c: torch.int64 for c in COLUMNS}):
        codes = batch["codes"][: cfg.val_images - images].to(backend.device)
        labels = batch["label"][: len(codes)].to(backend.device)
        with backend.autocast():
            logits = model(codes, labels if cfg.conditional else None)
        total += float(next_token_loss(logits, codes)) * codes.numel()
        tokens_seen += codes.numel()
        images += len(codes)
        if images >= cfg.val_images:
            break
    model.train()
    return total / max(tokens_seen, 1)


def _all_have_data(have: bool, world: int, backend) -> bool:
    """True while every worker has a full step. Picking one view per image leaves workers with slightly
    different row counts, so the end of an epoch is agreed on, not found out separately."""
    if world == 1 or not dist.is_initialized():
        return have
    flag = torch.tensor([1 if have else 0], device=backend.device if backend.kind == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _wrap_model(model: torch.nn.Module, cfg: TransformerConfig, backend):
    """DDP (or FSDP on GPU) through Ray Train; on XLA the backend all-reduces in its optimizer step."""
    import ray.train.torch

    if backend.kind == "xla" or ray.train.get_context().get_world_size() == 1:
        return model
    if cfg.parallelism == "fsdp":
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="fsdp")
    return ray.train.torch.prepare_model(model, move_to_device=False)


def transformer_loop(loop_config: dict) -> None:
    import ray.train

    from stages.training import report, restore_state, tag_placement_group

    cfg = TransformerConfig.model_validate(loop_config["transformer"])
    settings = TransformerSettings(**{**loop_config["settings"], "grid": tuple(loop_config["settings"]["grid"])})
    view_ids: list[int] = loop_config["view_ids"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    backend = devices.detect(cfg.resources.device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    core = VIMTransformer(settings).to(backend.device)  # the plain module: state, export, validation
    model = _wrap_model(torch.compile(core) if cfg.compile else core, cfg, backend)
    optimizer = torch.optim.AdamW(parameter_groups(core, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  fused=backend.fused_adamw())
    step, epoch, batch_in_epoch = 0, 0, 0
    state = restore_state()
    if state is not None:
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        print(f"[transformer rank {rank}] resumed at step {step} (epoch {epoch}, batch {batch_in_epoch})", flush=True)

    tracker = Tracker(loop_config["tracking_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None
    if tracker is not None:
        tag_placement_group(tracker)
    peak, peak_source = backend.peak_flops()
    flops_per_token = core.flops_per_token()
    if tracker is not None:
        tracker.set_tags({"vim.peak_flops": f"{peak:.3g} ({peak_source})", "vim.device": backend.kind})
        if state is not None:
            tracker.log_metrics({"resumed_from_step": step}, step=step)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * settings.length
    started = window_start = time.perf_counter()
    window_steps, data_wait = 0, 0.0

    def checkpoint_state() -> dict | None:
        gathered = [None] * world
        if dist.is_initialized() and world > 1:
            dist.all_gather_object(gathered, rng_state())
        else:
            gathered = [rng_state()]
        if rank != 0:
            return None
        model_state = {k: v.detach().cpu() for k, v in core.state_dict().items()}
        return {"model": model_state, "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "rng": gathered}

    last_val = float("nan")
    while step < cfg.steps:
        micro_batches = training_batches(train_shard, cfg, view_ids, epoch, rank)
        for _ in range(batch_in_epoch * cfg.grad_accum):  # resume: what this epoch had already used
            next(micro_batches, None)
        used_before = batch_in_epoch
        exhausted = False
        while step < cfg.steps:
            waited = time.perf_counter()
            group = []
            for _ in range(cfg.grad_accum):
                item = next(micro_batches, None)
                if item is None:
                    exhausted = True
                    break
                codes, labels = item
                labels = core.drop_labels(labels) if cfg.conditional else None
                group.append((codes.to(backend.device, non_blocking=True),
                              labels.to(backend.device, non_blocking=True) if labels is not None else None))
            if not _all_have_data(not exhausted, world, backend):
                break  # every worker ends the epoch together, or DDP would wait on the one that ended
            data_wait += time.perf_counter() - waited
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr_at(step, cfg.lr, cfg.lr_floor, cfg.warmup_steps, cfg.decay_start, cfg.steps)
            loss, grad_norm = accumulated_step(model, group, optimizer, backend, cfg.grad_clip)
            step += 1
            batch_in_epoch += 1
            window_steps += 1

            if tracker is not None and (step % cfg.log_every == 0 or step == cfg.steps):
                backend.synchronize()
                elapsed = time.perf_counter() - window_start
                tokens_per_second = window_steps * tokens_per_step / elapsed
                metrics = {"train_loss_nats": loss, "train_bits_per_token": loss / LN2, "grad_norm": grad_norm,
                           "lr": optimizer.param_groups[0]["lr"], "tokens_per_second": tokens_per_second,
                           "images_per_second": tokens_per_second / settings.length,
                           "mfu": tokens_per_second * flops_per_token / (peak * world),
                           "data_wait_fraction": data_wait / elapsed}
                tracker.log_metrics(metrics, step=step)
                eta = (cfg.steps - step) * tokens_per_step / max(tokens_per_second, 1e-9)
                print(f"[transformer] step {step}/{cfg.steps} loss {loss:.4f} nats ({loss / LN2:.3f} bits)/token "
                      f"{tokens_per_second:.0f} tok/s MFU {metrics['mfu']:.3f} data wait "
                      f"{metrics['data_wait_fraction']:.2f} ETA {eta:.0f}s", flush=True)
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
            if rank == 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
                last_val = validation_loss(core, val_shard, cfg, backend)
                tracker.log_metrics({"val_loss_nats": last_val, "val_bits_per_token": last_val / LN2}, step=step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                report({"step": step}, checkpoint_state())
        if step >= cfg.steps:
            break
        # A resumed epoch may have nothing left for this rank (each epoch draws its own views, so a rank's
        # share varies); only a fresh epoch without a full step is an error.
        if batch_in_epoch == used_before == 0:
            raise ValueError(f"an epoch gave no full step: the train split needs at least transformer.batch_size"
                             f" x grad_accum x workers = {cfg.batch_size * cfg.grad_accum * world} images")
        epoch, batch_in_epoch = epoch + 1, 0

    if rank == 0:
        final = {"val_loss_nats": last_val, "val_bits_per_token": last_val / LN2, "steps": float(step),
                 "train_seconds": time.perf_counter() - started, "epochs": float(epoch + 1),
                 "parameters": float(core.parameter_count(embeddings=True)),
                 "flops_per_token": float(flops_per_token), "peak_flops": peak}
        _export(core, loop_config["run_dir"], loop_config["folder"], final)


def _export(model: VIMTransformer, run_dir_location: str, folder: str, final: dict) -> None:
    run_dir = RunDir(run_dir_location)
    with tempfile.TemporaryDirectory() as temp:
        save_transformer(model, temp)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            run_dir.write_bytes(Path(temp, name).read_bytes(), folder, name)
    run_dir.write_json(final, folder, FINAL_METRICS)


# ---------------------------------------------------------------------------------------------
# The stage


def run(cfg: PipelineConfig, ctx: StageContext) -> StageResult:
    import ray

    from stages.training import build_trainer, fit

    codes, ingest = ctx.inputs["pretokenize"], ctx.inputs["ingest"]
    tcfg = cfg.transformer
    files = {split: [ctx.run_dir.uri("codes", name) for name in names] for split, names in codes.outputs["codes"].items()}
    val_split = "val" if files.get("val") else "train"
    train = ray.data.read_parquet(files["train"]).map_batches(with_image_ids, batch_format="pyarrow")
    val = (ray.data.read_parquet(files[val_split]).filter(lambda row: row["view"] == 0)
           .map_batches(with_image_ids, batch_format="pyarrow"))
    settings = TransformerSettings(
        size=tcfg.size, vocab_size=codes.outputs["codebook_size"], grid=tuple(codes.outputs["grid"]),
        num_classes=int(ingest.details.get("num_classes", 0)) if tcfg.conditional else 0,
        dropout=tcfg.dropout, label_dropout=tcfg.label_dropout)
    model = VIMTransformer(settings)
    ctx.log.info("VIM %s: %.2fM parameters, %d tokens per image, %d classes", tcfg.size,
                 model.parameter_count(embeddings=True) / 1e6, settings.length, settings.num_classes)
    ctx.tracker.set_tags({"vim.transformer_size": tcfg.size, "vim.conditional": str(tcfg.conditional)})
    ctx.run_dir.delete(ctx.folder, FINAL_METRICS)
    env = {"MLFLOW_TRACKING_URI": ctx.tracker.tracking_uri}
    if os.environ.get("RAY_AUTH_MODE"):
        env["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
    settings_dict = {**settings.__dict__, "grid": list(settings.grid)}
    loop_config = {"transformer": tcfg.model_dump(mode="json"), "settings": settings_dict,
                   "view_ids": sorted(codes.outputs["views"].values()), "tracking_uri": ctx.tracker.tracking_uri,
                   "mlflow_run_id": ctx.tracker.run_id, "run_dir": ctx.run_dir.location, "folder": ctx.folder,
                   "env": env}
    trainer = build_trainer(ctx, transformer_loop, loop_config, tcfg.resources, {"train": train, "val": val})
    fit(trainer)
    final = ctx.run_dir.read_json(ctx.folder, FINAL_METRICS)
    tokens = tcfg.steps * tcfg.batch_size * tcfg.grad_accum * tcfg.resources.num_workers * settings.length
    final["train_tokens_per_second_overall"] = tokens / max(final["train_seconds"], 1e-9)
    ctx.log.info("transformer: val %.4f nats/token (%.3f bits), %.0f tokens/s", final["val_loss_nats"],
                 final["val_bits_per_token"], final["train_tokens_per_second_overall"])
    return StageResult(
        outputs={"model": WEIGHTS_FILE, "config": CONFIG_FILE, "settings": settings_dict},
        counts={"steps": int(final["steps"]), "train_tokens_seen": tokens},
        metrics={k: float(v) for k, v in final.items() if isinstance(v, (int, float))},
        details={"run_name": f"{ctx.spec.name}-{ctx.fingerprint}",
                 "uniform_loss_nats": float(np.log(settings.vocab_size))})
