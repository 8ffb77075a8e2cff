"""zeda_vllm's slot compaction for vLLM's CPU MoE kernel (pure torch; no vLLM needed).

The routing math is the routing core's (tests/routing/test_routing_core.py pins it to every
family's own router and to zeda's routers).
"""

from __future__ import annotations

import torch

from zeda_vllm.routing import compact_slots


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
