"""zeda: zero-output experts for trained Mixture-of-Experts language models.

Importing zeda registers its families, its ``zeda_<family>`` model classes with transformers'
Auto classes and its experts backends; no transformers class is modified.
"""

from __future__ import annotations

import logging

from zeda.config import RunConfig, load_recipe
from zeda.distillation.loop import DistillResult, distill
from zeda.errors import ZedaError
from zeda.families import MoESpec, get_spec, supported_model_types
from zeda.io import atomic_save, load
from zeda.pipeline import RunResult, run
from zeda.zero import experts as _experts  # noqa: F401  (registers the zeda experts backends)
from zeda.zero import modeling as _modeling  # noqa: F401  (registers zeda_<family> Auto classes)
from zeda.zero.inject import InjectionReport, find_moe_layers, inject_zero_experts, is_injected, teacher_mode
from zeda.zero.routing import RouterTelemetry, SlotPolicy, router_settings

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"


def __getattr__(name: str):
    # evaluate/export pull in lm-eval and matplotlib; import them on first use.
    if name == "evaluate":
        from zeda.evaluation.evaluator import evaluate

        return evaluate
    if name == "export":
        from zeda.export import export

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
