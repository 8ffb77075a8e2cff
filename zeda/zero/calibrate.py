"""A FLOP budget baked into the model: solve the zero-logit bias for a target skipped share.

The zero-logit bias ``b`` is added to the zero-expert columns of every router's logits; the
share of routed top-k slots that go to zero experts (and so do no expert work) rises
monotonically with ``b``. `calibrate` finds ``b`` with the routing core's share solve
(`zeda_routing.solve_share`) on the share *measured* with `RouterTelemetry` over calibration
text, stores it in ``config.zeda["zero_logit_bias"]`` (which zeda's model classes, the serving
adapters and the exported config all honour) and, given held-out
text, reports the share and the perplexity there. With ``per_layer=True`` each MoE layer gets its
own bias, solved in layer order (a layer's share depends only on the layers before it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zeda.data import pack_texts
from zeda.errors import ZedaError
from zeda.zero.routing import router_settings
from zeda.zero.structure import find_moe_layers, is_injected, set_zero_logit_bias
from zeda.zero.teacher import teacher_mode
from zeda.zero.telemetry import RouterTelemetry
from zeda_routing import solve_share

logger = logging.getLogger(__name__)

__all__ = ["CalibrationResult", "calibrate"]


@dataclass
class CalibrationResult:
    """The outcome of `calibrate`.

    Attributes:
        target_share: The skipped-slot share asked for.
        zero_logit_bias: The solved bias: one float, or one per MoE layer (layer order).
        calibration_share: The share measured with that bias on the calibration text.
        calibration_tokens: Tokens of calibration text.
        evaluations: Forward sweeps over the calibration text the search used.
        heldout_share: The share measured on held-out text (None without held-out text).
        heldout_ppl: Held-out perplexity at the budget.
        teacher_ppl: Held-out perplexity of the original model (zero experts off).
        ppl_ratio: ``heldout_ppl / teacher_ppl``.
        heldout_tokens: Tokens of held-out text.
    """

    target_share: float
    zero_logit_bias: float | list[float]
    calibration_share: float
    calibration_tokens: int
    evaluations: int
    heldout_share: float | None = None
    heldout_ppl: float | None = None
    teacher_ppl: float | None = None
    ppl_ratio: float | None = None
    heldout_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable)."""
        return asdict(self)

    def summary(self) -> str:
        """A few lines for the console."""
        bias = self.zero_logit_bias
        bias_text = (
            f"{bias:.4f}" if isinstance(bias, float) else "[" + ", ".join(f"{b:.3f}" for b in bias) + "]"
        )
        lines = [
            f"target skipped share   {self.target_share:.1%}",
            f"zero-logit bias        {bias_text}",
            f"calibration share      {self.calibration_share:.1%} ({self.calibration_tokens:,} tokens)",
        ]
        if self.heldout_share is not None:
            lines.append(f"held-out share         {self.heldout_share:.1%} ({self.heldout_tokens:,} tokens)")
        if self.ppl_ratio is not None:
            lines.append(
                f"held-out perplexity    {self.heldout_ppl:.3f} (original {self.teacher_ppl:.3f}, "
                f"ratio {self.ppl_ratio:.3f})"
            )
        return "\n".join(lines)


def _blocks(data: Any, tokenizer: Any, seq_len: int, max_tokens: int) -> torch.Tensor:
    """``(N, T)`` token ids from a tensor, a list of tensors or a list of strings."""
    if isinstance(data, torch.Tensor):
        return data if data.dim() == 2 else data[None]
    items = list(data)
    if items and isinstance(items[0], torch.Tensor):
        return torch.cat([b if b.dim() == 2 else b[None] for b in items])
    if tokenizer is None:
        raise ZedaError("calibrating on text needs a tokenizer (or pass token-id batches)")
    blocks = pack_texts([str(t) for t in items], tokenizer, seq_len, max_tokens)
    return blocks[: max(1, max_tokens // seq_len)]


def _sweep(
    model: nn.Module, blocks: torch.Tensor, batch_size: int, fn: Callable[[torch.Tensor], None]
) -> None:
    device = next(model.parameters()).device
    for i in range(0, blocks.shape[0], batch_size):
        fn(blocks[i : i + batch_size].to(device))


@torch.no_grad()
def _measure(
    model: nn.Module, blocks: torch.Tensor, batch_size: int, bias: float | list[float]
) -> RouterTelemetry:
    layers = find_moe_layers(model)
    values = [bias] * len(layers) if isinstance(bias, float) else list(bias)
    # router_settings restores every router's own bias afterwards.
    with RouterTelemetry(model) as tel, router_settings(model, zero_logit_bias=0.0):
        set_zero_logit_bias(model, values)
        # Router outputs are all that is measured: skip the LM head (a large share of the FLOPs).
        body = getattr(model, "get_decoder", lambda: model)()
        _sweep(model, blocks, batch_size, lambda ids: body(input_ids=ids))
    return tel


@torch.no_grad()
def _perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    nll, n = 0.0, 0

    def step(ids: torch.Tensor) -> None:
        nonlocal nll, n
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += float(
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        )
        n += ids[:, 1:].numel()

    _sweep(model, blocks, batch_size, step)
    return math.exp(nll / n)


def calibrate(
    model: nn.Module,
    target_share: float,
    texts_or_batches: Sequence[str] | Sequence[torch.Tensor] | torch.Tensor,
    tokenizer: Any = None,
    heldout: Sequence[str] | Sequence[torch.Tensor] | torch.Tensor | None = None,
    per_layer: bool = False,
    seq_len: int = 256,
    max_tokens: int = 16384,
    batch_size: int = 8,
    tol: float = 0.002,
    max_iter: int = 30,
) -> CalibrationResult:
    """Solve the zero-logit bias so that the measured skipped share is ``target_share``; set it.

    The bias is set on every zeda router of ``model`` and stored in
    ``model.config.zeda["zero_logit_bias"]`` (so `zeda.export` writes it).

    Args:
        model: An injected model (or a student built on one), in eval mode.
        target_share: Share in (0, 1) of routed top-k slots to send to zero experts.
        texts_or_batches: Calibration text (documents, with ``tokenizer``) or ``(B, T)`` token ids.
        tokenizer: Needed for text.
        heldout: Held-out text or token ids to report the share and perplexity at the budget.
        per_layer: Solve one bias per MoE layer (in layer order) instead of one for all.
        seq_len: Block length when packing text.
        max_tokens: Calibration / held-out tokens at most, each.
        batch_size: Blocks per forward.
        tol: Stop when the calibration share is within this of the target.
        max_iter: Forward sweeps over the calibration text at most (per layer with ``per_layer``).

    Returns:
        A `CalibrationResult`.

    Raises:
        ZedaError: for a model without zero experts or a target outside (0, 1).
    """
    if not is_injected(model):
        raise ZedaError("calibrate needs a model with zero experts (inject and distill it first)")
    if not 0.0 < float(target_share) < 1.0:
        raise ZedaError(f"target share {target_share} must be between 0 and 1 (exclusive)")
    blocks = _blocks(texts_or_batches, tokenizer, seq_len, max_tokens)
    layers = find_moe_layers(model)
    was_training = model.training
    model.eval()
    try:
        if per_layer:
            bias: float | list[float] = [0.0] * len(layers)
            calls = 0
            for j, layer in enumerate(tqdm(layers, desc="calibrating layers", leave=False)):

                def share(b: float, j: int = j, index: int = layer.index) -> float:
                    trial = list(bias)
                    trial[j] = b
                    return _measure(model, blocks, batch_size, trial).per_layer.get(index, 0.0)

                bias[j], _, n = solve_share(share, target_share, tol=tol, max_iter=max_iter)
                calls += n
            achieved = _measure(model, blocks, batch_size, bias).zero_share
            calls += 1
        else:
            bias, achieved, calls = solve_share(
                lambda b: _measure(model, blocks, batch_size, b).zero_share,
                target_share,
                tol=tol,
                max_iter=max_iter,
            )
    finally:
        model.train(was_training)
    set_zero_logit_bias(model, bias)
    model.config.zeda = {**(getattr(model.config, "zeda", None) or {}), "zero_logit_bias": bias}
    result = CalibrationResult(float(target_share), bias, float(achieved), int(blocks.numel()), calls)
    if heldout is not None:
        held = _blocks(heldout, tokenizer, seq_len, max_tokens)
        with torch.no_grad(), RouterTelemetry(model) as tel:
            result.heldout_ppl = _perplexity(model, held, batch_size)
        with teacher_mode(model):
            result.teacher_ppl = _perplexity(model, held, batch_size)
        result.heldout_share = tel.zero_share
        result.ppl_ratio = result.heldout_ppl / result.teacher_ppl
        result.heldout_tokens = int(held.numel())
    logger.info("calibrated zero-logit bias %s: share %.4f (target %.4f)", bias, achieved, target_share)
    return result
