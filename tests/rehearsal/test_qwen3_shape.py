"""Rehearsal at Qwen3-30B-A3B's real shapes: the whole pipeline, checked from the outside.

Real vocabulary (151,936) and the vendored Qwen3 tokenizer, the real E = 128 routed experts,
top-8, Z = 64 zero experts; a small hidden size and one layer so that it runs on 2 CPU cores.
The pipeline is the public one (`zeda.pipeline.run`'s steps): inject, distill with rollout
stage 1 (grad_accum 4) and stage 2, evaluate, export. Every figure zeda reports is compared
with an independent count from plain forward hooks (`probe.RouterProbe`).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

import zeda
from zeda.config import RunConfig, apply_overrides
from zeda.distillation.student import build_student

from .probe import ASSETS, REPO, LargestTensor, RouterProbe, peak_rss, real_config, reset_peak_rss, share

pytestmark = pytest.mark.rehearsal

GA, BS, STEPS1, STEPS2, PROMPTS2, SEQ, EVAL_BATCH = 4, 2, 2, 2, 8, 64, 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One full pipeline run at real shapes, with the probe attached; shared by the checks."""
    threads = torch.get_num_threads()
    # One thread: the 128-expert scatter-adds are tiny, and on an oversubscribed machine OpenMP
    # barriers make them 100x slower than on one thread.
    torch.set_num_threads(1)
    try:
        yield _pipeline(tmp_path_factory.mktemp("qwen3"))
    finally:
        torch.set_num_threads(threads)


def _pipeline(tmp):
    tok = AutoTokenizer.from_pretrained(ASSETS / "qwen3_tokenizer")
    cfg_dict = real_config(
        "qwen3-30b-a3b",
        hidden_size=64,
        num_hidden_layers=1,
        max_window_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        moe_intermediate_size=16,
        max_position_embeddings=512,
    )
    config = Qwen3MoeConfig(**cfg_dict)
    assert (config.vocab_size, config.num_experts, config.num_experts_per_tok) == (151_936, 128, 8)
    assert len(tok) <= config.vocab_size
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    injection = zeda.inject_zero_experts(model, num_zero_experts=64, seed=0)

    cfg = apply_overrides(
        RunConfig(),
        [
            f"data.train_file={REPO / 'evals/reference/data/train_sample.jsonl'}",
            f"data.eval_file={REPO / 'evals/reference/data/validation.jsonl'}",
            f"data.seq_len={SEQ}",
            "data.max_prompts=16",
            "data.chat_template=true",
            "stage1.mode=rollout",
            f"stage1.steps={STEPS1}",
            "stage1.max_new_tokens=8",
            "stage1.rollout_batch_size=8",
            "stage1.lr=1e-3",
            "stage2.enabled=true",
            f"stage2.steps={STEPS2}",
            f"stage2.num_prompts_per_step={PROMPTS2}",
            "stage2.max_new_tokens=6",
            f"train.batch_size={BS}",
            f"train.grad_accum={GA}",
            "train.log_every=1",
            "train.save_every=0",
            f"train.output_dir={tmp / 'run'}",
            "eval.tasks=[]",
            f"eval.max_eval_tokens={EVAL_BATCH * SEQ}",
            "eval.baselines=[]",
            "eval.zero_bias_sweep=[]",
            "train.eval_every=0",  # the probe counts every forward: no validation forwards
            "train.verdict=false",
        ],
    )
    student = build_student(model, cfg)
    probe = RouterProbe(student)
    probe.phase = "distill"
    student, result = zeda.distill(student, cfg, tok)

    probe.phase = "eval"
    big = LargestTensor()
    before = reset_peak_rss()
    with big:
        evaluation = zeda.evaluate(student, cfg, tok, batch_size=EVAL_BATCH, progress=False)
    eval_peak = peak_rss() - before

    probe.phase = "export"
    out = zeda.export(student, tmp / "export", tokenizer=tok)
    probe.close()
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").open()]
    return dict(
        tok=tok, cfg=cfg, student=student, result=result, evaluation=evaluation, probe=probe,
        rows=rows, export=out, eval_peak=eval_peak, largest=big, injection=injection,
    )  # fmt: skip


def _steps(forwards, ga):
    assert len(forwards) % ga == 0
    return [forwards[i : i + ga] for i in range(0, len(forwards), ga)]


def _training(run):
    """The student's training forwards (autograd on), split into stage 1 and stage 2 steps."""
    train = run["probe"].select("distill", grad=True)
    assert len(train) == (STEPS1 + STEPS2) * GA  # one forward per micro-step, nothing else
    return _steps(train[: STEPS1 * GA], GA), _steps(train[STEPS1 * GA :], GA)


def test_logged_zero_share_is_the_routers_real_choice(run):
    s1, s2 = _training(run)
    logged = {(r["stage"], r["step"]): r["zero_share"] for r in run["rows"]}
    assert sorted(logged) == [("stage1", 1), ("stage1", 2), ("stage2", 1), ("stage2", 2)]
    for name, steps in (("stage1", s1), ("stage2", s2)):
        for i, step in enumerate(steps, 1):
            # zeda logs one share per optimisation step: all 4 micro-steps, real tokens only.
            assert logged[(name, i)] == pytest.approx(share(step), abs=1e-9), (name, i)
    assert run["result"].final_zero_share == pytest.approx(share(s2[-1]), abs=1e-9)


def test_every_micro_step_sees_different_rows(run):
    s1, s2 = _training(run)
    for step in s1 + s2:
        rows = [row for f in step for row in f.rows()]
        assert len(set(rows)) == len(rows) == sum(len(f.ids) for f in step), "micro-steps repeated rows"
    # Stage 1 walks through the 16 teacher rollouts without repeating one (2 steps x 4 x 2 rows).
    stage1_rows = [row for step in s1 for f in step for row in f.rows()]
    assert len(set(stage1_rows)) == STEPS1 * GA * BS == 16


def test_stage2_draws_the_documented_prompts_per_step(run):
    _, s2 = _training(run)
    for step in s2:
        # stage2.num_prompts_per_step sequences per optimisation step, split over the micro-steps.
        assert [len(f.ids) for f in step] == [PROMPTS2 // GA] * GA
    # The student sampled exactly those prompts: one prefill per micro-step, 2 prompts each.
    prefills = [f for f in run["probe"].select("distill", grad=False) if f.ids.shape[1] > 1]
    assert Counter(len(f.ids) for f in prefills) == Counter({PROMPTS2 // GA: STEPS2 * GA})


def test_evaluation_share_is_the_routers_real_choice(run):
    ev = run["evaluation"]
    forwards = run["probe"].select("eval")
    assert forwards and all(not f.grad for f in forwards)
    assert ev.zero_share == pytest.approx(share(forwards), abs=1e-9)
    assert ev.num_experts == 128 and ev.num_zero_experts == 64 and ev.top_k == 8


def test_evaluation_memory_is_bounded_at_real_vocabulary(run):
    full = EVAL_BATCH * SEQ * 151_936 * 4  # one fp32 (B, T, V) copy: 622 MB
    largest = run["largest"]
    assert largest.largest <= full / 8, f"a {largest.shape} tensor of {largest.largest / 2**20:.0f} MiB"
    assert run["eval_peak"] < full / 2, f"evaluation peak +{run['eval_peak'] / 2**20:.0f} MiB"


def test_export_reloads_with_the_students_logits(run):
    tok, student = run["tok"], run["student"]
    reloaded = AutoModelForCausalLM.from_pretrained(run["export"]).eval()
    ids = tok("The burden which Habakkuk the prophet did see.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = student(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    assert got.shape[-1] == 151_936
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
