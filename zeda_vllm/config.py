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

import transformers

from zeda_routing.serving import AdapterConfigs

CONFIGS = AdapterConfigs(
    __name__, "zeda_vllm", "the vLLM plugin", ("qwen3_moe", "glm4_moe", "mixtral"), transformers
)
"""The config classes of every zeda family (``CONFIGS.classes``); the refused ones raise."""

SUPPORTED_FAMILIES: dict[str, str] = CONFIGS.architectures
"""zeda family (base ``model_type``) -> architecture name served by this plugin."""
UNSUPPORTED_FAMILIES: tuple[str, ...] = CONFIGS.unsupported
unsupported_message = CONFIGS.message
register_configs = CONFIGS.register  # every zeda_<family> model type with AutoConfig (idempotent)
