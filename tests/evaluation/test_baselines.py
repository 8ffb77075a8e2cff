"""Training-free baselines: exactness with no policy, telemetry of dropped slots, calibration."""

from __future__ import annotations

import pytest
import torch
from conftest import token_batch

import zeda
from zeda.evaluation.baselines import attach_router_policy, calibrate, measure_share
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
    cal = calibrate(model, kind, 0.3, ids, tol=0.01)
    assert abs(cal.achieved_share - 0.3) <= 0.02
    # The reported share is what the chosen value really gives.
    assert measure_share(model, ids, cal.policy).zero_share == pytest.approx(cal.achieved_share)


def test_calibrate_keep_top_m_is_discrete() -> None:
    model = attach_router_policy(tiny_model("qwen3_moe", num_experts_per_tok=4))
    ids = token_batch(2, 16)
    cal = calibrate(model, "keep_top_m", 0.3, ids)
    assert cal.value == 3.0 and cal.achieved_share == pytest.approx(0.25)


def test_calibrate_on_injected_teacher_mode() -> None:
    model = tiny_model("qwen3_moe", num_experts_per_tok=4)
    zeda.inject_zero_experts(model, 4)
    ids = token_batch(2, 16)
    with zeda.teacher_mode(model):
        cal = calibrate(model, "top_p", 0.4, ids, tol=0.01)
    assert abs(cal.achieved_share - 0.4) <= 0.02


def test_calibrate_bad_input() -> None:
    model = tiny_model("qwen3_moe")
    with pytest.raises(zeda.ZedaError, match="attach_router_policy"):
        calibrate(model, "top_p", 0.3, token_batch())
    attach_router_policy(model)
    with pytest.raises(zeda.ZedaError, match="unknown baseline"):
        calibrate(model, "top_q", 0.3, token_batch())
