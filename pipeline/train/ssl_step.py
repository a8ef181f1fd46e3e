"""One self-distillation training step for DiGIT's SSL encoder, free of Ray, with DINO's stabilisers: a
teacher temperature warmed up from a sharper start, a teacher momentum that rises to 1 along a cosine,
prototypes frozen for the first steps, and gradient clipping (the l2-normalised head has steep gradients;
without these the teacher's output collapsed to one uniform distribution within tens of steps in a probe)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.data.multicrop import MultiCrop, multi_crop
from pipeline.models.ssl import SelfDistillation
from pipeline.schedules import cosine_ramp, linear_ramp


@dataclass(frozen=True)
class DistillationSchedule:
    steps: int                                  # the whole run: the momentum reaches 1 at its end
    teacher_temperature: float = 0.07
    teacher_temperature_start: float = 0.04
    teacher_temperature_steps: int = 0          # 0: no warm-up
    student_temperature: float = 0.1
    teacher_momentum: float = 0.996
    freeze_prototypes_steps: int = 0
    grad_clip: float = 3.0                      # 0: off

    def temperature(self, step: int) -> float:
        return linear_ramp(step, self.teacher_temperature_steps, self.teacher_temperature_start,
                           self.teacher_temperature)

    def momentum(self, step: int) -> float:
        return cosine_ramp(step, self.steps, self.teacher_momentum, 1.0)


def distillation_step(model: SelfDistillation, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                      crops: MultiCrop, schedule: DistillationSchedule, step: int,
                      generator: torch.Generator,
                      sync_gradients: Callable[[torch.nn.Module], None] | None = None) -> dict[str, float]:
    """Views of `images` (float (B, C, H, W) in [0, 1]), a student update, then the teacher's EMA; the
    caller sets the learning rate. `sync_gradients(student)` averages the gradients over data-parallel
    workers before clipping. Returns the loss and the figures that show a collapse early."""
    global_views, local_views = multi_crop(images, crops, generator)
    loss = model(global_views, local_views, teacher_temperature=schedule.temperature(step),
                 student_temperature=schedule.student_temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sync_gradients is not None:
        sync_gradients(model.student)
    if step < schedule.freeze_prototypes_steps:
        model.student.head.prototypes.grad = None
    norm = (torch.nn.utils.clip_grad_norm_(model.student.parameters(), schedule.grad_clip)
            if schedule.grad_clip > 0 else torch.zeros(()))
    optimizer.step()
    model.update_teacher(schedule.momentum(step))
    return {"loss": float(loss.detach()), "grad_norm": float(norm), "temperature": schedule.temperature(step),
            "momentum": schedule.momentum(step)}


@torch.no_grad()
def teacher_spread(model: SelfDistillation, images: torch.Tensor, temperature: float) -> dict[str, float]:
    """Collapse check on plain images: the mean entropy of the teacher's per-image distribution (low: sharp)
    and the entropy of their mean (high: many prototypes in use). A collapse to one prototype makes both
    low; a collapse to the uniform distribution makes both equal to log(prototypes)."""
    logits = model.teacher([images])[0]
    probs = torch.softmax((logits - model.center) / temperature, dim=-1)
    per_image = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    mean = probs.mean(0)
    of_mean = -(mean * mean.clamp_min(1e-12).log()).sum()
    return {"entropy_per_image": float(per_image), "entropy_of_mean": float(of_mean)}
