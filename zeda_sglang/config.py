"""transformers config classes for zeda exports, as SGLang's config parser needs them.

SGLang parses ``config.json`` with ``AutoConfig.from_pretrained``, which does not know a zeda
export's ``model_type = "zeda_<family>"``. `register_configs` (run by the ``sglang.srt.plugins``
entry point in every SGLang process, and on import of ``zeda_sglang.models``) registers:

- for the supported families, a subclass of the family's own config class, so every field
  SGLang reads keeps its meaning; the ``zeda`` dict rides along as an extra attribute;
- for every other zeda family, a config class that refuses to load with one line. Without it
  SGLang would fall back to its generic transformers backend for an unknown architecture.
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
"""zeda family (base ``model_type``) -> architecture name served by ``zeda_sglang.models``."""

UNSUPPORTED_FAMILIES: tuple[str, ...] = ("qwen2_moe", "olmoe", "gpt_oss", "glm4_moe_lite", "deepseek_v3")
"""zeda families that the SGLang models refuse (they load with zeda's transformers model)."""


def unsupported_message(family: str) -> str:
    """The one-line refusal for a zeda family that ``zeda_sglang`` does not serve."""
    return (
        f"zeda_sglang: zeda family {family!r} (model_type 'zeda_{family}') is not supported by the "
        f"SGLang models; supported families: {', '.join(sorted(SUPPORTED_FAMILIES))}"
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
    globals()[name] = cls  # importable by name, so pickling works across SGLang's processes
    return cls


CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "zeda_qwen3_moe": ZedaQwen3MoeConfig,
    "zeda_glm4_moe": ZedaGlm4MoeConfig,
    "zeda_mixtral": ZedaMixtralConfig,
    **{f"zeda_{f}": _unsupported_class(f) for f in UNSUPPORTED_FAMILIES},
}


def register_configs() -> None:
    """Register every ``zeda_<family>`` model type with transformers' ``AutoConfig`` (idempotent)."""
    for model_type, cls in CONFIG_CLASSES.items():
        AutoConfig.register(model_type, cls, exist_ok=True)
    logger.debug("registered zeda config classes: %s", ", ".join(CONFIG_CLASSES))
