"""The GPU path's routing traces whole: ``torch.compile(fullgraph=True)``, no host sync.

vLLM captures CUDA graphs by default on GPUs; a host sync (``.tolist()``, ``.item()``) or a
data-dependent shape (``nonzero``) inside the MoE op breaks capture. On GPUs the plugin routes
with `zeda_routing.serving.LayerRouting.route` (dropped slots at the sentinel id E, which the
layer's expert map sends to -1) or, with a forced share, vLLM's router followed by
`zeda_routing.drop_slots`; both must trace without a graph break, on every router kind, for
any token count. The CPU path's slot compaction must not (it syncs), which shows the check bites.
No GPU and no vLLM are needed.
"""

from __future__ import annotations

import pytest
import torch

from zeda_routing import DROPPED, drop_slots
from zeda_routing.serving import LayerRouting
from zeda_vllm.routing import compact_slots

E, Z, K = 16, 8, 4


class _Gate(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e_score_correction_bias = torch.nn.Parameter(torch.randn(E + Z) * 0.1, requires_grad=False)


ROUTERS = {
    "softmax": dict(kind="softmax", renormalize=True, zero_logit_bias=0.5),
    "sigmoid_grouped": dict(
        kind="sigmoid_bias", renormalize=True, gate=_Gate(), num_expert_group=4, topk_group=2
    ),
    "topk_softmax": dict(kind="topk_softmax", renormalize=True, zero_logit_bias=-0.3),
    "forced_teacher": dict(kind="softmax", renormalize=True, forced_share=0.5),
}


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_gpu_routing_traces_whole_for_any_token_count(name: str) -> None:
    routing = LayerRouting(num_experts=E, num_zero_experts=Z, top_k=K, **ROUTERS[name])
    compiled = _compiled(lambda logits: routing.route(logits, E))
    for t in (1, 7, 64):
        logits = torch.randn(t, E + Z, generator=torch.Generator().manual_seed(t))
        weights, ids = compiled(logits)
        ref_w, ref_i = routing.route(logits)  # the CPU convention: -1
        assert torch.equal(ids == E, ref_i == DROPPED) and torch.equal(weights, ref_w)
        assert torch.equal(ids[ids != E], ref_i[ref_i != DROPPED])
        assert ids.shape == (t, K) and ids.dtype == torch.int32


def test_forced_drops_after_the_stock_router_trace_whole() -> None:
    def forced(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return drop_slots(
            weights.float(), ids.to(torch.int32), E, dropped_id=E, zero_routing=False, forced_share=0.5
        )

    compiled = _compiled(forced)
    for t in (1, 9):
        w, i = torch.rand(t, K), torch.randint(0, E, (t, K))
        got, ref = compiled(w, i), forced(w, i)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        assert int((got[1] == E).sum()) == int(0.5 * t * K + 1e-9)


def test_the_cpu_compaction_does_not_trace_whole() -> None:
    """The check bites: the CPU path's compaction syncs with the host and has data-dependent shapes."""
    compiled = _compiled(lambda w, i: compact_slots(w, i)[2])
    w = torch.rand(4, K)
    i = torch.tensor([[1, -1, 2, 3], [1, 2, -1, -1], [0, 1, 2, 3], [-1, 5, 6, 7]], dtype=torch.int32)
    with pytest.raises(Exception, match="(?i)graph break|data.dependent|tolist|item|Unsupported"):
        compiled(w, i)
