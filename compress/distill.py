"""Knowledge distillation (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural
Network") as a loss around the task's loss.

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * task_loss(s, y)

t: the frozen teacher's logits on the same (augmented) batch the student sees, s: the
student's. The T^2 keeps the soft term's gradient at the scale of the hard one when T changes
(the gradient of the softened KL shrinks as 1 / T^2). The distiller knows nothing about the
compression being trained: pruned, quantized or binary students all call the same loss, and
with alpha = 0 it is the task's loss exactly.

The teacher runs in eval mode (its BN statistics and dropout fixed), under no_grad, inside the
training step's autocast, so it is on the student's device and precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress.config import validate_distill

# (inputs, student logits, labels) -> scalar loss: what the training loop minimises
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student) of temperature-softened logits, averaged over the batch
    (fp32, whatever the autocast dtype of the logits)."""
    t = float(temperature)
    log_p = F.log_softmax(student.float() / t, dim=1)
    log_q = F.log_softmax(teacher.float() / t, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    """The classification task's loss, as the loop calls it."""

    def loss(x: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)

    return loss


class Distiller(nn.Module):
    """The KD loss around `task_loss`, holding a frozen `teacher` (a submodule, so `.to(device)`
    moves it with the loss)."""

    def __init__(
        self, teacher: nn.Module, task_loss: LossFn, temperature: float = 4.0, alpha: float = 0.9
    ) -> None:
        super().__init__()
        validate_distill({"kind": "kd", "temperature": temperature, "alpha": alpha, "teacher": "-"})
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.task_loss, self.temperature, self.alpha = task_loss, float(temperature), float(alpha)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()  # never in training mode: its BN statistics stay the trained ones
        return self

    def forward(self, x: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()
        with torch.no_grad():
            t = self.teacher(x)
        hard = self.task_loss(x, out, y)
        return self.alpha * kd_loss(out, t, self.temperature) + (1 - self.alpha) * hard
