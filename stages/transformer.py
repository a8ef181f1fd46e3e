"""Transformer: fit the VIM Transformer (or, with transformer.kind=rq, the RQ-Transformer over code stacks) on the
pretokenized code arrays with Ray Train.

Workers stream the Parquet codes through Ray Data. An image stored in several views contributes one
of them per epoch, picked by a hash of its key and the epoch, so every epoch sees each image once and
the views rotate. Steps accumulate micro-batches; the device (CPU/gloo, CUDA/nccl + bf16, TPU/torch_xla)
comes from `pipeline.device`; workers replicate the model (DDP) or shard it (`parallelism: fsdp`, FSDP2
through `pipeline.train.sharding`). Rank 0 logs loss in nats and bits per token, tokens/s and model FLOPs
utilisation, and checkpoints the full (unsharded) model and optimizer, step and data position, so a restarted
worker group or a re-submitted job continues at the next step, on any number of workers.
"""
from __future__ import annotations

import itertools
import zlib

import numpy as np
import pyarrow as pa
import torch

from pipeline import device as devices
from pipeline.config import PipelineConfig, TransformerConfig
from pipeline.data.codes import CodesError, check_code_files
from pipeline.models.code_models import CodeModel, build_code_model, code_model_settings, codes_per_image
from pipeline.models.io import SETTINGS_FILE, WEIGHTS_FILE, save_weights
from pipeline.models.prefix_transformer import PrefixTransformer
from pipeline.models.residual_quantize import StoredStackLabels
from pipeline.models.rq_transformer import RQTransformer, code_stack_loss
from pipeline.stage import StageContext, StageInputError, StageResult
from pipeline.train import xla_spmd
from pipeline.train.lm_step import (LN2, LossOf, accumulated_step, lr_at, next_token_loss_of, parameter_groups,
                                    prefix_loss_of)
from pipeline.train.optim import set_lr
from pipeline.train.sharding import FullModelState, FullOptimizerState, is_sharded, shard_transformer
from pipeline.train.state import TrainState

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


def rq_loss(labeler: StoredStackLabels | None, cfg: TransformerConfig, generator: torch.Generator):
    """The RQ-Transformer's training loss on a micro-batch of Parquet code rows: cross-entropy over every code of
    every stack, on the codes or (soft_label_temperature > 0) on the paper's soft labels, with the input stacks
    resampled from them when stochastic_codes is on."""
    def loss_of(model, codes: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        core = getattr(model, "module", model)  # DDP keeps the model's own methods on .module
        stacks, targets = core.stacks(codes), None
        if labeler is not None:
            targets, stacks = labeler(stacks, cfg.soft_label_temperature, cfg.stochastic_codes, generator)
        return code_stack_loss(model(stacks, labels), stacks, targets)[0]
    return loss_of


@torch.no_grad()
def validation_loss(model: CodeModel, shard, cfg: TransformerConfig, backend,
                    loss_of: LossOf | None = None) -> dict[str, float]:
    """Mean NLL in nats per code over up to `val_images` plain-view val images (`val_loss_nats`); for the
    RQ-Transformer also per depth (`val_loss_nats_depth<d>`), on the stored codes. `loss_of`: another model's
    mean loss of a batch of rows (the render stage's, whose rows carry the prefix too)."""
    model.eval()
    total, codes_seen, images = 0.0, 0, 0
    per_depth = None  # the RQ-Transformer's summed loss per depth
    for batch in shard.iter_torch_batches(batch_size=256, dtypes={c: torch.int64 for c in COLUMNS}):
        codes = batch["codes"][: cfg.val_images - images].to(backend.device)
        labels = batch["label"][: len(codes)].to(backend.device)
        labels = labels if cfg.conditional else None
        with backend.autocast():
            if isinstance(model, RQTransformer):
                stacks = model.stacks(codes)
                loss, depths = code_stack_loss(model(stacks, labels), stacks)
                weighted = depths.double().cpu() * codes.numel()
                per_depth = weighted if per_depth is None else per_depth + weighted
            else:
                loss = (loss_of or next_token_loss_of)(model, codes, labels)
        total += float(loss) * codes.numel()
        codes_seen += codes.numel()
        images += len(codes)
        if images >= cfg.val_images:
            break
    model.train()
    figures = {"val_loss_nats": total / max(codes_seen, 1)}
    if per_depth is not None:
        figures.update({f"val_loss_nats_depth{d}": float(v) / codes_seen for d, v in enumerate(per_depth)})
    return figures


def _wrap_model(core: CodeModel, cfg: TransformerConfig, backend) -> torch.nn.Module:
    """The module the training step calls (compiled if asked): the core sharded in place by FSDP2, or DDP
    through Ray Train around it; on XLA, SPMD over every chip of every host replicates it or shards it (FSDPv2)."""
    import ray.train.torch

    if backend.kind == "xla":
        xla_spmd.check_one_mesh(workers=ray.train.get_context().get_world_size())
        return xla_spmd.shard_model(core, fully_sharded=cfg.parallelism == "fsdp")
    data_parallel = backend.wraps_for_data_parallel and ray.train.get_context().get_world_size() > 1
    if data_parallel and cfg.parallelism == "fsdp":
        shard_transformer(core, backend)  # in place: the core keeps its names, methods and state keys
        return torch.compile(core) if cfg.compile else core
    model = torch.compile(core) if cfg.compile else core
    return ray.train.torch.prepare_model(model, move_to_device=False) if data_parallel else model


def transformer_loop(loop_config: dict) -> dict[str, float] | None:
    import ray.train

    from stages.training import start_worker

    cfg = TransformerConfig.model_validate(loop_config["transformer"])
    settings = code_model_settings(loop_config["settings"])
    view_ids: list[int] = loop_config["view_ids"]
    backend = devices.detect(cfg.resources.device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    core = build_code_model(settings).to(backend.device)  # uncompiled, unwrapped: state, export, validation
    model = _wrap_model(core, cfg, backend)
    sharded = is_sharded(core) or backend.spans_processes  # then a forward, validation included, needs every rank
    # After sharding: the groups go by the parameters' names, which FSDP2 keeps.
    optimizer = torch.optim.AdamW(parameter_groups(core, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  fused=backend.fused_adamw())
    # Full tensors by parameter name, whatever the sharding: a checkpoint resumes on any worker count.
    state = TrainState(model=FullModelState(core), optimizer=FullOptimizerState(core, optimizer))
    if backend.kind == "xla":  # gathered from the chips by torch_xla, resharded on loading
        state = TrainState(model=xla_spmd.ModelState(core), optimizer=xla_spmd.OptimizerState(optimizer))
    run = start_worker(loop_config.get("stage", "transformer"), loop_config, state, cfg.steps, backend)
    peak, peak_source = backend.peak_flops()
    flops_per_token = core.flops_per_token()
    if run.tracker is not None:
        run.tracker.set_tags({"vim.peak_flops": f"{peak:.3g} ({peak_source})", "vim.device": backend.kind})
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    def epoch_steps(epoch: int):
        """Groups of `grad_accum` micro-batches, one group per optimizer step."""
        micro_batches = training_batches(train_shard, cfg, view_ids, epoch, run.rank)
        while len(group := list(itertools.islice(micro_batches, cfg.grad_accum))) == cfg.grad_accum:
            yield group

    labeler = None
    if loop_config.get("codebook") is not None:  # soft labels from the tokenizer's codebook
        labeler = StoredStackLabels(torch.as_tensor(loop_config["codebook"]).to(backend.device), settings.vocab_size,
                                    settings.code_depth, settings.shared_codebook)
    code_generator = torch.Generator()  # reseeded every step: a resumed run draws what an unbroken one would
    loss_of = (rq_loss(labeler, cfg, code_generator) if isinstance(core, RQTransformer)
               else prefix_loss_of(settings.prefix_length) if isinstance(core, PrefixTransformer) else None)
    codes_per_row = codes_per_image(settings)
    last_val: dict[str, float] = {}
    empty_epoch = (f"the train split needs at least transformer.batch_size x grad_accum x workers = "
                   f"{cfg.batch_size * cfg.grad_accum * run.world} images")
    # Picking one view per image leaves ranks with slightly different row counts: they agree on an epoch's end.
    for group in run.batches(epoch_steps, empty_epoch, agree_on_end=True):
        group = [(backend.batch_to_device(codes),
                  backend.batch_to_device(core.drop_labels(labels)) if cfg.conditional else None)
                 for codes, labels in group]
        set_lr(optimizer, lr_at(run.step, cfg.lr, cfg.lr_floor, cfg.warmup_steps, cfg.decay_start, cfg.steps))
        code_generator.manual_seed(cfg.seed * 1_000_003 + run.step * 97 + run.rank)
        loss, norm = accumulated_step(model, group, optimizer, backend, cfg.grad_clip, loss_of)
        run.step_done(cfg.batch_size * cfg.grad_accum * codes_per_row)

        if run.log_due(cfg.log_every):
            tokens_per_second, wait = run.window()
            mfu = tokens_per_second * flops_per_token / (peak * run.world)
            run.log({"train_loss_nats": loss, "train_bits_per_token": loss / LN2, "grad_norm": norm,
                     "lr": optimizer.param_groups[0]["lr"], "tokens_per_second": tokens_per_second,
                     "images_per_second": tokens_per_second / codes_per_row, "mfu": mfu,
                     "data_wait_fraction": wait},
                    f"loss {loss:.4f} nats ({loss / LN2:.3f} bits)/token {tokens_per_second:.0f} tok/s "
                    f"MFU {mfu:.3f} data wait {wait:.2f}")
        if run.log_due(cfg.eval_every) or (sharded and run.due(cfg.eval_every)):
            last_val = validation_loss(core, val_shard, cfg, backend, loss_of)  # every rank reads the same rows
            if run.tracker is not None:
                run.tracker.log_metrics({**last_val, "val_bits_per_token": last_val["val_loss_nats"] / LN2},
                                        step=run.step)
        run.checkpoint_if_due(cfg.checkpoint_every)

    if not last_val and (run.rank == 0 or sharded):  # resumed after the last step: still owed
        last_val = validation_loss(core, val_shard, cfg, backend, loss_of)
    if run.rank != 0:
        return None
    return {**last_val, "val_bits_per_token": last_val["val_loss_nats"] / LN2, "steps": float(run.step),
            "train_seconds": run.seconds, "epochs": float(run.state.epoch + 1),
            "parameters": float(core.parameter_count(embeddings=True)),
            "flops_per_token": float(flops_per_token), "peak_flops": peak}


# ---------------------------------------------------------------------------------------------
# The stage


def check_codes(ctx: StageContext, kind: str, settings, depth: int) -> None:
    """Every code file's contract (schema metadata and row length) against what the model is built for, before
    any worker starts: a depth, grid or codebook that differs is named with its file."""
    if depth > 1 and kind != "rq":
        raise StageInputError(f"the codes in {ctx.uri_of('pretokenize')} are stacks of {depth} (a tokenizer with "
                              f"quantizer=rq): train them with transformer.kind=rq")
    folder = ctx.folder_of("pretokenize")
    paths = [ctx.run_dir.path(folder, name) for names in ctx.inputs["pretokenize"].outputs["codes"].values()
             for name in names]
    try:
        check_code_files(paths, grid=tuple(settings.grid), depth=depth, codebook_size=settings.vocab_size,
                         filesystem=ctx.run_dir.fs)
    except CodesError as error:
        raise StageInputError(f"{error}; rerun pretokenize (--from pretokenize --force pretokenize)") from None


def tokenizer_codebook(ctx: StageContext) -> np.ndarray:
    """The lookup table of the tokenizer that wrote the codes, for soft labels; its weights must be the ones
    pretokenize recorded."""
    from safetensors.torch import load as load_safetensors

    from pipeline.data.codes import file_sha256

    data = ctx.run_dir.read_bytes(ctx.folder_of("tokenizer"), WEIGHTS_FILE)
    recorded = ctx.inputs["pretokenize"].outputs["tokenizer_sha256"]
    if file_sha256(data)[:len(recorded)] != recorded:
        raise StageInputError(f"{ctx.uri_of('tokenizer', WEIGHTS_FILE)} is not the tokenizer the codes were written "
                              f"with (sha256 {recorded}...); soft labels need its codebook: rerun pretokenize")
    return load_safetensors(data)["quantizer.codebook"].float().numpy()


def run(cfg: PipelineConfig, ctx: StageContext) -> StageResult:
    from stages.datasets import code_dataset

    codes, ingest = ctx.inputs["pretokenize"], ctx.inputs["ingest"]
    tcfg = cfg.transformer
    files = {split: [ctx.uri_of("pretokenize", name) for name in names]
             for split, names in codes.outputs["codes"].items()}
    val_split = "val" if files.get("val") else "train"
    read = tcfg.resources.read_cpus  # what a sweep trial counts beside its workers (orchestration/sweep.py)
    columns = ["key", *COLUMNS[:3]]  # not DiGIT's pixel codes: the render stage reads those
    train = code_dataset(files["train"], read, columns).map_batches(with_image_ids, batch_format="pyarrow",
                                                                    num_cpus=read)
    val = (code_dataset(files[val_split], read, columns).filter(lambda row: row["view"] == 0, num_cpus=read)
           .map_batches(with_image_ids, batch_format="pyarrow", num_cpus=read))
    depth = int(codes.outputs.get("depth", 1))
    settings = tcfg.model_settings(
        vocab_size=codes.outputs["codebook_size"], grid=tuple(codes.outputs["grid"]),
        num_classes=int(ingest.details.get("num_classes", 0)), code_depth=depth,
        shared_codebook=bool(codes.outputs.get("shared_codebook", True)))
    check_codes(ctx, tcfg.kind, settings, depth)
    with torch.device("meta"):  # shapes only: the driver never holds the weights
        parameters = build_code_model(settings).parameter_count(embeddings=True)
    size = tcfg.rq_size if tcfg.kind == "rq" else tcfg.size
    ctx.log.info("%s %s: %.2fM parameters, %d positions x %d codes per image, %d classes", tcfg.kind.upper(), size,
                 parameters / 1e6, settings.length, depth, settings.num_classes)
    ctx.tracker.set_tags({"vim.transformer_kind": tcfg.kind, "vim.transformer_size": size,
                          "vim.conditional": str(tcfg.conditional)})
    loop_config = {"transformer": tcfg.model_dump(mode="json"), "settings": settings.model_dump(mode="json"),
                   "view_ids": sorted(codes.outputs["views"].values()),
                   "codebook": tokenizer_codebook(ctx) if tcfg.kind == "rq" and tcfg.soft_label_temperature > 0 else None}
    return train_code_model(ctx, tcfg, settings, loop_config, {"train": train, "val": val})


def train_code_model(ctx: StageContext, tcfg: TransformerConfig, settings, loop_config: dict,
                     datasets: dict) -> StageResult:
    """Fit a model over codes with `transformer_loop` (the Transformer stage's, or the render stage's), export
    it and say what it learned: val loss per code against the uniform one, codes trained per second."""
    from stages.training import train_and_export

    final = train_and_export(ctx, transformer_loop, loop_config, tcfg.resources, datasets,
                             lambda weights, folder: save_weights(weights, settings, folder))
    tokens = tcfg.steps * tcfg.batch_size * tcfg.grad_accum * tcfg.resources.num_workers * codes_per_image(settings)
    final["train_tokens_per_second_overall"] = tokens / max(final["train_seconds"], 1e-9)
    uniform = float(np.log(settings.vocab_size))
    ctx.log.info("%s: val %.4f nats/code (%.3f bits; uniform %.4f), %.0f codes/s", ctx.spec.name,
                 final["val_loss_nats"], final["val_bits_per_token"], uniform,
                 final["train_tokens_per_second_overall"])
    return StageResult(
        outputs={"model": WEIGHTS_FILE, "config": SETTINGS_FILE, "settings": settings.model_dump(mode="json")},
        counts={"steps": int(final["steps"]), "train_tokens_seen": tokens},
        metrics={k: float(v) for k, v in final.items() if isinstance(v, (int, float))},
        details={"run_name": f"{ctx.spec.name}-{ctx.fingerprint}", "uniform_loss_nats": uniform})
