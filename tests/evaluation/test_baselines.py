"""Training-free baselines: exactness with no policy, telemetry of dropped slots, calibration."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import token_batch

import zeda
from zeda.evaluation.baselines import (
    EntropyAdaptiveK,
    apply_policy,
    attach_router_policy,
    calibrate_rule,
    make_policy,
    measure_share,
)
from zeda.tiny import tiny_model
from zeda.zero.routing import SlotPolicy, router_settings, zero_routers


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # 2 shared CPU cores: intra-op threads only add contention for these tiny models.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_attach_without_policy_is_bit_identical(family: str) -> None:
    ref = tiny_model(family)
    model = tiny_model(family)
    ids = token_batch(2, 16)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        attach_router_policy(model)
        attach_router_policy(model)  # idempotent
        got = model(input_ids=ids).logits
    assert torch.equal(want, got)
    assert not zeda.is_injected(model)
    assert not getattr(model.config, "zeda", None)
    assert all(r.num_zero_experts == 0 for r in zero_routers(model))
    # Without a policy the original is not the model under test: telemetry ignores it.
    assert measure_share(model, ids).per_layer == {}
    tel = measure_share(model, ids, SlotPolicy("keep_top_m", 8))  # keeps every slot
    assert tel.zero_share == 0.0
    assert len(tel.per_layer) == len(zeda.find_moe_layers(model))


def test_policy_drops_are_counted_and_change_output() -> None:
    model = attach_router_policy(tiny_model("qwen3_moe"))
    ids = token_batch(2, 16)
    tel = measure_share(model, ids, SlotPolicy("keep_top_m", 1))
    assert tel.zero_share == pytest.approx(0.5)  # k = 2, one slot kept per token
    assert tel.real_experts_histogram[1] == sum(tel.real_experts_histogram)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with router_settings(model, forced_zero_share=0.25):
            forced = model(input_ids=ids).logits
    assert not torch.equal(base, forced)


@pytest.mark.parametrize("kind", ["top_p", "threshold"])
def test_calibrate_continuous_hits_target(kind: str) -> None:
    model = attach_router_policy(tiny_model("qwen3_moe", num_experts_per_tok=4))
    ids = token_batch(4, 32)
    cal = calibrate_rule(model, kind, 0.3, ids, tol=0.01)
    assert abs(cal.achieved_share - 0.3) <= 0.02
    # The reported share is what the chosen value really gives.
    assert measure_share(model, ids, cal.policy).zero_share == pytest.approx(cal.achieved_share)


def test_calibrate_keep_top_m_is_discrete() -> None:
    model = attach_router_policy(tiny_model("qwen3_moe", num_experts_per_tok=4))
    ids = token_batch(2, 16)
    cal = calibrate_rule(model, "keep_top_m", 0.3, ids)
    assert cal.value == 3.0 and cal.achieved_share == pytest.approx(0.25)


def test_calibrate_on_injected_teacher_mode() -> None:
    model = tiny_model("qwen3_moe", num_experts_per_tok=4)
    zeda.inject_zero_experts(model, 4)
    ids = token_batch(2, 16)
    with zeda.teacher_mode(model):
        cal = calibrate_rule(model, "top_p", 0.4, ids, tol=0.01)
    assert abs(cal.achieved_share - 0.4) <= 0.02


def test_calibrate_bad_input() -> None:
    model = tiny_model("qwen3_moe")
    with pytest.raises(zeda.ZedaError, match="attach_router_policy"):
        calibrate_rule(model, "top_p", 0.3, token_batch())
    attach_router_policy(model)
    with pytest.raises(zeda.ZedaError, match="unknown baseline"):
        calibrate_rule(model, "top_q", 0.3, token_batch())


def test_adaptive_k_counts_match_hand_computation() -> None:
    k, e = 4, 8
    logits = torch.tensor([[0.0] * e, [9.0] + [0.0] * (e - 1), [3.0, 2.0, 1.0] + [0.0] * (e - 3)])
    value = 0.4  # scale s = 0.4 / 0.6; thresholds tau_j = j * s / k on the normalised entropy
    s = value / (1 - value)
    want = []
    for row in logits:
        p = torch.softmax(row, -1)
        h = float(-(p * p.log()).sum()) / math.log(e)
        want.append(1 + sum(h > j * s / k for j in range(1, k)))
    got = EntropyAdaptiveK(value).keep_count(logits, "softmax", k)
    assert got.tolist() == want and want[0] == k and want[1] == 1  # uniform keeps all, peaked keeps one
    assert EntropyAdaptiveK(0.0).keep_count(logits, "softmax", k).tolist() == [k] * 3
    assert EntropyAdaptiveK(1.0).keep_count(logits, "softmax", k).tolist() == [1] * 3
    # sigmoid routers: entropy of the normalised sigmoid scores
    p = torch.sigmoid(logits[2]) / torch.sigmoid(logits[2]).sum()
    h = float(-(p * p.log()).sum()) / math.log(e)
    assert EntropyAdaptiveK(value).keep_count(logits[2:], "sigmoid_bias", k).item() == 1 + sum(
        h > j * s / k for j in range(1, k)
    )


def test_adaptive_k_drops_weakest_slots_and_renormalises() -> None:
    model = attach_router_policy(tiny_model("qwen3_moe", num_experts_per_tok=4))
    router = next(zero_routers(model))
    hidden = torch.randn(6, router.hidden_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, weights, indices = router(hidden)
    rule = EntropyAdaptiveK(0.5)
    keep_n = rule.keep_count(logits, router.zeda_router_kind, 4)
    _, w2, i2 = rule.hook(router, (hidden,), (logits, weights, indices))
    for t in range(6):
        kept = i2[t] < router.num_experts
        assert int(kept.sum()) == int(keep_n[t])
        # the kept slots are the highest-weight ones, rescaled to the original total
        assert set(weights[t].argsort(descending=True)[: int(keep_n[t])].tolist()) == set(
            kept.nonzero().flatten().tolist()
        )
        assert float(w2[t].sum()) == pytest.approx(float(weights[t].sum()), rel=1e-5)
    _, w3, _ = EntropyAdaptiveK(0.5, renormalize=False).hook(router, (hidden,), (logits, weights, indices))
    assert torch.equal(w3, weights.masked_fill(i2 >= router.num_experts, 0))


@pytest.mark.parametrize("kind", ["adaptive_k", "top_p_no_renorm"])
def test_calibrate_new_baselines_hit_target(kind: str) -> None:
    model = attach_router_policy(tiny_model("qwen3_moe", num_experts_per_tok=4))
    ids = token_batch(4, 32)
    cal = calibrate_rule(model, kind, 0.3, ids, tol=0.01)
    assert cal.kind == kind and abs(cal.achieved_share - 0.3) <= 0.02
    assert measure_share(model, ids, cal.policy).zero_share == pytest.approx(cal.achieved_share)


def test_top_p_with_and_without_renormalisation() -> None:
    model = attach_router_policy(tiny_model("qwen3_moe", num_experts_per_tok=4))
    ids = token_batch(2, 16)
    renorm, raw = make_policy("top_p", 0.6), make_policy("top_p_no_renorm", 0.6)
    assert renorm.renormalize and not raw.renormalize and raw.kind == "top_p"
    assert measure_share(model, ids, renorm).zero_share == measure_share(model, ids, raw).zero_share > 0
    router = next(zero_routers(model))
    hidden = torch.randn(5, router.hidden_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, w0, _ = router(hidden)
        with apply_policy(model, renorm):
            _, w1, i1 = router(hidden)
        with apply_policy(model, raw):
            _, w2, i2 = router(hidden)
    assert torch.equal(i1, i2)
    dropped = i1 >= router.num_experts
    assert torch.equal(w2, w0.masked_fill(dropped, 0))  # kept weights untouched
    assert torch.allclose(w1.sum(-1), w0.sum(-1))  # rescaled to the original total
