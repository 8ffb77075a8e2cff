"""transformers config classes for zeda exports (``model_type = "zeda_<family>"``).

A zeda export's ``config.json`` names a model type transformers does not know, so vLLM's
config parser (``AutoConfig.from_pretrained``) needs these classes registered first. The
served families subclass the family's own config class, so every field vLLM reads keeps its
meaning; the ``zeda`` dict (``num_zero_experts``, ``zero_logit_bias``, ...) rides along as an
extra attribute. Every other zeda family gets a config class that refuses to load with one line
naming the served ones. A model type zeda itself has registered in this process is left as it
is (zeda's classes subclass the same family configs), so ``zeda.load`` keeps working beside vLLM.
"""

from __future__ import annotations

import logging

from transformers import AutoConfig, Glm4MoeConfig, MixtralConfig, PretrainedConfig, Qwen3MoeConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from zeda_routing.serving import AdapterConfigs

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES: dict[str, str] = {
    "qwen3_moe": "ZedaQwen3MoeForCausalLM",
    "glm4_moe": "ZedaGlm4MoeForCausalLM",
    "mixtral": "ZedaMixtralForCausalLM",
}
"""zeda family (base ``model_type``) -> architecture name served by this plugin."""

CONFIGS = AdapterConfigs(
    __name__,
    "zeda_vllm",
    "the vLLM plugin",
    {"qwen3_moe": Qwen3MoeConfig, "glm4_moe": Glm4MoeConfig, "mixtral": MixtralConfig},
    PretrainedConfig,
)
"""The config classes of every zeda family (``CONFIGS.classes``); the refused ones raise."""

UNSUPPORTED_FAMILIES = CONFIGS.unsupported
unsupported_message = CONFIGS.message


def register_configs() -> None:
    """Register every ``zeda_<family>`` model type with transformers' ``AutoConfig`` (idempotent)."""
    done = CONFIGS.register(
        lambda t, cls: AutoConfig.register(t, cls, exist_ok=True), CONFIG_MAPPING.__contains__
    )
    logger.debug("registered zeda config classes: %s", ", ".join(done))
