"""SGLang's Mixtral with zeda's zero-aware router (``ZedaMixtralForCausalLM``)."""

from __future__ import annotations

from typing import Any

from sglang.srt.models.mixtral import MixtralForCausalLM

from ..install import install_zero_experts


class ZedaMixtralForCausalLM(MixtralForCausalLM):
    """SGLang's Mixtral; every MoE block routes over E real + Z zero experts."""

    def __init__(self, config: Any, quant_config: Any = None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        install_zero_experts(self, config)


EntryClass = ZedaMixtralForCausalLM
