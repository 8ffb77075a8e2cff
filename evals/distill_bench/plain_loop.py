"""A minimal distillation loop: the yardstick zeda's stage-1 step is timed against.

Plain PyTorch + PEFT, nothing from zeda's training code. The teacher is a separate, frozen copy
of the original Hugging Face model (stock experts backend). The student is built with zeda's
public `zeda.build_student`, so it is the exact model zeda trains (zero experts injected, PEFT
LoRA on the expert FFNs, routers trained in full). One step: teacher forward under no_grad,
student forward with forward hooks keeping the routers' logits and indices, forward KL through
``F.kl_div(..., log_target=True)`` plus the two-group balance loss, backward, AdamW step.
Each part runs inside ``timer(name)`` so the benchmark can report where the time goes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeda.zero.routing import zero_routers

Timer = Callable[[str], contextlib.AbstractContextManager]


@contextlib.contextmanager
def _no_timer(name: str) -> Iterator[None]:
    yield


class RouterTap:
    """Forward hooks on the student's routers: ``(logits (T, E+Z), indices (T, k))`` per layer."""

    def __init__(self, model: nn.Module) -> None:
        self.records: list[tuple[nn.Module, Tensor, Tensor]] = []
        for r in zero_routers(model):
            r.register_forward_hook(lambda m, a, out: self.records.append((m, out[0], out[2])))


def balance_loss(records: list[tuple[nn.Module, Tensor, Tensor]], alpha: float, w: float) -> Tensor:
    """``alpha (E + wZ) (f_E P_E / E + f_Z P_Z / (wZ))`` per layer, summed; f from the real indices."""
    total = torch.zeros(())
    for router, logits, indices in records:
        e, z = router.num_experts, router.num_zero_experts
        if router.zeda_router_kind == "sigmoid_bias":
            p = torch.sigmoid(logits.float())
            p = p / p.sum(-1, keepdim=True)
        else:
            p = torch.softmax(logits.float(), dim=-1)
        f_z = (indices >= e).float().mean()
        p_z = p[:, e:].sum(-1).mean()
        total = total + alpha * (e + w * z) * ((1 - f_z) * (1 - p_z) / e + f_z * p_z / (w * z))
    return total


def plain_step(
    teacher: nn.Module,
    student: nn.Module,
    tap: RouterTap,
    optimizer: torch.optim.Optimizer,
    input_ids: Tensor,
    loss_mask: Tensor,
    alpha: float,
    w: float,
    timer: Timer = _no_timer,
) -> float:
    """One optimisation step on ``input_ids (B, T)``; ``loss_mask (B, T)`` marks trained positions.

    Returns:
        The loss (a Python float, read after the update).
    """
    with timer("teacher forward"), torch.no_grad():
        t_logits = teacher(input_ids=input_ids).logits
    tap.records.clear()
    with timer("student forward"):
        s_logits = student(input_ids=input_ids).logits
    with timer("loss"):
        v = s_logits.shape[-1]
        kl = F.kl_div(
            F.log_softmax(s_logits.float().view(-1, v), -1),
            F.log_softmax(t_logits.float().view(-1, v), -1),
            reduction="none",
            log_target=True,
        ).sum(-1)
        m = loss_mask.reshape(-1).float()
        loss = (kl * m).sum() / m.sum() + balance_loss(tap.records, alpha, w)
    with timer("backward"):
        loss.backward()
    with timer("optimiser"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def make_optimizer(student: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (PyTorch's defaults otherwise)."""
    return torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
