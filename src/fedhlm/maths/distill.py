"""Knowledge distillation's loss (Hinton et al., 2015): pure maths, shared by every student.

The student matches the teacher's softened distribution; the T^2 factor keeps the gradient's size
independent of the temperature, so a distillation weight means the same at any T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), averaged over the rows ([N, C] logits each; the teacher's carry no
    gradient). Computed in float32: a bf16 softmax over a 30k vocabulary loses the tail the student learns from."""
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    t = float(temperature)
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    target = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    return (t * t) * F.kl_div(student, target, reduction="batchmean", log_target=True)
