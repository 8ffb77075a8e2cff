"""zeda.calibrate: the zero-logit bias for a target skipped share, measured on held-out text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, token_batch

import zeda
from zeda.distillation.data import pack_texts, read_jsonl
from zeda.io import load, load_tokenizer
from zeda.pipeline import calibrate_export
from zeda.tiny import tiny_model
from zeda.zero.calibrate import calibrate
from zeda.zero.telemetry import RouterTelemetry

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


def _step0_ppl(model, tokenizer, held) -> tuple[float, float]:
    """(perplexity, skipped share) on 4096 held-out tokens."""
    import math

    import torch.nn.functional as F

    blocks = pack_texts(held, tokenizer, 256, 4096)[:16]
    nll = n = 0.0
    with RouterTelemetry(model) as tel, torch.no_grad():
        for i in range(0, 16, 8):
            ids = blocks[i : i + 8]
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            )
            n += ids[:, 1:].numel()
    return math.exp(nll / n), tel.zero_share


def test_fitted_rows_start_below_the_absolute_threshold() -> None:
    """inject.init=relative's start (`start_at_share(rows="fitted")`): on the reference model, at
    the same 50% share, zero rows fitted to each token's log-sum-exp give a lower perplexity
    than zero rows with one absolute logit threshold (the point of the fitted start)."""
    from zeda.zero.start import start_at_share

    tokenizer = load_tokenizer(REF / "model")
    calib = read_jsonl(REF / "data" / "validation.jsonl")
    held = read_jsonl(REF / "data" / "test.jsonl")
    ppl = {}
    for rows in ("zero", "fitted"):
        model = load(REF / "model")
        zeda.inject_zero_experts(model)
        result = start_at_share(model, 0.5, calib, tokenizer, rows=rows, max_tokens=4096, seq_len=128)
        layers = zeda.find_moe_layers(model)
        zero_rows = [layer.router.weight[layer.router.num_experts :] for layer in layers]
        if rows == "fitted":
            # One bias per layer (the fit's intercepts differ), every zero row of a layer the same fit.
            assert isinstance(result.zero_logit_bias, list) and len(result.zero_logit_bias) == len(layers)
            for w in zero_rows:
                assert torch.count_nonzero(w) > 0 and torch.equal(w, w[:1].expand_as(w))
        else:
            assert isinstance(result.zero_logit_bias, float)
            assert all(torch.count_nonzero(w) == 0 for w in zero_rows)
        ppl[rows], share = _step0_ppl(model, tokenizer, held)
        assert abs(share - 0.5) <= 0.03, (rows, share)
    assert ppl["fitted"] < ppl["zero"], ppl


def test_fit_zero_rows_tracks_log_sum_exp_and_ignores_sigmoid_routers(monkeypatch) -> None:
    """The fitted zero logit explains most of the variance of the log-sum-exp of the real
    logits; grouping layers into several passes (a small memory budget) fits the same rows;
    sigmoid routers keep their rows."""
    from zeda.zero import start as cal

    ids = token_batch(8, 32, seed=3)
    rows = []
    for budget in (cal.FIT_BUDGET_BYTES, 1):
        monkeypatch.setattr(cal, "FIT_BUDGET_BYTES", budget)
        model = tiny_model("qwen3_moe")
        zeda.inject_zero_experts(model)
        intercepts = cal.fit_zero_rows(model, ids)
        layers = zeda.find_moe_layers(model)
        assert len(intercepts) == len(layers) and all(isinstance(c, float) for c in intercepts)
        rows.append([layer.router.weight.detach().clone() for layer in layers])
        inputs = []
        hooks = [
            layer.router.register_forward_pre_hook(
                lambda m, a, inputs=inputs: inputs.append((m, a[0].reshape(-1, a[0].shape[-1])))
            )
            for layer in layers
        ]
        with torch.no_grad(), zeda.teacher_mode(model):
            model(ids)
        for h in hooks:
            h.remove()
        for (router, x), c in zip(inputs, intercepts, strict=True):
            e = router.num_experts
            y = torch.logsumexp(x @ router.weight[:e].T, -1)
            pred = x @ router.weight[e] + c
            r2 = 1 - ((pred - y) ** 2).mean() / y.var()
            assert r2 > 0.5, float(r2)
    for a, b in zip(*rows, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    model = tiny_model("deepseek_v3")
    zeda.inject_zero_experts(model)
    before = [layer.router.weight.detach().clone() for layer in zeda.find_moe_layers(model)]
    assert all(c is None for c in cal.fit_zero_rows(model, ids))
    for w, layer in zip(before, zeda.find_moe_layers(model), strict=True):
        assert torch.equal(w, layer.router.weight)
    with pytest.raises(zeda.ZedaError, match="rows must be"):
        cal.start_at_share(model, 0.3, ids, rows="random")


@pytest.mark.parametrize("family", FAMILIES)
def test_fitted_start_lands_on_the_share_in_every_family(family: str) -> None:
    """`start_at_share(rows="fitted")` on every family: softmax-family routers get fitted rows and
    one bias per layer, sigmoid routers zero rows and one bias; the share lands on the target."""
    from zeda.zero.start import start_at_share
    from zeda_routing import get_kind

    model = tiny_model(family)
    zeda.inject_zero_experts(model)
    ids = token_batch(8, 32, seed=3)
    result = start_at_share(model, 0.4, ids, rows="fitted", tol=0.005)
    layers = zeda.find_moe_layers(model)
    fitted = get_kind(layers[0].router.zeda_router_kind).normalised
    for layer in layers:
        n = torch.count_nonzero(layer.router.weight[layer.router.num_experts :])
        assert n > 0 if fitted else n == 0
    assert isinstance(result.zero_logit_bias, list if fitted else float)
    with RouterTelemetry(model) as tel, torch.no_grad():
        model(ids)
    assert abs(tel.zero_share - 0.4) <= 0.02
