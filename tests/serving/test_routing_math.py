"""zeda_vllm's routing math (pure torch) against zeda's own routers; no vLLM needed.

``zeda_vllm`` may not import zeda (the vLLM environment pins an older transformers), so its
routing is a mirror of zeda's; these tests pin the mirror to the original on injected tiny
models of every family the plugin serves: natural routing, a zero-logit bias, forced shares
(teacher routing + forced drops), and the slot compaction that feeds the experts kernel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zeda
from zeda_vllm.routing import compact_slots, layer_zero_logit_bias, zero_aware_route


def _tiny_model(family: str, **overrides):
    try:
        from zeda.tiny import tiny_model
    except ImportError:  # the refactor may move it
        from zeda.testing.tiny import tiny_model  # type: ignore[no-redef]
    return tiny_model(family, **overrides)


FAMILIES = {
    "qwen3_moe": ("softmax", {}),
    "mixtral": ("softmax", {}),
    "glm4_moe": ("sigmoid_bias", {"n_group": 4, "topk_group": 2}),
    "deepseek_v3": ("sigmoid_bias", {}),  # routing math only; the plugin does not serve it yet
}


def _router(family: str):
    kind, overrides = FAMILIES[family]
    model = _tiny_model(family, **overrides)
    zeda.inject_zero_experts(model, seed=0)
    routers = [
        m for m in model.modules() if getattr(m, "num_zero_experts", 0) > 0 and hasattr(m, "zeda_layer_index")
    ]
    return kind, routers[0]


def _mine(kind: str, router, h: torch.Tensor, **kwargs):
    if kind == "softmax":
        logits = F.linear(h, router.weight)
        extra = {"renormalize": bool(getattr(router, "norm_topk_prob", True))}
    else:
        logits = F.linear(h.float(), router.weight.float())
        extra = {
            "renormalize": bool(router.norm_topk_prob),
            "e_score_correction_bias": router.e_score_correction_bias,
            "num_expert_group": router.num_group if hasattr(router, "num_group") else router.n_group,
            "topk_group": router.topk_group,
            "routed_scaling_factor": router.routed_scaling_factor,
        }
    return zero_aware_route(
        logits, kind=kind, num_experts=router.num_experts, top_k=router.top_k, **extra, **kwargs
    )


def _as_sets(weights: torch.Tensor, ids: torch.Tensor, e: int) -> list[dict[int, float]]:
    out = []
    for w_row, i_row in zip(weights.tolist(), ids.tolist(), strict=True):
        out.append({i: w for w, i in zip(w_row, i_row, strict=True) if 0 <= i < e})
    return out


def _assert_same(theirs, mine, e: int) -> None:
    a = _as_sets(theirs[1], theirs[2], e)
    b = _as_sets(*mine, e)
    assert [sorted(x) for x in a] == [sorted(x) for x in b]
    for x, y in zip(a, b, strict=True):
        for k in x:
            assert abs(x[k] - y[k]) < 1e-6


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("bias", [0.0, 0.7, -0.4])
def test_natural_routing_matches_zeda(family: str, bias: float) -> None:
    kind, router = _router(family)
    h = torch.randn(64, router.hidden_dim, generator=torch.Generator().manual_seed(3))
    router.zero_logit_bias = bias
    with torch.no_grad():
        theirs = router(h)
        mine = _mine(kind, router, h, zero_logit_bias=bias)
    if bias >= 0:
        assert bool((theirs[2] >= router.num_experts).any()), "test needs some zero slots"
    _assert_same(theirs, mine, router.num_experts)
    # renormalise first, then drop: kept weights of a token with a zero slot sum below 1 (softmax)
    if kind == "softmax" and bool((mine[1] < 0).any()):
        sums = mine[0].sum(-1)
        assert bool((sums < 1 - 1e-4).any()) and bool((sums <= 1 + 1e-5).all())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.75])
def test_forced_share_matches_zeda_teacher_routing(family: str, share: float) -> None:
    kind, router = _router(family)
    h = torch.randn(37, router.hidden_dim, generator=torch.Generator().manual_seed(4))
    router.zero_experts_enabled = False
    router.forced_zero_share = share
    with torch.no_grad():
        theirs = router(h)
        mine = _mine(kind, router, h, zero_experts_enabled=False, forced_zero_share=share)
    _assert_same(theirs, mine, router.num_experts)
    dropped = int((mine[1] < 0).sum())
    assert dropped == int(share * h.shape[0] * router.top_k + 1e-9)


def test_compact_slots_layouts() -> None:
    w = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]])
    dense = compact_slots(w, torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32))
    assert dense[0] == "dense"
    layout, tok, cw, ci = compact_slots(w, torch.tensor([[1, -1, 3], [4, 5, -1]], dtype=torch.int32))
    assert layout == "uniform" and tok is None
    assert ci.tolist() == [[1, 3], [4, 5]] and torch.allclose(cw, torch.tensor([[0.5, 0.2], [0.6, 0.4]]))
    layout, tok, cw, ci = compact_slots(w, torch.tensor([[1, -1, -1], [4, 5, -1]], dtype=torch.int32))
    assert layout == "rows" and tok.tolist() == [0, 1, 1]
    assert ci[:, 0].tolist() == [1, 4, 5] and torch.allclose(cw[:, 0], torch.tensor([0.5, 0.6, 0.4]))
    layout, tok, cw, ci = compact_slots(w, torch.full((2, 3), -1, dtype=torch.int32))
    assert layout == "rows" and tok.tolist() == [0] and cw.tolist() == [[0.0]]


def test_layer_zero_logit_bias() -> None:
    assert layer_zero_logit_bias(None, 3) == 0.0
    assert layer_zero_logit_bias(0.5, 3) == 0.5
    assert layer_zero_logit_bias([0.1, 0.2], 1) == 0.2
    with pytest.raises(ValueError, match="one float per MoE layer"):
        layer_zero_logit_bias([0.1], 1)
