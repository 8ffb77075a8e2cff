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
        for name in spec.block_buffers:  # per-expert buffers the block holds for its router (MiniMax-M2)
            grown, kept = getattr(li.block, name), getattr(lo.block, name)
            assert grown.shape[0] == e + z and torch.equal(grown[:e], kept)
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
            _, weights, indices = layer.route(hidden.reshape(-1, hidden.shape[-1]))
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
        logits, weights, indices = layer.route(x)
        router.zero_logit_bias = 0.0
    assert logits.shape == (16, e + report.num_zero_experts)
    assert (indices == e).all() and (weights == 0).all()
    with torch.no_grad():
        logits, weights, indices = layer.route(x)
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


def _reference_group_limited(
    router, x: torch.Tensor, zero_bias: float
) -> tuple[list[set[int]], torch.Tensor]:
    """Group-limited sigmoid routing over E real + Z zero experts, one token at a time.

    Written independently of zeda's vectorised router: per token, score the groups of real
    experts (sum of their two best biased scores), keep the ``topk_group`` best groups, then take
    the k best candidates among the real experts of those groups and *all* zero experts.

    Returns:
        Per token the set of chosen expert ids (zero experts as their own ids E..E+Z-1), and
        ``(T, E+Z)`` weights of every candidate (0 where not chosen), normalised and scaled.
    """
    e, z, k = router.num_experts, router.num_zero_experts, router.top_k
    per_group = e // router.num_group
    weight = router.weight.detach().double()
    bias = router.e_score_correction_bias.detach().double()
    chosen, weights = [], torch.zeros(x.shape[0], e + z, dtype=torch.float64)
    for t, h in enumerate(x.double()):
        logits = weight @ h
        logits[e:] += zero_bias
        scores = torch.sigmoid(logits)
        choice = (scores + bias).tolist()
        group_score = [
            sum(sorted(choice[g * per_group : (g + 1) * per_group])[-2:]) for g in range(router.num_group)
        ]
        groups = sorted(range(router.num_group), key=lambda g: -group_score[g])[: router.topk_group]
        candidates = [i for i in range(e) if i // per_group in groups] + list(range(e, e + z))
        top = sorted(candidates, key=lambda i: -choice[i])[:k]
        chosen.append(set(top))
        w = scores[top] / scores[top].sum() if router.norm_topk_prob else scores[top]
        weights[t, top] = w * router.routed_scaling_factor
    return chosen, weights


def test_group_limited_routing_matches_reference_and_keeps_zero_experts_eligible():
    """DeepSeek-V3 group-limited routing (16 experts in 4 groups, 2 groups kept, top-4).

    Zero experts off: bit-equal to transformers' own DeepseekV3TopkRouter. On: equal to an
    independent per-token reference in which real experts obey the group mask and zero experts
    are eligible for every token, on inputs where the group limit changes the answer.
    """
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    overrides = dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    original = tiny_model("deepseek_v3", **overrides)
    model = tiny_model("deepseek_v3", **overrides)
    zeda.inject_zero_experts(model)
    router = find_moe_layers(model)[0].router
    stock = find_moe_layers(original)[0].router
    assert type(stock) is DeepseekV3TopkRouter
    e, z, per_group = router.num_experts, router.num_zero_experts, router.num_experts // router.num_group
    x = torch.randn(256, model.config.hidden_size, generator=torch.Generator().manual_seed(7))

    with torch.no_grad(), teacher_mode(model):
        got = router(x)
        want = stock(x)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)

    # Ungrouped top-k of the stock router's scores: the group limit must change some tokens.
    with torch.no_grad():
        plain = (torch.sigmoid(x @ stock.weight.T) + stock.e_score_correction_bias).topk(4, -1).indices
        _, _, grouped = stock(x)
    changed = [set(a.tolist()) != set(b.tolist()) for a, b in zip(plain, grouped, strict=True)]
    assert sum(changed) >= 10

    for zero_bias in (-1.0, 0.0, 0.2):
        router.zero_logit_bias = zero_bias
        with torch.no_grad():
            _, weights, indices = router(x)
        ref_sets, ref_weights = _reference_group_limited(router, x, zero_bias)
        n_zero = 0
        for t in range(x.shape[0]):
            real = {i for i in ref_sets[t] if i < e}
            got_idx = indices[t].tolist()
            assert sorted(i for i in got_idx if i < e) == sorted(real)
            assert got_idx.count(e) == len(ref_sets[t]) - len(real)  # zero slots carry the sentinel E
            n_zero += got_idx.count(e)
            # Real experts come from at most topk_group groups.
            assert len({i // per_group for i in real}) <= router.topk_group
            for slot, i in enumerate(got_idx):
                want_w = ref_weights[t, i].item() if i < e else 0.0
                assert weights[t, slot].item() == pytest.approx(want_w, rel=1e-5, abs=1e-6)
        if zero_bias > 0:
            # Zero experts win slots on tokens whatever groups those tokens chose.
            assert 0 < n_zero < x.shape[0] * router.top_k
            pairs = {
                frozenset(i // per_group for i in s if i < e) for s in ref_sets if any(i >= e for i in s)
            }
            assert len(pairs) >= 3
    router.zero_logit_bias = 30.0
    with torch.no_grad():
        _, _, idx = router(x)
    assert (idx == e).all() and z > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_share_is_exact(family):
    _, injected, report = _original_and_injected(family)
    ids = token_batch(2, 16)
    for share in (0.0, 0.25, 0.5, 0.75):
        with (
            zeda.RouterTelemetry(injected) as tel,
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
    with zeda.RouterTelemetry(model) as tel, torch.no_grad():
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


def test_llama4_token_on_a_zero_slot_gets_exactly_the_shared_expert():
    """Llama 4 routes k = 1: a token whose only slot is a zero expert skips the routed experts and
    its MoE output is the shared expert's, bit for bit (both the stock dense path and zeda's)."""
    from zeda.zero.inject import set_experts_backend

    _, injected, report = _original_and_injected("llama4_text")
    assert report.top_k == 1
    layer = find_moe_layers(injected)[0]
    x = torch.randn(2, 8, injected.config.hidden_size, generator=torch.Generator().manual_seed(2))
    flat = x.reshape(-1, x.shape[-1])
    for backend in ("eager", "zeda"):
        set_experts_backend(injected, backend)
        with torch.no_grad(), router_settings(injected, forced_zero_share=0.5, zero_logit_bias=-1e4):
            _, _, indices = layer.route(flat)
            out, _ = layer.block(x)
            shared = layer.block.shared_expert(flat)
        on_zero = indices[:, 0] == report.num_experts
        assert on_zero.sum() == 8  # half the tokens
        assert torch.equal(out[on_zero], shared[on_zero]), backend
        assert not torch.equal(out[~on_zero], shared[~on_zero]), backend


def test_softmax_group_limited_routing_matches_reference_and_keeps_zero_experts_eligible():
    """DeepSeek-V2 routing (softmax over E+Z, 16 experts in 4 groups ranked by their best expert,
    2 groups kept, top-4, no renormalisation, scaled). Zero experts off: bit-equal to transformers'
    DeepseekV2TopkRouter. On: equal to a per-token reference in which real experts obey the group
    mask and zero experts, in no group, stay eligible for every token."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    overrides = dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    original = tiny_model("deepseek_v2", **overrides)
    model = tiny_model("deepseek_v2", **overrides)
    zeda.inject_zero_experts(model)
    router, stock = find_moe_layers(model)[0].router, find_moe_layers(original)[0].router
    assert type(stock) is DeepseekV2TopkRouter
    e, z, k, per_group = router.num_experts, router.num_zero_experts, router.top_k, 4
    x = torch.randn(256, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), teacher_mode(model):
        for a, b in zip(router(x), stock(x), strict=True):
            assert torch.equal(a, b)
    with torch.no_grad():
        plain = torch.softmax(x @ stock.weight.T, -1).topk(k, -1).indices
        grouped = stock(x)[2]
    assert sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(plain, grouped, strict=True)) >= 10
    scale = float((x @ stock.weight.detach().T).std())  # a zero-logit bias of the logits' own scale
    for zero_bias in (0.0, scale):
        router.zero_logit_bias = zero_bias
        with torch.no_grad():
            _, weights, indices = router(x)
        n_zero = 0
        for t, h in enumerate(x.double()):
            logits = router.weight.detach().double() @ h
            logits[e:] += zero_bias
            p = torch.softmax(logits, -1)
            best = [max(p[g * per_group : (g + 1) * per_group]).item() for g in range(4)]
            groups = sorted(range(4), key=lambda g: -best[g])[:2]
            candidates = [i for i in range(e) if i // per_group in groups] + list(range(e, e + z))
            top = sorted(candidates, key=lambda i: -p[i].item())[:k]
            got = indices[t].tolist()
            assert sorted(i for i in got if i < e) == sorted(i for i in top if i < e)
            assert got.count(e) == sum(i >= e for i in top)
            n_zero += got.count(e)
            for slot, i in enumerate(got):
                want = p[i].item() * router.routed_scaling_factor if i < e else 0.0
                assert weights[t, slot].item() == pytest.approx(want, rel=1e-5, abs=1e-7)
        if zero_bias > 0:
            assert 0 < n_zero < x.shape[0] * k
    router.zero_logit_bias = 0.0


@pytest.mark.parametrize("family", ["llama4_text", "minimax_m2"])
def test_new_router_kinds_follow_the_zero_expert_rules(family):
    """Llama 4 (top-k of the logits over E+Z, sigmoid of the chosen) and MiniMax-M2 (select on
    sigmoid + the block's correction bias over E+Z, weights normalised over the k including zero
    slots): zeda's router against a per-token reference; teacher mode equals the stock router."""
    original, injected, report = _original_and_injected(family)
    layer, stock_layer = find_moe_layers(injected)[0], find_moe_layers(original)[0]
    e, z, k = report.num_experts, report.num_zero_experts, report.top_k
    x = torch.randn(64, injected.config.hidden_size, generator=torch.Generator().manual_seed(3))
    bias = getattr(layer.block, "e_score_correction_bias", None)
    with torch.no_grad(), teacher_mode(injected):
        got = layer.route(x)
        want = stock_layer.router(x, stock_layer.block.e_score_correction_bias) if bias is not None else None
    if want is not None:
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    else:  # Llama 4's stock router returns dense sigmoid scores at the chosen experts
        scores, logits = stock_layer.router(x)
        assert torch.equal(got[0], logits)
        assert torch.equal(scores.gather(1, got[2]), got[1])
    zero_bias = float((x @ stock_layer.router.weight.detach().T).std()) / 2  # of the logits' own scale
    layer.router.zero_logit_bias = zero_bias
    with torch.no_grad():
        _, weights, indices = layer.route(x)
    layer.router.zero_logit_bias = 0.0
    n_zero = 0
    for t, h in enumerate(x.double()):
        logits = layer.router.weight.detach().double() @ h
        logits[e:] += zero_bias
        if bias is None:
            top = logits.topk(k).indices.tolist()
            w = {i: torch.sigmoid(logits[i]).item() for i in top}
        else:
            s = torch.sigmoid(logits)
            top = (s + bias.double()).topk(k).indices.tolist()
            total = s[top].sum().item()
            w = {i: s[i].item() / total for i in top}
        got = indices[t].tolist()
        assert sorted(i for i in got if i < e) == sorted(i for i in top if i < e)
        assert got.count(e) == sum(i >= e for i in top)
        n_zero += got.count(e)
        for slot, i in enumerate(got):
            assert weights[t, slot].item() == pytest.approx(w[i] if i < e else 0.0, rel=1e-5, abs=1e-7)
    assert 0 < n_zero < x.shape[0] * k and z > 0
