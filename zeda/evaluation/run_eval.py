"""`evaluate`: a converted model side by side with its original — what it keeps and what it saves.

`evaluate` measures, in one call:

- **lm-eval tasks** on the in-memory model (`zeda.evaluation.lm_eval`), for the converted model
  and for the original (teacher mode of the same weights, or a separate model), with the
  recovery of every metric.
- **Intrinsic quality against the teacher** on held-out text (``data.eval_file``, packed blocks,
  up to ``eval.max_eval_tokens`` tokens; `zeda.evaluation.heldout`): perplexity of both, the
  ratio, top-1 agreement and the mean KL(teacher ‖ converted).
- **Measured FLOPs** from `RouterTelemetry` during the evaluation itself (every converted-model
  forward of the lm-eval tasks and of the held-out text; padding and teacher forwards excluded):
  per-layer zero share, the real-experts histogram, the expert-saturation alarm and, through
  `zeda.evaluation.flops.measured_report`, the routed-expert and total FLOP reductions.
- **The accuracy-versus-FLOPs curve** (`zeda.evaluation.curve`): a zero-logit-bias sweep and
  training-free baselines calibrated to the converted model's measured share.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from zeda.config import EvalConfig, RunConfig
from zeda.errors import ZedaError
from zeda.evaluation.baselines import POLICY_KINDS, attach_router_policy
from zeda.evaluation.curve import add_curve, flop_dict
from zeda.evaluation.heldout import HeldOut
from zeda.evaluation.result import EvalResult
from zeda.zero.inject import find_moe_layers, is_injected, teacher_mode
from zeda.zero.telemetry import RouterTelemetry

logger = logging.getLogger(__name__)

__all__ = ["evaluate"]


def _settings(config: RunConfig | EvalConfig | None) -> tuple[EvalConfig, str, int, str]:
    if config is None:
        config = RunConfig()
    if isinstance(config, RunConfig):
        return config.eval, config.data.eval_file, config.data.seq_len, config.data.text_field
    if isinstance(config, EvalConfig):
        d = RunConfig().data
        return config, d.eval_file, d.seq_len, d.text_field
    raise ZedaError(f"config must be a zeda RunConfig or EvalConfig, got {type(config).__name__}")


def _base_model(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _max_positions(model: nn.Module) -> int | None:
    return getattr(_base_model(model).config, "max_position_embeddings", None)


def evaluate(
    model: nn.Module,
    config: RunConfig | EvalConfig | None = None,
    tokenizer: Any = None,
    teacher: nn.Module | None = None,
    *,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    eval_file: str | os.PathLike | None = None,
    include_paths: Sequence[str | os.PathLike] = (),
    batch_size: int = 8,
    teacher_tasks: bool = True,
    baselines_at_sweep: bool = True,
    model_name: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` against its original: lm-eval tasks, held-out quality, measured FLOPs.

    Args:
        model: The converted model (injected, a PEFT student, or an exported checkpoint), or an
            original model (reported as 0% saved).
        config: A `RunConfig` (its ``eval`` and ``data`` sections are used) or an `EvalConfig`;
            None uses the defaults.
        tokenizer: The model's tokenizer (required).
        teacher: A separate original model; by default the original is the converted model's
            own `zeda.teacher_mode` (same weights, zero experts and adapters off). A separate
            teacher is converted in place by `zeda.evaluation.baselines.attach_router_policy`
            for the baselines (its outputs are unchanged).
        tasks: lm-eval task names (default ``eval.tasks``; ``[]`` skips lm-eval).
        limit: Examples per task (default ``eval.limit``).
        eval_file: Held-out JSONL text (default ``data.eval_file``); a missing file skips the
            held-out metrics, the sweep and the baselines.
        include_paths: Extra task directories (see `task_include_paths`).
        batch_size: Sequences per forward (lm-eval and held-out text).
        teacher_tasks: Also run the lm-eval tasks on the original (for recovery ratios).
        baselines_at_sweep: Calibrate the baselines to every bias-sweep point too, not only to
            the converted model's share.
        model_name: Display name (default: the config's ``_name_or_path``).
        progress: Show tqdm progress bars.

    Returns:
        An `EvalResult`.

    Raises:
        ZedaError: for an unknown task (listing where tasks are looked up), a missing tokenizer
            or an unusable config.
    """
    t0 = time.perf_counter()
    if tokenizer is None:
        raise ZedaError("evaluate needs the model's tokenizer (tokenizer=AutoTokenizer.from_pretrained(...))")
    ecfg, default_eval_file, seq_len, text_field = _settings(config)
    tasks = list(ecfg.tasks if tasks is None else tasks)
    limit = ecfg.limit if limit is None else limit
    eval_path = Path(eval_file if eval_file is not None else default_eval_file)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    unknown = [k for k in ecfg.baselines if k not in POLICY_KINDS]
    if unknown:
        raise ZedaError(
            f"unknown baseline(s) {', '.join(unknown)} in eval.baselines; use {', '.join(POLICY_KINDS)}"
        )
    layers = find_moe_layers(model)
    if not layers:
        raise ZedaError(f"{type(model).__name__} has no MoE layers to evaluate")
    base = _base_model(model)
    injected = is_injected(model)
    zeda_cfg = getattr(base.config, "zeda", None) or {}
    if teacher is None and zeda_cfg.get("merged_lora"):
        # An export's LoRA is merged into the expert weights: its teacher mode runs the trained
        # experts, not the original, so every ratio would be measured against the wrong model.
        raise ZedaError(
            "this model is an export with its LoRA merged into the experts, so its teacher mode is "
            "not the original; pass the original model as the teacher (zeda eval --teacher ORIGINAL)"
        )
    num_zero = int(zeda_cfg.get("num_zero_experts", 0)) if injected else 0
    result = EvalResult(
        model_name=model_name or str(getattr(base.config, "_name_or_path", "") or type(base).__name__),
        model_type=str(base.config.model_type),
        injected=injected,
        num_experts=int(layers[0].router.num_experts),
        num_zero_experts=num_zero,
        top_k=int(layers[0].router.top_k),
        settings={
            "tasks": tasks,
            "limit": limit,
            "eval_file": str(eval_path),
            "seq_len": seq_len,
            "max_eval_tokens": ecfg.max_eval_tokens,
            "zero_bias_sweep": list(ecfg.zero_bias_sweep),
            "baselines": list(ecfg.baselines),
            "batch_size": batch_size,
            "teacher": "separate model"
            if teacher is not None
            else ("teacher mode" if injected else "itself"),
        },
    )
    # lm-eval takes seconds to import: only when there are tasks. Unknown tasks fail before any compute.
    if tasks:
        from zeda.evaluation.lm_eval import recovery, run_tasks, task_include_paths, task_manager
    manager = task_manager(tasks, task_include_paths(include_paths)) if tasks else None
    if not injected:
        result.notes.append("model has no zero experts: 0% FLOPs saved")

    # The original: a separate model, the teacher mode of this one, or (original model) itself.
    teacher_model: nn.Module = teacher if teacher is not None else model
    teacher_ctx: Callable[[], Any] = (
        (lambda: teacher_mode(teacher_model)) if is_injected(teacher_model) else contextlib.nullcontext
    )
    same_as_teacher = teacher is None and not injected

    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()
    max_len = _max_positions(model)
    main_tel = RouterTelemetry(model)
    try:
        # ---- lm-eval tasks, converted model; telemetry measures the FLOPs of this very run ----
        if tasks:
            with main_tel:
                result.tasks, result.higher_is_better = run_tasks(
                    model, tokenizer, tasks, manager, limit, batch_size, max_len, [main_tel]
                )
            if same_as_teacher:
                result.teacher_tasks = {t: dict(m) for t, m in result.tasks.items()}
            elif teacher_tasks:
                with teacher_ctx():
                    result.teacher_tasks, _ = run_tasks(
                        teacher_model,
                        tokenizer,
                        tasks,
                        manager,
                        limit,
                        batch_size,
                        _max_positions(teacher_model),
                    )
            result.recovery = recovery(result.tasks, result.teacher_tasks, result.higher_is_better)

        # ---- held-out text ----
        held: HeldOut | None = None
        if eval_path.exists():
            from zeda.distillation.data import pack_texts, read_jsonl

            blk = min(seq_len, max_len or seq_len)
            blocks = pack_texts(
                read_jsonl(eval_path, text_field), tokenizer, blk, max_tokens=ecfg.max_eval_tokens
            )
            held = HeldOut(
                blocks[: max(1, ecfg.max_eval_tokens // blk)],
                teacher_model,
                teacher_ctx,
                batch_size,
                progress,
            )
            # The original's own expert loads, counted during its (one) held-out pass.
            if teacher is not None:
                attach_router_policy(teacher)
            original_tel = RouterTelemetry(teacher_model, count_original=True)
            held.prepare(telemetry=[original_tel])
            metrics, tel = held.score(model, contextlib.nullcontext, "zeda (held-out)", telemetry=[main_tel])
            result.intrinsic = {**metrics, "teacher_ppl": math.exp(held.teacher_nll)}
            result.expert_load_ratio = tel.load_ratio
            result.original_expert_load_ratio = original_tel.load_ratio
        else:
            result.notes.append(
                f"no held-out text at {eval_path}: perplexity/KL, bias sweep and baselines skipped"
            )

        _measured_routing(result, model, main_tel, layers, injected)
        if held is not None:
            add_curve(
                result,
                model,
                held,
                zero_bias_sweep=list(ecfg.zero_bias_sweep),
                baselines=list(ecfg.baselines),
                teacher=teacher,
                teacher_ctx=teacher_ctx,
                injected=injected,
                baselines_at_sweep=baselines_at_sweep,
                metrics=metrics,
                tel=tel,
            )
    finally:
        model.train(was_training)
    result.wall_seconds = time.perf_counter() - t0
    logger.info(
        "evaluated %s: %.1f%% routed FLOPs saved, ppl ratio %s",
        result.model_name,
        100 * result.routed_flop_reduction,
        None if result.intrinsic is None else f"{result.intrinsic['ppl_ratio']:.4f}",
    )
    return result


def _measured_routing(
    result: EvalResult, model: nn.Module, tel: RouterTelemetry, layers: list, injected: bool
) -> None:
    """The headline FLOP figures and the saturation alarm: every converted-model forward measured."""
    result.zero_share_per_layer = {int(i): float(s) for i, s in tel.per_layer.items()}
    result.real_experts_histogram = tel.real_experts_histogram
    result.busiest_expert_share = {int(i): float(s) for i, s in tel.busiest_expert_share.items()}
    result.saturated_layers = {int(i): float(s) for i, s in tel.saturated_layers.items()}
    result.saturation_factor = tel.saturation_factor
    if result.saturated_layers:
        logger.warning(
            "expert saturation: layers %s send more than %gx the mean load to their busiest expert",
            sorted(result.saturated_layers),
            tel.saturation_factor,
        )
    if tel.layers:
        first = next(iter(tel.layers.values()))
        result.measured_tokens = first.slots // max(1, result.top_k)
    result.flops = flop_dict(model, result.zero_share_per_layer, result.num_zero_experts if injected else 0)
    if not tel.layers:
        result.zero_share_per_layer = {layer.index: 0.0 for layer in layers}
        if injected:
            result.notes.append(
                "no forward pass was measured (no tasks, no held-out text): FLOP figures are not measurements"
            )
