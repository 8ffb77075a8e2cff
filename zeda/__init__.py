"""zeda: zero-output experts for trained Mixture-of-Experts language models.

Importing zeda registers its families, its ``zeda_<family>`` model classes with transformers'
Auto classes and its experts backends; no transformers class is modified.
"""

from __future__ import annotations

import logging

from . import experts as _experts  # noqa: F401  (registers the zeda experts backends)
from . import modeling as _modeling  # noqa: F401  (registers zeda_<family> Auto classes)
from .arch import MoESpec, get_spec, supported_model_types
from .errors import ZedaError
from .inject import InjectionReport, find_moe_layers, inject_zero_experts, is_injected, teacher_mode
from .routing import RouterTelemetry, SlotPolicy, router_settings

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
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
