"""One ViT-VQGAN training step's losses, free of Ray: generator side and discriminator side.

L = L_VQ + w_adv L_adv + w_perc L_perc + w_ll L_logit-Laplace + w_l2 L_2 (paper defaults 0.1/0.1/0.1/1.0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TokenizerConfig
from pipeline.models.discriminator import StyleGANDiscriminator
from pipeline.models.losses import (Perceptual, discriminator_adversarial, find_vgg16_weights,
                                    generator_adversarial, logit_laplace_nll, r1_penalty)
from pipeline.models.noble import branch_parameter_groups
from pipeline.models.tokenizer import ViTVQGAN


def generator_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The generator's optimizer groups: every trainable parameter decayed at `weight_decay`, as the tokenizer
    always did, except NOBLE branch parameters, which get their learning-rate multipliers and decay on
    matrices only. Without branches: one group, the same optimizer state as before."""
    placed, branch_groups = branch_parameter_groups(model, weight_decay)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in placed]
    return [{"params": rest, "weight_decay": weight_decay}, *branch_groups]


class TokenizerObjective(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.model = ViTVQGAN(cfg.model_settings())
        self.discriminator = (StyleGANDiscriminator(cfg.image_size, cfg.disc_base_channels)
                              if cfg.adversarial_weight > 0 else None)
        self.perceptual = (Perceptual(find_vgg16_weights(cfg.vgg16_weights))
                           if cfg.perceptual_weight > 0 else None)

    def adversarial_on(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.disc_start

    def generator_losses(self, model: nn.Module, discriminator: nn.Module | None, images: torch.Tensor,
                         step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, dict]:
        """-> (total loss, named terms, reconstruction, quantizer stats). `model`/`discriminator` may be
        DDP wrappers of self.model / self.discriminator."""
        cfg = self.cfg
        reconstruction, raw, quantized = model(images)
        terms: dict[str, torch.Tensor] = {f"vq_{k}": v for k, v in quantized.losses.items()}
        terms["l2"] = F.mse_loss(reconstruction, images)
        total = sum(quantized.losses.values()) + cfg.l2_weight * terms["l2"]
        if cfg.logit_laplace_weight > 0:
            terms["logit_laplace"] = logit_laplace_nll(images, raw["mu"].float(), raw["log_b"].float())
            total = total + cfg.logit_laplace_weight * terms["logit_laplace"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(reconstruction.clamp(0, 1), images)
            total = total + cfg.perceptual_weight * terms["perceptual"]
        if discriminator is not None and self.adversarial_on(step):
            terms["adversarial"] = generator_adversarial(discriminator(reconstruction))
            total = total + cfg.adversarial_weight * terms["adversarial"]
        return total, terms, reconstruction, quantized.stats

    def discriminator_losses(self, discriminator: nn.Module, images: torch.Tensor, reconstruction: torch.Tensor,
                             d_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        real_logits = discriminator(images)
        fake_logits = discriminator(reconstruction.detach())
        loss = discriminator_adversarial(real_logits, fake_logits)
        terms = {"disc": loss, "disc_real_logit": real_logits.mean().detach(),
                 "disc_fake_logit": fake_logits.mean().detach()}
        if cfg.r1_gamma > 0 and d_step % cfg.r1_interval == 0:
            penalty = r1_penalty(discriminator, images)
            terms["r1"] = penalty.detach()
            loss = loss + cfg.r1_gamma / 2 * penalty * cfg.r1_interval  # lazy: scaled by the interval
        return loss, terms
