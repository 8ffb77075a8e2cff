"""Every experts backend matches eager on injected models: zero slots are skipped, never misread."""

from __future__ import annotations

import pytest
import torch
from conftest import DECORATED_FAMILIES, FAMILIES, token_batch

import zeda
from zeda.tiny import tiny_model
from zeda.zero.inject import set_experts_backend
from zeda.zero.routing import router_settings

BACKENDS = ["eager", "grouped_mm", "batched_mm", "zeda", "zeda_grouped"]


def _logits(model, ids, backend, share):
    set_experts_backend(model, backend)
    with torch.no_grad(), router_settings(model, forced_zero_share=share):
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_backends_match_eager(family):
    model = tiny_model(family)
    zeda.inject_zero_experts(model)
    ids = token_batch(2, 16)
    spec = zeda.get_spec(family)
    for share in (None, 0.5):
        ref = _logits(model, ids, "zeda" if not spec.eager_skips_sentinel else "eager", share)
        assert torch.isfinite(ref).all()
        for backend in BACKENDS:
            out = _logits(model, ids, backend, share)
            torch.testing.assert_close(
                out, ref, rtol=1e-5, atol=1e-5, msg=f"{family} {backend} share={share}"
            )


@pytest.mark.parametrize("family", DECORATED_FAMILIES)
def test_zeda_backend_is_bit_exact_with_eager(family):
    """zeda's loop orders rows as eager does, so teacher comparisons stay bit-exact."""
    model = tiny_model(family)
    ids = token_batch(2, 16)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        ref = model(ids).logits
    model.set_experts_implementation("zeda")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_bf16_backends_agree(family):
    model = tiny_model(family).to(torch.bfloat16)
    zeda.inject_zero_experts(model)
    ids = token_batch(2, 16)
    ref = _logits(model, ids, "zeda", 0.5).float()
    for backend in ("zeda_grouped", "grouped_mm", "batched_mm"):
        out = _logits(model, ids, backend, 0.5).float()
        torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)


def test_zero_slots_do_no_expert_work():
    """Count expert GEMM rows: with 50% of slots on zero experts, zeda's loop touches half the rows."""
    from zeda.zero import experts as zx

    model = tiny_model("qwen3_moe")
    zeda.inject_zero_experts(model)
    layer = zeda.find_moe_layers(model)[0]
    x = torch.randn(32, model.config.hidden_size)
    with torch.no_grad(), zeda.teacher_mode(model), router_settings(model, forced_zero_share=0.5):
        _, w, idx = layer.route(x)
    kept = int((idx < layer.router.num_experts).sum())
    assert kept == 32 * 2 // 2
    orig_linear = zx._linear
    seen: list[int] = []

    def spy(inp, weight, bias, transposed):
        seen.append(inp.shape[0])
        return orig_linear(inp, weight, bias, transposed)

    zx._linear = spy
    try:
        zx.zeda_loop_forward(layer.experts, x, idx, w)
    finally:
        zx._linear = orig_linear
    assert sum(seen) == 2 * kept  # up and down projections over kept rows only


def test_gpt_oss_eager_request_is_redirected():
    model = tiny_model("gpt_oss")
    zeda.inject_zero_experts(model)
    set_experts_backend(model, "eager")
    assert model.config._experts_implementation == "zeda"


def test_cpu_autotune_picks_a_strategy_and_caches_it():
    """bf16 inference on CPU: "zeda" times both strategies once per shape and kept-row bucket,
    caches the faster and returns that strategy's exact output; forced strategies and bad names
    behave."""
    from zeda.errors import ZedaError
    from zeda.zero import cpu_strategy
    from zeda.zero import experts as zx

    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    zeda.inject_zero_experts(model)
    layer = zeda.find_moe_layers(model)[0]
    x = torch.randn(24, model.config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad(), router_settings(model, forced_zero_share=0.5):
        _, w, idx = layer.route(x)
    kept = int((idx < layer.router.num_experts).sum())
    assert 0 < kept < idx.numel()
    try:
        zx.set_cpu_strategy("auto")
        with torch.no_grad():
            ref = {
                "loop": zx.zeda_loop_forward(layer.experts, x, idx, w),
                "grouped": zx.zeda_grouped_forward(layer.experts, x, idx, w),
            }
            out = zx.zeda_experts_forward(layer.experts, x, idx, w)
            (key, choice), *rest = zx.cpu_strategy_choices().items()
            assert not rest and choice in ref and key[-1] == cpu_strategy._bucket(kept) >= kept
            assert torch.equal(out, ref[choice])
            assert torch.equal(zx.zeda_experts_forward(layer.experts, x, idx, w), ref[choice])
            assert len(zx.cpu_strategy_choices()) == 1  # cached: no second tuning
            # fp32 and training never autotune: the loop keeps teacher comparisons bit-exact.
            xf, wf = x.float(), w.float()
            layer.experts.float()
            assert torch.equal(
                zx.zeda_experts_forward(layer.experts, xf, idx, wf),
                zx.zeda_loop_forward(layer.experts, xf, idx, wf),
            )
            layer.experts.to(torch.bfloat16)
            assert len(zx.cpu_strategy_choices()) == 1
            for forced in ("loop", "grouped"):
                zx.set_cpu_strategy(forced)
                assert torch.equal(zx.zeda_experts_forward(layer.experts, x, idx, w), ref[forced])
                assert zx.cpu_strategy_choices() == {}
        with pytest.raises(ZedaError, match="unknown CPU experts strategy"):
            zx.set_cpu_strategy("fast")
    finally:
        zx.set_cpu_strategy("auto")


@pytest.mark.parametrize("family", DECORATED_FAMILIES)
def test_single_token_loop_is_bit_exact_with_eager(family):
    """Decode at batch 1 takes a lighter path through the loop: still bit-identical to eager."""
    from zeda.zero import experts as zx

    model = tiny_model(family)
    zeda.inject_zero_experts(model)
    layer = zeda.find_moe_layers(model)[0]
    eager = type(layer.experts).forward.__wrapped__
    e = layer.router.num_experts
    torch.manual_seed(0)
    for _ in range(4):
        x = torch.randn(1, model.config.hidden_size)
        with torch.no_grad():
            _, w, idx = layer.route(x)
            idx = idx.clone()
            idx[0, 0] = e  # one zero slot
            keep = idx[0] < e
            # eager cannot skip sentinel slots: give it only the kept ones (k' = kept slots).
            ref = eager(layer.experts, x, idx[:, keep], w[:, keep])
            out = zx.zeda_loop_forward(layer.experts, x, idx, w)
        assert torch.equal(out, ref), family


def test_llama4_backends_skip_zero_slots_and_match_the_stock_algorithm():
    """Llama 4's experts scale each expert's input by its weight; behind the family's adapter every
    backend equals the stock dense algorithm, and zeda's loop computes kept rows only."""
    from zeda.families.llama4 import dense_experts
    from zeda.zero import experts as zx

    model = tiny_model("llama4_text")
    zeda.inject_zero_experts(model)
    layer = zeda.find_moe_layers(model)[0]
    e = layer.router.num_experts
    x = torch.randn(32, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    for share in (0.0, 0.5):
        with torch.no_grad(), router_settings(model, forced_zero_share=share, zero_logit_bias=-1e4):
            _, w, idx = layer.route(x)
        assert int((idx == e).sum()) == int(share * idx.numel())
        with torch.no_grad():
            ref = dense_experts(layer.experts, x, idx, w)
            assert ref.abs().sum() > 0
            for backend in ("zeda", "zeda_grouped", "grouped_mm", "batched_mm"):
                set_experts_backend(model, backend)
                torch.testing.assert_close(layer.experts(x, idx, w), ref, rtol=1e-5, atol=1e-6, msg=backend)
            set_experts_backend(model, "eager")
            assert torch.equal(layer.experts(x, idx, w), ref)
    set_experts_backend(model, "zeda")
    orig_linear = zx._linear
    seen: list[int] = []

    def spy(inp, weight, bias, transposed):
        assert transposed  # Llama 4 stores (E, in, out)
        seen.append(inp.shape[0])
        return orig_linear(inp, weight, bias, transposed)

    zx._linear = spy
    try:
        with torch.no_grad():
            layer.experts(x, idx, w)
    finally:
        zx._linear = orig_linear
    assert sum(seen) == 2 * int((idx < e).sum()) == 2 * 16  # up and down projections, kept rows only
