"""Resume, the non-finite stop and checkpoint safety (issue 14), through `distill` on tiny models."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import metrics
from safetensors.torch import load_file
from test_distill import cfg_for

import zeda
import zeda.distillation.trainer as trainer_mod
from zeda.config import apply_overrides
from zeda.distillation.loop import distill
from zeda.distillation.student import build_student, load_run
from zeda.io import atomic_save
from zeda.tiny import tiny_model, tiny_tokenizer


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _killed(monkeypatch, model, cfg, tok, saves: int) -> None:
    """``distill(model, cfg, tok)`` as a process that dies right after its ``saves``-th checkpoint."""
    real = trainer_mod.save_checkpoint
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == saves:
            raise KeyboardInterrupt  # the process "dies" right after this checkpoint

    monkeypatch.setattr(trainer_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        distill(model, cfg, tok)
    monkeypatch.undo()


def test_killed_run_resumes_from_checkpoint_old_without_repeating_metrics(corpus, tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    full, _ = distill(tiny_model("olmoe"), cfg_for(corpus, tmp_path / "full", "train.log_every=1"), tok)
    run = tmp_path / "killed"
    atomic_save(tiny_model("olmoe"), tmp_path / "model", tokenizer=tok)
    cfg = cfg_for(corpus, run, "train.log_every=1", f"model.name_or_path={tmp_path / 'model'}")
    _killed(monkeypatch, tiny_model("olmoe"), cfg, tok, saves=2)
    # The recipe was written at the start: the killed run can be exported.
    student, _, stored, _ = load_run(run)
    assert stored.stage1.steps == 6 and zeda.is_injected(student)
    # The step-2 checkpoint stays until a finite step follows the step-4 one.
    assert json.loads((run / ".checkpoint.old" / "state.json").read_text())["step"] == 2
    # A row logged after the checkpoint, then a crash between the two renames of the next save.
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"stage": "stage1", "step": 5, "loss": 0.0}) + "\n")
    shutil.rmtree(run / ".checkpoint.old")
    (run / "checkpoint").rename(run / ".checkpoint.old")
    (run / ".checkpoint.tmp").mkdir()
    resumed, _ = distill(tiny_model("olmoe"), apply_overrides(cfg, ["train.resume=true"]), tok)
    a, b = _trainable(full), _trainable(resumed)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "checkpoint" / "state.json").read_text()) == {"stage": "stage1", "step": 6}
    assert not (run / ".checkpoint.old").exists()


def test_nan_loss_stops_keeps_a_finite_checkpoint_and_resume_with_lower_lr_finishes(
    corpus, tmp_path, monkeypatch
):
    tok = tiny_tokenizer()
    run = tmp_path / "run"
    real = trainer_mod.Trainer.step
    calls = {"n": 0}

    def poisoned(self, stage, batch):
        calls["n"] += 1
        loss, parts = real(self, stage, batch)
        return (loss * float("nan"), parts) if calls["n"] == 5 else (loss, parts)

    monkeypatch.setattr(trainer_mod.Trainer, "step", poisoned)
    with pytest.raises(zeda.ZedaError, match=r"non-finite loss at stage1 step 4.*lower stage1.lr and resume"):
        distill(tiny_model("qwen3_moe"), cfg_for(corpus, run), tok)
    monkeypatch.undo()
    # The step-4 checkpoint's next step was not finite: the step-2 one (whose next step was) is kept.
    assert json.loads((run / "checkpoint" / "state.json").read_text()) == {"stage": "stage1", "step": 2}
    assert not (run / ".checkpoint.old").exists()
    assert [r["step"] for r in metrics(run)] == [2]
    assert all(
        torch.isfinite(t).all() for t in load_file(run / "checkpoint" / "trainable.safetensors").values()
    )
    # The advised recovery: lower the learning rate and resume; the new lr is the one used.
    cfg = cfg_for(corpus, run, "train.resume=true", "stage1.lr=0.005")
    _, result = distill(tiny_model("qwen3_moe"), cfg, tok)
    assert result.stage1_steps == 6
    rows = metrics(run)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert rows[-1]["lr"] == pytest.approx(0.005)
    assert not (run / ".checkpoint.old").exists()
    assert not (run / "stopped.json").exists()


def test_non_finite_gradients_are_never_applied_or_checkpointed(corpus, tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    run = tmp_path / "run"
    cfg = cfg_for(corpus, run, "train.save_every=2")
    student = build_student(tiny_model("qwen3_moe"), cfg)
    lora = next(p for n, p in student.named_parameters() if "lora_B" in n)
    steps = {"n": 0}

    def poison(grad):  # the 4th backward (stage1 step 3) yields NaN gradients
        steps["n"] += 1
        return grad * float("nan") if steps["n"] == 4 else grad

    lora.register_hook(poison)
    with pytest.raises(zeda.ZedaError, match="non-finite gradients at stage1 step 3"):
        distill(student, cfg, tok)
    assert all(torch.isfinite(p).all() for p in student.parameters())  # the update was discarded
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    assert all(
        torch.isfinite(t).all() for t in load_file(run / "checkpoint" / "trainable.safetensors").values()
    )


def test_resume_refuses_a_changed_recipe_naming_each_difference(corpus, tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    run = tmp_path / "run"
    _killed(monkeypatch, tiny_model("olmoe"), cfg_for(corpus, run), tok, saves=1)
    recipe = (run / "recipe.yaml").read_text()
    with pytest.raises(zeda.ZedaError) as err:
        distill(
            tiny_model("olmoe"), cfg_for(corpus, run, "train.resume=true", "lora.r=4", "lora.alpha=8"), tok
        )
    msg = str(err.value)
    assert "\n" not in msg and "lora.r" in msg and "lora.alpha" in msg
    with pytest.raises(zeda.ZedaError, match="stage1.lr"):  # lr may change only after a non-finite stop
        distill(tiny_model("olmoe"), cfg_for(corpus, run, "train.resume=true", "stage1.lr=0.001"), tok)
    assert (run / "recipe.yaml").read_text() == recipe
    # More steps may be asked for.
    _, result = distill(tiny_model("olmoe"), cfg_for(corpus, run, "train.resume=true", "stage1.steps=8"), tok)
    assert result.stage1_steps == 8


def test_crafted_optimizer_pickle_is_refused_with_one_line(corpus, tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    run = tmp_path / "run"
    _killed(monkeypatch, tiny_model("olmoe"), cfg_for(corpus, run), tok, saves=1)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    torch.save({"optimizer": Payload()}, run / "checkpoint" / "optim.pt")
    with pytest.raises(zeda.ZedaError) as err:
        distill(tiny_model("olmoe"), cfg_for(corpus, run, "train.resume=true"), tok)
    assert "refusing to load" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_two_equal_steps_give_equal_logged_losses(corpus, tmp_path):
    """Sanity: the loop logs finite numbers (guards the bookkeeping the stop relies on)."""
    _, result = distill(
        tiny_model("olmoe"), cfg_for(corpus, tmp_path / "run", "stage1.steps=2"), tiny_tokenizer()
    )
    assert math.isfinite(result.last["loss"]) and result.tokens_seen > 0


def test_share_controller_follows_its_law_and_a_resumed_run_restores_its_weight(
    corpus, tmp_path, monkeypatch
):
    """balance.share_gain: each logged step's w is the previous one moved by the gain times the
    previous step's shortfall, and a killed run resumes bit-exactly (w is in the checkpoint)."""
    tok = tiny_tokenizer()
    extra = ("train.log_every=1", "balance.target_zero_share=0.75", "balance.share_gain=0.5")
    full, _ = distill(tiny_model("olmoe"), cfg_for(corpus, tmp_path / "full", *extra), tok)
    rows = metrics(tmp_path / "full")
    assert len(rows) == 6 and all("balance_w" in r for r in rows)
    for before, after in zip(rows, rows[1:], strict=False):
        assert after["balance_w"] == pytest.approx(
            before["balance_w"] * math.exp(0.5 * (0.75 - before["zero_share"])), rel=1e-9
        )
    # The checkpoint holds the weight the next step would use (the one a resume continues with).
    state = json.loads((tmp_path / "full" / "checkpoint" / "state.json").read_text())
    assert state.keys() == {"stage", "step", "balance_w"} and state["step"] == 6
    assert state["balance_w"] == pytest.approx(
        rows[-1]["balance_w"] * math.exp(0.5 * (0.75 - rows[-1]["zero_share"])), rel=1e-9
    )
    run = tmp_path / "killed"
    atomic_save(tiny_model("olmoe"), tmp_path / "model", tokenizer=tok)
    cfg = cfg_for(corpus, run, *extra, f"model.name_or_path={tmp_path / 'model'}")
    _killed(monkeypatch, tiny_model("olmoe"), cfg, tok, saves=2)
    resumed, _ = distill(tiny_model("olmoe"), apply_overrides(cfg, ["train.resume=true"]), tok)
    a, b = _trainable(full), _trainable(resumed)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)
    assert [r["balance_w"] for r in metrics(run)] == [r["balance_w"] for r in rows]
