"""DiGIT's self-supervised encoder, trained in the pipeline because no SSL weights exist offline: a ViT with a
class token, trained by DINO-style self-distillation (Caron et al., 2021).

A student (ViT + projection head) sees every crop, a teacher (the student's exponential moving average, no
gradients) sees the two global crops, and the student learns to predict the teacher's sharpened, centred
distribution over `prototypes` classes for every other view. DiGIT then clusters the patch features of one
block (`feature_block`, after the final LayerNorm) with K-means.

Positions are the fixed 2D sin-cos table of the global crop's grid, resized (bicubic, as DINO does for its
learned table) for a smaller local crop, so a local crop's tokens span the same position range.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.cpu_linear import Linear, linear
from pipeline.models.io import load_model, save_model
from pipeline.models.settings import SSLEncoderSettings
from pipeline.models.tokenizer import LUMA
from pipeline.models.vit import Block, init_weights, sincos_2d


class SSLViT(nn.Module):
    """Images (B, C, h, w) in [0, 1], h and w multiples of the patch size -> class-token embedding and patch
    features."""

    def __init__(self, settings: SSLEncoderSettings):
        super().__init__()
        self.settings = settings
        shape = settings.shape
        self.patch = nn.Conv2d(settings.channels, shape.dim, settings.patch_size, settings.patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, shape.dim))
        self.register_buffer("pos", sincos_2d(settings.grid, settings.grid, shape.dim), persistent=False)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.depth))
        self.norm = nn.LayerNorm(shape.dim)
        init_weights(self)
        # Xavier for the patch embedding, as in the tokenizer: at std 0.02 the unit-scale positions would drown
        # the pixels and every image would start with the same output (the head then collapses at once).
        nn.init.xavier_uniform_(self.patch.weight.view(self.patch.weight.shape[0], -1))
        nn.init.trunc_normal_(self.class_token, std=0.02)

    def positions(self, height: int, width: int) -> torch.Tensor:
        grid = self.settings.grid
        if (height, width) == (grid, grid):
            return self.pos
        table = self.pos.view(1, grid, grid, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(table, size=(height, width), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(height * width, -1)

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        if self.settings.channels == 1 and images.shape[1] == 3:  # RGB of grey data: the luma, as the tokenizer
            images = torch.einsum("bchw,c->bhw", images, LUMA.to(images)).unsqueeze(1)
        patches = self.patch(images * 2 - 1)
        height, width = patches.shape[-2:]
        x = patches.flatten(2).transpose(1, 2) + self.positions(height, width)
        return torch.cat([self.class_token.expand(len(x), -1, -1), x], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, dim): the class token after the last block and the final LayerNorm."""
        x = self._tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])

    def patch_features(self, images: torch.Tensor, block: int | None = None) -> torch.Tensor:
        """(B, N, dim): the patch tokens after block `block` (default: the settings' feature_block, negative
        counts from the end) through the final LayerNorm: what K-means clusters."""
        block = self.settings.feature_block if block is None else block
        last = block % len(self.blocks)
        x = self._tokens(images)
        for index in range(last + 1):
            x = self.blocks[index](x)
        return self.norm(x[:, 1:])

    @property
    def feature_dim(self) -> int:
        return self.settings.shape.dim


class ProjectionHead(nn.Module):
    """DINO's head: a 3-layer MLP to an l2-normalised bottleneck, then prototypes of unit norm (the weight-
    normalised last layer with its gain fixed at 1)."""

    def __init__(self, dim: int, settings: SSLEncoderSettings):
        super().__init__()
        hidden = settings.head_hidden
        self.mlp = nn.Sequential(Linear(dim, hidden), nn.GELU(), Linear(hidden, hidden), nn.GELU(),
                                 Linear(hidden, settings.head_bottleneck))
        self.prototypes = nn.Parameter(torch.empty(settings.prototypes, settings.head_bottleneck))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


class StudentNetwork(nn.Module):
    def __init__(self, settings: SSLEncoderSettings):
        super().__init__()
        self.backbone = SSLViT(settings)
        self.head = ProjectionHead(self.backbone.feature_dim, settings)

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits of every crop; crops of one size run as one batch."""
        outputs: list[torch.Tensor | None] = [None] * len(crops)
        sizes: dict[tuple[int, int], list[int]] = {}
        for index, crop in enumerate(crops):
            sizes.setdefault(tuple(crop.shape[-2:]), []).append(index)
        for indices in sizes.values():
            logits = self.head(self.backbone(torch.cat([crops[i] for i in indices])))
            for i, chunk in zip(indices, logits.chunk(len(indices))):
                outputs[i] = chunk
        return outputs  # type: ignore[return-value]


def distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
                      student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """Mean cross-entropy H(teacher view a, student view b) over every pair a != b. The teacher's views are
    the global crops, which come first among the student's."""
    targets = [F.softmax((t - center) / teacher_temperature, dim=-1) for t in teacher]
    total, pairs = torch.zeros((), device=center.device), 0
    for a, target in enumerate(targets):
        for b, logits in enumerate(student):
            if a == b:
                continue
            total = total - (target * F.log_softmax(logits / student_temperature, dim=-1)).sum(-1).mean()
            pairs += 1
    return total / pairs


class SelfDistillation(nn.Module):
    """Student, EMA teacher and the teacher's output centre: one checkpointable module."""

    def __init__(self, settings: SSLEncoderSettings, center_momentum: float = 0.9):
        super().__init__()
        self.settings = settings
        self.student = StudentNetwork(settings)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, settings.prototypes))

    def forward(self, global_crops: list[torch.Tensor], local_crops: list[torch.Tensor],
                teacher_temperature: float, student_temperature: float = 0.1) -> torch.Tensor:
        """The loss of one batch; in training mode it also moves the centre towards the teacher's mean."""
        with torch.no_grad():
            teacher = self.teacher(global_crops)
        student = self.student(list(global_crops) + list(local_crops))
        loss = distillation_loss(student, teacher, self.center, student_temperature, teacher_temperature)
        if self.training:
            with torch.no_grad():
                batch_center = torch.cat(teacher).mean(0, keepdim=True)
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(batch_center)
                    batch_center /= torch.distributed.get_world_size()
                self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
        return loss

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student."""
        for teacher, student in zip(self.teacher.parameters(), self.student.parameters()):
            teacher.mul_(momentum).add_(student.detach(), alpha=1 - momentum)

    def encoder(self) -> SSLViT:
        """The network DiGIT tokenizes with: the teacher's backbone (as DINO evaluates)."""
        return self.teacher.backbone


def save_ssl_encoder(encoder: SSLViT, folder: str | Path) -> None:
    save_model(encoder, folder)


def load_ssl_encoder(folder: str | Path, device: str | torch.device = "cpu") -> SSLViT:
    return load_model(SSLViT, SSLEncoderSettings, folder, device)
