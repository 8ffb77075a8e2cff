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

from transformers import AutoConfig, PretrainedConfig

# The served families, their architecture names and their config classes are the vLLM plugin's
# (pure transformers, no vLLM import): both engines load the same exports.
from zeda_vllm.config import (
    SUPPORTED_FAMILIES,
    UNSUPPORTED_FAMILIES,
    ZedaGlm4MoeConfig,
    ZedaMixtralConfig,
    ZedaQwen3MoeConfig,
)

logger = logging.getLogger(__name__)


def unsupported_message(family: str) -> str:
    """The one-line refusal for a zeda family that ``zeda_sglang`` does not serve."""
    return (
        f"zeda_sglang: zeda family {family!r} (model_type 'zeda_{family}') is not supported by the "
        f"SGLang models; supported families: {', '.join(sorted(SUPPORTED_FAMILIES))}"
    )


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
