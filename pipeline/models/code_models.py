"""The models over an image's codes behind one loader and one sampler: the VIM Transformer (one code per
position) or the RQ-Transformer (a stack of D codes per position). The settings file tells them apart (only the
RQ-Transformer's has `code_depth`), so a stage or evaluator that reads a trained model needs no config to pick.

Codes travel as the Parquet rows hold them: (B, L * D) per image, raster order, depth innermost."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.models.io import SETTINGS_FILE, load_model
from pipeline.models.prefix_transformer import PrefixTransformer, PrefixTransformerSettings
from pipeline.models.rq_transformer import RQSamplingSettings, RQTransformer, sample_code_stacks
from pipeline.models.sampling import SamplingSettings, sample_tokens
from pipeline.models.settings import RQTransformerSettings, TransformerSettings
from pipeline.models.transformer import VIMTransformer

CodeModelSettings = TransformerSettings | RQTransformerSettings | PrefixTransformerSettings
CodeModel = VIMTransformer | RQTransformer | PrefixTransformer


def code_model_settings(data: dict) -> CodeModelSettings:
    """A code model's settings from their JSON form (a settings file, a manifest): the RQ-Transformer's have
    `code_depth`, DiGIT's second stage's `prefix_vocab_size`."""
    if "code_depth" in data:
        return RQTransformerSettings.model_validate(data)
    if "prefix_vocab_size" in data:
        return PrefixTransformerSettings.model_validate(data)
    return TransformerSettings.model_validate(data)


def _model_class(settings: CodeModelSettings) -> type[CodeModel]:
    if isinstance(settings, RQTransformerSettings):
        return RQTransformer
    return PrefixTransformer if isinstance(settings, PrefixTransformerSettings) else VIMTransformer


def build_code_model(settings: CodeModelSettings) -> CodeModel:
    return _model_class(settings)(settings)


def load_code_model(folder: str | Path, device: str | torch.device = "cpu") -> CodeModel:
    """The trained model in `folder` (config.json + model.safetensors), in eval mode."""
    settings = code_model_settings(json.loads((Path(folder) / SETTINGS_FILE).read_text()))
    return load_model(_model_class(settings), type(settings), folder, device)


def position_blocks(settings: CodeModelSettings) -> int:
    """Blocks that run over the image's positions (the probe's candidates): all of the VIM Transformer's, the
    RQ-Transformer's spatial ones."""
    shape = settings.shape
    return shape.spatial_layers if isinstance(settings, RQTransformerSettings) else shape.depth


def codes_per_image(settings: CodeModelSettings) -> int:
    """What one image is to the model, in codes: positions x depth."""
    return settings.length * getattr(settings, "code_depth", 1)


@torch.no_grad()
def sample_codes(model: CodeModel, labels: torch.Tensor | None, settings: SamplingSettings | RQSamplingSettings,
                 generator: torch.Generator, batch: int | None = None) -> torch.Tensor:
    """Codes (B, L * D) for the given labels (or `batch` unconditional samples). The RQ-Transformer takes
    per-depth temperature, top-k and top-p (tuples, one value per depth) as well as single values."""
    if isinstance(model, RQTransformer):
        if isinstance(settings, SamplingSettings):
            settings = RQSamplingSettings(settings.temperature, settings.top_k, settings.top_p,
                                          settings.guidance_scale)
        return sample_code_stacks(model, labels, settings, generator, batch).flatten(1)
    if not isinstance(settings, SamplingSettings):
        if any(isinstance(v, tuple) for v in (settings.temperature, settings.top_k, settings.top_p)):
            raise ValueError("per-depth sampling settings are for the RQ-Transformer; the VIM Transformer takes "
                             "one temperature, top-k and top-p")
        settings = SamplingSettings(settings.temperature, settings.top_k, settings.top_p, settings.guidance_scale)
    return sample_tokens(model, labels, settings, generator, batch)
