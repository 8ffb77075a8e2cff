"""The student's trainable set: LoRA on expert FFNs + routers in full, nothing else; honest teacher."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, token_batch

import zeda
from zeda.config import LoraConfig
from zeda.distillation.student import make_student, peft_config_for
from zeda.tiny import tiny_model


def _student(family: str, **lora):
    original = tiny_model(family)
    original.set_experts_implementation("eager")
    model = tiny_model(family)
    zeda.inject_zero_experts(model)
    return original, make_student(model, LoraConfig(**lora))


def _train_steps(student, steps: int = 2, lr: float = 1e-2):
    ids = token_batch(2, 12)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    student.train()
    for _ in range(steps):
        out = student(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    student.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_training_changes_every_trainable_param_and_nothing_else(family):
    original, student = _student(family)
    spec = zeda.get_spec(family)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in student.named_buffers()}
    assert trainable, "nothing is trainable"
    for n in trainable:  # only LoRA factors on experts and router copies train
        assert ("lora_" in n and f".{spec.experts_attr}." in n) or (
            "modules_to_save" in n and f".{spec.router_attr}." in n
        ), n
    n_router_copies = sum(1 for n in trainable if "modules_to_save" in n and n.endswith(".weight"))
    assert n_router_copies == len(zeda.find_moe_layers(student))
    _train_steps(student)
    for n, p in student.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in trainable), f"{n}: changed={changed}, trainable={n in trainable}"
    for n, b in student.named_buffers():  # correction biases stay frozen
        assert torch.equal(b, buffers[n]), n


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_stays_bit_exact_during_training(family):
    original, student = _student(family)
    ids = token_batch(2, 12, seed=5)
    with torch.no_grad():
        ref = original(ids).logits
    for _ in range(2):
        _train_steps(student, steps=1)
        with torch.no_grad(), zeda.teacher_mode(student):
            assert torch.equal(student(ids).logits, ref)
        with torch.no_grad():
            assert not torch.equal(student(ids).logits, ref)


def test_full_experts_keeps_a_frozen_teacher_copy():
    original, student = _student("qwen3_moe", full_experts=True)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert any(".experts.modules_to_save." in n for n in trainable)
    assert not any("lora_" in n for n in trainable)
    ids = token_batch()
    with torch.no_grad():
        ref = original(ids).logits
    _train_steps(student)
    with torch.no_grad(), zeda.teacher_mode(student):
        assert torch.equal(student(ids).logits, ref)


def test_shared_expert_gate_is_not_mistaken_for_the_router():
    model = tiny_model("qwen2_moe")
    zeda.inject_zero_experts(model)
    cfg = peft_config_for(model, LoraConfig())
    assert all(name.endswith(".mlp.gate") for name in cfg.modules_to_save)
    student = make_student(model, LoraConfig())
    assert not any("shared_expert" in n for n, p in student.named_parameters() if p.requires_grad)


def test_needs_injected_model():
    with pytest.raises(zeda.ZedaError, match="inject"):
        make_student(tiny_model("olmoe"), LoraConfig())
