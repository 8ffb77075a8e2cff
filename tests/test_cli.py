"""The command line: contract of inject / flops / ls / validate, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import token_batch

import zeda
from zeda.cli import main
from zeda.io import atomic_save, load
from zeda.tiny import tiny_model, tiny_tokenizer


def test_inject_cli_round_trip(tmp_path, capsys):
    original = tiny_model("qwen3_moe")
    atomic_save(original, tmp_path / "orig", tokenizer=tiny_tokenizer())
    rc = main(
        [
            "inject",
            "--model",
            str(tmp_path / "orig"),
            "--out",
            str(tmp_path / "inj"),
            "--num-zero-experts",
            "3",
            "--seed",
            "7",
            "--dtype",
            "float32",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_zero_experts"] == 3 and report["seed"] == 7 and report["num_experts"] == 8
    injected = load(tmp_path / "inj", attn_implementation="eager")
    assert injected.config.zeda["num_zero_experts"] == 3
    assert (tmp_path / "inj" / "tokenizer.json").exists()
    original.set_experts_implementation("eager")
    ids = token_batch()
    with torch.no_grad(), zeda.teacher_mode(injected):
        assert torch.equal(injected(ids).logits, original(ids).logits)
    # Refuses to overwrite, and says how.
    rc = main(["inject", "--model", str(tmp_path / "orig"), "--out", str(tmp_path / "inj")])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    # Re-injecting an injected checkpoint fails with one line.
    rc = main(["inject", "--model", str(tmp_path / "inj"), "--out", str(tmp_path / "inj2")])
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("zeda: error:")]
    assert rc == 2 and len(line) == 1 and "already has zero experts" in line[0]


def test_flops_json_contract(capsys):
    assert main(["flops", "--model-config", "qwen3-30b-a3b", "--zero-share", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("total_params", "active_params", "flops_per_token", "routed_expert_flops_per_token"):
        assert key in out
    assert out["routed_flop_reduction"] == pytest.approx(0.5)
    assert main(["flops", "--model-config", "no-such-model"]) == 2
    assert "built-in names" in capsys.readouterr().err


def test_ls_and_validate(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for family in zeda.supported_model_types():
        assert family in out
    assert "qwen3-30b-a3b" in out
    assert main(["validate", "recipes/reference/quickstart.yaml"]) == 0


def test_unknown_recipe_key_fails(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batchsize: 4\n")
    assert main(["validate", str(bad)]) == 2
    assert "did you mean" in capsys.readouterr().err
