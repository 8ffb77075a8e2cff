"""SGLang's Qwen3-MoE with zeda's zero-aware router (``ZedaQwen3MoeForCausalLM``)."""

from __future__ import annotations

from typing import Any

from sglang.srt.models.qwen3_moe import Qwen3MoeForCausalLM

from ..install import install_zero_experts


def moe_layers(c: Any) -> list[int]:
    """Decoder layers of a Qwen3-MoE config that hold an MoE block."""
    return [
        i
        for i in range(c.num_hidden_layers)
        if i not in (getattr(c, "mlp_only_layers", None) or [])
        and c.num_experts > 0
        and (i + 1) % c.decoder_sparse_step == 0
    ]


class ZedaQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    """SGLang's Qwen3-MoE; every MoE block routes over E real + Z zero experts."""

    def __init__(self, config: Any, quant_config: Any = None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        install_zero_experts(self, config, moe_layers)


EntryClass = ZedaQwen3MoeForCausalLM
