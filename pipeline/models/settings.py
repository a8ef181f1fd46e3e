"""The models' settings, declared once: what a model needs to be built, stored beside its weights.

Torch-free, so the pipeline config (imported by light processes) can build on these classes: its
tokenizer and transformer sections inherit these fields rather than repeating them, and hand the
models their settings by field name (`TokenizerConfig.model_settings()`,
`TransformerConfig.model_settings(...)`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

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


class TokenizerSettings(QuantizerSettings):
    """ViT-VQGAN: the quantizer plus the ViT encoder and decoder (small sizes for CPU)."""

    image_size: Int = Field(32, ge=8)
    patch_size: Int = Field(4, ge=1)
    encoder: VIT_SIZE_NAMES = "tiny"
    decoder: VIT_SIZE_NAMES = "tiny"
    output_head: Literal["logit_laplace", "linear"] = "logit_laplace"

    @property
    def grid(self) -> int:
        """Tokens per side."""
        return self.image_size // self.patch_size


class TransformerArchitecture(ModelSettings):
    """The VIM Transformer's settings that come from the config (paper: VIM-Base/Large, dropout 0.1)."""

    size: VIM_SIZE_NAMES = "nano"
    dropout: Float = Field(0.1, ge=0, lt=1, description="residual, MLP and attention dropout")
    label_dropout: Float = Field(0.0, ge=0, lt=1, description="null-class rate for classifier-free guidance")


class TransformerSettings(TransformerArchitecture):
    """The architecture plus what the data decides: vocabulary, token grid and classes."""

    vocab_size: Int = Field(512, ge=1, description="the tokenizer's codebook size")
    grid: tuple[Int, Int] = (8, 8)
    num_classes: Int = Field(10, ge=0, description="0: unconditional, a start token instead of a class token")

    @property
    def shape(self) -> VimSize:
        return VIM_SIZES[self.size]

    @property
    def length(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def null_class(self) -> int:
        """Index of the null class (the start token of an unconditional model)."""
        return self.num_classes
