"""SGLang's Mixtral with zeda's zero-aware router (``ZedaMixtralForCausalLM``)."""

from __future__ import annotations

from typing import Any

from sglang.srt.models.mixtral import MixtralForCausalLM

from ..install import install_zero_experts


def moe_layers(c: Any) -> list[int]:
    """Every decoder layer of Mixtral holds an MoE block."""
    return list(range(c.num_hidden_layers))


class ZedaMixtralForCausalLM(MixtralForCausalLM):
    """SGLang's Mixtral; every MoE block routes over E real + Z zero experts."""

    def __init__(self, config: Any, quant_config: Any = None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        install_zero_experts(self, config, moe_layers)


EntryClass = ZedaMixtralForCausalLM
