"""``stage1.head_budget``: the logits of a random share of the positions, when the lm_head dominates."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import token_batch
from test_distill import cfg_for

from zeda.config import RunConfig, apply_overrides
from zeda.distillation.loop import distill
from zeda.distillation.losses import distill_loss
from zeda.distillation.rollouts import Batch, forward_logits, logit_positions, text_batch
from zeda.distillation.student import build_student
from zeda.errors import ZedaError
from zeda.evaluation.flops import load_config
from zeda.evaluation.head import lm_head_ratio, logit_fraction
from zeda.tiny import tiny_config, tiny_model, tiny_tokenizer


def test_logit_positions_are_a_sorted_share_of_the_trained_positions():
    mask = text_batch(torch.zeros(4, 21, dtype=torch.long)).loss_mask  # the last position untrained
    pos = logit_positions(mask, 0.25, torch.Generator().manual_seed(3))
    assert pos.numel() == 5  # round(0.25 * 20)
    assert torch.equal(pos, pos.unique()) and int(pos.max()) < 20
    assert torch.equal(pos, logit_positions(mask, 0.25, torch.Generator().manual_seed(3)))
    draws = {tuple(logit_positions(mask, 0.25, torch.Generator().manual_seed(s)).tolist()) for s in range(8)}
    assert len(draws) > 1
    assert logit_positions(mask, 1.0, torch.Generator()) is None
    assert logit_positions(mask, 1e-6, torch.Generator()).numel() == 1


def test_logit_positions_skip_positions_no_row_trains():
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0, 2:5] = 1
    mask[1, 6] = 1
    pos = logit_positions(mask, 0.99, torch.Generator().manual_seed(0))
    assert pos.tolist() == [2, 3, 4, 6]


@pytest.mark.parametrize(
    "family",
    ["qwen3_moe", "deepseek_v3", "gpt_oss", "mixtral", "olmoe", "glm4_moe", "qwen2_moe", "minimax_m2"],
)
def test_logits_at_positions_are_the_full_logits_there(family):
    """The model's own ``logits_to_keep`` (a 1-D tensor) gives the full forward's rows."""
    model = tiny_model(family)
    ids = token_batch(2, 12)
    full = text_batch(ids)
    part = Batch(full.input_ids, full.attention_mask, full.loss_mask, torch.tensor([0, 3, 4, 10]))
    with torch.no_grad():
        a, b = forward_logits(model, full), forward_logits(model, part)
    assert b.shape == (2, 4, a.shape[-1])
    torch.testing.assert_close(b, a[:, [0, 3, 4, 10]], rtol=1e-5, atol=1e-6)
    assert torch.equal(part.labels, full.labels[:, [0, 3, 4, 10]])
    assert torch.equal(part.kd_mask, full.loss_mask[:, [0, 3, 4, 10]])


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "nll"])
def test_loss_at_positions_is_the_full_loss_masked_to_them(kind):
    torch.manual_seed(0)
    s, t = torch.randn(3, 9, 50), torch.randn(3, 9, 50)
    full = text_batch(torch.randint(0, 50, (3, 9)))
    pos = torch.tensor([1, 2, 6])
    part = Batch(full.input_ids, full.attention_mask, full.loss_mask, pos)
    only = torch.zeros_like(full.loss_mask)
    only[:, pos] = full.loss_mask[:, pos]
    want = distill_loss(kind, s, t, full.labels, only)
    got = distill_loss(kind, s[:, pos], t[:, pos], part.labels, part.kd_mask)
    torch.testing.assert_close(got, want)


def test_logit_fraction_is_the_budget_over_the_heads_share():
    big_vocab = tiny_config("deepseek_v3", vocab_size=4096)
    ratio = lm_head_ratio(big_vocab, context_len=16)
    assert ratio > 2
    assert logit_fraction(big_vocab, 2.0, 32) == pytest.approx(2.0 / ratio)
    assert logit_fraction(big_vocab, None, 32) == 1.0
    assert logit_fraction(big_vocab, 10 * ratio, 32) == 1.0


@pytest.mark.parametrize(
    "name", ["qwen3-30b-a3b", "deepseek-v3", "glm-4.7-flash", "mixtral-8x7b", "olmoe-1b-7b", "gpt-oss-20b"]
)
def test_the_default_budget_keeps_every_position_on_real_checkpoints(name):
    assert logit_fraction(load_config(name), 2.0, 4096) == 1.0


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_head_budget_must_be_positive_and_finite(value):
    with pytest.raises(ZedaError, match="stage1.head_budget"):
        apply_overrides(RunConfig(), [f"stage1.head_budget={value}"]).validate()
    apply_overrides(RunConfig(), ["stage1.head_budget=null"]).validate()


def _head_rows(corpus, out, *extra) -> tuple[list[torch.Tensor], list[int]]:
    """Distil a tiny qwen3_moe; the hidden-state rows each grad-enabled lm_head call saw and the
    positions of the teacher's (no-grad) calls' sequence length."""
    cfg = cfg_for(corpus, out, "stage1.steps=3", *extra)
    student = build_student(tiny_model("qwen3_moe"), cfg)
    trained, teacher = [], []

    def hook(module, args):
        (trained if torch.is_grad_enabled() else teacher).append(args[0].shape[1])

    handle = student.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        distill(student, cfg, tiny_tokenizer())
    finally:
        handle.remove()
    return trained, teacher


def test_head_budget_trains_the_logits_of_its_share_of_positions(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path / "x")
    fraction = logit_fraction(tiny_config("qwen3_moe"), 0.05, cfg.data.seq_len)
    assert 0 < fraction < 1
    trained, teacher = _head_rows(corpus, tmp_path / "part", "stage1.head_budget=0.05")
    keep = round(fraction * (cfg.data.seq_len - 1))
    assert trained == [keep] * 3 and teacher == [keep] * 3
    result = json.loads((tmp_path / "part" / "result.json").read_text())
    assert result["logit_share"] == pytest.approx(fraction)
    trained, teacher = _head_rows(corpus, tmp_path / "all")
    assert trained == [cfg.data.seq_len] * 3 and teacher == [cfg.data.seq_len] * 3


def test_the_summary_says_when_stage1_trained_a_share_of_the_positions():
    from zeda.distillation.result import DistillResult

    assert "head_budget" not in DistillResult(output_dir="x").summary()
    assert "10.1% of the positions" in DistillResult(output_dir="x", logit_share=0.101).summary()
