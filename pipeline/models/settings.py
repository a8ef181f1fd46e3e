"""The models' settings, declared once: what a model needs to be built, stored beside its weights.

Torch-free, so the pipeline config (imported by light processes) can build on these classes: its
tokenizer and transformer sections inherit these fields rather than repeating them, and hand the
models their settings by field name (`TokenizerConfig.model_settings()`,
`TransformerConfig.model_settings(...)`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

# Strict numbers: a bool (`steps=true`) or a string ("30") is not a number. An int still passes for a float
# (and becomes one, so hashes do not change).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]

VIT_SIZE_NAMES = Literal["tiny", "mini", "S", "B", "L"]  # keys of VIT_SIZES
VIM_SIZE_NAMES = Literal["pico", "nano", "micro", "small", "B", "L"]


@dataclass(frozen=True)
class ViTSize:
    depth: int
    dim: int
    heads: int
    mlp_dim: int


# The tokenizer's encoder and decoder: paper Table 2 (S, B, L) plus small presets for CPU runs.
VIT_SIZES: dict[str, ViTSize] = {
    "tiny": ViTSize(depth=2, dim=64, heads=4, mlp_dim=128),
    "mini": ViTSize(depth=4, dim=128, heads=4, mlp_dim=256),
    "S": ViTSize(depth=8, dim=512, heads=8, mlp_dim=2048),
    "B": ViTSize(depth=12, dim=768, heads=12, mlp_dim=3072),
    "L": ViTSize(depth=32, dim=1280, heads=16, mlp_dim=5120),
}


@dataclass(frozen=True)
class VimSize:
    dim: int
    depth: int
    heads: int
    mlp_dim: int


# Paper Table 2: Base and Large. The small ones are for CPU runs.
VIM_SIZES: dict[str, VimSize] = {
    "pico": VimSize(64, 2, 2, 256),
    "nano": VimSize(128, 4, 4, 512),
    "micro": VimSize(256, 6, 8, 1024),
    "small": VimSize(512, 8, 8, 2048),
    "B": VimSize(1536, 24, 16, 6144),
    "L": VimSize(2048, 36, 32, 8192),
}


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Marks a field added after models and stages were committed (NOBLE's, the CNN's): at its default it is left out of a
# stage's hash (pipeline/config.py `Section.output_affecting`) and of a model's config.json
# (pipeline/models/io.py), so the stages and models that existed before hash and save as they did.
ADDED_LATER = {"added_later": True}


def added_later_with(owner: str) -> dict:
    """`ADDED_LATER` for a field that sizes what another added-later field (`owner`) switches on: left out
    only while `owner` holds its default too, so a model that uses it records it even at its default (a
    CNN tokenizer keeps its widths in config.json and its stage hash, whatever later defaults become)."""
    return {"added_later": True, "written_with": owner}


def later_fields_at_default(settings: BaseModel) -> list[str]:
    """Names of the `ADDED_LATER` fields of `settings` that hold their default (and whose owner does)."""
    fields = type(settings).model_fields

    def at_default(name: str) -> bool:
        return getattr(settings, name) == fields[name].default

    names = []
    for name, field in fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        owner = extra.get("written_with")
        if extra.get("added_later") and at_default(name) and (owner is None or at_default(owner)):
            names.append(name)
    return names


NOBLE_ACTIVATIONS = Literal["cosnet", "gelu"]
NOBLE_LAYERS = Literal["attention", "mlp", "all"]


class NobleSettings(ModelSettings):
    """NOBLE (pipeline/models/noble.py): a nonlinear low-rank branch beside the blocks' linear layers."""

    noble_rank: Int = Field(0, ge=0, description="branch rank; 0: no branch (the reference code uses 32)",
                            json_schema_extra=ADDED_LATER)
    noble_activation: NOBLE_ACTIVATIONS = Field(
        "cosnet", description="the branch's nonlinearity: the paper's CosNet, or plain GELU to compare",
        json_schema_extra=ADDED_LATER)
    noble_layers: NOBLE_LAYERS = Field(
        "all", description="which linear layers get a branch: attention (qkv, output), mlp (both), all",
        json_schema_extra=ADDED_LATER)


class QuantizerSettings(ModelSettings):
    """The vector quantizer (paper defaults where the paper gives one)."""

    codebook_size: Int = Field(512, ge=2, le=32767, description="<= 32767 so codes fit int16")
    codebook_dim: Int | None = Field(32, ge=1, description="lookup dimension; null = no factorisation")
    l2_normalize: bool = True
    beta: Float = Field(0.25, ge=0)
    ema: bool = False
    ema_decay: Float = Field(0.99, gt=0, lt=1)
    dead_code_threshold: Float = Field(0.0, ge=0, description="restart codes used less than this per step")
    codebook_init: Literal["normal", "data"] = "normal"


class RQSettings(ModelSettings):
    """The tokenizer's quantizer kind: the vector quantizer, or residual quantization
    (pipeline/models/residual_quantize.py) with the quantizer's other settings (codebook_size, ema, ...)."""

    quantizer: Literal["vq", "rq"] = Field(
        "vq", description="vq: one code per position; rq: rq_depth codes per position, each coding the residual "
        "left by the ones before", json_schema_extra=ADDED_LATER)
    rq_depth: Int = Field(4, ge=1, description="rq: codes per position (the paper's D)",
                          json_schema_extra=added_later_with("quantizer"))
    rq_shared_codebook: bool = Field(True, description="rq: one codebook for every depth; false: one per depth",
                                     json_schema_extra=added_later_with("quantizer"))


class TokenizerSettings(QuantizerSettings, RQSettings, NobleSettings):
    """ViT-VQGAN: the quantizer plus the ViT encoder and decoder (small sizes for CPU); or, with
    architecture=cnn, the same quantizer and heads around the CNN-VQGAN baseline (pipeline/models/cnn.py).
    With quantizer=rq the quantizer is residual (RQ-VAE) whatever the architecture."""

    image_size: Int = Field(32, ge=8)
    patch_size: Int = Field(4, ge=1)
    encoder: VIT_SIZE_NAMES = Field("tiny", description="ViT size (vit only; cnn ignores it)")
    decoder: VIT_SIZE_NAMES = Field("tiny", description="ViT size (vit only; cnn ignores it)")
    output_head: Literal["logit_laplace", "linear"] = "logit_laplace"
    architecture: Literal["vit", "cnn"] = Field(
        "vit", description="vit: the paper's ViT-VQGAN; cnn: the taming-transformers CNN-VQGAN baseline, sized "
        "by the cnn_* keys (encoder and decoder are ignored)", json_schema_extra=ADDED_LATER)
    cnn_channels: Int = Field(16, ge=1, description="cnn: channels at full resolution",
                              json_schema_extra=added_later_with("architecture"))
    cnn_channel_mult: tuple[Int, ...] | None = Field(
        None, description="cnn: width multiplier per level, full resolution first, log2(patch_size) + 1 of them; "
        "null: 1, 2, 4, 4, ... (doubling, at most 4)", json_schema_extra=added_later_with("architecture"))
    cnn_res_blocks: Int = Field(1, ge=1, description="cnn: residual blocks per level (the decoder has one more)",
                                json_schema_extra=added_later_with("architecture"))
    channels: Literal[1, 3] = Field(
        3, description="colour channels the encoder reads and the decoder predicts; 1: grey data (images still "
        "enter and leave as RGB, the decoder's one channel shared by all three)", json_schema_extra=ADDED_LATER)

    @property
    def grid(self) -> int:
        """Tokens per side."""
        return self.image_size // self.patch_size

    @property
    def code_depth(self) -> int:
        """Codes per position: rq_depth under residual quantization, else 1."""
        return self.rq_depth if self.quantizer == "rq" else 1

    @property
    def code_shape(self) -> tuple[int, ...]:
        """An image's codes: (grid, grid), or (grid, grid, depth) under residual quantization."""
        return (self.grid, self.grid) + ((self.code_depth,) if self.quantizer == "rq" else ())

    @property
    def cnn_levels(self) -> tuple[int, ...]:
        """The CNN's width multiplier per level, full resolution first: one level per halving, plus one."""
        if self.cnn_channel_mult is not None:
            return tuple(self.cnn_channel_mult)
        return tuple(min(2 ** level, 4) for level in range(self.patch_size.bit_length()))

    @property
    def latent_width(self) -> int:
        """Channels of the encoder's output per token: what the quantizer's lookup space factorises."""
        if self.architecture == "cnn":
            return self.cnn_channels * self.cnn_levels[-1]
        return VIT_SIZES[self.encoder].dim

    @model_validator(mode="after")
    def _cnn_fits(self) -> "TokenizerSettings":
        if self.architecture != "cnn":
            return self
        cnn = "tokenizer.architecture=cnn"
        if self.patch_size & (self.patch_size - 1):
            raise ValueError(f"tokenizer.patch_size {self.patch_size} is not a power of two: {cnn} halves the "
                             "resolution log2(patch_size) times; use 1, 2, 4, 8, 16, ...")
        halvings = self.patch_size.bit_length() - 1
        if self.cnn_channel_mult is not None:
            if len(self.cnn_channel_mult) != halvings + 1:
                raise ValueError(f"tokenizer.cnn_channel_mult {list(self.cnn_channel_mult)} has "
                                 f"{len(self.cnn_channel_mult)} level(s); tokenizer.patch_size {self.patch_size} needs "
                                 f"log2({self.patch_size}) + 1 = {halvings + 1} (full resolution first), or null")
            if min(self.cnn_channel_mult) < 1:
                raise ValueError(f"tokenizer.cnn_channel_mult {list(self.cnn_channel_mult)}: every multiplier must "
                                 "be at least 1")
        if self.noble_rank > 0:
            raise ValueError(f"tokenizer.noble_rank {self.noble_rank}: NOBLE branches sit in the ViT's linear "
                             f"layers, which {cnn} does not have; set tokenizer.noble_rank=0")
        return self


class TransformerArchitecture(NobleSettings):
    """The VIM Transformer's settings that come from the config (paper: VIM-Base/Large, dropout 0.1)."""

    size: VIM_SIZE_NAMES = "nano"
    dropout: Float = Field(0.1, ge=0, lt=1, description="residual, MLP and attention dropout")
    label_dropout: Float = Field(0.0, ge=0, lt=1, description="null-class rate for classifier-free guidance")


class CodeGrid(ModelSettings):
    """What the data decides for a model over an image's code grid, class first: the grid and the classes."""

    grid: tuple[Int, Int] = (8, 8)
    num_classes: Int = Field(10, ge=0, description="0: unconditional, a start token instead of a class token")

    @property
    def length(self) -> int:
        """Positions per image."""
        return self.grid[0] * self.grid[1]

    @property
    def null_class(self) -> int:
        """Index of the null class (the start token of an unconditional model)."""
        return self.num_classes


class TransformerSettings(TransformerArchitecture, CodeGrid):
    """The architecture plus what the data decides: vocabulary, token grid and classes."""

    vocab_size: Int = Field(512, ge=1, description="the tokenizer's codebook size")

    @property
    def shape(self) -> VimSize:
        return VIM_SIZES[self.size]


# ---- The RQ-Transformer (residual quantization's second stage) -------------------------------------------------

RQ_SIZE_NAMES = Literal["pico", "nano", "micro", "480M", "821M", "1.4B", "3.8B"]  # keys of RQ_SIZES


@dataclass(frozen=True)
class RQSize:
    dim: int
    spatial_layers: int
    depth_layers: int
    heads: int
    mlp_dim: int


# Lee et al. (CVPR 2022), Table: 480M, 821M, 1.4B and 3.8B (MLP 4x the width); the small ones are for CPU runs.
RQ_SIZES: dict[str, RQSize] = {
    "pico": RQSize(64, 2, 1, 2, 256),
    "nano": RQSize(128, 4, 2, 4, 512),
    "micro": RQSize(256, 6, 2, 8, 1024),
    "480M": RQSize(1536, 12, 4, 24, 6144),
    "821M": RQSize(1536, 24, 4, 24, 6144),
    "1.4B": RQSize(1536, 42, 6, 24, 6144),
    "3.8B": RQSize(2560, 42, 6, 40, 10240),
}


class RQTransformerOptions(ModelSettings):
    """The transformer section's choice of model, and the RQ-Transformer's training targets."""

    kind: Literal["vim", "rq"] = Field(
        "vim", description="vim: the VIM Transformer over one code per position; rq: the RQ-Transformer over code "
        "stacks (needs tokenizer.quantizer=rq)", json_schema_extra=ADDED_LATER)
    rq_size: RQ_SIZE_NAMES = Field("pico", description="rq: the RQ-Transformer's size",
                                   json_schema_extra=added_later_with("kind"))
    soft_label_temperature: Float = Field(
        0.0, ge=0, description="rq: 0 trains on the codes with plain cross-entropy; > 0 on the paper's soft labels "
        "softmax(-||residual - code||^2 / T) (the paper uses 0.5)", json_schema_extra=added_later_with("kind"))
    stochastic_codes: bool = Field(
        True, description="rq, soft labels: feed codes sampled from the soft labels (the paper's stochastic "
        "sampling) instead of the nearest ones", json_schema_extra=added_later_with("kind"))


class RQTransformerSettings(NobleSettings, CodeGrid):
    """The RQ-Transformer (pipeline/models/rq_transformer.py): its size and dropouts plus what the data decides."""

    size: RQ_SIZE_NAMES = "pico"
    dropout: Float = Field(0.1, ge=0, lt=1, description="residual, MLP and attention dropout")
    label_dropout: Float = Field(0.0, ge=0, lt=1, description="null-class rate for classifier-free guidance")
    vocab_size: Int = Field(512, ge=1, description="codes per codebook (the tokenizer's codebook_size)")
    code_depth: Int = Field(4, ge=1, description="codes per position (the tokenizer's rq_depth)")
    shared_codebook: bool = Field(True, description="the tokenizer's rq_shared_codebook; false: an embedding "
                                  "table per depth")

    @property
    def shape(self) -> RQSize:
        return RQ_SIZES[self.size]


# ---- DiGIT's self-supervised encoder ----------------------------------------------------------------------------

class SSLEncoderSettings(ModelSettings):
    """A ViT trained by DINO-style self-distillation, whose patch features K-means turns into DiGIT's tokens."""

    size: VIT_SIZE_NAMES = Field("tiny", description="the ViT preset (VIT_SIZES)")
    image_size: Int = Field(28, ge=1, description="the global crops' side; local crops are smaller")
    patch_size: Int = Field(4, ge=1, description="pixels per token side: the token grid is image_size / patch_size")
    channels: Literal[1, 3] = Field(3, description="colour channels the encoder reads (1: grey data)")
    feature_block: Int = Field(-3, description="the block whose output (after the final LayerNorm) K-means "
                               "clusters, counted from the end as in DiGIT (-3: the third-from-last block)")
    head_hidden: Int = Field(512, ge=1, description="the projection head's hidden width")
    head_bottleneck: Int = Field(128, ge=1, description="the projection head's l2-normalised bottleneck")
    prototypes: Int = Field(1024, ge=2, description="the head's output width: the self-distillation classes")

    @property
    def shape(self) -> ViTSize:
        return VIT_SIZES[self.size]

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @model_validator(mode="after")
    def _fits(self) -> "SSLEncoderSettings":
        if self.image_size % self.patch_size:
            raise ValueError(f"ssl image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        depth = self.shape.depth
        if not -depth <= self.feature_block < depth:
            raise ValueError(f"ssl feature_block {self.feature_block}: the {self.size} ViT has {depth} blocks, so "
                             f"it must lie in {-depth}..{depth - 1}")
        return self
