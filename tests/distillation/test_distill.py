"""The distillation loop on tiny models: sparsity rises, teacher stays exact, resume is exact."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from conftest import token_batch

import zeda
from zeda.config import RunConfig, apply_overrides
from zeda.distillation.loop import distill
from zeda.tiny import tiny_corpus, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    with (d / "train.jsonl").open("w") as f:
        for t in tiny_corpus(96):
            f.write(json.dumps({"text": t}) + "\n")
    return d / "train.jsonl"


def _cfg(corpus, out, *extra):
    return apply_overrides(
        RunConfig(),
        [
            f"data.train_file={corpus}",
            "data.seq_len=32",
            "train.batch_size=4",
            f"train.output_dir={out}",
            "train.log_every=2",
            "train.save_every=2",
            "train.lr_schedule=constant",
            "train.warmup_ratio=0.0",
            "stage1.lr=0.01",
            "stage1.steps=6",
            *extra,
        ],
    )


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_balance_loss_raises_zero_share_and_teacher_stays_exact(family, corpus, tmp_path):
    tok = tiny_tokenizer()
    ids = token_batch(2, 16)
    original = tiny_model(family)
    original.set_experts_implementation("eager")
    with torch.no_grad():
        ref = original(ids).logits
    model = tiny_model(family)
    zeda.inject_zero_experts(model)
    with zeda.RouterTelemetry() as before, torch.no_grad():
        model(ids)
    cfg = _cfg(
        corpus, tmp_path / "run", "stage1.steps=20", "balance.alpha=1.0", "balance.target_zero_share=0.75"
    )
    student, result = distill(model, cfg, tok)
    with zeda.RouterTelemetry() as after, torch.no_grad():
        student(ids)
    assert after.zero_share > before.zero_share + 0.05
    with torch.no_grad(), zeda.teacher_mode(student):
        assert torch.equal(student(ids).logits, ref)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(2, 21, 2))
    assert all(k in rows[0] for k in ("loss", "kd", "balance", "zero_share", "tokens_per_s"))
    assert result.stage1_steps == 20 and result.target_zero_share == pytest.approx(0.75)


def test_killed_run_resumes_to_the_same_result(corpus, tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    full, _ = distill(tiny_model("olmoe"), _cfg(corpus, tmp_path / "full"), tok)
    zd = importlib.import_module("zeda.distillation.loop")

    calls = {"n": 0}
    real = zd.save_checkpoint

    def crash_after_first_save(*args, **kwargs):
        real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # checkpoint at step 4 written, then the process "dies"
            raise KeyboardInterrupt

    monkeypatch.setattr(zd, "save_checkpoint", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        distill(tiny_model("olmoe"), _cfg(corpus, tmp_path / "killed"), tok)
    monkeypatch.setattr(zd, "save_checkpoint", real)
    state = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    resumed, _ = distill(tiny_model("olmoe"), _cfg(corpus, tmp_path / "killed", "train.resume=true"), tok)
    a, b = _trainable(full), _trainable(resumed)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)


def test_nan_loss_stops_and_keeps_last_checkpoint(corpus, tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    zd = importlib.import_module("zeda.distillation.loop")

    real = zd.distill_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(zd, "distill_loss", poisoned)
    with pytest.raises(zeda.ZedaError, match="non-finite loss.*stage1 step 4"):
        distill(tiny_model("qwen3_moe"), _cfg(corpus, tmp_path / "run"), tok)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4


def test_existing_output_dir_is_refused(corpus, tmp_path):
    tok = tiny_tokenizer()
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(zeda.ZedaError, match="train.resume=true.*train.overwrite=true"):
        distill(tiny_model("qwen3_moe"), _cfg(corpus, out), tok)
    assert (out / "notes.txt").read_text() == "keep me"


def test_stage2_and_rollout_modes_run(corpus, tmp_path):
    tok = tiny_tokenizer()
    cfg = _cfg(
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
    student, result = distill(tiny_model("glm4_moe"), cfg, tok)
    assert result.stage1_steps == 2 and result.stage2_steps == 2
    assert list((tmp_path / "run").glob("rollouts-*.jsonl"))
    # A re-run reuses the cached rollouts.
    cfg2 = apply_overrides(cfg, ["train.overwrite=true", f"data.rollout_cache={tmp_path / 'run2cache'}"])
    distill(tiny_model("glm4_moe"), cfg2, tok)
    cached = list((tmp_path / "run2cache").glob("rollouts-*.jsonl"))
    assert cached
    mtime = cached[0].stat().st_mtime
    distill(tiny_model("glm4_moe"), apply_overrides(cfg2, []), tok)
    assert cached[0].stat().st_mtime == mtime
    stages = [json.loads(line)["stage"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert "stage1" in stages and "stage2" in stages
