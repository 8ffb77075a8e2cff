"""SGLang facts that differ between releases, decided without importing SGLang.

`zeda_sglang.install` was written against SGLang 0.5.23's source but SGLang could not be run
here, so every name it reads that other releases spell differently (or lack) goes through
these functions, which the main environment tests.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = [
    "ROUTING_BACKENDS",
    "check_runner_backend",
    "folded_scaling",
    "shared_topk_slots",
    "supports_kwarg",
]

ROUTING_BACKENDS = frozenset(
    {"triton_kernel", "triton_kernels", "flashinfer_trtllm", "flashinfer_trtllm_routed", "flashinfer_mxfp4"}
)
"""``--moe-runner-backend`` values whose kernels run their own top-k on the raw router logits
(SGLang's ``TopK`` then returns a non-standard output and never calls a custom routing function),
so ids ``>= E`` of zeda's router would reach a kernel with E experts."""


def _name(backend: Any) -> str:
    return str(getattr(backend, "value", backend) or "auto").lower()


def check_runner_backend(backend: Any) -> None:
    """Refuse, in one line, an MoE runner backend that ignores custom routing.

    Args:
        backend: SGLang's ``MoeRunnerBackend`` (an enum) or its value.

    Raises:
        ValueError: for a backend in `ROUTING_BACKENDS`.
    """
    name = _name(backend)
    if name in ROUTING_BACKENDS:
        raise ValueError(
            f"zeda_sglang: --moe-runner-backend {name} routes inside its kernel and ignores zeda's zero experts; "
            "launch with --moe-runner-backend triton"
        )


def shared_topk_slots(topk_config: Any) -> int:
    """Shared-expert slots fused into the routed top-k (``num_shared_topk_slots`` in some SGLang
    releases, ``num_fused_shared_experts`` in others; 0 when neither exists)."""
    for name in ("num_shared_topk_slots", "num_fused_shared_experts"):
        value = getattr(topk_config, name, None)
        if value is not None:
            return int(value)
    return 0


def folded_scaling(topk_config: Any) -> float:
    """The ``routed_scaling_factor`` zeda's routing must fold into its weights.

    Where SGLang fuses the factor into the top-k weights
    (``apply_routed_scaling_factor_on_output``, i.e. the experts' ``should_fuse_routed_scaling_factor_in_topk``)
    the experts do not apply it again; SGLang's custom-routing path asserts that flag is off, so
    zeda's ``TopK`` turns it off and its routing applies the factor instead. Otherwise 1 (SGLang
    scales the routed output itself).
    """
    if getattr(topk_config, "apply_routed_scaling_factor_on_output", False):
        return float(getattr(topk_config, "routed_scaling_factor", None) or 1.0)
    return 1.0


def supports_kwarg(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` (e.g. ``TopK.__init__``) takes a keyword argument ``name``."""
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
