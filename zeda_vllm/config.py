"""transformers config classes for zeda exports (``model_type = "zeda_<family>"``).

A zeda export's ``config.json`` names a model type transformers does not know, so vLLM's
config parser (``AutoConfig.from_pretrained``) needs these classes registered first. The
supported families subclass the family's own config class, so every field vLLM reads keeps
its meaning; the ``zeda`` dict (``num_zero_experts``, ``zero_logit_bias``, ...) rides along
as an extra attribute. The other zeda families get a config class that refuses to load with
one line naming the family and the supported ones.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import AutoConfig, Glm4MoeConfig, MixtralConfig, PretrainedConfig, Qwen3MoeConfig

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES: dict[str, str] = {
    "qwen3_moe": "ZedaQwen3MoeForCausalLM",
    "glm4_moe": "ZedaGlm4MoeForCausalLM",
    "mixtral": "ZedaMixtralForCausalLM",
}
"""zeda family (base ``model_type``) -> architecture name served by this plugin."""

UNSUPPORTED_FAMILIES: tuple[str, ...] = ("qwen2_moe", "olmoe", "gpt_oss", "glm4_moe_lite", "deepseek_v3")
"""zeda families that the vLLM plugin refuses (they load with zeda's transformers model)."""


def unsupported_message(family: str) -> str:
    """The one-line refusal for a zeda family this plugin does not serve."""
    return (
        f"zeda_vllm: zeda family {family!r} (model_type 'zeda_{family}') is not supported by the "
        f"vLLM plugin; supported families: {', '.join(sorted(SUPPORTED_FAMILIES))}"
    )


class ZedaQwen3MoeConfig(Qwen3MoeConfig):
    """Qwen3-MoE config of a zeda export."""

    model_type = "zeda_qwen3_moe"


class ZedaGlm4MoeConfig(Glm4MoeConfig):
    """GLM-4.5/4.6/4.7 (glm4_moe) config of a zeda export."""

    model_type = "zeda_glm4_moe"


class ZedaMixtralConfig(MixtralConfig):
    """Mixtral config of a zeda export."""

    model_type = "zeda_mixtral"


class _UnsupportedZedaConfig(PretrainedConfig):
    """Base of the config classes of refused families: loading one raises a clear error."""

    zeda_family = ""

    def __init__(self, **kwargs: Any) -> None:
        raise ValueError(unsupported_message(self.zeda_family))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> PretrainedConfig:
        """``AutoConfig.from_pretrained`` ends here: refuse the family."""
        raise ValueError(unsupported_message(cls.zeda_family))


def _unsupported_class(family: str) -> type[PretrainedConfig]:
    name = "Zeda" + "".join(p.capitalize() for p in family.split("_")) + "UnsupportedConfig"
    cls = type(name, (_UnsupportedZedaConfig,), {"model_type": f"zeda_{family}", "zeda_family": family})
    cls.__module__ = __name__
    globals()[name] = cls  # importable by name, so pickling works across vLLM's processes
    return cls


CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "zeda_qwen3_moe": ZedaQwen3MoeConfig,
    "zeda_glm4_moe": ZedaGlm4MoeConfig,
    "zeda_mixtral": ZedaMixtralConfig,
    **{f"zeda_{f}": _unsupported_class(f) for f in UNSUPPORTED_FAMILIES},
}


def register_configs() -> None:
    """Register every ``zeda_<family>`` model type with transformers' ``AutoConfig``."""
    for model_type, cls in CONFIG_CLASSES.items():
        AutoConfig.register(model_type, cls, exist_ok=True)
    logger.debug("registered zeda config classes: %s", ", ".join(CONFIG_CLASSES))
