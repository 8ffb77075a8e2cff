"""SGLang's GLM-4.5/4.6/4.7 (glm4_moe) with zeda's zero-aware router (``ZedaGlm4MoeForCausalLM``)."""

from __future__ import annotations

from typing import Any

from sglang.srt.models.glm4_moe import Glm4MoeForCausalLM

from ..install import install_zero_experts


class ZedaGlm4MoeForCausalLM(Glm4MoeForCausalLM):
    """SGLang's glm4_moe; group-limited sigmoid routing over E real experts + Z zero experts."""

    def __init__(self, config: Any, quant_config: Any = None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        install_zero_experts(self, config)

    @classmethod
    def shared_experts_fusion_disable_reason(cls, hf_config: Any, quant_config: Any) -> str:
        """Never fuse the shared expert into the routed top-k: zeda's router fills all k slots."""
        return "zeda exports route k slots over real + zero experts; the shared expert stays separate"


EntryClass = ZedaGlm4MoeForCausalLM
