"""zeda: zero-output experts for trained Mixture-of-Experts language models.

Importing zeda registers its families, its ``zeda_<family>`` model classes with transformers'
Auto classes and its experts backends; no transformers class is modified.
"""

from __future__ import annotations

import logging

from . import experts as _experts  # noqa: F401  (registers the zeda experts backends)
from . import modeling as _modeling  # noqa: F401  (registers zeda_<family> Auto classes)
from .arch import MoESpec, get_spec, supported_model_types
from .config import RunConfig, load_recipe
from .distill import DistillResult, distill
from .errors import ZedaError
from .inject import InjectionReport, find_moe_layers, inject_zero_experts, is_injected, teacher_mode
from .io import atomic_save, load
from .pipeline import RunResult, run
from .routing import RouterTelemetry, SlotPolicy, router_settings

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"


def __getattr__(name: str):
    # evaluate/export pull in lm-eval and matplotlib; import them on first use.
    if name == "evaluate":
        from .evaluate import evaluate

        return evaluate
    if name == "export":
        from .export import export

        return export
    raise AttributeError(f"module 'zeda' has no attribute {name!r}")


__all__ = [
    "DistillResult",
    "RunConfig",
    "RunResult",
    "atomic_save",
    "distill",
    "evaluate",
    "export",
    "load",
    "load_recipe",
    "run",
    "InjectionReport",
    "MoESpec",
    "RouterTelemetry",
    "SlotPolicy",
    "ZedaError",
    "find_moe_layers",
    "get_spec",
    "inject_zero_experts",
    "is_injected",
    "router_settings",
    "supported_model_types",
    "teacher_mode",
]
