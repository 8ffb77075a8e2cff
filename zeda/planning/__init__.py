"""Memory planning: `plan` predicts the peak memory per GPU of a zeda run from its recipe."""

from zeda.planning.memory import GIB, MAX_GPU_FRACTION, MemoryPlan, check_recipe_fits, plan
from zeda.planning.shapes import resolve_model_config, scaled_config

__all__ = [
    "GIB",
    "MAX_GPU_FRACTION",
    "MemoryPlan",
    "check_recipe_fits",
    "plan",
    "resolve_model_config",
    "scaled_config",
]
