"""SGLang's Qwen3-MoE with zeda's zero-aware router (``ZedaQwen3MoeForCausalLM``)."""

from __future__ import annotations

from typing import Any

from sglang.srt.models.qwen3_moe import Qwen3MoeForCausalLM

from ..install import install_zero_experts


class ZedaQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    """SGLang's Qwen3-MoE; every MoE block routes over E real + Z zero experts."""

    def __init__(self, config: Any, quant_config: Any = None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        install_zero_experts(self, config)


EntryClass = ZedaQwen3MoeForCausalLM
