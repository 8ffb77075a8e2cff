"""Saving and reloading injected models: logits equal, no silent random init, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, token_batch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import zeda
from zeda.io import atomic_save, load
from zeda.tiny import tiny_model


def _injected(family: str):
    model = tiny_model(family)
    zeda.inject_zero_experts(model)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_logits_equal(family, tmp_path):
    model = _injected(family)
    ids = token_batch()
    with torch.no_grad():
        ref = model(ids).logits
        with zeda.teacher_mode(model):
            ref_teacher = model(ids).logits
    atomic_save(model, tmp_path / "m")
    for reloaded in (
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "m", dtype=torch.float32, attn_implementation="eager"
        ),
        load(tmp_path / "m", attn_implementation="eager"),
    ):
        reloaded.eval()
        assert type(reloaded).__name__ == f"Zeda{type(tiny_model(family)).__name__}"
        assert reloaded.config._experts_implementation == "zeda"
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, ref)
            with zeda.teacher_mode(reloaded):
                assert torch.equal(reloaded(ids).logits, ref_teacher)


def test_reload_with_missing_expert_weights_refuses(tmp_path):
    model = _injected("qwen3_moe")
    atomic_save(model, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    tensors = load_file(f)
    dropped = {k: v for k, v in tensors.items() if "experts" not in k}
    assert len(dropped) < len(tensors)
    save_file(dropped, f, metadata={"format": "pt"})
    with pytest.raises(zeda.ZedaError, match="missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(zeda.ZedaError, match="missing"):
        load(tmp_path / "m")


def test_truncated_safetensors_gives_clear_error(tmp_path):
    atomic_save(_injected("olmoe"), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 3])
    with pytest.raises(zeda.ZedaError, match="corrupt or truncated"):
        load(tmp_path / "m")


def test_wrong_zero_count_in_config_refuses(tmp_path):
    atomic_save(_injected("mixtral"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["zeda"]["num_zero_experts"] += 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(zeda.ZedaError):
        load(tmp_path / "m")


def test_load_original_and_bad_paths(tmp_path):
    original = tiny_model("qwen2_moe")
    atomic_save(original, tmp_path / "orig")
    model = load(tmp_path / "orig")
    assert not zeda.is_injected(model)
    with pytest.raises(zeda.ZedaError, match="no such directory"):
        load(tmp_path / "missing")
    with pytest.raises(zeda.ZedaError, match="dtype"):
        load(tmp_path / "orig", dtype="float8")


def test_atomic_save_refuses_existing_dir_and_keeps_it(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(zeda.ZedaError, match="--overwrite"):
        atomic_save(_injected("qwen3_moe"), out)
    assert (out / "keep.txt").read_text() == "precious"
    atomic_save(_injected("qwen3_moe"), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
