"""The models' settings, declared once: what a model needs to be built, stored beside its weights.

Torch-free, so the pipeline config (imported by light processes) can build on these classes: its
tokenizer and transformer sections inherit these fields rather than repeating them, and hand the
models their settings by field name (`TokenizerConfig.model_settings()`,
`TransformerConfig.model_settings(...)`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

VIT_SIZE_NAMES = Literal["tiny", "mini", "S", "B", "L"]  # keys of pipeline.models.vit.VIT_SIZES
VIM_SIZE_NAMES = Literal["pico", "nano", "micro", "small", "B", "L"]


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

    codebook_size: int = Field(512, ge=2, le=32767, description="<= 32767 so codes fit int16")
    codebook_dim: int | None = Field(32, ge=1, description="lookup dimension; null = no factorisation")
    l2_normalize: bool = True
    beta: float = Field(0.25, ge=0)
    ema: bool = False
    ema_decay: float = Field(0.99, gt=0, lt=1)
    dead_code_threshold: float = Field(0.0, ge=0, description="restart codes used less than this per step")
    codebook_init: Literal["normal", "data"] = "normal"


class TokenizerSettings(QuantizerSettings):
    """ViT-VQGAN: the quantizer plus the ViT encoder and decoder (small sizes for CPU)."""

    image_size: int = Field(32, ge=8)
    patch_size: int = Field(4, ge=1)
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
    dropout: float = Field(0.1, ge=0, lt=1, description="residual, MLP and attention dropout")
    label_dropout: float = Field(0.0, ge=0, lt=1, description="null-class rate for classifier-free guidance")


class TransformerSettings(TransformerArchitecture):
    """The architecture plus what the data decides: vocabulary, token grid and classes."""

    vocab_size: int = Field(512, ge=1, description="the tokenizer's codebook size")
    grid: tuple[int, int] = (8, 8)
    num_classes: int = Field(10, ge=0, description="0: unconditional, a start token instead of a class token")

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
