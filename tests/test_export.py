"""zeda.export: merged LoRA + trained routers reload through AutoModelForCausalLM with equal logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import token_batch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import zeda
import zeda.io as zio
from zeda.cli import main as cli_main
from zeda.config import LoraConfig, RunConfig, apply_overrides
from zeda.distillation.student import build_student
from zeda.tiny import tiny_corpus, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _student(family: str = "qwen3_moe", **lora: object) -> torch.nn.Module:
    model = tiny_model(family)
    zeda.inject_zero_experts(model, 4)
    student = build_student(model, RunConfig(lora=LoraConfig(**lora)))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # stand-in for training: every trainable tensor moves
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student.eval()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in path.glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_export_reloads_with_equal_logits(family: str, tmp_path: Path) -> None:
    student = _student(family)
    ids = token_batch(2, 16)
    with torch.no_grad():
        want = student(input_ids=ids).logits
    metrics = {
        "zero_share": 0.41,
        "routed_flop_reduction": 0.41,
        "total_flop_reduction": 0.2,
        "ppl_ratio": 1.03,
    }
    out = zeda.export(student, tmp_path / "export", tokenizer=tiny_tokenizer(), card_metrics=metrics)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__.startswith("Zeda") and zeda.is_injected(model)
    assert model.config.zeda["num_zero_experts"] == 4 and model.config.zeda["merged_lora"] is True
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # The student is untouched (a copy was merged) and still gives the same logits.
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, want)
    # A plain checkpoint: no adapter tensors; experts differ from the frozen originals.
    weights = _weights(out)
    assert not any("lora" in k or "modules_to_save" in k or "original_module" in k for k in weights)
    base = tiny_model(family)
    zeda.inject_zero_experts(base, 4)
    sd, ref = model.state_dict(), base.state_dict()
    name = next(k for k in sd if k.endswith("experts.down_proj"))
    assert not torch.equal(sd[name], ref[name])
    card = (out / "README.md").read_text()
    assert "41.0%" in card and "ppl_ratio" in card and "num_zero_experts" in card and "import zeda" in card
    assert json.loads((out / "zeda_metrics.json").read_text())["ppl_ratio"] == 1.03
    assert (out / "tokenizer.json").exists()


def test_export_full_experts_student(tmp_path: Path) -> None:
    student = _student(enabled=False, full_experts=True)
    ids = token_batch(2, 16)
    with torch.no_grad():
        want = student(input_ids=ids).logits
    out = zeda.export(student, tmp_path / "e")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_export_refuses_existing_dir_and_overwrites(tmp_path: Path) -> None:
    student = _student()
    (tmp_path / "e").mkdir()
    with pytest.raises(zeda.ZedaError, match="already exists"):
        zeda.export(student, tmp_path / "e")
    zeda.export(student, tmp_path / "e", overwrite=True)
    assert (tmp_path / "e" / "config.json").exists()


def test_failed_check_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(zio.RELOAD_TOLERANCE, torch.float32, -1.0)  # any difference fails
    with pytest.raises(zeda.ZedaError, match="export check failed"):
        zeda.export(_student(), tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


def test_export_needs_zero_experts(tmp_path: Path) -> None:
    with pytest.raises(zeda.ZedaError, match="zero experts"):
        zeda.export(tiny_model("qwen3_moe"), tmp_path / "e")


def test_cli_export_of_model_dir(tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe")
    zeda.inject_zero_experts(model, 4)
    zeda.atomic_save(model, tmp_path / "injected", tokenizer=tiny_tokenizer())
    assert cli_main(["export", "--model", str(tmp_path / "injected"), "--out", str(tmp_path / "out")]) == 0
    ids = token_batch(1, 8)
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # tiny config uses eager attention, reload sdpa
    assert cli_main(["export", "--model", str(tmp_path / "injected"), "--out", str(tmp_path / "out")]) == 2


@pytest.mark.parametrize("init", ["random", "relative"])
def test_cli_export_of_run_dir(tmp_path: Path, init: str) -> None:
    """`zeda export --model RUN_DIR` rebuilds the student from a `zeda run` directory (with
    ``inject.init=relative`` too: its fitted start and per-layer bias are rebuilt exactly)."""
    zeda.atomic_save(tiny_model("qwen3_moe"), tmp_path / "model", tokenizer=tiny_tokenizer())
    with (tmp_path / "train.jsonl").open("w") as f:
        for t in tiny_corpus(32):
            f.write(json.dumps({"text": t}) + "\n")
    cfg = apply_overrides(
        RunConfig(),
        [
            f"model.name_or_path={tmp_path / 'model'}",
            f"data.train_file={tmp_path / 'train.jsonl'}",
            "data.seq_len=16",
            "train.batch_size=2",
            "stage1.steps=2",
            "stage1.lr=1e-2",
            f"inject.init={init}",
            f"train.output_dir={tmp_path / 'run'}",
        ],
    )
    zeda.run(cfg, evaluate=False)  # trains, writes recipe.yaml + checkpoint/, exports to run/export
    assert cli_main(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    ids = token_batch(2, 8)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export")(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(input_ids=ids).logits
        orig = AutoModelForCausalLM.from_pretrained(tmp_path / "model")(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, orig)  # the trained student, not the original
    bias = json.loads((tmp_path / "out" / "config.json").read_text())["zeda"].get("zero_logit_bias")
    assert isinstance(bias, list) if init == "relative" else bias in (None, 0.0)
