"""A FLOP budget baked into the model: solve the zero-logit bias for a target skipped share.

The zero-logit bias ``b`` is added to the zero-expert columns of every router's logits; the
share of routed top-k slots that go to zero experts (and so do no expert work) rises
monotonically with ``b``. `calibrate` finds ``b`` by root finding (bracketing, then regula falsi) on the share *measured* with
`RouterTelemetry` over calibration text, stores it in ``config.zeda["zero_logit_bias"]`` (which
zeda's model classes, the vLLM plugin and the exported config all honour) and, given held-out
text, reports the share and the perplexity there. With ``per_layer=True`` each MoE layer gets its
own bias, solved in layer order (a layer's share depends only on the layers before it).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zeda.errors import ZedaError
from zeda.evaluation.telemetry import RouterTelemetry
from zeda.zero.routing import router_settings
from zeda.zero.structure import find_moe_layers, is_injected, set_zero_logit_bias
from zeda.zero.teacher import teacher_mode

logger = logging.getLogger(__name__)

__all__ = ["CalibrationResult", "calibrate", "calibrate_export"]


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
    from zeda.distillation.data import pack_texts

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


def _solve(
    share: Callable[[float], float], target: float, tol: float, max_iter: int
) -> tuple[float, float, int]:
    """Solve ``share(b) = target`` for a non-decreasing ``share``; returns ``(b, share(b), calls)``.

    Brackets the root from ``b = 0`` outwards, then narrows it by regula falsi with the Illinois
    modification (the share is smooth in ``b`` over many tokens, so this needs far fewer
    forward sweeps than bisection; each sweep is a pass over the calibration text).
    """
    calls = 0
    best = (0.0, math.inf)

    def f(b: float) -> float:
        nonlocal calls, best
        calls += 1
        s = share(b)
        if abs(s - target) < abs(best[1] - target):
            best = (b, s)
        return s - target

    f0 = f(0.0)
    step = 2.0 if f0 < 0 else -2.0
    a, fa = 0.0, f0
    b, fb = step, f(step)
    while (fb < 0) == (f0 < 0) and abs(b) < 1e3 and fb != 0:  # expand until the sign changes
        a, fa = b, fb
        step *= 2
        b, fb = b + step, f(b + step)
    if a > b:
        a, fa, b, fb = b, fb, a, fa
    side = 0
    while calls < max_iter and abs(best[1] - target) > tol and fb != fa:
        c = (a * fb - b * fa) / (fb - fa)
        fc = f(c)
        if fc < 0:
            a, fa = c, fc
            if side == -1:
                fb /= 2
            side = -1
        else:
            b, fb = c, fc
            if side == 1:
                fa /= 2
            side = 1
    return best[0], best[1], calls


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

                bias[j], _, n = _solve(share, target_share, tol, max_iter)
                calls += n
            achieved = _measure(model, blocks, batch_size, bias).zero_share
            calls += 1
        else:
            bias, achieved, calls = _solve(
                lambda b: _measure(model, blocks, batch_size, b).zero_share, target_share, tol, max_iter
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


def calibrate_export(
    model_dir: str | os.PathLike,
    target_share: float,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    heldout: str | os.PathLike | None = None,
    overwrite: bool = False,
    per_layer: bool = False,
    heldout_fraction: float = 0.2,
    **kwargs: Any,
) -> CalibrationResult:
    """Load a zeda model, calibrate its zero-logit bias on a data file, export it at that budget.

    Args:
        model_dir: An injected or exported zeda model directory (or a ZEDA-reference checkpoint).
        target_share: The skipped share to reach.
        data: JSONL (``{"text": ...}`` per line) or ``.txt`` calibration text.
        out_dir: The export directory (``config.json`` carries ``zeda.zero_logit_bias``).
        heldout: Held-out text file; by default the last ``heldout_fraction`` of ``data``'s
            documents are held out (and not used for calibration).
        overwrite: Replace an existing ``out_dir``.
        per_layer: One bias per MoE layer.
        heldout_fraction: Share of ``data``'s documents held out when ``heldout`` is None.
        **kwargs: Passed to `calibrate` (``seq_len``, ``max_tokens``, ``batch_size``, ``tol``).

    Returns:
        The `CalibrationResult` (its held-out figures are those of the exported model).

    Raises:
        ZedaError: for a bad model, data file or output directory (nothing is written then).
    """
    from zeda.distillation.data import read_jsonl
    from zeda.io import export, load, load_tokenizer

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ZedaError(f"output directory {out} already exists; pass --overwrite to replace it")
    texts = read_jsonl(data)
    if heldout is not None:
        held_texts = read_jsonl(heldout)
    elif len(texts) >= 2:
        cut = max(1, min(len(texts) - 1, round(len(texts) * (1 - heldout_fraction))))
        texts, held_texts = texts[:cut], texts[cut:]
    else:
        held_texts = None
    model = load(model_dir)
    tokenizer = load_tokenizer(model_dir, model)
    result = calibrate(
        model, target_share, texts, tokenizer, heldout=held_texts, per_layer=per_layer, **kwargs
    )
    metrics = {k: v for k, v in result.to_dict().items() if v is not None and k != "zero_logit_bias"}
    export(model, out, tokenizer=tokenizer, card_metrics=metrics, overwrite=overwrite, inplace=True)
    return result
