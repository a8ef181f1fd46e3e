"""SSL: DiGIT's self-supervised encoder (tokens: ssl_kmeans), trained on the ingest shards with Ray Train, or a
pretrained timm ViT named by `ssl.pretrained` and read from the local file `ssl.weights` (nothing downloads).

Training is DINO-style self-distillation (pipeline/train/ssl_step.py): multi-crop views, a student, an EMA
teacher and its centre, which all travel in the checkpoint with every rank's RNG, so a restarted worker group or
a re-submitted job continues at the next step. Gradients are averaged by hand over the workers (the teacher
and the centre live outside DDP's reach). The export is the teacher's backbone, as DINO evaluates."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from pipeline import device as devices
from pipeline.config import ConfigError, PipelineConfig, SSLConfig
from pipeline.data.multicrop import MultiCrop
from pipeline.data.transforms import center, to_float
from pipeline.models.io import SETTINGS_FILE, WEIGHTS_FILE, save_weights
from pipeline.models.settings import SSLEncoderSettings
from pipeline.models.ssl import SelfDistillation
from pipeline.schedules import warmup_cosine
from pipeline.stage import StageContext, StageResult
from pipeline.train.optim import average_gradients, set_lr
from pipeline.train.ssl_step import DistillationSchedule, distillation_step, teacher_spread
from pipeline.train.state import TrainState

ENCODER_PREFIX = "teacher.backbone."  # the exported network inside the self-distillation state
KNN_NEIGHBOURS = 20


def preflight(cfg: PipelineConfig) -> None:
    """A pretrained encoder's weights file must be there before Ray starts."""
    scfg = cfg.ssl
    if not scfg.trains and not Path(scfg.weights).expanduser().is_file():
        raise ConfigError(f"ssl.weights {scfg.weights}: no such file. Nothing is downloaded at run time: copy the "
                          f"{scfg.pretrained} checkpoint there, or drop ssl.pretrained and ssl.weights to train the "
                          f"encoder in the pipeline")


def schedule_of(cfg: SSLConfig) -> DistillationSchedule:
    return DistillationSchedule(
        steps=cfg.steps, teacher_temperature=cfg.teacher_temperature,
        teacher_temperature_start=cfg.teacher_temperature_start,
        teacher_temperature_steps=cfg.teacher_temperature_steps, student_temperature=cfg.student_temperature,
        teacher_momentum=cfg.teacher_momentum, freeze_prototypes_steps=cfg.freeze_prototypes_steps,
        grad_clip=cfg.grad_clip)


def crops_of(cfg: SSLConfig) -> MultiCrop:
    return MultiCrop(global_size=cfg.image_size, local_size=cfg.resolved_local_size(), local_crops=cfg.local_crops,
                     global_scale=tuple(cfg.global_scale), local_scale=tuple(cfg.local_scale), jitter=cfg.jitter)


# ---------------------------------------------------------------------------------------------
# The per-worker training loop


def ssl_loop(loop_config: dict) -> dict[str, float] | None:
    import ray.train

    from stages.training import image_epochs, start_worker

    cfg = SSLConfig.model_validate(loop_config["ssl"])
    settings = SSLEncoderSettings.model_validate(loop_config["settings"])
    backend = devices.detect(cfg.resources.device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = SelfDistillation(settings).to(backend.device).train()
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=backend.fused_adamw())
    state = TrainState(model=model, optimizer=optimizer)
    run = start_worker("ssl", loop_config, state, cfg.steps, backend)
    schedule, crops = schedule_of(cfg), crops_of(cfg)
    shard = ray.train.get_dataset_shard("train")
    held_out = _val_images(cfg) if run.rank == 0 else None

    def lr_at(step: int) -> float:
        return cfg.lr * warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.lr_floor / cfg.lr)

    empty_epoch = f"the train split needs at least ssl.batch_size x workers = {cfg.batch_size * run.world} images"
    for batch in run.batches(image_epochs(shard, cfg.batch_size, cfg.seed, run.rank), empty_epoch):
        step = run.step
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 97 + run.rank)
        images = center(to_float(batch["image"]), cfg.image_size).to(backend.device)
        set_lr(optimizer, lr_at(step))
        figures = distillation_step(model, optimizer, images, crops, schedule, step, generator, average_gradients)
        backend.mark_step()
        run.step_done(len(images))
        if run.log_due(cfg.log_every):
            rate, wait = run.window()
            model.eval()
            figures.update(teacher_spread(model, held_out[0][:256].to(backend.device), schedule.temperature(step)))
            model.train()
            run.log({**{f"train_{k}": v for k, v in figures.items()}, "lr": lr_at(step),
                     "images_per_second": rate, "data_wait_fraction": wait},
                    f"loss {figures['loss']:.4f} teacher entropy {figures['entropy_per_image']:.2f} per image, "
                    f"{figures['entropy_of_mean']:.2f} of the mean {rate:.1f} img/s")
        run.checkpoint_if_due(cfg.checkpoint_every)

    if run.rank != 0:
        return None
    model.eval()
    final = knn_figures(model.encoder(), *held_out, backend.device)
    final.update(teacher_spread(model, held_out[0][:256].to(backend.device), schedule.temperature(cfg.steps)))
    final.update(train_seconds=run.seconds, steps=float(run.step))
    run.tracker.log_metrics(final, step=run.step)
    return final


def _val_images(cfg: SSLConfig, limit: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `limit` held-out images (float, centred) and their labels, for the collapse check and k-NN."""
    import ray.train

    images, labels, seen = [], [], 0
    for batch in ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=256, dtypes={"image": torch.uint8, "label": torch.int64}):
        images.append(center(to_float(batch["image"]), cfg.image_size))
        labels.append(batch["label"])
        seen += len(images[-1])
        if seen >= limit:
            break
    return torch.cat(images)[:limit], torch.cat(labels)[:limit]


@torch.no_grad()
def knn_top1(features: torch.Tensor, labels: torch.Tensor, neighbours: int = KNN_NEIGHBOURS) -> float:
    """Leave-one-out k-NN top-1 by cosine similarity (majority vote of the `neighbours` nearest others)."""
    unit = torch.nn.functional.normalize(features.float().flatten(1), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    nearest = similarity.topk(min(neighbours, len(unit) - 1), dim=1).indices
    votes = torch.nn.functional.one_hot(labels[nearest], int(labels.max()) + 1).sum(1)
    return float((votes.argmax(1) == labels).float().mean())


def knn_figures(encoder, images: torch.Tensor, labels: torch.Tensor, device) -> dict[str, float]:
    """The encoder's class-token features against the raw pixels of the same held-out images, by k-NN."""
    features = torch.cat([encoder(chunk.to(device)).cpu() for chunk in images.split(256)])
    return {"val_knn_top1": knn_top1(features, labels), "val_knn_top1_pixels": knn_top1(images, labels),
            "val_knn_images": float(len(images))}


# ---------------------------------------------------------------------------------------------
# The stage


def export_encoder(weights: dict[str, torch.Tensor], settings: SSLEncoderSettings, folder: str) -> None:
    """The teacher's backbone out of the self-distillation state, as an `SSLViT` folder."""
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in weights.items() if k.startswith(ENCODER_PREFIX)}
    save_weights(encoder, settings, folder)


def run(cfg: PipelineConfig, ctx: StageContext) -> StageResult:
    scfg = cfg.ssl
    if not scfg.trains:
        return _pretrained(cfg, ctx)
    from stages.datasets import held_out_split, shard_dataset
    from stages.training import train_and_export

    read = scfg.resources.read_cpus
    datasets = {split: shard_dataset(ctx, name, read_cpus=read).select_columns(columns, num_cpus=read)
                for split, name, columns in (("train", "train", ["image"]),
                                             ("val", held_out_split(ctx), ["image", "label"]))}
    settings = scfg.model_settings(data_channels=ctx.inputs["ingest"].outputs.get("channels", 3))
    ctx.tracker.set_tags({"vim.ssl_encoder": f"trained: DINO-style self-distillation, ViT-{scfg.size}"})
    loop_config = {"ssl": scfg.model_dump(mode="json"), "settings": settings.model_dump(mode="json")}
    final = train_and_export(ctx, ssl_loop, loop_config, scfg.resources, datasets,
                             lambda weights, folder: export_encoder(weights, settings, folder))
    images = scfg.steps * scfg.batch_size * scfg.resources.num_workers
    ctx.log.info("ssl: held-out k-NN top-1 %.3f (raw pixels %.3f); teacher entropy %.2f per image, %.2f of the "
                 "mean", final["val_knn_top1"], final["val_knn_top1_pixels"], final["entropy_per_image"],
                 final["entropy_of_mean"])
    return StageResult(
        outputs={"kind": "trained", "model": WEIGHTS_FILE, "config": SETTINGS_FILE, "grid": settings.grid,
                 "image_size": settings.image_size, "feature_block": settings.feature_block,
                 "feature_dim": settings.shape.dim, "channels": settings.channels},
        counts={"steps": int(final["steps"]), "train_images_seen": images},
        metrics={k: float(v) for k, v in final.items() if isinstance(v, (int, float))},
        details={"run_name": f"{ctx.spec.name}-{ctx.fingerprint}", "knn": f"leave-one-out {KNN_NEIGHBOURS}-NN, cosine, "
                 "class token vs raw pixels of the same held-out images"})


def _pretrained(cfg: PipelineConfig, ctx: StageContext) -> StageResult:
    """A pretrained encoder is loaded once here (a file that does not fit its architecture fails now, not in
    an actor) and recorded by path and checksum; its weights stay where they are."""
    from pipeline.models.ssl_tokens import EncoderSource, load_feature_encoder

    scfg = cfg.ssl
    path = Path(scfg.weights).expanduser().resolve()
    source = EncoderSource(pretrained=scfg.pretrained, weights=str(path), image_size=cfg.tokenizer.image_size,
                           feature_block=scfg.feature_block)
    encoder = load_feature_encoder(source)
    with torch.no_grad():
        probe = encoder.patch_features(torch.zeros(1, 3, cfg.tokenizer.image_size, cfg.tokenizer.image_size))
    grid = int(round(probe.shape[1] ** 0.5))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ctx.tracker.set_tags({"vim.ssl_encoder": f"pretrained: {scfg.pretrained} from {path}"})
    ctx.run_dir.write_json({**source.as_dict(), "sha256": digest}, ctx.folder, "source.json")
    return StageResult(
        outputs={"kind": "pretrained", "source": source.as_dict(), "grid": grid, "image_size": cfg.tokenizer.image_size,
                 "feature_block": scfg.feature_block, "feature_dim": int(encoder.feature_dim), "channels": 3},
        details={"weights_sha256": digest})
