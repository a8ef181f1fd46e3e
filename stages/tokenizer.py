"""Tokenizer: fit ViT-VQGAN on the ingest shards with Ray Train, export model.safetensors + config.json.

Workers stream the train split through Ray Data (random crop + flip), the generator runs under DDP,
the discriminator's gradients are averaged by hand (lazy R1 needs a double backward, which DDP does not
support). Rank 0 logs to MLflow and writes checkpoints; a restarted worker group or a re-submitted job
continues from the latest checkpoint at the next step, in the same epoch, after the batches it had used.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import device as devices
from pipeline.config import PipelineConfig, TokenizerConfig
from pipeline.data.transforms import center, random_crop_flip, to_float
from pipeline.metrics.codebook import CodebookUsage
from pipeline.models.losses import find_vgg16_weights, logit_laplace_nll
from pipeline.models.tokenizer import CONFIG_FILE, WEIGHTS_FILE, save_tokenizer
from pipeline.stage import StageContext, StageResult
from pipeline.storage import RunDir
from pipeline.tracking import Tracker
from pipeline.train.state import rng_state, set_rng_state
from pipeline.train.tokenizer_objective import TokenizerObjective, psnr
from pipeline.viz import make_grid

FINAL_METRICS = "final_metrics.json"


def preflight(cfg: PipelineConfig) -> None:
    """Fail before Ray starts when the perceptual loss is on but VGG16 weights are nowhere."""
    if cfg.tokenizer.perceptual_weight > 0:
        find_vgg16_weights(cfg.tokenizer.vgg16_weights)


# ---------------------------------------------------------------------------------------------
# The per-worker training loop


def _average_gradients(module: torch.nn.Module) -> None:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _grad_norm(module: torch.nn.Module, clip: float) -> float:
    params = [p for p in module.parameters() if p.grad is not None]
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    return float(torch.norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0


@torch.no_grad()
def evaluate_reconstruction(model, batches, codebook_size: int, limit: int, backend) -> dict[str, float]:
    """Val metrics: PSNR, L2, logit-Laplace NLL, codebook usage (paper's per-256 and whole split)."""
    model.eval()
    usage = CodebookUsage(codebook_size)
    sums = {"psnr": 0.0, "l2": 0.0, "logit_laplace": 0.0}
    seen = 0
    for images in batches:
        images = images[: limit - seen].to(backend.device)
        reconstruction, raw, quantized = model(images)
        sums["psnr"] += float(psnr(reconstruction, images).sum())
        sums["l2"] += float((reconstruction.clamp(0, 1) - images).pow(2).flatten(1).mean(1).sum())
        if "mu" in raw:
            sums["logit_laplace"] += float(logit_laplace_nll(images, raw["mu"], raw["log_b"])) * len(images)
        usage.update(quantized.codes.cpu().numpy())
        seen += len(images)
        if seen >= limit:
            break
    model.train()
    metrics = {f"val_{k}": v / max(seen, 1) for k, v in sums.items()}
    metrics.update({f"val_{k}": v for k, v in usage.result().items()})
    metrics["val_images"] = float(seen)
    return metrics


def _val_batches(cfg: TokenizerConfig, backend):
    import ray.train

    shard = ray.train.get_dataset_shard("val")
    for batch in shard.iter_torch_batches(batch_size=min(256, cfg.val_images), dtypes={"image": torch.uint8},
                                          drop_last=False):
        yield center(to_float(batch["image"]), cfg.image_size)


def tokenizer_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from stages.training import report, restore_state, tag_placement_group

    cfg = TokenizerConfig.model_validate(loop_config["tokenizer"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    backend = devices.detect(cfg.resources.device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    objective = TokenizerObjective(cfg)
    objective.model.to(backend.device)
    if objective.discriminator is not None:
        objective.discriminator.to(backend.device)
    if objective.perceptual is not None:
        objective.perceptual.to(backend.device)
    model = ray.train.torch.prepare_model(objective.model, move_to_device=False)
    discriminator = objective.discriminator
    generator_params = [p for p in objective.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(generator_params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                  fused=backend.fused_adamw())
    d_optimizer = (torch.optim.AdamW(discriminator.parameters(), lr=cfg.disc_lr, betas=cfg.betas,
                                     weight_decay=cfg.weight_decay) if discriminator is not None else None)
    from pipeline.schedules import warmup_cosine

    def lr_at(step: int) -> float:
        return cfg.lr * warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.lr_floor / cfg.lr)

    step, epoch, batch_in_epoch, d_steps = 0, 0, 0, 0
    state = restore_state()
    if state is not None:
        objective.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if discriminator is not None:
            discriminator.load_state_dict(state["discriminator"])
            d_optimizer.load_state_dict(state["d_optimizer"])
        step, epoch, batch_in_epoch, d_steps = state["step"], state["epoch"], state["batch_in_epoch"], state["d_steps"]
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        print(f"[tokenizer rank {rank}] resumed at step {step} (epoch {epoch}, batch {batch_in_epoch})", flush=True)

    tracker = Tracker(loop_config["tracking_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None
    if tracker is not None:
        tag_placement_group(tracker)
    if tracker is not None and state is not None:
        tracker.log_metrics({"resumed_from_step": step}, step=step)
    val_probe = next(iter(_val_batches(cfg, backend))) if rank == 0 else None  # fixed: comparable over time
    shard = ray.train.get_dataset_shard("train")
    started = window_start = time.perf_counter()
    window_images, data_wait = 0, 0.0

    def checkpoint_state() -> dict:
        gathered = [None] * world
        own = rng_state()
        if dist.is_initialized() and world > 1:
            dist.all_gather_object(gathered, own)
        else:
            gathered = [own]
        if rank != 0:
            return None
        out = {"model": objective.model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
               "epoch": epoch, "batch_in_epoch": batch_in_epoch, "d_steps": d_steps, "rng": gathered}
        if discriminator is not None:
            out.update(discriminator=discriminator.state_dict(), d_optimizer=d_optimizer.state_dict())
        return out

    while step < cfg.steps:
        batches = shard.iter_torch_batches(batch_size=cfg.batch_size, dtypes={"image": torch.uint8},
                                           drop_last=True, local_shuffle_buffer_size=cfg.batch_size * 8,
                                           local_shuffle_seed=cfg.seed * 100_003 + epoch * 101 + rank)
        iterator = iter(batches)
        for _ in range(batch_in_epoch):  # resume: the batches this epoch had already used
            next(iterator, None)
        waited = time.perf_counter()
        used_before = batch_in_epoch
        for batch in iterator:
            data_wait += time.perf_counter() - waited
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 97 + rank)
            images = random_crop_flip(to_float(batch["image"]), cfg.image_size, cfg.augment_pad, generator)
            images = images.to(backend.device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)

            with backend.autocast():
                loss, terms, reconstruction, stats = objective.generator_losses(model, discriminator, images, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = _grad_norm(objective.model, cfg.grad_clip)
            backend.optimizer_step(optimizer)

            if discriminator is not None and objective.adversarial_on(step):
                d_optimizer.zero_grad(set_to_none=True)
                with backend.autocast():
                    d_loss, d_terms = objective.discriminator_losses(discriminator, images, reconstruction, d_steps)
                d_loss.backward()
                _average_gradients(discriminator)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(discriminator.parameters(), cfg.grad_clip)
                backend.optimizer_step(d_optimizer)
                terms.update(d_terms)
                d_steps += 1
            backend.mark_step()
            step += 1
            batch_in_epoch += 1
            window_images += images.shape[0] * world

            if tracker is not None and (step % cfg.log_every == 0 or step == cfg.steps):
                backend.synchronize()
                elapsed = time.perf_counter() - window_start
                rate = window_images / elapsed
                metrics = {f"train_{k}": float(v) for k, v in terms.items()}
                metrics.update({"train_loss": float(loss), "lr": lr_at(step - 1), "grad_norm": grad_norm,
                                "images_per_second": rate, "data_wait_fraction": data_wait / elapsed,
                                **{f"train_{k}": v for k, v in stats.items()}})
                tracker.log_metrics(metrics, step=step)
                eta = (cfg.steps - step) * cfg.batch_size * world / max(rate, 1e-9)
                print(f"[tokenizer] step {step}/{cfg.steps} loss {float(loss):.4f} l2 {float(terms['l2']):.5f} "
                      f"usage {stats['usage_batch']:.3f} {rate:.1f} img/s ETA {eta:.0f}s", flush=True)
                window_start, window_images, data_wait = time.perf_counter(), 0, 0.0
            if tracker is not None and (step % cfg.image_every == 0 or step == cfg.steps):
                _log_reconstructions(objective.model, val_probe, backend, tracker, step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                report({"step": step}, checkpoint_state())
            if step >= cfg.steps:
                break
            waited = time.perf_counter()
        else:
            # A checkpoint on an epoch's last batch resumes into an empty rest of that epoch: move on. Only a
            # fresh epoch without a full batch is an error.
            if batch_in_epoch == used_before == 0:
                raise ValueError(f"an epoch gave no full batch: the train split needs at least "
                                 f"tokenizer.batch_size x workers = {cfg.batch_size * world} images")
            epoch, batch_in_epoch = epoch + 1, 0
            continue
        break

    if rank == 0:
        final = evaluate_reconstruction(objective.model, _val_batches(cfg, backend), cfg.codebook_size,
                                        cfg.val_images, backend)
        final["train_seconds"] = time.perf_counter() - started
        final["steps"] = float(step)
        _export(objective.model, loop_config["run_dir"], loop_config["folder"], final)
        tracker.log_metrics(final, step=step)


@torch.no_grad()
def _log_reconstructions(model, val_probe: torch.Tensor, backend, tracker: Tracker, step: int) -> None:
    """PSNR on a fixed val batch, and a grid of its first 8 images over their reconstructions."""
    model.eval()
    with torch.no_grad():
        reconstruction = model(val_probe.to(backend.device))[0].clamp(0, 1).float().cpu()
    model.train()
    val_probe = val_probe.cpu()  # the val batch may already sit on the accelerator
    tracker.log_metrics({"val_psnr_probe": float(psnr(reconstruction, val_probe).mean())}, step=step)
    preview, reconstruction = val_probe[:8], reconstruction[:8]
    rows = torch.cat([preview, reconstruction]).permute(0, 2, 3, 1).mul(255).round().byte().numpy()
    grid = make_grid(list(rows), columns=len(preview), scale=max(1, 64 // preview.shape[-1]))
    tracker.log_image(grid, f"reconstructions/step_{step:07d}.png")


def _export(model, run_dir_location: str, folder: str, final: dict) -> None:
    run_dir = RunDir(run_dir_location)
    with tempfile.TemporaryDirectory() as temp:
        save_tokenizer(model, temp)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            run_dir.write_bytes(Path(temp, name).read_bytes(), folder, name)
    run_dir.write_json(final, folder, FINAL_METRICS)


# ---------------------------------------------------------------------------------------------
# The stage


def run(cfg: PipelineConfig, ctx: StageContext) -> StageResult:
    from stages.datasets import shard_dataset
    from stages.training import build_trainer, fit

    ingest = ctx.inputs["ingest"]
    tcfg = cfg.tokenizer
    val_split = "val" if "val" in ingest.outputs["shards"] else "train"
    datasets = {"train": shard_dataset(ctx.run_dir, ingest, "train").select_columns(["image"]),
                "val": shard_dataset(ctx.run_dir, ingest, val_split).select_columns(["image"])}
    ctx.tracker.set_tags({"vim.perceptual_loss": "on" if tcfg.perceptual_weight > 0 else "off",
                          "vim.adversarial_loss": "on" if tcfg.adversarial_weight > 0 else "off"})
    ctx.run_dir.delete(ctx.folder, FINAL_METRICS)
    env = {"MLFLOW_TRACKING_URI": ctx.tracker.tracking_uri}
    if os.environ.get("RAY_AUTH_MODE"):
        env["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
    loop_config = {"tokenizer": tcfg.model_dump(mode="json"), "tracking_uri": ctx.tracker.tracking_uri,
                   "mlflow_run_id": ctx.tracker.run_id, "run_dir": ctx.run_dir.location, "folder": ctx.folder,
                   "env": env}
    started = time.perf_counter()
    trainer = build_trainer(ctx, tokenizer_loop, loop_config, tcfg.resources, datasets)
    fit(trainer)
    final = ctx.run_dir.read_json(ctx.folder, FINAL_METRICS)
    seconds = time.perf_counter() - started
    images = tcfg.steps * tcfg.batch_size * tcfg.resources.num_workers
    final["train_images_per_second_overall"] = images / max(final.get("train_seconds", seconds), 1e-9)
    ctx.log.info("tokenizer: val PSNR %.2f dB, usage/256 %.3f, perplexity %.1f", final["val_psnr"],
                 final["val_usage_per_256"], final["val_perplexity"])
    grid = ctx.cfg.tokenizer.image_size // ctx.cfg.tokenizer.patch_size
    return StageResult(
        outputs={"model": WEIGHTS_FILE, "config": CONFIG_FILE, "grid": [grid, grid],
                 "codebook_size": tcfg.codebook_size},
        counts={"steps": int(final["steps"]), "train_images_seen": images},
        metrics={k: float(v) for k, v in final.items() if isinstance(v, (int, float))},
        details={"perceptual_loss": "on" if tcfg.perceptual_weight > 0 else "off (weight 0)",
                 "run_name": f"{ctx.spec.name}-{ctx.fingerprint}"})
