"""transformers config classes for zeda exports, as SGLang's config parser needs them.

SGLang parses ``config.json`` with ``AutoConfig.from_pretrained``, which does not know a zeda
export's ``model_type = "zeda_<family>"``. `register_configs` (run by the ``sglang.srt.plugins``
entry point in every SGLang process, and on import of ``zeda_sglang.models``) registers:

- for the served families, a subclass of the family's own config class, so every field SGLang
  reads keeps its meaning; the ``zeda`` dict rides along as an extra attribute;
- for every other zeda family, a config class that refuses to load with one line. Without it
  SGLang would fall back to its generic transformers backend for an unknown architecture.

A model type zeda itself has registered in this process is left as it is.
"""

from __future__ import annotations

import transformers

from zeda_routing.serving import AdapterConfigs

CONFIGS = AdapterConfigs(
    __name__, "zeda_sglang", "the SGLang models", ("qwen3_moe", "glm4_moe", "mixtral"), transformers
)
"""The config classes of every zeda family (``CONFIGS.classes``); the refused ones raise."""

SUPPORTED_FAMILIES: dict[str, str] = CONFIGS.architectures
"""zeda family (base ``model_type``) -> architecture name served by ``zeda_sglang.models``."""
UNSUPPORTED_FAMILIES: tuple[str, ...] = CONFIGS.unsupported
unsupported_message = CONFIGS.message
register_configs = CONFIGS.register  # every zeda_<family> model type with AutoConfig (idempotent)
