"""zeda_sglang: serve zeda exports (zero-output experts) with SGLang, as an out-of-tree model package.

Launch (see docs/serving.md)::

    SGLANG_EXTERNAL_MODEL_PACKAGE=zeda_sglang.models python -m sglang.launch_server \\
        --model-path <export dir> --moe-runner-backend triton --disable-shared-experts-fusion

``zeda_sglang.models`` holds SGLang model classes for the zeda architectures (qwen3_moe, glm4_moe,
mixtral) whose routers send zero slots to expert id -1, which SGLang's Triton fused MoE skips.
`register` (the ``sglang.srt.plugins`` entry point, which SGLang runs early in every process)
registers zeda's config classes with transformers, so SGLang's config parser reads an export.

This package imports nothing from ``zeda`` (SGLang pins its own transformers) nor from
``zeda_vllm``; the routing math is the routing core's (``zeda_routing``, torch only), shared with
zeda and the vLLM plugin. Importing ``zeda_sglang`` or ``zeda_sglang.routing`` does not import
SGLang.
"""

from __future__ import annotations

import logging

from .config import SUPPORTED_FAMILIES, UNSUPPORTED_FAMILIES, register_configs, unsupported_message

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

__version__ = "0.1.0"


def register() -> None:
    """SGLang general-plugin entry point (``sglang.srt.plugins``): register zeda's config classes."""
    register_configs()


__all__ = ["SUPPORTED_FAMILIES", "UNSUPPORTED_FAMILIES", "register", "unsupported_message"]
