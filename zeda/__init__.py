"""zeda: zero-output experts for trained Mixture-of-Experts language models.

The method, one public function per step (`zeda.run` calls them in this order)::

    model = zeda.load(path)                         # original MoE checkpoint
    zeda.inject_zero_experts(model)                 # Z zero experts per router
    student, result = zeda.distill(model, cfg, tok) # stage 1 + stage 2 self-distillation
    evaluation = zeda.evaluate(student, cfg, tok)   # quality vs the teacher, FLOPs, baselines
    zeda.export(student, out, tokenizer=tok)        # merged, reloaded and verified

Importing zeda registers its families, its ``zeda_<family>`` model classes with transformers'
Auto classes and its experts backends; no transformers class is modified. lm-eval and
matplotlib are imported only when an evaluation or a plot needs them.
"""

from __future__ import annotations

import logging

from zeda.config import RunConfig, load_recipe
from zeda.distillation.loop import DistillResult, distill
from zeda.errors import ZedaError
from zeda.evaluation.result import EvalResult
from zeda.evaluation.run_eval import evaluate
from zeda.families import MoESpec, get_spec, supported_model_types
from zeda.io import atomic_save, export, load, load_tokenizer
from zeda.pipeline import RunResult, run
from zeda.zero import experts as _experts  # noqa: F401  (registers the zeda experts backends)
from zeda.zero import modeling as _modeling  # noqa: F401  (registers zeda_<family> Auto classes)
from zeda.zero.calibrate import CalibrationResult, calibrate
from zeda.zero.inject import InjectionReport, inject_zero_experts
from zeda.zero.routing import SlotPolicy, router_settings
from zeda.zero.structure import find_moe_layers, is_injected
from zeda.zero.teacher import teacher_mode
from zeda.zero.telemetry import RouterTelemetry

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "CalibrationResult",
    "DistillResult",
    "EvalResult",
    "InjectionReport",
    "MoESpec",
    "RouterTelemetry",
    "RunConfig",
    "RunResult",
    "SlotPolicy",
    "ZedaError",
    "atomic_save",
    "calibrate",
    "distill",
    "evaluate",
    "export",
    "find_moe_layers",
    "get_spec",
    "inject_zero_experts",
    "is_injected",
    "load",
    "load_recipe",
    "load_tokenizer",
    "router_settings",
    "run",
    "supported_model_types",
    "teacher_mode",
]
