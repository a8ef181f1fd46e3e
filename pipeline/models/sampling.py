"""Batched autoregressive sampling from the VIM Transformer with its KV cache.

Paper protocol: temperature 1, no top-k, no top-p. Options beyond it: temperature, top-k, top-p and
classifier-free guidance (logits = uncond + s * (cond - uncond), for models trained with label
dropout; s = 1 is exactly the plain conditional path and runs no unconditional pass).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.models.cpu_linear import packed_weights
from pipeline.models.transformer import VIMTransformer


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    guidance_scale: float = 1.0  # 1: plain conditional sampling


def guided_logits(conditional: torch.Tensor, unconditional: torch.Tensor | None, scale: float) -> torch.Tensor:
    if unconditional is None or scale == 1.0:
        return conditional
    return unconditional + scale * (conditional - unconditional)


def conditioning_rows(labels: torch.Tensor | None, scale: float, label_dropout: float, null_class: int,
                      device) -> tuple[torch.Tensor | None, bool]:
    """The class rows a sampling batch feeds, and whether it is guided: the labels; or, guided (labels and a
    scale other than 1), one batch of the conditional rows then the same rows with the null class."""
    guided = labels is not None and scale != 1.0
    if guided and label_dropout <= 0:
        raise ValueError("classifier-free guidance needs a model trained with transformer.label_dropout > 0")
    if guided:
        return torch.cat([labels, torch.full_like(labels, null_class)]).to(device), True
    return (labels.to(device) if labels is not None else None), False


def filter_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
    logits = logits.float() / max(settings.temperature, 1e-6)
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= settings.top_p  # keep the token that crosses p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def sample_tokens(model: VIMTransformer, labels: torch.Tensor | None, settings: SamplingSettings,
                  generator: torch.Generator, batch: int | None = None,
                  condition: torch.Tensor | None = None) -> torch.Tensor:
    """Token grids (B, L) for the given labels (or `batch` unconditional samples); `condition` (B, P): the
    prefix a PrefixTransformer decodes from (DiGIT's SSL tokens)."""
    device = model.head.weight.device
    count = len(labels) if labels is not None else len(condition) if condition is not None else batch
    labels_in, guided = conditioning_rows(labels, settings.guidance_scale, model.settings.label_dropout,
                                          model.settings.null_class, device)
    rows = len(labels_in) if labels_in is not None else count
    cache = model.new_cache(rows, device)
    tokens = torch.empty(count, model.settings.length, dtype=torch.long, device=device)
    with packed_weights(model):
        if condition is None:
            logits = model.prefill(labels_in, cache)
        else:
            condition = condition.to(device)
            logits = model.prefill(labels_in, cache,
                                   condition=torch.cat([condition, condition]) if guided else condition)
        for position in range(model.settings.length):
            if guided:
                logits = guided_logits(logits[:count], logits[count:], settings.guidance_scale)
            probs = filter_logits(logits, settings).softmax(-1)
            token = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
            tokens[:, position] = token
            if position + 1 < model.settings.length:
                logits = model.decode_step(torch.cat([token, token]) if guided else token, cache)
    return tokens


def balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """The same number of samples for every class, class-major: 0,0,...,1,1,..."""
    return torch.arange(num_classes).repeat_interleave(per_class)
