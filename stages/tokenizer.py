"""Tokenizer: fit ViT-VQGAN on the ingest shards with Ray Train, export model.safetensors + config.json.

Workers stream the train split through Ray Data (random crop + flip), the generator runs under DDP,
the discriminator's gradients are averaged by hand (lazy R1 needs a double backward, which DDP does not
support). Rank 0 logs to MLflow; checkpoints hold every rank's RNG, so a restarted worker group or a
re-submitted job continues from the latest checkpoint at the next step, after the batches it had used.
"""
from __future__ import annotations

import torch

from pipeline import device as devices
from pipeline.config import PipelineConfig, TokenizerConfig
from pipeline.data.transforms import center, random_crop_flip, to_float
from pipeline.metrics.codebook import CodeStackUsage
from pipeline.metrics.image_quality import psnr, ssim
from pipeline.models.io import SETTINGS_FILE, WEIGHTS_FILE, save_weights
from pipeline.models.losses import find_vgg16_weights, logit_laplace_nll
from pipeline.schedules import warmup_cosine
from pipeline.stage import StageContext, StageResult
from pipeline.tracking import Tracker
from pipeline.train.optim import average_gradients, grad_norm, set_lr
from pipeline.train.state import TrainState
from pipeline.train.tokenizer_objective import TokenizerObjective, generator_parameter_groups
from pipeline.viz import make_grid


def preflight(cfg: PipelineConfig) -> None:
    """Fail before Ray starts when the perceptual loss is on but VGG16 weights are nowhere."""
    if cfg.tokenizer.perceptual_weight > 0:
        find_vgg16_weights(cfg.tokenizer.vgg16_weights)


# ---------------------------------------------------------------------------------------------
# The per-worker training loop


def tokenizer_loop(loop_config: dict) -> dict[str, float] | None:
    import ray.train
    import ray.train.torch

    from stages.training import image_epochs, start_worker

    cfg = TokenizerConfig.model_validate(loop_config["tokenizer"])
    backend = devices.detect(cfg.resources.device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    objective = TokenizerObjective(cfg).to(backend.device)
    model = ray.train.torch.prepare_model(objective.model, move_to_device=False)
    discriminator = objective.discriminator
    optimizer = torch.optim.AdamW(generator_parameter_groups(objective.model, cfg.weight_decay), lr=cfg.lr,
                                  betas=cfg.betas, weight_decay=cfg.weight_decay, fused=backend.fused_adamw())
    d_optimizer = (torch.optim.AdamW(discriminator.parameters(), lr=cfg.disc_lr, betas=cfg.betas,
                                     weight_decay=cfg.weight_decay) if discriminator is not None else None)
    state = TrainState(model=objective.model, optimizer=optimizer, discriminator=discriminator,
                       d_optimizer=d_optimizer, counters={"d_steps": 0})
    run = start_worker("tokenizer", loop_config, state, cfg.steps, backend)
    val_probe = next(iter(_val_batches(cfg))) if run.rank == 0 else None  # fixed: comparable over time
    shard = ray.train.get_dataset_shard("train")

    def lr_at(step: int) -> float:
        return cfg.lr * warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.lr_floor / cfg.lr)

    empty_epoch = f"the train split needs at least tokenizer.batch_size x workers = {cfg.batch_size * run.world} images"
    for batch in run.batches(image_epochs(shard, cfg.batch_size, cfg.seed, run.rank), empty_epoch):
        step = run.step
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 97 + run.rank)
        images = random_crop_flip(to_float(batch["image"]), cfg.image_size, cfg.augment_pad, generator)
        images = images.to(backend.device, non_blocking=True)
        set_lr(optimizer, lr_at(step))
        with backend.autocast():
            loss, terms, reconstruction, stats = objective.generator_losses(model, discriminator, images, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = grad_norm(objective.model.parameters(), cfg.grad_clip)
        backend.optimizer_step(optimizer)

        if discriminator is not None and objective.adversarial_on(step):
            d_optimizer.zero_grad(set_to_none=True)
            with backend.autocast():
                d_loss, d_terms = objective.discriminator_losses(discriminator, images, reconstruction,
                                                                 state.counters["d_steps"])
            d_loss.backward()
            average_gradients(discriminator)
            if cfg.grad_clip > 0:
                grad_norm(discriminator.parameters(), cfg.grad_clip)
            backend.optimizer_step(d_optimizer)
            terms.update(d_terms)
            state.counters["d_steps"] += 1
        backend.mark_step()
        run.step_done(images.shape[0])

        if run.log_due(cfg.log_every):
            rate, wait = run.window()
            run.log({**{f"train_{k}": float(v) for k, v in {**terms, **stats}.items()}, "train_loss": float(loss),
                     "lr": lr_at(step), "grad_norm": norm, "images_per_second": rate, "data_wait_fraction": wait},
                    f"loss {float(loss):.4f} l2 {float(terms['l2']):.5f} usage {stats['usage_batch']:.3f} "
                    f"{rate:.1f} img/s")
        if run.log_due(cfg.image_every):
            _log_reconstructions(objective.model, val_probe, backend, run.tracker, run.step)
        run.checkpoint_if_due(cfg.checkpoint_every)

    if run.rank != 0:
        return None
    final = evaluate_reconstruction(objective.model, _val_batches(cfg), cfg.val_images, backend)
    final.update(train_seconds=run.seconds, steps=float(run.step))
    run.tracker.log_metrics(final, step=run.step)
    return final


def _val_batches(cfg: TokenizerConfig):
    import ray.train

    shard = ray.train.get_dataset_shard("val")
    for batch in shard.iter_torch_batches(batch_size=min(256, cfg.val_images), dtypes={"image": torch.uint8},
                                          drop_last=False):
        yield center(to_float(batch["image"]), cfg.image_size)


@torch.no_grad()
def evaluate_reconstruction(model, batches, limit: int, backend) -> dict[str, float]:
    """Val metrics: PSNR, SSIM, L2, logit-Laplace NLL, codebook usage (paper's per-256 and whole split; per
    depth too under residual quantization)."""
    model.eval()
    settings = model.settings
    usage = CodeStackUsage(settings.codebook_size, settings.code_depth, settings.rq_shared_codebook)
    sums = {"psnr": 0.0, "ssim": 0.0, "l2": 0.0, "logit_laplace": 0.0}
    seen = 0
    for images in batches:
        images = images[: limit - seen].to(backend.device)
        reconstruction, raw, quantized = model(images)
        sums["psnr"] += float(psnr(reconstruction, images).sum())
        sums["ssim"] += float(ssim(reconstruction.float(), images.float()).sum())
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


@torch.no_grad()
def _log_reconstructions(model, val_probe: torch.Tensor, backend, tracker: Tracker, step: int) -> None:
    """PSNR on a fixed val batch, and a grid of its first 8 images over their reconstructions."""
    model.eval()
    reconstruction = model(val_probe.to(backend.device))[0].clamp(0, 1).float().cpu()
    model.train()
    val_probe = val_probe.cpu()  # the val batch may already sit on the accelerator
    tracker.log_metrics({"val_psnr_probe": float(psnr(reconstruction, val_probe).mean())}, step=step)
    preview, reconstruction = val_probe[:8], reconstruction[:8]
    rows = torch.cat([preview, reconstruction]).permute(0, 2, 3, 1).mul(255).round().byte().numpy()
    grid = make_grid(list(rows), columns=len(preview), scale=max(1, 64 // preview.shape[-1]))
    tracker.log_image(grid, f"reconstructions/step_{step:07d}.png")


# ---------------------------------------------------------------------------------------------
# The stage


def run(cfg: PipelineConfig, ctx: StageContext) -> StageResult:
    from stages.datasets import held_out_split, shard_dataset
    from stages.training import train_and_export

    tcfg = cfg.tokenizer
    read = tcfg.resources.read_cpus  # what a sweep trial counts beside its workers (orchestration/sweep.py)
    datasets = {split: shard_dataset(ctx, name, read_cpus=read).select_columns(["image"], num_cpus=read)
                for split, name in (("train", "train"), ("val", held_out_split(ctx)))}
    ctx.tracker.set_tags({"vim.perceptual_loss": "on" if tcfg.perceptual_weight > 0 else "off",
                          "vim.adversarial_loss": "on" if tcfg.adversarial_weight > 0 else "off"})
    # Grey data (ingest records 1 channel when every image is grey) is tokenized and decoded as one channel.
    settings = tcfg.model_settings(data_channels=ctx.inputs["ingest"].outputs.get("channels", 3))
    loop_tokenizer = {**tcfg.model_dump(mode="json"), "channels": settings.channels}
    final = train_and_export(ctx, tokenizer_loop, {"tokenizer": loop_tokenizer}, tcfg.resources,
                             datasets, lambda weights, folder: save_weights(weights, settings, folder))
    images = tcfg.steps * tcfg.batch_size * tcfg.resources.num_workers
    final["train_images_per_second_overall"] = images / max(final["train_seconds"], 1e-9)
    ctx.log.info("tokenizer: val PSNR %.2f dB, usage/256 %.3f, perplexity %.1f%s", final["val_psnr"],
                 final["val_usage_per_256"], final["val_perplexity"],
                 "".join(f"; depth {d} usage/256 {final[f'val_usage_per_256_depth{d}']:.3f}"
                         for d in range(settings.code_depth if settings.code_depth > 1 else 0)))
    return StageResult(
        outputs={"model": WEIGHTS_FILE, "config": SETTINGS_FILE, "grid": [settings.grid, settings.grid],
                 "codebook_size": tcfg.codebook_size, "channels": settings.channels, "depth": settings.code_depth},
        counts={"steps": int(final["steps"]), "train_images_seen": images},
        metrics={k: float(v) for k, v in final.items() if isinstance(v, (int, float))},
        details={"perceptual_loss": "on" if tcfg.perceptual_weight > 0 else "off (weight 0)",
                 "run_name": f"{ctx.spec.name}-{ctx.fingerprint}"})
