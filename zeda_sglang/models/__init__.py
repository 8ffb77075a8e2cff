"""SGLang model classes for zeda exports: ``SGLANG_EXTERNAL_MODEL_PACKAGE=zeda_sglang.models``.

SGLang's model registry imports every module of this package and registers the ``EntryClass``
of each: ``ZedaQwen3MoeForCausalLM``, ``ZedaGlm4MoeForCausalLM`` and ``ZedaMixtralForCausalLM``
(the ``architectures`` a zeda export writes). Importing the package also registers zeda's config
classes with transformers (the ``sglang.srt.plugins`` entry point does it earlier, in every
SGLang process).
"""

from __future__ import annotations

from ..config import register_configs

register_configs()
