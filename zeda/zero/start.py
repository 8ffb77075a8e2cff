"""Where distillation starts: zero experts set up so that step 0 already skips a target share.

`start_at_share` puts the zero rows on a training-free rule (an absolute logit threshold, or
rows fitted by `fit_zero_rows` to each token's log-sum-exp) and solves the zero-logit bias with
`zeda.zero.calibrate.calibrate`. Used by ``inject.init=threshold|relative``.

In a distributed run (``torch.distributed`` initialised, more than one rank) the start is solved
once, on rank 0, and broadcast: other ranks may hold placeholder or meta weights (FSDP's
RAM-efficient loading), and every rank must route with the same bias and zero rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zeda.errors import ZedaError
from zeda.zero.calibrate import CalibrationResult, _blocks, _sweep, calibrate
from zeda.zero.structure import find_moe_layers, is_injected, set_zero_logit_bias
from zeda.zero.teacher import teacher_mode
from zeda_routing import get_kind

__all__ = ["fit_zero_rows", "start_at_share"]


#: fp32 normal-equation bytes `fit_zero_rows` holds at once (more layers take more passes).
FIT_BUDGET_BYTES = 2 * 1024**3


def _reference_logit(real_logits: torch.Tensor) -> torch.Tensor:
    """``(T,)`` per-token logit a zero expert's row is fitted to: the log-sum-exp of the
    ``(T, E)`` real logits (the log of the softmax normaliser over the real experts).

    A zero logit of ``reference + b`` beats expert i exactly when i's softmax probability
    among the real experts is below ``e^b``. (Measured on the reference model: fitting to the
    log-sum-exp over the top-k only starts at a clearly higher perplexity.)
    """
    return torch.logsumexp(real_logits, dim=-1)


@torch.no_grad()
def fit_zero_rows(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, ridge: float = 1e-3
) -> list[float]:
    """Set every zero expert's router row to a linear fit of the token's reference logit.

    In teacher mode (zero experts off, so the fit sees the original model's router inputs) each
    MoE layer's router input ``x`` ``(T, H)`` and the reference logit ``y`` ``(T,)``
    (`_reference_logit`) are accumulated as ridge normal equations of ``y ≈ w·x + c``; all Z
    zero rows of that layer become ``w``. Layers are grouped so that at most `FIT_BUDGET_BYTES`
    of fp32 ``(H+1)²`` matrices are held; each group is one pass over ``blocks``.

    Args:
        model: A freshly injected model.
        blocks: ``(N, T)`` calibration token ids.
        batch_size: Blocks per forward.
        ridge: Ridge strength relative to the mean diagonal of ``XᵀX``.

    Routers whose kind does not normalise over the experts (``zeda_routing`` kinds with
    ``normalised=False``: sigmoid routers) keep their rows: a sigmoid router scores each expert
    on its own, so an absolute threshold is already its rule (measured on the sigmoid reference
    model at 50%: step-0 perplexity ratio 1.024 with zero rows against 1.040 with rows fitted to
    the log of the summed scores).

    Returns:
        The per-layer intercepts ``c`` (layer order; None for a layer not fitted): the router
        has no place for them, so the caller folds them into a per-layer zero-logit bias.
    """
    layers = find_moe_layers(model)
    intercepts: list[float | None] = [None] * len(layers)
    fitted = [j for j, layer in enumerate(layers) if get_kind(layer.router.zeda_router_kind).normalised]
    groups: list[list[int]] = []
    used = 0
    for j in fitted:
        size = 4 * (layers[j].router.weight.shape[1] + 1) ** 2
        if not groups or used + size > FIT_BUDGET_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(j)
        used += size
    body = getattr(model, "get_decoder", lambda: model)()
    gram: dict[int, torch.Tensor] = {}
    rhs: dict[int, torch.Tensor] = {}

    def hook(router: nn.Module, args: tuple, j: int) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        e = router.num_experts
        bias = getattr(router, "bias", None)
        logits = F.linear(x, router.weight[:e].float(), None if bias is None else bias[:e].float())
        y = _reference_logit(logits)
        a = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        gram[j] = gram.get(j, 0) + a.T @ a
        rhs[j] = rhs.get(j, 0) + a.T @ y

    for group in tqdm(groups, desc="fitting zero rows", leave=False, disable=len(groups) <= 1):
        gram.clear()
        rhs.clear()
        handles = [
            layers[j].router.register_forward_pre_hook(lambda m, args, j=j: hook(m, args, j)) for j in group
        ]
        try:
            with teacher_mode(model):
                _sweep(model, blocks, batch_size, lambda ids: body(input_ids=ids))
        finally:
            for h in handles:
                h.remove()
        for j in group:
            router, g = layers[j].router, gram[j]
            eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
            eye[-1, -1] = 0  # the intercept is not shrunk
            sol = torch.linalg.solve(g + ridge * g.diagonal()[:-1].mean() * eye, rhs[j])
            e = router.num_experts
            router.weight[e:] = sol[:-1].to(router.weight.dtype)
            intercepts[j] = float(sol[-1])
    return intercepts


def start_at_share(
    model: nn.Module,
    target_share: float,
    texts_or_batches: Sequence[str] | Sequence[torch.Tensor] | torch.Tensor,
    tokenizer: Any = None,
    rows: Literal["zero", "fitted"] = "zero",
    **kwargs: Any,
) -> CalibrationResult:
    """Start distillation where a training-free rule is: a threshold at ``target_share``.

    ``rows="zero"``: every zero expert's router row (and router bias, if any) is set to 0, so
    its logit is the zero-logit bias alone, and a real expert is kept exactly when its logit
    beats that bias (an absolute logit threshold per layer).

    ``rows="fitted"``: every zero expert's row of a softmax-family router is the least-squares
    fit (`fit_zero_rows`) of the token's log-sum-exp over its real logits, and the bias is
    solved per layer, so that it is a threshold on each token's *own normalised* routing
    weights (keep expert i when ``p_i ≳ e^b``): the threshold baseline's rule, which skips the
    same share at a lower perplexity than an absolute logit threshold. Sigmoid routers keep
    zero rows (see `fit_zero_rows`).

    Either way `calibrate` then solves the bias on the text so that the share of skipped
    slots is ``target_share`` from the first step, instead of random rows that start near 0%
    and spend the first part of training reaching the target share.

    Args:
        model: A freshly injected model (not a student).
        target_share: Skipped share to start at, in (0, 1).
        texts_or_batches: Calibration text (with ``tokenizer``) or ``(B, T)`` token ids.
        tokenizer: Needed for text.
        rows: How the zero experts' router rows start (``zero`` or ``fitted``).
        **kwargs: Passed to `calibrate` (``seq_len``, ``max_tokens``, ``per_layer``, ...).

    Returns:
        The `CalibrationResult` (the bias is set on the routers and in ``config.zeda``).

    In a distributed run every rank must call it (a collective): rank 0 solves, the others
    receive its zero rows, bias and result (`_from_rank0`).
    """
    if not is_injected(model):
        raise ZedaError("start_at_share needs a model with zero experts (inject them first)")
    if rows not in ("zero", "fitted"):
        raise ZedaError(f"start_at_share: rows must be 'zero' or 'fitted', got {rows!r}")
    if _world_size() > 1:
        return _from_rank0(
            model, lambda: _solve_start(model, target_share, texts_or_batches, tokenizer, rows, **kwargs)
        )
    return _solve_start(model, target_share, texts_or_batches, tokenizer, rows, **kwargs)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _zero_rows(model: nn.Module) -> dict[int, dict[str, torch.Tensor]]:
    """Views of every router's zero-expert rows (``weight``/``bias`` rows ``[E, E+Z)``), by MoE layer."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for layer in find_moe_layers(model):
        e = layer.router.num_experts
        for name in ("weight", "bias"):
            t = getattr(layer.router, name, None)
            if isinstance(t, torch.Tensor) and t.shape[0] > e:
                out.setdefault(layer.index, {})[name] = t[e:]
    return out


def _from_rank0(model: nn.Module, solve: Any) -> CalibrationResult:
    """Run ``solve`` on rank 0 only; give every other rank its zero rows, bias and result.

    Ranks whose router tensors are on the meta device keep them: the sharding broadcasts rank 0's
    weights into them. A failure on rank 0 is raised on every rank (no rank is left waiting).
    """
    dist = torch.distributed
    payload: list[Any] = [None]
    result: CalibrationResult | None = None
    if dist.get_rank() == 0:
        try:
            result = solve()
            rows = {
                i: {n: v.detach().cpu().clone() for n, v in d.items()} for i, d in _zero_rows(model).items()
            }
            payload = [{"result": result.to_dict(), "rows": rows}]
        except Exception as exc:
            payload = [{"error": str(exc)}]
            dist.broadcast_object_list(payload, src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    got = payload[0]
    if "error" in got:
        raise ZedaError(f"the distillation start failed on rank 0: {got['error']}")
    if result is not None:
        return result
    with torch.no_grad():
        for index, views in _zero_rows(model).items():
            for name, view in views.items():
                if view.device.type != "meta":
                    view.copy_(got["rows"][index][name])
    result = CalibrationResult(**got["result"])
    set_zero_logit_bias(model, result.zero_logit_bias)
    model.config.zeda = {
        **(getattr(model.config, "zeda", None) or {}),
        "zero_logit_bias": result.zero_logit_bias,
    }
    return result


def _solve_start(
    model: nn.Module,
    target_share: float,
    texts_or_batches: Sequence[str] | Sequence[torch.Tensor] | torch.Tensor,
    tokenizer: Any,
    rows: str,
    **kwargs: Any,
) -> CalibrationResult:
    with torch.no_grad():
        for layer in find_moe_layers(model):
            router, e = layer.router, layer.router.num_experts
            for name in ("weight", "bias"):
                t = getattr(router, name, None)
                if isinstance(t, torch.Tensor) and t.shape[0] > e:
                    t[e:] = 0
    if rows == "fitted":
        seq_len, max_tokens = kwargs.get("seq_len", 256), kwargs.get("max_tokens", 16384)
        blocks = _blocks(texts_or_batches, tokenizer, seq_len, max_tokens)
        if any(c is not None for c in fit_zero_rows(model, blocks, kwargs.get("batch_size", 8))):
            # The fit's intercepts differ per layer and the router has no place for them: one bias
            # per layer, solved in layer order, absorbs them (and measured lower perplexity at
            # the same share than the intercepts plus one shared shift).
            kwargs.setdefault("per_layer", True)
        texts_or_batches, tokenizer = blocks, None
    return calibrate(model, target_share, texts_or_batches, tokenizer, **kwargs)
