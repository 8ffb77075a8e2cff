"""Rehearsal at DeepSeek-V3's router shape: sigmoid scores + correction bias, group-limited
top-8 (n_group 8, topk_group 4) over the real E = 256 routed experts, Z = 128 zero experts; a
small hidden size and vocabulary so that enough optimisation steps run on 2 CPU cores.

The balance loss counts the routers' real (biased, group-limited) selections, so the zero share
the model really skips must land on the recipe's target; it is measured here with plain forward
hooks on held-out text after training, not with zeda's counters.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config

import zeda
from zeda.config import RunConfig, apply_overrides
from zeda.distillation.student import build_student
from zeda.tiny import tiny_corpus, tiny_tokenizer

from .probe import RouterProbe, real_config, share

pytestmark = pytest.mark.rehearsal

TARGET, STEPS = 0.4, 40


def test_group_limited_sigmoid_router_reaches_the_target_share(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_qwen3_shape: tiny per-expert ops, oversubscribed machine
    try:
        _run(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _run(tmp_path):
    config = DeepseekV3Config(
        **real_config(
            "deepseek-v3",
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            intermediate_size=96,
            moe_intermediate_size=8,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            rope_scaling=None,
            max_position_embeddings=256,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    assert (config.n_routed_experts, config.n_group, config.topk_group, config.num_experts_per_tok) == (
        256,
        8,
        4,
        8,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():  # a trained checkpoint's correction bias is not zero
        for m in model.modules():
            if isinstance(getattr(m, "e_score_correction_bias", None), torch.Tensor):
                m.e_score_correction_bias.copy_(torch.rand_like(m.e_score_correction_bias) * 0.1)
    zeda.inject_zero_experts(model, seed=0)
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(96)))
    cfg = apply_overrides(
        RunConfig(),
        [
            f"data.train_file={corpus}",
            f"data.eval_file={corpus}",
            "data.seq_len=32",
            "data.chat_template=false",
            f"stage1.steps={STEPS}",
            "stage1.lr=5e-3",
            "stage1.kd=forward_kl",
            f"balance.target_zero_share={TARGET}",
            "balance.alpha=1.0",
            "train.batch_size=4",
            "train.grad_accum=2",
            "train.warmup_ratio=0",
            "train.lr_schedule=constant",
            "train.log_every=5",
            "train.save_every=0",
            f"train.output_dir={tmp_path / 'run'}",
            "train.eval_every=0",  # the probe counts every forward: no validation forwards
            "train.verdict=false",
        ],
    )
    tok = tiny_tokenizer()
    student = build_student(model, cfg)
    probe = RouterProbe(student)
    probe.phase = "distill"
    student, result = zeda.distill(student, cfg, tok)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    trajectory = [round(r["zero_share"], 4) for r in rows]
    assert result.target_zero_share == pytest.approx(TARGET)

    # The logged share of the last window is the routers' real choice (hooks, real tokens).
    train = probe.select("distill", grad=True)
    assert rows[-1]["zero_share"] == pytest.approx(share(train[-5 * 2 :]), abs=1e-9)

    # The share the trained model really skips on held-out text, counted by the hooks.
    probe.phase = "heldout"
    student.eval()
    blocks = torch.tensor(
        tok("\n".join(tiny_corpus(40)[-20:]), add_special_tokens=False)["input_ids"][: 16 * 32]
    ).view(16, 32)
    with torch.no_grad():
        student(input_ids=blocks)
    achieved = share(probe.select("heldout"))
    probe.close()
    assert abs(achieved - TARGET) <= 0.02, f"achieved {achieved:.4f}, target {TARGET}, logged {trajectory}"
    assert abs(result.final_zero_share - TARGET) <= 0.02
