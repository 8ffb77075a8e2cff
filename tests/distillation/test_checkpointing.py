"""Activation checkpointing in the distillation loop (``train.gradient_checkpointing``).

The same loss trajectory and the same routing counts with and without it (fp32, CPU), the
teacher pass never recomputed, and every router hook that counts (the balance loss's
`RouterCapture`, `RouterTelemetry`) sees each real forward once although backward runs the
student's routers a second time.
"""

from __future__ import annotations

import pytest
import torch
from conftest import metrics, run_config, token_batch

import zeda
from zeda.config import RunConfig
from zeda.distillation.balance import RouterCapture
from zeda.distillation.loop import distill
from zeda.distillation.student import build_student
from zeda.tiny import tiny_model, tiny_tokenizer
from zeda.zero.checkpointing import enable_activation_checkpointing, is_recomputing
from zeda.zero.routing import zero_routers


def _run(corpus, out, family, *extra):
    cfg = run_config(
        corpus,
        out,
        "train.grad_accum=2",
        "train.log_every=1",
        "train.save_every=0",
        "train.lr_schedule=constant",
        "train.warmup_ratio=0.0",
        "stage1.lr=0.01",
        "stage1.steps=4",
        "balance.alpha=1.0",
        "balance.target_zero_share=0.6",
        *extra,
    )
    model = tiny_model(family)
    zeda.inject_zero_experts(model)
    student, _ = distill(model, cfg, tiny_tokenizer())
    return student, metrics(out)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_same_trajectory_and_counts_with_checkpointing(family, corpus, tmp_path):
    _, plain = _run(corpus, tmp_path / "plain", family)
    student, ckpt = _run(corpus, tmp_path / "ckpt", family, "train.gradient_checkpointing=true")
    assert len(plain) == len(ckpt) == 4
    for a, b in zip(plain, ckpt, strict=True):
        for key in ("loss", "kd", "balance"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
        # The share comes from the routers' real selections, summed over the step's micro-batches:
        # a recompute counted twice would still give the same share, the counts test below does not.
        assert b["zero_share"] == pytest.approx(a["zero_share"], rel=1e-9)
    # The student comes back as it went in: no layer checkpoints any more.
    assert not any(getattr(m, "gradient_checkpointing", False) for m in student.modules())


def _student(family: str):
    model = tiny_model(family)
    zeda.inject_zero_experts(model)
    student = build_student(model, RunConfig())
    with torch.no_grad():  # non-zero LoRA B, so adapters matter in every forward
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return student.train()


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe_lite"])
def test_recompute_runs_the_routers_but_counts_once(family):
    ids = token_batch(2, 12)
    calls: list[bool] = []  # every router forward (is it a recompute?), counting or not
    student = _student(family)
    for r in zero_routers(student):  # PEFT's trained copies and the teacher's frozen originals
        r.register_forward_hook(lambda m, a, o: calls.append(is_recomputing()))
    results = {}
    for ckpt in (False, True):
        if ckpt:
            enable_activation_checkpointing(student)
        calls.clear()
        student.zero_grad()
        with zeda.RouterTelemetry(student) as tel:
            with torch.no_grad(), zeda.teacher_mode(student):
                student(input_ids=ids)  # the teacher pass: never checkpointed, never recomputed
            with RouterCapture(student) as cap:
                out = student(input_ids=ids, labels=ids)
            loss = out.loss + sum(rec.logits.float().logsumexp(-1).mean() for rec in cap.records)
            loss.backward()  # with checkpointing: each layer's forward runs again, routers included
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results[ckpt] = (list(calls), len(cap.records), tel.layers, grads)
    (calls_plain, rec_plain, tel_plain, g_plain), (calls_ckpt, rec_ckpt, tel_ckpt, g_ckpt) = results.values()
    n = len(zeda.find_moe_layers(student))
    assert calls_plain == [False] * 2 * n  # teacher + student
    assert calls_ckpt == [False] * 2 * n + [True] * n  # + the recompute in backward
    assert rec_plain == rec_ckpt == n
    assert {i: (s.slots, s.zero_slots) for i, s in tel_ckpt.items()} == {
        i: (s.slots, s.zero_slots) for i, s in tel_plain.items()
    }
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) > 0
    for name in g_plain:  # gradients reach the router logits used outside the checkpointed layers
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-7)
