"""The distillation loss shared by the classification SLM and the title SLM."""

from __future__ import annotations

import pytest
import torch

from fedhlm.maths.distill import distill_kl


def test_distill_kl_is_zero_on_the_teacher_and_pulls_the_student_towards_it() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(5, 50)
    assert float(distill_kl(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    student = torch.zeros(5, 50, requires_grad=True)
    loss = distill_kl(student, teacher, 1.0)
    assert float(loss) > 0.1
    loss.backward()
    # the gradient is softmax(student) - softmax(teacher) per row, over the rows' count
    expected = (torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)) / 5
    assert torch.allclose(student.grad, expected, atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        distill_kl(student, teacher, 0.0)


def test_the_temperature_factor_keeps_the_loss_in_scale() -> None:
    """T^2 KL of softened distributions tends to the logit MSE / (2 V) for large T, not to zero."""
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 8), torch.randn(4, 8)
    at_large_t = float(distill_kl(student, teacher, 100.0))
    centred = (student - student.mean(-1, keepdim=True)) - (teacher - teacher.mean(-1, keepdim=True))
    assert at_large_t == pytest.approx(float((centred ** 2).sum(-1).mean() / (2 * 8)), rel=0.05)

