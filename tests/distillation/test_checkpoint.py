"""Consolidated checkpoint state (`gather_train_state` / `restore_optimizer`) in one process.

The multi-process layouts (DDP, FSDP2) are covered by test_accelerate.py and test_fsdp.py.
"""

from __future__ import annotations

import pytest
import torch

import zeda
from zeda.config import RunConfig, apply_overrides
from zeda.distillation.checkpoint import gather_train_state, restore_optimizer
from zeda.distillation.student import build_student
from zeda.tiny import tiny_model


def _student_and_optimizer():
    cfg = apply_overrides(RunConfig(), ["balance.target_zero_share=0.5"])
    student = build_student(tiny_model("qwen3_moe"), cfg)
    params = [p for p in student.parameters() if p.requires_grad]
    # Two groups with different learning rates, as with lora.router_lr_scale.
    optimizer = torch.optim.AdamW([{"params": params[:3], "lr": 1e-2}, {"params": params[3:], "lr": 5e-3}])
    return student, optimizer


def test_gathered_state_is_name_keyed_and_restores_exactly():
    student, optimizer = _student_and_optimizer()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    student(input_ids=ids).logits.pow(2).mean().backward()
    optimizer.step()
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    tensors, state = gather_train_state(student, optimizer, names)
    assert set(tensors) == names  # trained parameters only: no frozen weights, no buffers
    for n, p in student.named_parameters():
        if n in names:
            torch.testing.assert_close(tensors[n], p.detach(), rtol=0, atol=0)
    assert set(state["state"]) == names and all(isinstance(k, str) for k in state["state"])

    fresh = torch.optim.AdamW(
        [{"params": g["params"], "lr": 0.5} for g in optimizer.param_groups]  # same params, other lr
    )
    restore_optimizer(student, fresh, state)
    before, after = optimizer.state_dict(), fresh.state_dict()
    assert [g["lr"] for g in after["param_groups"]] == [1e-2, 5e-3]
    for i, s in before["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(after["state"][i][key], s[key], rtol=0, atol=0)


def test_an_optimizer_state_keyed_by_position_is_refused_in_one_line():
    student, optimizer = _student_and_optimizer()
    legacy = optimizer.state_dict()  # torch's own format: parameters by position, not by name
    with pytest.raises(zeda.ZedaError, match="not keyed by parameter name") as err:
        restore_optimizer(student, optimizer, legacy)
    assert "\n" not in str(err.value)
