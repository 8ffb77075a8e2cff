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


def _tree(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_missing_config_json_is_named(tmp_path):
    atomic_save(_injected("qwen3_moe"), tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    before = _tree(tmp_path)
    with pytest.raises(zeda.ZedaError, match="not a model directory \\(no config.json\\)") as err:
        load(tmp_path / "m")
    assert "\n" not in str(err.value) and "model_type" not in str(err.value)
    assert _tree(tmp_path) == before


def test_tokenizer_is_checked_against_the_model(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from zeda.io import check_tokenizer, load_tokenizer
    from zeda.tiny import tiny_tokenizer

    model = _injected("qwen3_moe")
    atomic_save(model, tmp_path / "m", tokenizer=tiny_tokenizer())
    assert len(load_tokenizer(tmp_path / "m", model)) <= model.config.vocab_size
    # No tokenizer files: transformers 5 returns an empty 1-token tokenizer.
    atomic_save(model, tmp_path / "bare")
    before = _tree(tmp_path)
    with pytest.raises(zeda.ZedaError, match="has no tokenizer files") as err:
        load_tokenizer(tmp_path / "bare", model)
    assert "\n" not in str(err.value)
    # Tokenizer files that hold no vocabulary.
    empty = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")))
    with pytest.raises(zeda.ZedaError, match="tokenizer is empty"):
        check_tokenizer(empty, model, "empty")
    # A tokenizer with more tokens than the model's embedding has rows.
    atomic_save(model, tmp_path / "big", tokenizer=tiny_tokenizer(256))
    before = _tree(tmp_path)
    for target in (model, None):  # the model, or the config next to the tokenizer
        with pytest.raises(
            zeda.ZedaError, match="tokenizer has 1[3-9]\\d tokens but the model's embedding has 128 rows"
        ):
            load_tokenizer(tmp_path / "big", target)
    assert _tree(tmp_path) == before


def test_outputs_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = atomic_save(_injected("olmoe"), tmp_path / "m")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}


def test_zero_logit_bias_in_config_round_trips(tmp_path):
    model = _injected("qwen3_moe")
    layers = zeda.find_moe_layers(model)
    ids = token_batch()
    with torch.no_grad():
        plain = model(ids).logits
    for bias in (0.7, [0.5 * i - 0.2 for i in range(len(layers))]):
        model.config.zeda["zero_logit_bias"] = bias
        atomic_save(model, tmp_path / "m", overwrite=True)
        reloaded = load(tmp_path / "m", attn_implementation="eager")
        want = [bias] * len(layers) if isinstance(bias, float) else bias
        assert [layer.router.zero_logit_bias for layer in zeda.find_moe_layers(reloaded)] == want
        with torch.no_grad(), zeda.router_settings(reloaded, zero_logit_bias=0.0):
            assert torch.equal(reloaded(ids).logits, plain)
        with torch.no_grad():
            assert not torch.equal(reloaded(ids).logits, plain)
    model.config.zeda["zero_logit_bias"] = [1.0]
    atomic_save(model, tmp_path / "bad", overwrite=True)
    with pytest.raises(zeda.ZedaError, match="zero_logit_bias has 1 entries but the model has 2 MoE layers"):
        load(tmp_path / "bad")
