"""RouterTelemetry: own hooks per collector, counts only the model under test, saturation alarm."""

from __future__ import annotations

import pytest
import torch
from conftest import token_batch

import zeda
from zeda.tiny import tiny_model
from zeda.zero.inject import find_moe_layers, teacher_mode
from zeda.zero.routing import router_settings, zero_routers
from zeda.zero.telemetry import RouterTelemetry


def _injected(family: str = "qwen3_moe") -> torch.nn.Module:
    model = tiny_model(family)
    zeda.inject_zero_experts(model)
    return model


def test_hooks_live_only_inside_the_context():
    model = _injected()
    routers = list(zero_routers(model))
    assert routers and all(not r._forward_hooks for r in routers)  # injection installs no hook
    tel = RouterTelemetry(model)
    with tel, torch.no_grad():
        assert all(len(r._forward_hooks) == 1 for r in routers)
        model(token_batch())
    assert all(not r._forward_hooks for r in routers)
    assert tel.zero_share > 0
    # Another model's forwards are never counted.
    other = _injected()
    with RouterTelemetry(model) as quiet, torch.no_grad():
        other(token_batch())
    assert quiet.layers == {}


def test_teacher_forward_inside_the_context_is_not_counted():
    """Issue 16, defect 1: a teacher pass inside the telemetry must not dilute the measured share."""
    model = _injected()
    ids = token_batch(2, 16)
    with RouterTelemetry(model) as alone, torch.no_grad():
        model(ids)
    with RouterTelemetry(model) as mixed, torch.no_grad():
        model(ids)
        with teacher_mode(model):
            model(ids)  # the teacher recomputed inside the same telemetry
    assert alone.zero_share > 0.05
    assert mixed.zero_share == alone.zero_share
    assert {i: s.slots for i, s in mixed.layers.items()} == {i: s.slots for i, s in alone.layers.items()}
    # A forced share is the model under test even in teacher mode (the baselines' calibration).
    with RouterTelemetry(model) as forced, torch.no_grad(), router_settings(model, forced_zero_share=0.5):
        with teacher_mode(model):
            model(ids)
    assert forced.zero_share == pytest.approx(0.5)


def test_nested_collectors_and_mask():
    model = _injected()
    ids = token_batch(2, 16)
    with RouterTelemetry(model) as outer, torch.no_grad():
        with RouterTelemetry(model) as inner:
            inner.set_mask(torch.tensor([[True] * 8 + [False] * 8] * 2))
            model(ids)
        model(ids)
    k = model.config.num_experts_per_tok
    first = next(iter(inner.layers.values()))
    assert first.slots == 16 * k and first.tokens == 16
    assert next(iter(outer.layers.values())).slots == 2 * 32 * k


def test_expert_saturation_alarm():
    """One expert taking every token is flagged; the busiest-expert share reads 1.0."""
    model = _injected("gpt_oss")  # its router has a bias: make expert 3 win every token
    layer = find_moe_layers(model)[0]
    e = layer.router.num_experts
    with torch.no_grad():
        layer.router.bias[3] = 100.0
    ids = token_batch(2, 16)
    with RouterTelemetry(model, saturation_factor=2.0) as tel, torch.no_grad():
        model(ids)
    stats = tel.layers[layer.index]
    assert stats.expert_load[3] == 32
    assert sum(stats.expert_load) + stats.zero_slots == stats.slots
    assert tel.busiest_expert_share[layer.index] == 1.0
    assert tel.saturated_layers[layer.index] == pytest.approx(32 * e / sum(stats.expert_load))
    assert tel.saturated_layers[layer.index] > 2.0
    with RouterTelemetry(model, saturation_factor=float(e)) as lenient, torch.no_grad():
        model(ids)
    assert lenient.saturated_layers == {}  # the busiest load can never exceed E × the mean
