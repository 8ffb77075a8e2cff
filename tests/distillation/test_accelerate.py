"""Data-parallel distillation on CPU: two processes (gloo) launched with torchrun.

accelerate 1.15's ``accelerate launch --cpu --num_processes 2`` starts ONE process (its simple
launcher); two CPU processes need ``torchrun`` with ``ACCELERATE_USE_CPU=true``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LAUNCH_ENV, free_port

from zeda.config import RunConfig, apply_overrides, save_recipe
from zeda.io import atomic_save
from zeda.tiny import tiny_corpus, tiny_model, tiny_tokenizer


def _torchrun() -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        free_port(),
    ]


def test_two_process_cpu_distill(tmp_path):
    tok = tiny_tokenizer()
    atomic_save(tiny_model("qwen3_moe"), tmp_path / "model", tokenizer=tok)
    with (tmp_path / "train.jsonl").open("w") as f:
        for t in tiny_corpus(96):
            f.write(json.dumps({"text": t}) + "\n")
    cfg = apply_overrides(
        RunConfig(),
        [
            f"model.name_or_path={tmp_path / 'model'}",
            f"data.train_file={tmp_path / 'train.jsonl'}",
            "data.seq_len=32",
            "train.batch_size=2",
            "stage1.steps=4",
            "train.log_every=2",
            "train.save_every=2",
            f"train.output_dir={tmp_path / 'run'}",
            "balance.target_zero_share=0.5",
        ],
    )
    save_recipe(cfg, tmp_path / "recipe.yaml")
    cmd = [*_torchrun(), "-m", "zeda.cli", "distill", str(tmp_path / "recipe.yaml")]
    res = subprocess.run(cmd, env=LAUNCH_ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [2, 4]  # logged once (main process), not per rank
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state == {"stage": "stage1", "step": 4}
    assert (tmp_path / "run" / "export" / "config.json").exists()


WORKER = Path(__file__).with_name("ddp_worker.py")


def _launch(tmp_path, overrides, nan_rank=-1):
    cmd = [
        *_torchrun(),
        str(WORKER),
        str(tmp_path),
        json.dumps(overrides),
        str(nan_rank),
    ]
    return subprocess.run(cmd, env=LAUNCH_ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def _corpus(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(96)))
    return path


def test_two_ranks_split_rollouts_prompts_and_count_the_global_share(tmp_path):
    corpus = _corpus(tmp_path)
    overrides = [
        f"data.train_file={corpus}",
        f"data.eval_file={corpus}",
        "data.seq_len=32",
        "data.max_prompts=8",
        "stage1.mode=rollout",
        "stage1.kd=nll",
        "stage1.steps=2",
        "stage1.max_new_tokens=4",
        "stage1.rollout_batch_size=8",
        "stage2.enabled=true",
        "stage2.steps=1",
        "stage2.num_prompts_per_step=4",
        "stage2.max_new_tokens=3",
        "train.batch_size=2",
        "train.log_every=100",
        "train.eval_every=0",  # the worker's hooks count every forward: no validation forwards
        "train.verdict=false",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    res = _launch(tmp_path, overrides)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Teacher rollouts: each rank generates its half of the 8 prompts (prefill batch of 4).
    assert [r["eval_batches"][0] for r in ranks] == [4, 4]
    # Stage 1 (2 steps) then stage 2 (1 step, 4 prompts per step -> 2 per rank).
    for r in ranks:
        assert [len(rows) for rows in r["train_rows"]] == [2, 2, 2]
    assert ranks[0]["train_rows"][0] != ranks[1]["train_rows"][0]  # ranks train on different rows
    # The logged zero share is the share of slots the routers really chose, over both ranks.
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [(r["stage"], r["step"]) for r in rows] == [("stage1", 2), ("stage2", 1)]
    for row, forwards in ((rows[0], slice(0, 2)), (rows[1], slice(2, 3))):
        zero = sum(sum(r["zero"][forwards]) for r in ranks)
        slots = sum(sum(r["slots"][forwards]) for r in ranks)
        assert row["zero_share"] == pytest.approx(zero / slots, abs=1e-12)


def test_a_nan_on_one_rank_stops_both_without_deadlock(tmp_path):
    corpus = _corpus(tmp_path)
    overrides = [
        f"data.train_file={corpus}",
        f"data.eval_file={corpus}",
        "data.seq_len=32",
        "stage1.steps=4",
        "train.batch_size=2",
        "train.save_every=1",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    res = _launch(tmp_path, overrides, nan_rank=1)
    assert res.returncode != 0
    for r in (0, 1):
        error = (tmp_path / f"error{r}.txt").read_text()
        assert "non-finite loss at stage1 step 1" in error and "nothing was saved" in error
    # The only checkpoint (step 1) was followed by a non-finite step: the new run leaves nothing.
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.*"))


def test_ddp_checkpoint_resumes_on_the_one_process_trajectory(tmp_path):
    # The consolidated, name-keyed checkpoint under DDP: 2 processes x 2 sequences stop after 2
    # steps, resume to 4, and log the trajectory of 1 uninterrupted process x 4 sequences.
    import zeda
    from zeda.io import load, load_tokenizer

    tok = tiny_tokenizer()
    atomic_save(tiny_model("qwen3_moe"), tmp_path / "model", tokenizer=tok)
    corpus = _corpus(tmp_path)

    def recipe(out: str, batch_size: int, steps: int, *extra: str) -> RunConfig:
        return apply_overrides(
            RunConfig(),
            [
                f"model.name_or_path={tmp_path / 'model'}",
                f"data.train_file={corpus}",
                "data.seq_len=32",
                f"train.batch_size={batch_size}",
                f"stage1.steps={steps}",
                "stage1.lr=1e-2",
                "train.log_every=1",
                "train.save_every=0",
                "train.warmup_ratio=0",
                "train.lr_schedule=constant",
                f"train.output_dir={tmp_path / out}",
                "balance.target_zero_share=0.5",
                *extra,
            ],
        )

    for name, cfg in (("half", recipe("two", 2, 2)), ("resume", recipe("two", 2, 4, "train.resume=true"))):
        save_recipe(cfg, tmp_path / f"{name}.yaml")
        cmd = [*_torchrun(), "-m", "zeda.cli", "distill", str(tmp_path / f"{name}.yaml")]
        res = subprocess.run(cmd, env=LAUNCH_ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    zeda.distill(load(tmp_path / "model"), recipe("one", 4, 4), load_tokenizer(tmp_path / "model"))
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / r / "metrics.jsonl").open()] for r in ("two", "one")
    ]
    assert len(losses[0]) == 4
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-6)
