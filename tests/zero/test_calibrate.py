"""zeda.calibrate: the zero-logit bias for a target skipped share, measured on held-out text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import token_batch

import zeda
from zeda.distillation.data import pack_texts, read_jsonl
from zeda.evaluation.telemetry import RouterTelemetry
from zeda.io import load, load_tokenizer
from zeda.tiny import tiny_model
from zeda.zero.calibrate import calibrate, calibrate_export

REF = Path(__file__).resolve().parents[2] / "evals" / "reference"


@pytest.fixture(scope="module")
def reference():
    model = load(REF / "model")
    tokenizer = load_tokenizer(REF / "model", model)
    zeda.inject_zero_experts(model)
    calib = read_jsonl(REF / "data" / "validation.jsonl")
    held = read_jsonl(REF / "data" / "test.jsonl")
    return model, tokenizer, calib, held


@pytest.mark.parametrize("share", [0.25, 0.4, 0.5])
def test_heldout_share_lands_on_target(reference, share: float) -> None:
    """Issue 17: calibrated on validation text, the share measured on test text is S ± 2 points."""
    model, tokenizer, calib, held = reference
    result = calibrate(model, share, calib, tokenizer, max_tokens=4096)
    assert abs(result.calibration_share - share) <= 0.005
    assert result.calibration_tokens == 4096
    # The bias is set on the routers and in the config that export writes.
    assert model.config.zeda["zero_logit_bias"] == result.zero_logit_bias
    assert all(
        layer.router.zero_logit_bias == result.zero_logit_bias for layer in zeda.find_moe_layers(model)
    )
    blocks = pack_texts(held, tokenizer, 256, 4096)[:16]
    with RouterTelemetry(model) as tel, torch.no_grad():
        for i in range(0, 16, 8):
            model.get_decoder()(input_ids=blocks[i : i + 8])
    assert abs(tel.zero_share - share) <= 0.02, (tel.zero_share, result.summary())


def test_calibrate_export_bakes_the_budget_into_config(tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe")
    zeda.inject_zero_experts(model)
    from zeda.tiny import tiny_corpus, tiny_tokenizer

    zeda.atomic_save(model, tmp_path / "m", tokenizer=tiny_tokenizer())
    with (tmp_path / "data.jsonl").open("w") as f:
        for text in tiny_corpus(64):
            f.write(json.dumps({"text": text}) + "\n")
    result = calibrate_export(tmp_path / "m", 0.3, tmp_path / "data.jsonl", tmp_path / "out", seq_len=32)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["zeda"]["zero_logit_bias"] == pytest.approx(result.zero_logit_bias)
    assert abs(result.calibration_share - 0.3) <= 0.01
    reloaded = load(tmp_path / "out")
    ids = token_batch(4, 32)
    with RouterTelemetry(reloaded) as tel, torch.no_grad():
        reloaded(ids)
    assert 0.1 < tel.zero_share < 0.5  # the baked-in bias is active after a plain reload
    assert "held-out share" in result.summary()
    with pytest.raises(zeda.ZedaError, match="already exists"):
        calibrate_export(tmp_path / "m", 0.3, tmp_path / "data.jsonl", tmp_path / "out")


def test_per_layer_calibration_hits_every_layer() -> None:
    model = tiny_model("deepseek_v3")
    zeda.inject_zero_experts(model)
    ids = token_batch(8, 32, seed=4)
    result = calibrate(model, 0.4, ids, per_layer=True, tol=0.005)
    assert isinstance(result.zero_logit_bias, list) and len(result.zero_logit_bias) == 2
    with RouterTelemetry(model) as tel, torch.no_grad():
        model(ids)
    for share in tel.per_layer.values():
        assert abs(share - 0.4) <= 0.02


def test_bad_calibration_inputs() -> None:
    with pytest.raises(zeda.ZedaError, match="zero experts"):
        calibrate(tiny_model("qwen3_moe"), 0.3, token_batch())
    model = tiny_model("qwen3_moe")
    zeda.inject_zero_experts(model)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(zeda.ZedaError, match="between 0 and 1"):
            calibrate(model, bad, token_batch())
    with pytest.raises(zeda.ZedaError, match="needs a tokenizer"):
        calibrate(model, 0.3, ["some text"])
    assert "zero_logit_bias" not in model.config.zeda
