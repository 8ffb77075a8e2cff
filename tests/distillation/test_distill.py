"""The distillation loop on tiny models: sparsity rises, teacher stays exact, every expert trains."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import metrics, run_config, token_batch

import zeda
from zeda.config import RunConfig, apply_overrides
from zeda.distillation.loop import distill
from zeda.distillation.student import build_student
from zeda.tiny import tiny_model, tiny_tokenizer
from zeda.zero.routing import zero_routers


def cfg_for(corpus, out, *extra):
    return run_config(
        corpus,
        out,
        "train.log_every=2",
        "train.save_every=2",
        "train.lr_schedule=constant",
        "train.warmup_ratio=0.0",
        "stage1.lr=0.01",
        "stage1.steps=6",
        # Validation (best checkpoint, verdict) is tested in test_validation.py; off here, where
        # it would cost most of each tiny run's time.
        "train.eval_every=0",
        "train.verdict=false",
        *extra,
    )


# One family per router kind (and MiniMax-M2's block-held correction bias).
@pytest.mark.parametrize(
    "family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "deepseek_v2", "llama4_text", "minimax_m2"]
)
def test_balance_loss_raises_zero_share_and_teacher_stays_exact(family, corpus, tmp_path):
    tok = tiny_tokenizer()
    ids = token_batch(2, 16)
    original = tiny_model(family)
    original.set_experts_implementation("eager")
    with torch.no_grad():
        ref = original(ids).logits
    model = tiny_model(family)
    zeda.inject_zero_experts(model)
    with zeda.RouterTelemetry(model) as before, torch.no_grad():
        model(ids)
    cfg = cfg_for(
        corpus, tmp_path / "run", "stage1.steps=20", "balance.alpha=1.0", "balance.target_zero_share=0.75"
    )
    student, result = distill(model, cfg, tok)
    with zeda.RouterTelemetry(student) as after, torch.no_grad():
        student(ids)
    assert after.zero_share > before.zero_share + 0.05
    with torch.no_grad(), zeda.teacher_mode(student):
        assert torch.equal(student(ids).logits, ref)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(2, 21, 2))
    assert all(k in rows[0] for k in ("loss", "kd", "balance", "zero_share", "tokens_per_s"))
    assert result.stage1_steps == 20 and result.target_zero_share == pytest.approx(0.75)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_every_routed_experts_lora_slice_trains_and_frozen_weights_stay(family, corpus, tmp_path):
    """Through `distill` with weight decay 0: a parameter changes only if it received gradient."""
    tok = tiny_tokenizer()
    cfg = cfg_for(corpus, tmp_path / "run", "train.weight_decay=0.0", "stage1.steps=4")
    original = tiny_model(family)
    original.set_experts_implementation("eager")
    ids = token_batch(2, 12, seed=5)
    with torch.no_grad():
        ref = original(ids).logits
    student = build_student(tiny_model(family), cfg)
    with torch.no_grad(), zeda.teacher_mode(student):
        assert torch.equal(student(ids).logits, ref)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    routed: dict[int, set[int]] = {}
    layer_of = {
        id(m): int(n.split(".layers.")[1].split(".")[0])
        for n, m in student.named_modules()
        if ".layers." in n
    }

    def record(module, args, out):
        if module.routes_to_zero and torch.is_grad_enabled():
            idx = out[2].reshape(-1)
            routed.setdefault(layer_of[id(module)], set()).update(idx[idx < module.num_experts].tolist())

    handles = [r.register_forward_hook(record) for r in zero_routers(student)]
    try:
        student, _ = distill(student, cfg, tok)
    finally:
        for h in handles:
            h.remove()
    layers = zeda.find_moe_layers(student)
    e = layers[0].router.num_experts
    r = cfg.lora.r
    checked = 0
    for n, p in student.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
            continue
        if "lora_" not in n:  # router copies train in full
            assert not torch.equal(p, before[n]), n
            continue
        layer = int(n.split(".layers.")[1].split(".")[0])
        for x in range(e):
            # PEFT's layout for 3-D expert weights: A is (E*r, in) expert-major, B is (out, r*E)
            # rank-major (expert x owns columns x, x+E, ...).
            sl = (
                (slice(x * r, (x + 1) * r), slice(None))
                if "lora_A" in n
                else (slice(None), slice(x, None, e))
            )
            changed = not torch.equal(p[sl], before[n][sl])
            assert changed == (x in routed[layer]), (
                f"{n} expert {x}: changed={changed}, routed={x in routed[layer]}"
            )
            checked += 1
    assert checked > 0
    with torch.no_grad(), zeda.teacher_mode(student):
        assert torch.equal(student(ids).logits, ref)


def test_zero_share_logged_is_the_routers_real_selection(corpus, tmp_path):
    """DeepSeek-style sigmoid+bias, group-limited router: logged share == count of real indices."""
    tok = tiny_tokenizer()
    cfg = cfg_for(corpus, tmp_path / "run", "stage1.steps=2", "train.grad_accum=2", "stage1.kd=nll")
    student = build_student(tiny_model("deepseek_v3"), cfg)
    with torch.no_grad():  # a correction bias makes real selection differ from a plain top-k
        for r in zero_routers(student):
            r.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, r.e_score_correction_bias.numel()))
    counts = [0, 0]

    def record(module, args, out):
        if module.routes_to_zero and torch.is_grad_enabled():
            counts[0] += int((out[2] >= module.num_experts).sum())
            counts[1] += out[2].numel()

    handles = [r.register_forward_hook(record) for r in zero_routers(student)]
    try:
        distill(student, cfg, tok)
    finally:
        for h in handles:
            h.remove()
    (row,) = metrics(tmp_path / "run")
    assert row["zero_share"] == pytest.approx(counts[0] / counts[1], abs=1e-9)


def _train_inputs(cfg) -> list[torch.Tensor]:
    """Distil a tiny qwen3_moe with ``cfg``; the token ids of every student training forward
    (grad enabled), in order."""
    student = build_student(tiny_model("qwen3_moe"), cfg)
    seen: list[torch.Tensor] = []

    def hook(module, args):
        if torch.is_grad_enabled():
            seen.append(args[0].clone())

    handle = student.get_input_embeddings().register_forward_pre_hook(hook)
    try:
        distill(student, cfg, tiny_tokenizer())
    finally:
        handle.remove()
    return seen


def test_rollout_stage1_gives_every_micro_step_different_rows(corpus, tmp_path):
    cfg = cfg_for(
        corpus,
        tmp_path / "run",
        "stage1.mode=rollout",
        "stage1.kd=nll",
        "stage1.steps=2",
        "stage1.max_new_tokens=4",
        "train.grad_accum=2",
        "train.batch_size=2",
        "data.max_prompts=16",
    )
    seen = _train_inputs(cfg)
    assert len(seen) == 4  # 2 steps x 2 micro-steps
    rows = [tuple(map(tuple, x.tolist())) for x in seen]
    assert len(set(rows)) == 4, "two micro-steps trained on the same rows"


def test_stage2_draws_num_prompts_per_step_per_optimisation_step(corpus, tmp_path):
    cfg = cfg_for(
        corpus,
        tmp_path / "run",
        "stage1.enabled=false",
        "stage2.enabled=true",
        "stage2.steps=2",
        "stage2.num_prompts_per_step=4",
        "stage2.max_new_tokens=3",
        "train.grad_accum=2",
        "data.max_prompts=16",
    )
    seen = _train_inputs(cfg)
    assert [x.shape[0] for x in seen] == [2, 2, 2, 2]  # 4 prompts per step, 2 per micro-step


def test_stage2_and_rollout_modes_run_and_cache_only_when_asked(corpus, tmp_path):
    tok = tiny_tokenizer()
    cfg = cfg_for(
        corpus,
        tmp_path / "run",
        "stage1.mode=rollout",
        "stage1.kd=nll",
        "stage1.steps=2",
        "stage1.max_new_tokens=6",
        "stage2.enabled=true",
        "stage2.steps=2",
        "stage2.num_prompts_per_step=2",
        "stage2.max_new_tokens=6",
        "data.max_prompts=8",
    )
    _, result = distill(tiny_model("glm4_moe"), cfg, tok)
    assert result.stage1_steps == 2 and result.stage2_steps == 2
    assert not list((tmp_path / "run").glob("rollouts-*.jsonl"))  # rollout_cache: None = no cache
    stages = [r["stage"] for r in metrics(tmp_path / "run")]
    assert "stage1" in stages and "stage2" in stages
    cfg2 = apply_overrides(cfg, ["train.overwrite=true", f"data.rollout_cache={tmp_path / 'cache'}"])
    distill(tiny_model("glm4_moe"), cfg2, tok)
    (cached,) = list((tmp_path / "cache").glob("rollouts-*.jsonl"))
    mtime = cached.stat().st_mtime
    distill(tiny_model("glm4_moe"), cfg2, tok)
    assert cached.stat().st_mtime == mtime


def test_max_prompts_none_means_all(tmp_path):
    from zeda.distillation.data import load_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": f"prompt {i}"}) + "\n" for i in range(5000)))
    cfg = apply_overrides(RunConfig(), [f"data.prompt_file={path}"])
    assert cfg.data.max_prompts is None
    assert len(load_prompts(cfg, tiny_tokenizer())) == 5000
    assert len(load_prompts(apply_overrides(cfg, ["data.max_prompts=7"]), tiny_tokenizer())) == 7


_RUN = """
import json, sys
from zeda.config import RunConfig, apply_overrides
from zeda.distillation.loop import distill
from zeda.tiny import tiny_model, tiny_tokenizer
cfg = apply_overrides(RunConfig(), json.loads(sys.argv[1]))
distill(tiny_model("olmoe"), cfg, tiny_tokenizer())
"""


def test_two_fresh_runs_in_separate_processes_are_bit_equal(corpus, tmp_path):
    outs = []
    for name in ("a", "b"):
        cfg_list = [
            f"data.train_file={corpus}",
            f"data.eval_file={corpus}",
            "data.seq_len=32",
            "train.batch_size=2",
            "stage1.steps=2",
            "train.seed=3",
            f"train.output_dir={tmp_path / name}",
        ]
        res = subprocess.run(
            [sys.executable, "-c", _RUN, json.dumps(cfg_list)], capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append((tmp_path / name / "checkpoint" / "trainable.safetensors").read_bytes())
    assert outs[0] == outs[1]


def test_the_model_is_prepared_once_for_both_stages(corpus, tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator()
    cfg = cfg_for(
        corpus,
        tmp_path / "run",
        "stage1.steps=1",
        "stage2.enabled=true",
        "stage2.steps=1",
        "stage2.num_prompts_per_step=2",
        "stage2.max_new_tokens=3",
        "data.max_prompts=4",
    )
    distill(tiny_model("qwen3_moe"), cfg, tiny_tokenizer(), accelerator=accelerator)
    assert len(accelerator._models) == 1  # one wrap, not one per stage


def test_router_lr_scale_gives_routers_their_own_learning_rate(corpus, tmp_path):
    """Adam's first step moves each weight by about its group's lr: routers by lr x scale."""
    tok = tiny_tokenizer()
    model = tiny_model("qwen3_moe")
    zeda.inject_zero_experts(model)
    cfg = cfg_for(
        corpus,
        tmp_path / "run",
        "stage1.steps=1",
        "stage1.lr=0.001",
        "lora.router_lr_scale=10",
        "train.max_grad_norm=1e9",
    )
    student = build_student(model, cfg)
    before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    student, _ = distill(student, cfg, tok)
    after = dict(student.named_parameters())
    moved = {n: float((after[n].detach() - b).abs().max()) for n, b in before.items()}
    router = [v for n, v in moved.items() if "modules_to_save" in n]
    lora = [v for n, v in moved.items() if "lora_B" in n]
    assert router and lora
    assert all(v == pytest.approx(0.01, rel=0.05) for v in router)
    assert all(v == pytest.approx(0.001, rel=0.05) for v in lora)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_router_rows_zero_trains_only_the_zero_rows(family, corpus, tmp_path):
    """``lora.router_rows=zero`` with weight decay: real rows (and gpt-oss's real biases) stay
    bit-equal, zero rows and LoRA move, the teacher stays exact; ``all`` moves the real rows."""
    tok = tiny_tokenizer()
    ids = token_batch(2, 12, seed=3)
    original = tiny_model(family)
    original.set_experts_implementation("eager")
    with torch.no_grad():
        ref = original(ids).logits
    for rows in ("zero", "all"):
        cfg = cfg_for(corpus, tmp_path / rows, f"lora.router_rows={rows}", "train.weight_decay=0.1")
        student = build_student(tiny_model(family), cfg)
        before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
        student, _ = distill(student, cfg, tok)
        after = dict(student.named_parameters())
        e = zeda.find_moe_layers(student)[0].router.num_experts
        routers = [n for n in before if "modules_to_save" in n]
        assert routers and any("lora_" in n for n in before)
        for n, b in before.items():
            if n in routers:
                assert torch.equal(after[n][:e], b[:e]) == (rows == "zero"), n
                assert not torch.equal(after[n][e:], b[e:]), n
            else:
                assert not torch.equal(after[n], b), n
        with torch.no_grad(), zeda.teacher_mode(student):
            assert torch.equal(student(ids).logits, ref)


def test_router_rows_must_be_all_or_zero():
    with pytest.raises(zeda.ZedaError, match="lora.router_rows.*'all' or 'zero'"):
        apply_overrides(RunConfig(), ["lora.router_rows=real"]).validate()


def test_balance_per_layer_false_reaches_the_trainer(corpus, tmp_path, monkeypatch):
    """``balance.per_layer=false`` is what the loop's balance tracker uses (and ``true`` by default)."""
    import zeda.distillation.trainer as trainer_mod

    seen = []
    real = trainer_mod.BalanceTracker

    def spy(*args, **kwargs):
        tracker = real(*args, **kwargs)
        seen.append(tracker.per_layer)
        return tracker

    monkeypatch.setattr(trainer_mod, "BalanceTracker", spy)
    tok = tiny_tokenizer()
    for value in ("false", "true"):
        cfg = cfg_for(corpus, tmp_path / value, f"balance.per_layer={value}")
        distill(build_student(tiny_model("qwen3_moe"), cfg), cfg, tok)
    assert seen and seen[0] is False and seen[-1] is True
