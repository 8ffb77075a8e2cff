"""Sharded (FSDP2) training on CPU: two gloo processes under ``accelerate launch --use_fsdp``.

accelerate 1.15 applies FSDP only to accelerator-backed process groups; on CPU it would wrap the
model in DDP and ignore the FSDP options (``DistributedType.MULTI_CPU``). zeda shards the student
itself in that case (`zeda.distillation.sharding`). These tests check, on a tiny Qwen3-MoE:

- every rank holds only its shards (DTensor parameters, local element count below the full one);
- the loss trajectory of 2 sharded processes equals, step by step, that of 1 process with the same
  global batch;
- the consolidated checkpoint of a sharded run resumes (model and optimiser state) on the
  trajectory of an uninterrupted run;
- ``zeda distill`` under FSDP exports a consolidated model whose logits equal those of the
  1-process student;
- with ``train.gradient_checkpointing`` the sharded run still follows that trajectory and counts
  the same zero slots (a recompute in backward is never counted).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import LAUNCH_ENV, free_port

import zeda
from zeda.config import RunConfig, apply_overrides, save_recipe
from zeda.distillation.sharding import cpu_fsdp2_plugin
from zeda.io import atomic_save, load, load_tokenizer
from zeda.tiny import tiny_corpus, tiny_model, tiny_tokenizer

WORKER = Path(__file__).with_name("fsdp_worker.py")
STEPS = 4


def _fsdp_launch(ram_efficient: bool = False) -> list[str]:
    """accelerate's FSDP2 launch of 2 CPU processes (a fixed free port: port 0 can hang here)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
        "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap", "Qwen3MoeDecoderLayer",
        "--fsdp_cpu_ram_efficient_loading", "true" if ram_efficient else "false",
    ]  # fmt: skip


def _recipe(root: Path, out: str, batch_size: int, steps: int, *extra: str) -> RunConfig:
    return apply_overrides(
        RunConfig(),
        [
            f"model.name_or_path={root / 'model'}",
            f"data.train_file={root / 'train.jsonl'}",
            f"data.eval_file={root / 'train.jsonl'}",
            "data.seq_len=32",
            f"stage1.steps={steps}",
            "stage1.lr=1e-2",
            f"train.batch_size={batch_size}",
            "train.log_every=1",
            "train.save_every=0",
            "train.warmup_ratio=0",
            "train.lr_schedule=constant",  # a resume may then extend the stage without changing the lr
            "train.eval_every=2",  # the whole run and the half run + resume validate at the same steps
            f"train.output_dir={root / out}",
            "balance.target_zero_share=0.5",
            *extra,
        ],
    )


def _losses(run: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny model, a corpus, and the 1-process reference run (4 sequences per step)."""
    root = tmp_path_factory.mktemp("fsdp")
    atomic_save(tiny_model("qwen3_moe"), root / "model", tokenizer=tiny_tokenizer())
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(96)))
    cfg = _recipe(root, "one", 4, STEPS)
    student, _ = zeda.distill(load(root / "model"), cfg, load_tokenizer(root / "model"))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = student.eval()(input_ids=ids).logits
    return {
        "root": root,
        "losses": _losses(root / "one"),
        "shares": _losses(root / "one", "zero_share"),
        "ids": ids,
        "logits": logits,
    }


@pytest.fixture(scope="module")
def sharded_half(world):
    """2 FSDP2 processes x 2 sequences train the first half of the steps (fixture: the resume test
    continues this run)."""
    root = world["root"]
    save_recipe(_recipe(root, "two", 2, STEPS // 2), root / "two.yaml")
    res = subprocess.run(
        [*_fsdp_launch(), str(WORKER), str(root), str(root / "two.yaml")],
        env=LAUNCH_ENV, capture_output=True, text=True, timeout=600, cwd=root,
    )  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_sharded_processes_hold_shards_and_follow_the_one_process_trajectory(world, sharded_half):
    ranks = sharded_half
    # accelerate alone would not shard on CPU (MULTI_CPU); zeda's FSDP2 did: one unit per
    # decoder layer plus the root, every parameter (frozen or trained) a DTensor shard.
    assert {r["distributed_type"] for r in ranks} == {"DistributedType.MULTI_CPU"}
    assert {r["model"] for r in ranks} == {"FSDPZedaQwen3MoeForCausalLM"}
    layers = tiny_model("qwen3_moe").config.num_hidden_layers
    assert {r["fsdp_units"] for r in ranks} == {layers + 1}
    assert {r["generate_syncs_ranks"] for r in ranks} == {True}
    for name in ranks[0]["params"]:
        p0, p1 = ranks[0]["params"][name], ranks[1]["params"][name]
        assert p0["dtensor"] and p1["dtensor"], name
        assert p0["full"] == p1["full"] and p0["local"] + p1["local"] == p0["full"], name
    for r in ranks:
        local = sum(p["local"] for p in r["params"].values())
        full = sum(p["full"] for p in r["params"].values())
        assert 0 < local < full and local == pytest.approx(full / 2, rel=0.05)
        trained = [p for p in r["params"].values() if p["trainable"]]
        assert trained and sum(p["local"] for p in trained) < sum(p["full"] for p in trained)

    # The logged loss is the global batch's; it equals 1 process with 4 sequences per step.
    two = _losses(world["root"] / "two")
    assert len(two) == STEPS // 2
    assert two == pytest.approx(world["losses"][: STEPS // 2], rel=1e-4, abs=1e-6)


def test_sharded_checkpoint_resumes_and_exports_consolidated(world, sharded_half, tmp_path):
    root = world["root"]
    run = tmp_path / "two"
    shutil.copytree(root / "two", run)  # this test's own copy of the half-trained sharded run
    ckpt = run / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text()) == {"stage": "stage1", "step": STEPS // 2}
    # The checkpoint is consolidated: full tensors and the optimiser state of every parameter.
    optim = torch.load(ckpt / "optim.pt", weights_only=True)["optimizer"]
    assert len(optim["state"]) == len(optim["param_groups"][0]["params"]) > 0

    # `zeda distill` under FSDP2: resume to STEPS, then export (consolidated on the main process).
    cfg = _recipe(root, "two", 2, STEPS, "train.resume=true", f"train.output_dir={run}")
    save_recipe(cfg, tmp_path / "resume.yaml")
    cmd = [*_fsdp_launch(), "-m", "zeda.cli", "distill", str(tmp_path / "resume.yaml")]
    res = subprocess.run(cmd, env=LAUNCH_ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]

    # Resumed on the uninterrupted trajectory: the step after the resume depends on the restored
    # weights, the one after that also on the restored Adam moments.
    assert _losses(run) == pytest.approx(world["losses"], rel=1e-4, abs=1e-6)
    assert json.loads((ckpt / "state.json").read_text()) == {"stage": "stage1", "step": STEPS}

    # The export reloads as a plain model with the 1-process student's logits.
    exported = load(run / "export")
    with torch.no_grad():
        logits = exported(input_ids=world["ids"]).logits
    torch.testing.assert_close(logits, world["logits"], rtol=1e-4, atol=1e-4)


def test_checkpointed_sharded_run_follows_the_one_process_trajectory(world, tmp_path):
    # transformers' per-layer activation checkpointing inside FSDP2's units (its hooks stay outside
    # the recomputed call): the same losses and zero-slot shares as 1 unsharded process without it.
    root = world["root"]
    cfg = _recipe(root, "ckpt", 2, STEPS // 2, "train.gradient_checkpointing=true")
    save_recipe(cfg, tmp_path / "ckpt.yaml")
    cmd = [*_fsdp_launch(), "-m", "zeda.cli", "distill", str(tmp_path / "ckpt.yaml")]
    res = subprocess.run(cmd, env=LAUNCH_ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    run = root / "ckpt"
    assert _losses(run) == pytest.approx(world["losses"][: STEPS // 2], rel=1e-4, abs=1e-6)
    assert _losses(run, "zero_share") == pytest.approx(world["shares"][: STEPS // 2], rel=1e-9)
    assert (run / "checkpoint" / "trainable.safetensors").is_file()


def test_sharded_rollouts_and_on_policy_stage(world, tmp_path):
    # Teacher rollouts (stage 1) and student samples (stage 2) generate on every rank with a
    # sharded model: generation goes through the FSDP root and keeps the ranks in step.
    root = world["root"]
    cfg = _recipe(
        root, "rollout", 2, 2,
        "data.max_prompts=8", "stage1.mode=rollout", "stage1.kd=nll", "stage1.max_new_tokens=4",
        "stage1.rollout_batch_size=8", "stage2.enabled=true", "stage2.steps=1",
        "stage2.num_prompts_per_step=4", "stage2.max_new_tokens=3", f"train.output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    save_recipe(cfg, tmp_path / "rollout.yaml")
    cmd = [*_fsdp_launch(), "-m", "zeda.cli", "distill", str(tmp_path / "rollout.yaml")]
    res = subprocess.run(cmd, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [(r["stage"], r["step"]) for r in rows] == [("stage1", 1), ("stage1", 2), ("stage2", 1)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (tmp_path / "run" / "export" / "config.json").is_file()


@pytest.mark.parametrize("init", ["threshold", "relative"])
def test_ram_efficient_sharded_start_is_solved_once_and_broadcast(world, tmp_path, init):
    """``inject.init=threshold|relative`` under FSDP2 with RAM-efficient loading: rank 1 holds
    placeholder weights until sharding, so only rank 0 can solve the start; its zero rows and
    zero-logit bias reach rank 1 (`zeda.zero.start.start_at_share`), and rank 0's weights reach
    rank 1's shards (`zeda.distillation.sharding.shard_fsdp2`): the 1-process trajectory."""
    root = world["root"]
    extra = (f"inject.init={init}", "inject.num_zero_experts=4")
    one = _recipe(root, f"one_{init}", 4, STEPS // 2, *extra)
    zeda.distill(load(root / "model"), one, load_tokenizer(root / "model"))
    save_recipe(_recipe(root, f"two_{init}", 2, STEPS // 2, *extra), tmp_path / "two.yaml")
    out = tmp_path / "ranks"
    out.mkdir()
    res = subprocess.run(
        [*_fsdp_launch(ram_efficient=True), str(WORKER), str(out), str(tmp_path / "two.yaml")],
        env={**LAUNCH_ENV, "ZEDA_TEST_PLACEHOLDER_WEIGHTS": "1"}, capture_output=True, text=True, timeout=600,
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["zero_logit_bias"] == ranks[1]["zero_logit_bias"]
    assert _losses(root / f"two_{init}") == pytest.approx(_losses(root / f"one_{init}"), rel=1e-4, abs=1e-6)
    assert _losses(root / f"two_{init}", "zero_share") == pytest.approx(
        _losses(root / f"one_{init}", "zero_share"), rel=1e-6
    )


def test_fsdp_launch_options_the_cpu_path_cannot_honour_are_refused(monkeypatch):
    for key in (
        "ACCELERATE_USE_FSDP",
        "FSDP_VERSION",
        "FSDP_CPU_RAM_EFFICIENT_LOADING",
        "FSDP_ACTIVATION_CHECKPOINTING",
    ):
        monkeypatch.delenv(key, raising=False)
    assert cpu_fsdp2_plugin(DistributedType.MULTI_CPU) is None  # no FSDP asked for: DDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert cpu_fsdp2_plugin(DistributedType.MULTI_GPU) is None  # GPUs: accelerate's own FSDP2
    assert cpu_fsdp2_plugin(DistributedType.MULTI_CPU).fsdp_version == 2
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")  # accelerate launch's default
    assert cpu_fsdp2_plugin(DistributedType.MULTI_CPU).cpu_ram_efficient_loading  # rank 0's weights broadcast
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(zeda.ZedaError, match="version 2 only"):
        cpu_fsdp2_plugin(DistributedType.MULTI_CPU)
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")  # would rename every parameter
    with pytest.raises(zeda.ZedaError, match="train.gradient_checkpointing=true") as err:
        cpu_fsdp2_plugin(DistributedType.MULTI_CPU)
    assert "\n" not in str(err.value)
