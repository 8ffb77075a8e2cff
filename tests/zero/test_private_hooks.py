"""The two private transformers APIs zeda relies on, checked directly against the installed version.

zeda uses ``transformers.integrations.moe._grouped_linear`` (in `zeda.zero.experts.grouped_linear`)
and sets the private ``_is_expert_parallel`` flag of experts modules (in
`zeda.zero.experts.skip_sentinel_slots`). If a transformers release changes either, these
tests fail before any model silently computes garbage.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from transformers.integrations import moe
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from zeda.tiny import tiny_config
from zeda.zero.experts import grouped_linear, skip_sentinel_slots


def test_installed_transformers_is_in_the_pinned_range():
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    lo, hi = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', text).groups()
    assert Version(lo) <= Version(version("transformers")) < Version(hi)


def test_grouped_linear_signature_and_semantics():
    params = list(inspect.signature(moe._grouped_linear).parameters)
    assert params[:3] == ["input", "weight", "offs"] and {"bias", "is_transposed"} <= set(params)
    g = torch.Generator().manual_seed(0)
    e, n_in, n_out = 3, 8, 12  # grouped_mm wants 16-byte strides
    counts = [2, 0, 3]
    x = torch.randn(sum(counts), n_in, generator=g)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    w = torch.randn(e, n_out, n_in, generator=g)
    bias = torch.randn(sum(counts), n_out, generator=g)
    rows = torch.repeat_interleave(torch.arange(e), torch.tensor(counts))
    want = torch.stack([w[r] @ x[i] for i, r in enumerate(rows.tolist())]) + bias
    torch.testing.assert_close(grouped_linear(x, w, offsets, bias, False), want)
    torch.testing.assert_close(grouped_linear(x, w.transpose(1, 2).contiguous(), offsets, bias, True), want)


def _experts_and_routing():
    torch.manual_seed(0)
    experts = Qwen3MoeExperts(tiny_config("qwen3_moe")).eval()
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2)
    e = experts.num_experts
    x = torch.randn(6, experts.hidden_dim)
    idx = torch.tensor([[0, e], [e, 1], [2, 3], [e, e], [4, e], [5, 6]])
    w = torch.rand(6, 2).masked_fill(idx == e, 0.0)
    return experts, x, idx, w


def _reference(experts, x, idx, w):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j, i in enumerate(idx[t].tolist()):
            if i < experts.num_experts:
                gate, up = (x[t] @ experts.gate_up_proj[i].T).chunk(2)
                h = experts.act_fn(gate) * up
                out[t] += w[t, j] * (h @ experts.down_proj[i].T)
    return out


@pytest.mark.parametrize("forward", [moe.batched_mm_experts_forward, moe.grouped_mm_experts_forward])
def test_stock_backends_skip_sentinel_rows_only_with_the_expert_parallel_flag(forward):
    experts, x, idx, w = _experts_and_routing()
    assert experts._is_expert_parallel is False  # set by @use_experts_implementation
    if forward is moe.batched_mm_experts_forward:
        # Without the flag the sentinel index E is used to index the weights and fails.
        with pytest.raises((IndexError, RuntimeError)), torch.no_grad():
            forward(experts, x, idx, w)
    skip_sentinel_slots(experts)
    assert experts._is_expert_parallel is True
    with torch.no_grad():
        out = forward(experts, x, idx, w)
        want = _reference(experts, x, idx, w)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # a token with only zero slots
