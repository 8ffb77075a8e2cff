"""Injection: exact router growth, routing semantics, teacher mode and bad input, for every family."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, token_batch

import zeda
from zeda.tiny import tiny_model
from zeda.zero.inject import find_moe_layers, teacher_mode
from zeda.zero.routing import router_settings, zero_routers


def _original_and_injected(family: str, **kw):
    original = tiny_model(family)
    original.set_experts_implementation("eager")
    injected = tiny_model(family)
    injected.set_experts_implementation("eager")
    report = zeda.inject_zero_experts(injected, **kw)
    return original, injected, report


@pytest.mark.parametrize("family", FAMILIES)
def test_router_growth_is_exact(family):
    original, injected, report = _original_and_injected(family, seed=3)
    spec = zeda.get_spec(family)
    e, z = report.num_experts, report.num_zero_experts
    assert z == e // 2 and report.top_k == original.config.num_experts_per_tok
    layers_o, layers_i = find_moe_layers(original), find_moe_layers(injected)
    assert [layer.index for layer in layers_o] == report.layers == spec.moe_layer_indices(original.config)
    for lo, li in zip(layers_o, layers_i, strict=True):
        w_o, w_i = lo.router.weight, li.router.weight
        assert w_i.shape == (e + z, w_o.shape[1])
        assert torch.equal(w_i[:e], w_o)
        # New rows follow the per-dimension statistics of the old ones, not a copy of any row.
        assert not any(torch.equal(w_i[e + j], w_o[i]) for j in range(z) for i in range(e))
        for name in ("bias", "e_score_correction_bias"):
            if isinstance(getattr(lo.router, name, None), torch.Tensor):
                assert getattr(li.router, name).shape[0] == e + z
                assert torch.equal(getattr(li.router, name)[:e], getattr(lo.router, name))
        assert li.experts.gate_up_proj.shape[0] == e  # experts are untouched
    assert injected.config.model_type == f"zeda_{family}"
    assert injected.config.zeda["num_zero_experts"] == z


def test_injection_is_seeded():
    a, b, c = tiny_model("qwen3_moe"), tiny_model("qwen3_moe"), tiny_model("qwen3_moe")
    zeda.inject_zero_experts(a, seed=1)
    zeda.inject_zero_experts(b, seed=1)
    zeda.inject_zero_experts(c, seed=2)
    wa, wb, wc = (find_moe_layers(m)[0].router.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_mode_is_bit_exact(family):
    original, injected, _ = _original_and_injected(family)
    ids = token_batch()
    with torch.no_grad():
        ref = original(ids).logits
        student = injected(ids).logits
        with teacher_mode(injected):
            teacher = injected(ids).logits
        after = injected(ids).logits
    assert torch.equal(teacher, ref)
    assert not torch.equal(student, ref)  # zero experts do change the output
    assert torch.equal(after, student)  # the context restores student mode


@pytest.mark.parametrize("family", FAMILIES)
def test_forcing_all_slots_to_zero_silences_routed_experts(family):
    _, injected, _ = _original_and_injected(family)
    spec = zeda.get_spec(family)
    hidden = torch.randn(2, 5, injected.config.hidden_size)
    for layer in find_moe_layers(injected):
        with torch.no_grad(), router_settings(injected, forced_zero_share=1.0):
            _, weights, indices = layer.router(hidden.reshape(-1, hidden.shape[-1]))
            assert (indices == layer.router.num_experts).all() and (weights == 0).all()
            routed = layer.experts(hidden.reshape(-1, hidden.shape[-1]), indices, weights)
            assert torch.equal(routed, torch.zeros_like(routed))
            block_out = layer.block(hidden)
            block_out = block_out[0] if isinstance(block_out, tuple) else block_out
        if spec.shared_expert_attrs:
            assert block_out.abs().sum() > 0  # shared experts still run
        else:
            assert torch.equal(block_out, torch.zeros_like(block_out))


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_routing_semantics(family):
    """Top-k over E+Z, zero slots become the sentinel, weights normalised including zeros."""
    _, injected, report = _original_and_injected(family)
    layer = find_moe_layers(injected)[0]
    router, e, k = layer.router, report.num_experts, report.top_k
    with torch.no_grad():
        # Make zero experts irresistible for the first half of the tokens.
        x = torch.randn(16, injected.config.hidden_size)
        router.zero_logit_bias = 50.0
        logits, weights, indices = router(x)
        router.zero_logit_bias = 0.0
    assert logits.shape == (16, e + report.num_zero_experts)
    assert (indices == e).all() and (weights == 0).all()
    with torch.no_grad():
        logits, weights, indices = router(x)
    assert ((indices >= 0) & (indices <= e)).all()
    assert (weights[indices == e] == 0).all()
    if report.router_kind == "softmax" and getattr(router, "norm_topk_prob", True):
        probs = torch.softmax(logits.float(), -1)
        top = probs.topk(k, -1).values
        full = top / top.sum(-1, keepdim=True)
        # Real slots keep their share of the normalisation over all k (zeros included).
        real_mass = weights.float().sum(-1)
        expected = torch.where(probs.topk(k, -1).indices < e, full, torch.zeros_like(full)).sum(-1)
        torch.testing.assert_close(real_mass, expected)


def test_group_limited_routing_keeps_zero_experts_eligible():
    """DeepSeek-V3 (n_group=4, topk_group=2): real experts outside the chosen groups are masked,
    zero experts stay eligible for every token."""
    model = tiny_model("deepseek_v3")
    zeda.inject_zero_experts(model)
    router = find_moe_layers(model)[0].router
    e, per_group = router.num_experts, router.num_experts // router.num_group
    x = torch.randn(64, model.config.hidden_size)
    with torch.no_grad():
        _, _, idx = router(x)
        router_dict = dict(router.named_parameters())
        scores = torch.sigmoid(x @ router_dict["weight"].T)
    real = idx[idx < e]
    groups_used = (idx.clamp(max=e - 1) // per_group).where(idx < e, torch.full_like(idx, -1))
    for row in groups_used:
        assert len({g for g in row.tolist() if g >= 0}) <= router.topk_group
    assert real.numel() > 0 and scores.shape[1] == e + router.num_zero_experts
    # With a huge zero bias every token picks zero experts although they belong to no group.
    router.zero_logit_bias = 30.0
    with torch.no_grad():
        _, _, idx = router(x)
    assert (idx == e).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_share_is_exact(family):
    _, injected, report = _original_and_injected(family)
    ids = token_batch(2, 16)
    for share in (0.0, 0.25, 0.5, 0.75):
        with (
            zeda.RouterTelemetry() as tel,
            torch.no_grad(),
            router_settings(injected, forced_zero_share=share),
        ):
            with teacher_mode(injected):  # native routing + forced drops
                injected(ids)
        slots = 2 * 16 * report.top_k
        assert tel.zero_share == pytest.approx(int(share * slots) / slots)
        assert sum(tel.real_experts_histogram) == 2 * 16 * len(report.layers)


def test_telemetry_histogram_and_per_layer():
    model = tiny_model("qwen3_moe")
    zeda.inject_zero_experts(model)
    with zeda.RouterTelemetry() as tel, torch.no_grad():
        model(token_batch(2, 16))
    k = model.config.num_experts_per_tok
    for i, share in tel.per_layer.items():
        hist = tel.layers[i].real_per_token
        assert sum(hist) == 32
        zero_from_hist = sum((k - r) * n for r, n in enumerate(hist))
        assert zero_from_hist == pytest.approx(share * 32 * k)


def test_bad_inputs_raise_one_line_errors():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_model("qwen3_moe")
    for z in (0, 8 * 4 + 1):
        with pytest.raises(zeda.ZedaError, match="num_zero_experts"):
            zeda.inject_zero_experts(model, num_zero_experts=z)
    zeda.inject_zero_experts(model)
    with pytest.raises(zeda.ZedaError, match="already has zero experts"):
        zeda.inject_zero_experts(model)
    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(zeda.ZedaError, match="not a supported MoE model.*qwen3_moe") as err:
        zeda.inject_zero_experts(dense)
    assert "\n" not in str(err.value)
    with pytest.raises(zeda.ZedaError, match="unsupported model family"):
        zeda.get_spec("llama")
    no_moe = tiny_model("qwen3_moe", mlp_only_layers=[0, 1])
    with pytest.raises(zeda.ZedaError, match="no MoE layers"):
        zeda.inject_zero_experts(no_moe)


def test_teacher_mode_restores_flags_on_error():
    model = tiny_model("olmoe")
    zeda.inject_zero_experts(model)
    with pytest.raises(RuntimeError), teacher_mode(model):
        raise RuntimeError("boom")
    assert all(r.zero_experts_enabled for r in zero_routers(model))
