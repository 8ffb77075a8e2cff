"""Data-parallel distillation on CPU: `accelerate launch --num_processes 2` (gloo) runs a recipe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from zeda.config import RunConfig, apply_overrides, save_recipe
from zeda.io import atomic_save
from zeda.tiny import tiny_corpus, tiny_model, tiny_tokenizer


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        "accelerate",
        "launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "zeda.cli",
        "distill",
        str(tmp_path / "recipe.yaml"),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [2, 4]  # logged once (main process), not per rank
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state == {"stage": "stage1", "step": 4}
    assert (tmp_path / "run" / "export" / "config.json").exists()
