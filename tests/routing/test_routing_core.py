"""The routing core (`zeda_routing`) against the families' own routers and its own contracts.

zeda's routers, the vLLM plugin and the SGLang models all route with this core, so these tests
pin it to something independent: each family's stock transformers router (the core's math on
the first E columns must be bit-identical to it), plus the rules the method fixes (zero experts
outside every group, renormalise then drop, exact forced shares, the share solve, the counts).
"""

from __future__ import annotations

import pytest
import torch

import zeda
from zeda.tiny import TINY, tiny_model
from zeda_routing import (
    DROPPED,
    KINDS,
    LayerStats,
    RouterKind,
    RouterParams,
    drop_slots,
    forced_zero_mask,
    layer_zero_logit_bias,
    limit_groups,
    per_layer_values,
    register_kind,
    route,
    select_slots,
    solve_share,
)

GROUPED = {"glm4_moe": {"n_group": 4, "topk_group": 2}, "deepseek_v3": {"n_group": 4, "topk_group": 2}}
# (deepseek_v2 and dots1's tiny configs are grouped already)


def _router(family: str):
    """An injected router and what its block passes it besides the hidden states (MiniMax-M2's
    correction bias lives on the block)."""
    model = tiny_model(family, **GROUPED.get(family, {}))
    zeda.inject_zero_experts(model, seed=0)
    layer = zeda.find_moe_layers(model)[0]
    names = getattr(layer.router, "zeda_block_buffers", ())
    return layer.router, tuple(getattr(layer.block, n) for n in names)


def _hidden(router, n: int = 64, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, router.weight.shape[-1], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(TINY))
def test_core_on_real_columns_is_the_family_router_bit_for_bit(family: str) -> None:
    """On the E real columns the core's kind math reproduces the stock transformers router."""
    router, extra = _router(family)
    with torch.no_grad():
        logits, weights, ids = router.native_forward(_hidden(router), *extra)  # the family's own forward
        params = router.routing_params(*extra)._replace(zero_logit_bias=0.7)  # no zero columns: no effect
        mine = select_slots(logits, router.zeda_router_kind, params)
    assert torch.equal(mine[0], weights) and torch.equal(mine[1], ids)


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("bias", [0.0, 0.7])
def test_engine_route_matches_zeda_router(family: str, bias: float) -> None:
    """`route` (what the engines call) equals zeda's router, with dropped slots at id -1 / weight 0."""
    router, extra = _router(family)
    router.zero_logit_bias = bias
    h = _hidden(router)
    with torch.no_grad():
        _, w_zeda, i_zeda = router(h, *extra)
        w, i = route(router.gate_logits(h), router.zeda_router_kind, router.routing_params(*extra))
    e = router.num_experts
    assert w.dtype == torch.float32 and i.dtype == torch.int32
    assert torch.equal(i == DROPPED, i_zeda == e)
    if bias > 0:
        assert bool((i == DROPPED).any()), "test needs zero slots"
    assert torch.equal(i[i >= 0].long(), i_zeda[i_zeda < e])
    assert torch.equal(w, w_zeda.float())


def test_renormalise_then_drop() -> None:
    """Weights are normalised over the k chosen slots including zero slots, then those are dropped."""
    logits = torch.tensor([[2.0, 1.0, 0.0, 3.0]])  # E = 3 real, Z = 1 zero (the best)
    w, i = route(logits, "softmax", RouterParams(num_experts=3, top_k=2))
    p = torch.softmax(logits, -1)[0]
    assert i.tolist() == [[DROPPED, 0]]
    torch.testing.assert_close(w, torch.tensor([[0.0, float(p[0] / (p[3] + p[0]))]]))


def test_zero_experts_belong_to_no_group() -> None:
    """Group-limited selection masks real experts of losing groups; zero experts stay eligible."""
    p = RouterParams(num_experts=8, top_k=2, num_expert_group=4, topk_group=1)
    choice = torch.tensor([[5.0, 4.0, 0, 0, 0, 0, 0, 0, 1.0, 0.5]])  # group 0 wins; zero cols 8, 9
    out = limit_groups(choice, p)
    assert torch.isinf(out[0, 2:8]).all() and torch.equal(out[0, :2], choice[0, :2])
    assert torch.equal(out[0, 8:], choice[0, 8:])
    # group 0 wins (3 + 3); expert 4 (group 2, 2.9) is masked although it beats zero expert 8 (2.8)
    logits = torch.tensor([[3.0, 3, -1, -1, 2.9, -1, -1, -1, 2.8, -5]])
    w, i = route(logits, "sigmoid_bias", p._replace(top_k=3, correction_bias=torch.zeros(10)))
    assert sorted(i[0].tolist()) == [DROPPED, 0, 1]


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("tokens", [1, 7, 37])
def test_forced_share_is_exact(share: float, tokens: int) -> None:
    w = torch.rand(tokens, 4, generator=torch.Generator().manual_seed(tokens))
    mask = forced_zero_mask(w, share)
    assert int(mask.sum()) == int(share * tokens * 4 + 1e-9)
    weights, ids = drop_slots(
        w, torch.zeros(tokens, 4, dtype=torch.long), 8, dropped_id=DROPPED, forced_share=share
    )
    assert torch.equal(ids == DROPPED, mask) and bool((weights[mask] == 0).all())


def test_per_layer_bias_is_validated() -> None:
    assert per_layer_values(None, 2) == [0.0, 0.0] and per_layer_values(0.5, 2) == [0.5, 0.5]
    with pytest.raises(ValueError, match="has 1 entries but the model has 2 MoE layers"):
        per_layer_values([0.1], 2)
    cfg = tiny_model("glm4_moe", num_hidden_layers=3, first_k_dense_replace=1).config
    assert layer_zero_logit_bias([0.1, 0.2], cfg) == {1: 0.1, 2: 0.2}
    with pytest.raises(ValueError, match="one float or one per MoE layer"):
        layer_zero_logit_bias([0.1, 0.2, 0.3], cfg)  # one per decoder layer is not one per MoE layer


@pytest.mark.parametrize("target", [0.1, 0.37, 0.6])
def test_share_solve_unbounded_and_bounded(target: float) -> None:
    x = torch.linspace(-4, 4, 2001)
    unbounded = solve_share(lambda b: float((x < b).float().mean()), target, tol=0.002, max_iter=30)
    assert abs(unbounded.share - target) <= 0.002 and unbounded.calls <= 30
    bounded = solve_share(
        lambda v: float((x < 8 * v - 4).float().mean()) * 0.75,
        target,
        tol=0.004,
        max_iter=12,
        ends=(0.0, 0.75),
    )
    assert abs(bounded.share - target) <= 0.004
    falling = solve_share(
        lambda v: 0.75 * (1 - v), target, tol=0.004, max_iter=12, ends=(0.75, 0.0), increasing=False
    )
    assert abs(falling.share - target) <= 0.004


def test_counts_treat_sentinel_and_minus_one_as_skipped() -> None:
    stats = LayerStats()
    stats.add(torch.tensor([[0, 4], [DROPPED, 1], [2, 2]]), num_experts=4)
    assert (stats.slots, stats.zero_slots) == (6, 2)
    assert stats.real_per_token == [0, 2, 1] and stats.expert_load == [1, 1, 2, 0]


def test_a_new_kind_is_one_function() -> None:
    """A kind registered in the table routes through the same drops (llama4-style: top-k on the
    logits, then sigmoid of the chosen)."""

    def topk_sigmoid(logits, p):
        top_v, top_i = torch.topk(logits, p.top_k, dim=-1)
        return torch.sigmoid(top_v.float()), top_i

    name = "test_topk_sigmoid"
    register_kind(RouterKind(name, topk_sigmoid, lambda x: torch.softmax(x.float(), -1)))
    try:
        w, i = route(torch.tensor([[0.0, 1.0, 2.0]]), name, RouterParams(num_experts=2, top_k=1))
        assert i.tolist() == [[DROPPED]] and w.tolist() == [[0.0]]
    finally:
        KINDS.pop(name)
    with pytest.raises(ValueError, match="unknown router kind"):
        route(torch.zeros(1, 3), name, RouterParams(num_experts=2, top_k=1))
