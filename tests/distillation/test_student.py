"""The student's trainable set: LoRA on expert FFNs + routers in full, nothing else; honest teacher."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import FAMILIES, token_batch

import zeda
from zeda.config import LoraConfig, RunConfig, apply_overrides
from zeda.distillation.student import build_student, peft_config_for
from zeda.tiny import tiny_model


def _cfg(**lora) -> RunConfig:
    return apply_overrides(RunConfig(), sorted(f"lora.{k}={str(v).lower()}" for k, v in lora.items()))


def _student(family: str, **lora):
    original = tiny_model(family)
    original.set_experts_implementation("eager")
    model = tiny_model(family)
    zeda.inject_zero_experts(model)
    return original, build_student(model, _cfg(**lora))


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
    original, student = _student("qwen3_moe", enabled=False, full_experts=True)
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
    student = build_student(model, RunConfig())
    assert not any("shared_expert" in n for n, p in student.named_parameters() if p.requires_grad)


def test_build_student_injects_an_original_and_is_quiet():
    """One constructor: an original model is injected per the recipe; PEFT and transformers stay silent."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        student = build_student(tiny_model("olmoe"), RunConfig())
        full = build_student(tiny_model("olmoe"), _cfg(enabled=False, full_experts=True))
    assert zeda.is_injected(student) and zeda.is_injected(full)
    noisy = [
        str(w.message)
        for w in caught
        if "target_modules" in str(w.message) or "checkpointing" in str(w.message)
    ]
    assert not noisy, noisy


def test_same_seed_same_lora_init():
    a = build_student(tiny_model("olmoe"), _cfg())
    torch.manual_seed(123)  # whatever the global RNG holds, train.seed decides
    b = build_student(tiny_model("olmoe"), _cfg())
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_nothing_to_train_is_refused():
    with pytest.raises(zeda.ZedaError, match="nothing to train"):
        build_student(tiny_model("olmoe"), _cfg(enabled=False, train_router=False))


def test_build_student_from_an_injected_checkpoint_directory(tmp_path):
    from zeda.io import atomic_save

    model = tiny_model("olmoe")
    zeda.inject_zero_experts(model)
    atomic_save(model, tmp_path / "injected")
    ids = token_batch(2, 8)
    student = build_student(tmp_path / "injected", RunConfig())
    assert zeda.is_injected(student) and any(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, model(ids).logits)
    with pytest.raises(zeda.ZedaError, match="needs the run config"):
        build_student(tmp_path / "injected")


@pytest.mark.parametrize("init", ["threshold", "relative"])
def test_threshold_init_starts_at_the_target_share_and_rebuilds_identically(tmp_path, init):
    """inject.init=threshold|relative: zero rows at 0 (threshold) or fitted (relative), bias
    calibrated so step 0 skips the target share; building again from the same recipe gives
    the same rows and bias (resume and export rely on it)."""
    import json

    from zeda.config import apply_overrides
    from zeda.distillation.data import pack_texts
    from zeda.distillation.student import inject_for_run
    from zeda.tiny import tiny_corpus, tiny_model, tiny_tokenizer
    from zeda.zero.inject import find_moe_layers
    from zeda.zero.structure import current_zero_logit_bias

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(64)))
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "model")
    cfg = apply_overrides(
        RunConfig(),
        [
            f"model.name_or_path={tmp_path / 'model'}",
            f"data.train_file={data}",
            "data.seq_len=32",
            f"inject.init={init}",
            "balance.target_zero_share=0.4",
        ],
    )
    biases, rows = [], []
    for _ in range(2):
        model = tiny_model("qwen3_moe")
        inject_for_run(model, cfg)
        for layer in find_moe_layers(model):
            e = layer.router.num_experts
            nonzero = torch.count_nonzero(layer.router.weight[e:])
            assert nonzero == 0 if init == "threshold" else nonzero > 0
        rows.append([layer.router.weight.detach().clone() for layer in find_moe_layers(model)])
        ids = pack_texts(tiny_corpus(64), tiny_tokenizer(), 32)[:8]
        with zeda.RouterTelemetry(model) as tel, torch.no_grad():
            model(ids)
        assert tel.zero_share == pytest.approx(0.4, abs=0.1)
        biases.append(current_zero_logit_bias(model))
    assert biases[0] is not None and biases[0] == biases[1]
    assert isinstance(biases[0], list if init == "relative" else float)  # relative: one per layer
    for a, b in zip(*rows, strict=True):
        assert torch.equal(a, b)
