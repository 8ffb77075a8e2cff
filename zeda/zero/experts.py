"""zeda's experts backends: zero slots (sentinel index ``E``) do no expert work.

Registered through transformers' `ExpertsInterface` (no class patches) under two names:

- ``"zeda"``: picks the fastest correct strategy per device. On CUDA in bf16/fp16, compaction of
  the kept slots followed by grouped GEMMs, so sentinel slots cost nothing. On CPU for bf16/fp16 inference
  on more than one token, whichever of the two strategies is faster on this machine for the
  shape and the number of kept rows (timed once per shape and row-count bucket, then cached:
  which one wins depends on the CPU's matmul kernels, e.g. AMX, see `zeda.zero.cpu_strategy`).
  Otherwise (fp32, training, one token) a loop over the experts that received kept slots,
  bit-identical to stock ``eager`` in fp32.
- ``"zeda_grouped"``: always the compaction + grouped-GEMM strategy (on CPU it runs through
  transformers' grouped_mm CPU fallback; used to test the GPU path on CPU).

Both read the layout flags that ``@use_experts_implementation`` puts on every experts module
(``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``), so one function
serves every family, gpt-oss's transposed biased experts included.

**Split LoRA.** While a low-rank delta is attached to a fused weight (`split_lora`, done by the
student's LoRA wrappers for the length of one forward), both backends compute each selected
expert as ``x·W[e]ᵀ + s·(x·A[e]ᵀ)·B[e]ᵀ`` on its own rows: ``W + s·B·A`` is never formed, so
neither the merged ``(E, out, in)`` stack nor its gradient exists in training (zero slots are
still skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from zeda.errors import ZedaError
from zeda.zero.cpu_strategy import (  # noqa: F401  (CPU_STRATEGIES, GROUPED_MARGIN, the setters: re-exported)
    CPU_STRATEGIES,
    GROUPED_MARGIN,
    autotuned_forward,
    cpu_strategy_choices,
    set_cpu_strategy,
)

# ----------------------------------------------------------------------------------------------
# The two private transformers APIs zeda relies on, each used in exactly one function below.
# Tested against the range pinned in pyproject.toml by tests/zero/test_private_hooks.py.
# ----------------------------------------------------------------------------------------------


def skip_sentinel_slots(experts: nn.Module) -> None:
    """Make transformers' own ``grouped_mm`` / ``batched_mm`` experts backends skip zero slots.

    Expert-parallel sharding in transformers routes non-local slots to the sentinel index ``E``;
    its backends then skip (grouped_mm: rows beyond the offsets) or mask (batched_mm: clamped and
    zero-weighted) those rows only when the module's private ``_is_expert_parallel`` flag is set.
    Zero slots use the same sentinel, so setting the flag makes the stock backends correct on an
    injected model.

    Args:
        experts: A fused experts module decorated with ``@use_experts_implementation``.
    """
    experts._is_expert_parallel = True


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    """transformers' private ``_grouped_linear``: one GEMM per expert over its slice of rows.

    Args:
        x: ``(S, in)`` rows sorted by expert.
        weight: ``(E, out, in)`` or, if ``transposed``, ``(E, in, out)``.
        offsets: ``(E,)`` int32 cumulative row counts (rows beyond ``offsets[-1]`` are skipped).
        bias: ``(S, out)`` per-row bias, or None.
        transposed: The weight layout flag of the experts module.

    Returns:
        ``(S, out)``.
    """
    from transformers.integrations.moe import _grouped_linear

    return _grouped_linear(x, weight, offsets, bias=bias, is_transposed=transposed)


@dataclass(frozen=True)
class LoraDelta:
    """A low-rank delta of a fused expert weight: ``scaling * lhs @ rhs`` is shaped like the weight.

    For a weight stored ``(E, out, in)``: ``lhs (E, out, r)`` (B) and ``rhs (E, r, in)`` (A), and
    expert ``e`` adds ``scaling * (x @ rhs[e].T) @ lhs[e].T``. For a transposed weight
    ``(E, in, out)``: ``lhs (E, in, r)``, ``rhs (E, r, out)``, and expert ``e`` adds
    ``scaling * (x @ lhs[e]) @ rhs[e]``.
    """

    lhs: torch.Tensor
    rhs: torch.Tensor
    scaling: float


#: The attribute of an experts module that holds the deltas attached by `split_lora`.
_LORA_ATTR = "zeda_lora_deltas"


def splits_lora(experts: nn.Module) -> bool:
    """Whether ``experts`` dispatches to a zeda backend, i.e. one that applies attached deltas.

    Stock backends (eager, grouped_mm, batched_mm) would ignore them: deltas must then be
    merged into the weight instead.
    """
    config = getattr(experts, "config", None)
    return getattr(config, "_experts_implementation", None) in BACKENDS


@contextmanager
def split_lora(experts: nn.Module, name: str, delta: LoraDelta) -> Iterator[None]:
    """Attach ``delta`` to the fused weight ``name`` of ``experts`` for the forwards inside.

    Args:
        experts: A fused experts module whose backend is zeda's (`splits_lora`).
        name: ``"gate_up_proj"``, ``"up_proj"`` or ``"down_proj"``.
        delta: The low-rank factors (they carry the gradient to the adapter's parameters).
    """
    deltas = experts.__dict__.setdefault(_LORA_ATTR, {})
    if name in deltas:
        raise ZedaError(f"a LoRA delta is already attached to {name} of {type(experts).__name__}")
    deltas[name] = delta
    try:
        yield
    finally:
        del deltas[name]


class _Weight:
    """One fused weight as a backend reads it: the stored tensor, its bias, and an attached
    low-rank delta split into per-expert views once per forward (a backward through ``unbind``
    stacks the gradient once, where indexing would expand every expert's slice to the stack)."""

    def __init__(self, module: nn.Module, name: str, bias_name: str | None) -> None:
        self.weight = getattr(module, name)
        self.bias = getattr(module, bias_name) if bias_name is not None else None
        delta = module.__dict__.get(_LORA_ATTR, {}).get(name)
        self.delta = delta
        self.lhs = delta.lhs.unbind(0) if delta is not None else None
        self.rhs = delta.rhs.unbind(0) if delta is not None else None


def _weights(module: nn.Module) -> tuple[_Weight, _Weight]:
    # Read each (possibly PEFT-parametrised) fused parameter once per forward, not per expert.
    up = "gate_up_proj" if module.has_gate else "up_proj"
    return (
        _Weight(module, up, f"{up}_bias" if module.has_bias else None),
        _Weight(module, "down_proj", "down_proj_bias" if module.has_bias else None),
    )


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if transposed:
        out = x @ w
        return out + b if b is not None else out
    return F.linear(x, w, b)


def _expert_linear(x: torch.Tensor, w: _Weight, e: int, transposed: bool) -> torch.Tensor:
    """Expert ``e`` of one fused weight on rows ``x``, plus its attached low-rank delta if any."""
    out = _linear(x, w.weight[e], w.bias[e] if w.bias is not None else None, transposed)
    if w.delta is None:
        return out
    if transposed:
        low = (x @ w.lhs[e].to(x.dtype)) @ w.rhs[e].to(x.dtype)
    else:
        low = F.linear(F.linear(x, w.rhs[e].to(x.dtype)), w.lhs[e].to(x.dtype))
    return out + w.delta.scaling * low


def _activate(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


def _expert_ffn(module: nn.Module, x: torch.Tensor, e: int, weights: tuple[_Weight, _Weight]) -> torch.Tensor:
    """Expert ``e`` on rows ``x (n, H)`` -> ``(n, H)``, unweighted (the ops of stock eager)."""
    up, down = weights
    h = _expert_linear(x, up, e, module.is_transposed)
    h = _activate(module, h)
    h = _expert_linear(h, down, e, module.is_transposed)
    if getattr(module, "has_post_expert_norm", False):  # the flag is absent in transformers 5.19
        h = module.post_expert_norm(h)
    return h


def _kept_slots(
    top_k_index: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept (non-sentinel) slots sorted by expert.

    Returns:
        ``slots (S,)`` flat slot ids sorted by expert, ``experts (S,)`` their expert ids, and
        ``counts (E,)`` slots per expert.
    """
    t, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    slots = torch.nonzero(flat < num_experts, as_tuple=False).squeeze(1)
    experts = flat[slots]
    # Within an expert, order rows by (top-k position, token) as stock eager's torch.where does,
    # so GEMM rows, and therefore results, are bit-identical to eager.
    key = experts * (t * k) + (slots % k) * t + slots // k
    order = torch.argsort(key)
    experts = experts[order]
    return slots[order], experts, torch.bincount(experts, minlength=num_experts)


@torch.compiler.disable(recursive=True)
def zeda_loop_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Per-expert loop over kept rows only (the CPU strategy).

    One host sync (the per-expert counts) per call, routing bookkeeping done once for all slots,
    then one pair of GEMMs per expert that received kept slots. Under ``torch.compile`` this
    function runs eagerly (``torch.compiler.disable``): its loop bounds are data-dependent, so
    tracing it would recompile for every new routing.

    Args:
        module: A fused experts module (``num_experts`` = E).
        hidden_states: ``(T, H)`` tokens.
        top_k_index: ``(T, k)`` expert ids; ``>= E`` are zero slots and are skipped.
        top_k_weights: ``(T, k)`` routing weights.

    Returns:
        ``(T, H)`` weighted sum of the kept experts' outputs.
    """
    if hidden_states.shape[0] == 1:
        return _single_token_loop(module, hidden_states, top_k_index, top_k_weights)
    k = top_k_index.shape[-1]
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        slots, _, counts = _kept_slots(top_k_index, module.num_experts)
        tok_all = slots // k
        counts_list = counts.tolist()
    weights_all = top_k_weights.reshape(-1)[slots]
    weights = _weights(module)
    start = 0
    # Ascending expert order with one index_add_ per expert mirrors stock eager's accumulation.
    for e, n in enumerate(counts_list):
        if n == 0:
            continue
        end = start + n
        tok = tok_all[start:end]
        h = _expert_ffn(module, hidden_states[tok], e, weights) * weights_all[start:end, None]
        out.index_add_(0, tok, h.to(out.dtype))
        start = end
    return out


def _single_token_loop(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`zeda_loop_forward` for one token ``(1, H)``: the k slot ids are read once on the host
    and no sorting or gathering tensors are built (decode at batch 1 pays per-op overhead)."""
    e_real = module.num_experts
    kept = sorted((e, j) for j, e in enumerate(top_k_index[0].tolist()) if e < e_real)
    out = torch.zeros_like(hidden_states)
    weights = _weights(module)
    # Ascending expert order, as stock eager accumulates: fp32 results stay bit-identical.
    for e, j in kept:
        out.add_((_expert_ffn(module, hidden_states, e, weights) * top_k_weights[:, j, None]).to(out.dtype))
    return out


def zeda_grouped_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Compact the kept slots, then two grouped GEMMs over them (the GPU strategy).

    Shapes as in `zeda_loop_forward`. Sentinel slots never enter a GEMM: the grouped inputs hold
    only the ``S`` kept rows, sorted by expert, with per-expert offsets.
    """
    k = top_k_index.shape[-1]
    slots, experts, counts = _kept_slots(top_k_index, module.num_experts)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    tok = slots // k
    x = hidden_states[tok]
    up, down = _weights(module)
    h = _grouped_lora_linear(x, up, offsets, experts, module.is_transposed)
    h = _activate(module, h)
    h = _grouped_lora_linear(h, down, offsets, experts, module.is_transposed)
    if getattr(module, "has_post_expert_norm", False):  # the flag is absent in transformers 5.19
        h = module.post_expert_norm(h)
    h = h * top_k_weights.reshape(-1)[slots, None]
    out = torch.zeros(hidden_states.shape, dtype=h.dtype, device=h.device)
    out.index_add_(0, tok, h)
    return out.to(hidden_states.dtype)


def _grouped_lora_linear(
    x: torch.Tensor, w: _Weight, offsets: torch.Tensor, experts: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """`grouped_linear` of one fused weight over rows sorted by expert, plus its attached delta
    as two more grouped GEMMs through the rank-``r`` factors."""
    out = grouped_linear(x, w.weight, offsets, w.bias[experts] if w.bias is not None else None, transposed)
    if w.delta is None:
        return out
    first, second = (w.delta.lhs, w.delta.rhs) if transposed else (w.delta.rhs, w.delta.lhs)
    # Grouped GEMMs take contiguous weight stacks; PEFT's factors are permuted views (rank-r: small).
    low = grouped_linear(x, first.to(x.dtype).contiguous(), offsets, None, transposed)
    low = grouped_linear(low, second.to(x.dtype).contiguous(), offsets, None, transposed)
    return out + w.delta.scaling * low


def _native_grouped_mm_on_cpu() -> bool:
    return hasattr(torch.nn.functional, "grouped_mm")


_CPU_STRATEGY_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "loop": zeda_loop_forward,
    "grouped": zeda_grouped_forward,
}


def zeda_experts_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ``"zeda"`` backend: the fastest correct strategy for the device and dtype.

    - CUDA, bf16/fp16: compaction of the kept slots + grouped GEMMs (`zeda_grouped_forward`);
      torch documents its grouped GEMM kernels for bf16 inputs, so fp32 takes the loop below.
    - CPU, bf16/fp16, no autograd, more than one token, torch with a native ``grouped_mm`` CPU
      kernel: the kept-row loop or compaction + grouped GEMMs, whichever was measured faster on
      this machine for the shape and kept-row count (`set_cpu_strategy`). On a 2-core AMD EPYC
      the grouped GEMMs won from 2 to 512 tokens; on a 2-core Xeon with AMX the loop (oneDNN
      AMX GEMMs per expert) wins for long prefills.
    - Otherwise (fp32 on any device, CPU training, single-token decode): the per-expert loop over kept rows
      (`zeda_loop_forward`), which keeps fp32 results bit-identical to stock eager (exact teacher
      comparisons) and has less fixed cost than compaction for one token's k slots.

    Args:
        module: A fused experts module (``num_experts`` = E).
        hidden_states: ``(T, H)`` tokens.
        top_k_index: ``(T, k)`` expert ids; ``>= E`` are zero slots and are skipped.
        top_k_weights: ``(T, k)`` routing weights.

    Returns:
        ``(T, H)`` weighted sum of the kept experts' outputs.
    """
    if hidden_states.is_cuda and hidden_states.dtype in (torch.bfloat16, torch.float16):
        return zeda_grouped_forward(module, hidden_states, top_k_index, top_k_weights)
    if (
        hidden_states.shape[0] > 1
        and hidden_states.dtype in (torch.bfloat16, torch.float16)
        and not torch.is_grad_enabled()
        and _native_grouped_mm_on_cpu()
        and not torch.compiler.is_compiling()
    ):
        return autotuned_forward(_CPU_STRATEGY_FNS, module, hidden_states, top_k_index, top_k_weights)
    return zeda_loop_forward(module, hidden_states, top_k_index, top_k_weights)


BACKENDS = {"zeda": zeda_experts_forward, "zeda_grouped": zeda_grouped_forward}
for _name, _fn in BACKENDS.items():
    if _name not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(_name, _fn)
