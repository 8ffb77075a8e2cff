"""Evaluate a converted model side by side with its original: what it keeps and what it saves.

`evaluate` measures, in one call:

- **lm-eval tasks** on the in-memory model (``HFLM`` over the model object), for the converted
  model and for the original (teacher mode of the same weights, or a separate model), with the
  recovery of every metric (converted / original, inverted for lower-is-better metrics). Task
  names are looked up in the project's ``evals/tasks`` (offline), in user include paths, and in
  lm-eval's own registry (hub datasets need network).
- **Intrinsic quality against the teacher** on held-out text (``data.eval_file``, packed blocks,
  up to ``eval.max_eval_tokens`` tokens): perplexity of both, the ratio, top-1 agreement and the
  mean KL(teacher ‖ converted).
- **Measured FLOPs** from `RouterTelemetry` during the evaluation itself (every converted-model
  forward of the lm-eval tasks and of the held-out text; padding excluded): per-layer zero
  share, the histogram of real experts per token, and through `zeda.flops.measured_report` the
  routed-expert and total FLOP reductions relative to the original at its native top-k.
- **A zero-logit-bias sweep** (``eval.zero_bias_sweep``): one trained model, several FLOP budgets.
- **Training-free baselines at matched measured FLOPs** (``eval.baselines``): the original model
  with its weakest slots dropped (`zeda.baselines`), calibrated to the converted model's
  measured share (and to each sweep point).

The result (`EvalResult`) renders as tables in notebooks, plots inline, and saves
``results.json``, ``report.md``, ``zero_share_per_layer.png`` and ``frontier.png``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zeda.config import EvalConfig, RunConfig
from zeda.errors import ZedaError
from zeda.evaluation import render as _report
from zeda.zero.inject import find_moe_layers, is_injected, teacher_mode
from zeda.zero.routing import RouterTelemetry, SlotPolicy, router_settings

logger = logging.getLogger(__name__)

__all__ = ["EvalResult", "CurvePoint", "evaluate", "evaluate_cli", "task_include_paths"]

REPO_ROOT = Path(__file__).resolve().parents[1]
TEACHER_CACHE_BYTES = 1 << 30
"""Teacher log-probabilities of the held-out text are kept in memory up to this size (fp32);
beyond it they are recomputed for every curve point."""


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass
class CurvePoint:
    """One setting on the accuracy-versus-FLOPs plane, measured on the held-out text.

    Attributes:
        label: Display name, e.g. ``"zeda"``, ``"zeda bias=+1"``, ``"top_p p=0.61"``.
        method: ``original``, ``zeda`` (converted model, any bias) or a baseline kind.
        setting: The knob's value (zero-logit bias, or the baseline policy value).
        zero_share: Measured share of routed slots that did no expert work.
        routed_flop_reduction: Routed-expert FLOP reduction vs. the original at native top-k.
        total_flop_reduction: Whole-model FLOP reduction (per token, context 0).
        ppl: Perplexity on the held-out text.
        ppl_ratio: ``ppl / original ppl``.
        top1_agreement: Share of positions whose argmax equals the original's.
        mean_kl: Mean KL(original ‖ this) per token, in nats.
        target_share: For baselines, the share they were calibrated to.
    """

    label: str
    method: str
    setting: float | None
    zero_share: float
    routed_flop_reduction: float
    total_flop_reduction: float
    ppl: float
    ppl_ratio: float
    top1_agreement: float
    mean_kl: float
    target_share: float | None = None


@dataclass
class EvalResult:
    """Everything `evaluate` measured. ``to_dict()`` is what ``results.json`` holds.

    Attributes:
        model_name: Display name of the model.
        model_type: Its config's model type.
        injected: Whether the model has zero experts.
        num_experts: Real routed experts E per MoE layer.
        num_zero_experts: Zero experts Z per MoE layer (0 for an original model).
        top_k: Routed slots per token.
        tasks: Converted model's lm-eval metrics, ``task -> metric -> value``.
        teacher_tasks: The original's lm-eval metrics (same tasks, same limit).
        recovery: ``task -> metric -> converted/original`` (original/converted when lower is
            better), so 1.0 means fully kept.
        higher_is_better: ``task -> metric -> bool`` as lm-eval declares it.
        intrinsic: Held-out text metrics: ``ppl``, ``teacher_ppl``, ``ppl_ratio``,
            ``top1_agreement``, ``mean_kl``, ``tokens``.
        flops: `zeda.flops.FlopReport` (as a dict) from the shares measured during evaluation.
        zero_share_per_layer: Measured zero share per MoE layer (decoder index).
        real_experts_histogram: Token·layer counts of 0..k real experts used.
        measured_tokens: Tokens (padding excluded) behind the FLOP figures.
        curve: The accuracy-versus-FLOPs points (original, converted, sweep, baselines).
        calibrations: Baseline calibrations (`zeda.baselines.Calibration` dicts).
        settings: The evaluation settings used.
        notes: Anything skipped and why.
        wall_seconds: Time the evaluation took.
    """

    model_name: str
    model_type: str
    injected: bool
    num_experts: int
    num_zero_experts: int
    top_k: int
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    teacher_tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    recovery: dict[str, dict[str, float | None]] = field(default_factory=dict)
    higher_is_better: dict[str, dict[str, bool]] = field(default_factory=dict)
    intrinsic: dict[str, float] | None = None
    flops: dict[str, Any] = field(default_factory=dict)
    zero_share_per_layer: dict[int, float] = field(default_factory=dict)
    real_experts_histogram: list[int] = field(default_factory=list)
    measured_tokens: int = 0
    curve: list[CurvePoint] = field(default_factory=list)
    calibrations: list[dict] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0

    # -- headline numbers ------------------------------------------------------------------

    @property
    def routed_flop_reduction(self) -> float:
        """Measured routed-expert FLOP reduction vs. the original at its native top-k."""
        return float(self.flops.get("routed_flop_reduction", 0.0))

    @property
    def total_flop_reduction(self) -> float:
        """Measured whole-model FLOP reduction per token."""
        return float(self.flops.get("total_flop_reduction", 0.0))

    @property
    def zero_share(self) -> float:
        """Measured share of routed slots that went to zero experts."""
        return float(self.flops.get("zero_share", 0.0))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (plus the headline FLOP numbers)."""
        d = asdict(self)
        d["zero_share_per_layer"] = {str(k): v for k, v in self.zero_share_per_layer.items()}
        d["zero_share"] = self.zero_share
        d["routed_flop_reduction"] = self.routed_flop_reduction
        d["total_flop_reduction"] = self.total_flop_reduction
        return _finite(d)

    def card_metrics(self) -> dict[str, Any]:
        """The figures a model card lists (`zeda.export.export` ``card_metrics``)."""
        out: dict[str, Any] = {
            "zero_share": self.zero_share,
            "routed_flop_reduction": self.routed_flop_reduction,
            "total_flop_reduction": self.total_flop_reduction,
            "measured_tokens": self.measured_tokens,
        }
        if self.intrinsic:
            out.update(
                {
                    k: self.intrinsic[k]
                    for k in ("ppl_ratio", "top1_agreement", "mean_kl", "ppl", "teacher_ppl")
                }
            )
        for task, metrics in self.tasks.items():
            for name, value in metrics.items():
                out[f"{task}/{name}"] = value
                rec = self.recovery.get(task, {}).get(name)
                if rec is not None:
                    out[f"{task}/{name} recovery"] = rec
        return out

    # -- rendering -------------------------------------------------------------------------

    def _sections(self) -> list[tuple[str, Sequence[str], list[list[Any]]]]:
        pct = _report.pct
        title = (
            f"{self.model_name} ({self.model_type}): E={self.num_experts}, Z={self.num_zero_experts}, "
            f"top-{self.top_k}"
        )
        summary: list[list[Any]] = [
            ["zero-expert share of routed slots", "0.0%", pct(self.zero_share)],
            ["routed-expert FLOP reduction", "0.0%", pct(self.routed_flop_reduction)],
            ["total FLOP reduction", "0.0%", pct(self.total_flop_reduction)],
        ]
        if self.flops:
            summary.append(
                [
                    "FLOPs / token",
                    _report.fmt(float(self.flops["native_flops_per_token"])),
                    _report.fmt(float(self.flops["flops_per_token"])),
                ]
            )
        if self.intrinsic:
            i = self.intrinsic
            summary += [
                ["held-out perplexity", i["teacher_ppl"], i["ppl"]],
                ["perplexity ratio", 1.0, i["ppl_ratio"]],
                ["top-1 agreement with original", 1.0, i["top1_agreement"]],
                ["mean KL(original ‖ model), nats", 0.0, i["mean_kl"]],
            ]
        sections: list[tuple[str, Sequence[str], list[list[Any]]]] = [
            (title, ["", "original", "zeda"], summary)
        ]
        rows = []
        for task, metrics in self.tasks.items():
            for name, value in metrics.items():
                rows.append(
                    [
                        task,
                        name,
                        self.teacher_tasks.get(task, {}).get(name),
                        value,
                        self.recovery.get(task, {}).get(name),
                    ]
                )
        if rows:
            sections.append(("lm-eval tasks", ["task", "metric", "original", "zeda", "recovery"], rows))
        if self.curve:
            sections.append(
                (
                    "accuracy vs FLOPs (held-out text; baselines at matched measured FLOPs)",
                    [
                        "setting",
                        "skipped share",
                        "routed FLOPs saved",
                        "total FLOPs saved",
                        "ppl ratio",
                        "top-1 agr.",
                        "KL",
                    ],
                    [
                        [
                            p.label,
                            pct(p.zero_share),
                            pct(p.routed_flop_reduction),
                            pct(p.total_flop_reduction),
                            p.ppl_ratio,
                            p.top1_agreement,
                            p.mean_kl,
                        ]
                        for p in self.curve
                    ],
                )
            )
        if self.zero_share_per_layer:
            sections.append(
                (
                    "zero share per MoE layer",
                    ["layer", *[str(i) for i in self.zero_share_per_layer]],
                    [["share", *[pct(v) for v in self.zero_share_per_layer.values()]]],
                )
            )
        if self.real_experts_histogram:
            total = sum(self.real_experts_histogram) or 1
            sections.append(
                (
                    "real experts per token (all MoE layers)",
                    ["real experts", *[str(i) for i in range(len(self.real_experts_histogram))]],
                    [["share of token·layers", *[pct(h / total) for h in self.real_experts_histogram]]],
                )
            )
        return sections

    def _repr_markdown_(self) -> str:
        parts = []
        for title, header, rows in self._sections():
            parts.append(f"**{title}**\n\n{_report.md_table(header, rows)}")
        if self.notes:
            parts.append("Notes: " + "; ".join(self.notes))
        return "\n\n".join(parts)

    def _repr_html_(self) -> str:
        import html

        parts = [
            f"<p><b>{html.escape(title)}</b></p>{_report.html_table(header, rows)}"
            for title, header, rows in self._sections()
        ]
        if self.notes:
            parts.append(f"<p>Notes: {html.escape('; '.join(self.notes))}</p>")
        return "".join(parts)

    def __str__(self) -> str:
        return self._repr_markdown_()

    def plot(self) -> list[Any]:
        """The figures (zero share per layer, accuracy-vs-FLOPs frontier); shown inline in notebooks."""
        figs = []
        if self.zero_share_per_layer:
            figs.append(
                _report.zero_share_figure(
                    self.zero_share_per_layer,
                    self.real_experts_histogram,
                    f"{self.model_name}: measured routing",
                )
            )
        if self.curve:
            figs.append(
                _report.frontier_figure(
                    [asdict(p) for p in self.curve], f"{self.model_name}: accuracy vs FLOPs"
                )
            )
        return figs

    def save(self, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``results.json``, ``report.md``, ``zero_share_per_layer.png`` and ``frontier.png``.

        Args:
            out_dir: Output directory (created).
            overwrite: Replace an existing directory.

        Returns:
            The output directory.

        Raises:
            ZedaError: if ``out_dir`` exists and ``overwrite`` is False.
        """
        out = Path(out_dir)
        if out.exists():
            if not overwrite:
                raise ZedaError(
                    f"output directory {out} already exists; pass --overwrite (overwrite=True) to replace it"
                )
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps(self.to_dict(), indent=1))
        (out / "report.md").write_text(
            "# zeda evaluation\n\n"
            + self._repr_markdown_()
            + "\n\n![zero share per layer](zero_share_per_layer.png)\n\n![accuracy vs FLOPs](frontier.png)\n"
        )
        figs = self.plot()
        names = (["zero_share_per_layer.png"] if self.zero_share_per_layer else []) + (
            ["frontier.png"] if self.curve else []
        )
        for fig, name in zip(figs, names, strict=True):
            _report.save_figure(fig, out / name)
        logger.info("wrote evaluation to %s", out)
        return out


def _finite(x: Any) -> Any:
    """Replace NaN/inf by None so results.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# ----------------------------------------------------------------------------------------------
# lm-eval
# ----------------------------------------------------------------------------------------------


def task_include_paths(extra: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Directories searched for task YAMLs before lm-eval's own registry.

    In order: ``extra``, ``$ZEDA_TASK_PATHS`` (``os.pathsep``-separated), ``./evals/tasks`` and
    the repository's ``evals/tasks`` (the project's offline tasks), those that exist.
    """
    cands = [Path(p) for p in extra]
    cands += [Path(p) for p in os.environ.get("ZEDA_TASK_PATHS", "").split(os.pathsep) if p]
    cands += [Path("evals/tasks"), REPO_ROOT / "evals" / "tasks"]
    out: list[Path] = []
    for c in cands:
        if c.is_dir() and c.resolve() not in [o.resolve() for o in out]:
            out.append(c)
    return out


def _task_manager(tasks: Sequence[str], include_paths: Sequence[Path]) -> Any:
    """A TaskManager that knows every task in ``tasks``; only index lm-eval's registry if needed.

    lm-eval's own registry (thousands of YAMLs, seconds to index) is searched only when a task is
    not in ``include_paths``, and not at all with ``ZEDA_LM_EVAL_REGISTRY=0``.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    if paths:
        tm = TaskManager(include_path=paths, include_defaults=False)
        if all(t in tm.all_tasks or Path(t).is_file() for t in tasks):
            return tm
    use_registry = os.environ.get("ZEDA_LM_EVAL_REGISTRY", "1").strip().lower() not in ("0", "false", "no")
    if use_registry:
        tm = TaskManager(include_path=paths or None)
    elif paths:
        tm = TaskManager(include_path=paths, include_defaults=False)
    else:
        tm = None
    missing = [t for t in tasks if (tm is None or t not in tm.all_tasks) and not Path(t).is_file()]
    if missing:
        where = ", ".join(str(p) for p in include_paths) or "(no project task directory found)"
        registry = (
            "lm-eval's built-in registry"
            if use_registry
            else "not lm-eval's registry (ZEDA_LM_EVAL_REGISTRY=0)"
        )
        raise ZedaError(
            f"unknown task(s) {', '.join(missing)}; looked in {where}, $ZEDA_TASK_PATHS and {registry}; "
            "hub tasks also need network to download their data"
        )
    return tm


class _PaddingAwareTelemetry:
    """Makes `RouterTelemetry` skip lm-eval's right padding (its forwards carry no attention mask).

    lm-eval pads loglikelihood batches with ``pad_and_concat``; the wrapper records the true
    lengths and the HFLM subclass turns them into the token mask of the next forward.
    """

    def __init__(self, collectors: Sequence[RouterTelemetry]) -> None:
        self.collectors = list(collectors)
        self.lengths: list[int] | None = None

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        import lm_eval.models.huggingface as hf

        original = hf.pad_and_concat

        def wrapper(
            max_length: int, tensors: list[torch.Tensor], padding_side: str = "right"
        ) -> torch.Tensor:
            if padding_side == "right":
                self.lengths = [int(t.shape[0]) for t in tensors]
            return original(max_length, tensors, padding_side=padding_side)

        hf.pad_and_concat = wrapper
        try:
            yield
        finally:
            hf.pad_and_concat = original
            self.lengths = None

    def set_mask(self, mask: torch.Tensor | None) -> None:
        for c in self.collectors:
            c.set_mask(mask)


def _make_lm(
    model: nn.Module,
    tokenizer: Any,
    batch_size: int,
    max_length: int | None,
    pad: _PaddingAwareTelemetry | None,
) -> Any:
    from lm_eval.models.huggingface import HFLM

    class _ZedaLM(HFLM):
        def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
            if pad is not None:
                lengths = pad.lengths
                if lengths is not None and len(lengths) == inps.shape[0]:
                    pos = torch.arange(inps.shape[1])[None, :]
                    pad.set_mask(pos < torch.tensor(lengths)[:, None])
                else:
                    pad.set_mask(None)
            try:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            finally:
                if pad is not None:
                    pad.set_mask(None)

        def _model_generate(
            self, context: torch.Tensor, max_length: int, stop: list[str], **kw: Any
        ) -> torch.Tensor:
            if pad is not None and kw.get("attention_mask") is not None:
                pad.set_mask(kw["attention_mask"])  # the prefill; decode steps count every row
            try:
                return super()._model_generate(context, max_length, stop, **kw)
            finally:
                if pad is not None:
                    pad.set_mask(None)

    kwargs: dict[str, Any] = {
        "pretrained": model,
        "tokenizer": tokenizer,
        "backend": "causal",
        "batch_size": batch_size,
    }
    if max_length is not None:
        kwargs["max_length"] = max_length
    return _ZedaLM(**kwargs)


@contextlib.contextmanager
def _no_env_info() -> Iterator[None]:
    """Skip lm-eval's ``add_env_info`` (it shells out to collect pip/CUDA versions: seconds per call)."""
    import lm_eval.evaluator as ev

    original = getattr(ev, "add_env_info", None)
    if original is None:  # pragma: no cover - other lm-eval versions
        yield
        return
    ev.add_env_info = lambda results: None
    try:
        yield
    finally:
        ev.add_env_info = original


def _parse_results(results: dict) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, bool]]]:
    metrics: dict[str, dict[str, float]] = {}
    hib: dict[str, dict[str, bool]] = {}
    for task, values in results.get("results", {}).items():
        row = {}
        for key, value in values.items():
            if (
                "," not in key
                or "_stderr" in key
                or not isinstance(value, (int, float))
                or isinstance(value, bool)
            ):
                continue
            name, filt = key.split(",", 1)
            row[name if filt == "none" else f"{name},{filt}"] = float(value)
        if row:
            metrics[task] = row
            declared = results.get("higher_is_better", {}).get(task, {})
            hib[task] = {m: bool(declared.get(m.split(",")[0], True)) for m in row}
    return metrics, hib


def _run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    task_manager: Any,
    limit: int | None,
    batch_size: int,
    max_length: int | None,
    collectors: Sequence[RouterTelemetry] = (),
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, bool]]]:
    from lm_eval import simple_evaluate

    pad = _PaddingAwareTelemetry(collectors) if collectors else None
    lm = _make_lm(model, tokenizer, batch_size, max_length, pad)
    with pad.patched() if pad is not None else contextlib.nullcontext(), _no_env_info():
        results = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=task_manager,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
        )
    if results is None:  # pragma: no cover - only on non-zero ranks
        return {}, {}
    return _parse_results(results)


def _recovery(
    student: dict[str, dict[str, float]],
    teacher: dict[str, dict[str, float]],
    hib: dict[str, dict[str, bool]],
) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for task, metrics in student.items():
        row: dict[str, float | None] = {}
        for name, value in metrics.items():
            ref = teacher.get(task, {}).get(name)
            if ref is None:
                row[name] = None
            elif hib.get(task, {}).get(name, True):
                row[name] = value / ref if ref != 0 else (1.0 if value == 0 else None)
            else:
                row[name] = ref / value if value != 0 else (1.0 if ref == 0 else None)
        out[task] = row
    return out


# ----------------------------------------------------------------------------------------------
# Held-out text: perplexity, agreement, KL
# ----------------------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _HeldOut:
    """Held-out blocks and the teacher's log-probabilities on them (cached when small).

    Args:
        blocks: ``(N, T)`` token ids.
        teacher: The original model (or the converted one, used inside ``teacher_ctx``).
        teacher_ctx: Context factory that turns ``teacher`` into the original (e.g. teacher mode).
        batch_size: Blocks per forward.
        progress: Show tqdm bars.
    """

    def __init__(
        self,
        blocks: torch.Tensor,
        teacher: nn.Module,
        teacher_ctx: Callable[[], Any],
        batch_size: int,
        progress: bool,
    ) -> None:
        self.blocks, self.teacher, self.teacher_ctx = blocks, teacher, teacher_ctx
        self.batch_size, self.progress = batch_size, progress
        self.cache: list[torch.Tensor] | None = None
        self.teacher_nll: float = math.nan

    def batches(self) -> list[torch.Tensor]:
        return list(torch.split(self.blocks, self.batch_size))

    @torch.no_grad()
    def teacher_logprobs(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        """``(B, T-1, V)`` fp32 teacher log-probabilities of batch ``i``."""
        if self.cache is not None and i < len(self.cache):
            return self.cache[i]
        with self.teacher_ctx():
            logits = self.teacher(input_ids=ids.to(_device(self.teacher))).logits[:, :-1]
        return F.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def prepare(self) -> None:
        """One teacher pass: its NLL, and the log-prob cache if it fits `TEACHER_CACHE_BYTES`."""
        batches = self.batches()
        nll, n = 0.0, 0
        cache: list[torch.Tensor] = []
        size = 0
        keep = True
        for i, ids in enumerate(
            tqdm(batches, desc="original (held-out)", disable=not self.progress, leave=False)
        ):
            lp = self.teacher_logprobs(i, ids)
            labels = ids[:, 1:].to(lp.device)
            nll += float(-lp.gather(-1, labels[..., None]).sum())
            n += labels.numel()
            size += lp.numel() * 4
            keep = keep and size <= TEACHER_CACHE_BYTES
            if keep:
                cache.append(lp)
        self.cache = cache if keep else None
        self.teacher_nll = nll / n

    @torch.no_grad()
    def score(
        self, model: nn.Module, ctx: Callable[[], Any], desc: str
    ) -> tuple[dict[str, float], RouterTelemetry]:
        """Perplexity, agreement and KL of ``model`` (inside ``ctx``) against the teacher.

        Returns:
            ``({"ppl", "ppl_ratio", "top1_agreement", "mean_kl", "tokens"}, telemetry)``.
        """
        nll = agree = kl = 0.0
        n = 0
        with RouterTelemetry() as tel:
            for i, ids in enumerate(tqdm(self.batches(), desc=desc, disable=not self.progress, leave=False)):
                t_lp = self.teacher_logprobs(i, ids)
                with ctx():
                    logits = model(input_ids=ids.to(_device(model))).logits[:, :-1]
                s_lp = F.log_softmax(logits.float(), dim=-1).to(t_lp.device)
                labels = ids[:, 1:].to(t_lp.device)
                nll += float(-s_lp.gather(-1, labels[..., None]).sum())
                agree += float((s_lp.argmax(-1) == t_lp.argmax(-1)).sum())
                kl += float((t_lp.exp() * (t_lp - s_lp)).sum())
                n += labels.numel()
        ppl = math.exp(nll / n)
        return {
            "ppl": ppl,
            "ppl_ratio": ppl / math.exp(self.teacher_nll),
            "top1_agreement": agree / n,
            "mean_kl": kl / n,
            "tokens": n,
        }, tel


# ----------------------------------------------------------------------------------------------
# FLOPs from telemetry
# ----------------------------------------------------------------------------------------------


def _base_model(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _flop_dict(
    model: nn.Module, per_layer: dict[int, float], num_zero_experts: int | None = None
) -> dict[str, Any]:
    """`measured_report` of ``model`` with ``per_layer`` shares; MoE layers not seen count as 0."""
    from zeda.evaluation.flops import measured_report

    config = _base_model(model).config
    moe = [layer.index for layer in find_moe_layers(model)]
    shares = {i: float(per_layer.get(i, 0.0)) for i in moe}
    unseen = [i for i in moe if i not in per_layer]
    if unseen and len(unseen) < len(moe):
        logger.warning("no router telemetry for MoE layers %s; counting them as 0%% saved", unseen)
    try:
        return measured_report(config, shares, num_zero_experts=num_zero_experts).to_dict()
    except ZedaError as exc:  # e.g. layer indexing this family's accounting does not share
        logger.warning("FLOP accounting failed (%s); reporting the routed share only", exc)
        share = sum(shares.values()) / len(shares) if shares else 0.0
        return {"zero_share": share, "routed_flop_reduction": share, "total_flop_reduction": math.nan}


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------


def _settings(config: RunConfig | EvalConfig | None) -> tuple[EvalConfig, str, int, str]:
    if config is None:
        config = RunConfig()
    if isinstance(config, RunConfig):
        return config.eval, config.data.eval_file, config.data.seq_len, config.data.text_field
    if isinstance(config, EvalConfig):
        d = RunConfig().data
        return config, d.eval_file, d.seq_len, d.text_field
    raise ZedaError(f"config must be a zeda RunConfig or EvalConfig, got {type(config).__name__}")


def _max_positions(model: nn.Module) -> int | None:
    cfg = _base_model(model).config
    return getattr(cfg, "max_position_embeddings", None)


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
            teacher is converted in place by `zeda.baselines.attach_router_policy` for the
            baselines (its outputs are unchanged).
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

    layers = find_moe_layers(model)
    if not layers:
        raise ZedaError(f"{type(model).__name__} has no MoE layers to evaluate")
    base = _base_model(model)
    injected = is_injected(model)
    num_zero = int((getattr(base.config, "zeda", None) or {}).get("num_zero_experts", 0)) if injected else 0
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
    # Unknown tasks fail before any compute.
    include = task_include_paths(include_paths)
    task_manager = _task_manager(tasks, include) if tasks else None
    if not injected:
        result.notes.append("model has no zero experts: 0% FLOPs saved")

    # The original: a separate model, the teacher mode of this one, or (original model) itself.
    if teacher is not None:
        teacher_model: nn.Module = teacher
        teacher_ctx: Callable[[], Any] = (
            (lambda: teacher_mode(teacher)) if is_injected(teacher) else contextlib.nullcontext
        )
    elif injected:
        teacher_model, teacher_ctx = model, (lambda: teacher_mode(model))
    else:
        teacher_model, teacher_ctx = model, contextlib.nullcontext
    same_as_teacher = teacher is None and not injected

    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()
    max_len = _max_positions(model)
    main_tel = RouterTelemetry()
    try:
        # ---- lm-eval tasks, converted model; telemetry measures the FLOPs of this very run ----
        if tasks:
            with main_tel:
                result.tasks, result.higher_is_better = _run_lm_eval(
                    model, tokenizer, tasks, task_manager, limit, batch_size, max_len, [main_tel]
                )
            if same_as_teacher:
                result.teacher_tasks = {t: dict(m) for t, m in result.tasks.items()}
            elif teacher_tasks:
                with teacher_ctx():
                    result.teacher_tasks, _ = _run_lm_eval(
                        teacher_model,
                        tokenizer,
                        tasks,
                        task_manager,
                        limit,
                        batch_size,
                        _max_positions(teacher_model),
                    )
            result.recovery = _recovery(result.tasks, result.teacher_tasks, result.higher_is_better)

        # ---- held-out text ----
        held: _HeldOut | None = None
        if eval_path.exists():
            from zeda.distillation.data import pack_texts, read_jsonl

            texts = read_jsonl(eval_path, text_field)
            blk = min(seq_len, max_len or seq_len)
            blocks = pack_texts(texts, tokenizer, blk, max_tokens=ecfg.max_eval_tokens)
            blocks = blocks[: max(1, ecfg.max_eval_tokens // blk)]
            held = _HeldOut(blocks, teacher_model, teacher_ctx, batch_size, progress)
            held.prepare()
        else:
            result.notes.append(
                f"no held-out text at {eval_path}: perplexity/KL, bias sweep and baselines skipped"
            )

        if held is not None:
            with main_tel:
                metrics, tel = held.score(model, contextlib.nullcontext, "zeda (held-out)")
            result.intrinsic = {**metrics, "teacher_ppl": math.exp(held.teacher_nll)}
        # The headline FLOP figures: every converted-model forward of this evaluation.
        result.zero_share_per_layer = {int(i): float(s) for i, s in main_tel.per_layer.items()}
        result.real_experts_histogram = main_tel.real_experts_histogram
        if main_tel.layers:
            first = next(iter(main_tel.layers.values()))
            result.measured_tokens = first.slots // max(1, result.top_k)
        result.flops = _flop_dict(model, result.zero_share_per_layer, num_zero if injected else 0)
        if not main_tel.layers:
            result.zero_share_per_layer = {layer.index: 0.0 for layer in layers}
            if injected:
                result.notes.append(
                    "no forward pass was measured (no tasks, no held-out text): FLOP figures are not measurements"
                )

        if held is not None:
            _curve(
                result,
                model,
                held,
                ecfg,
                teacher,
                teacher_model,
                teacher_ctx,
                injected,
                baselines_at_sweep,
                metrics,
                tel,
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


def _point(
    model: nn.Module,
    label: str,
    method: str,
    setting: float | None,
    metrics: dict,
    tel: RouterTelemetry,
    num_zero: int,
    target: float | None = None,
) -> CurvePoint:
    flops = _flop_dict(model, tel.per_layer, num_zero)
    return CurvePoint(
        label=label,
        method=method,
        setting=setting,
        zero_share=tel.zero_share,
        routed_flop_reduction=float(flops["routed_flop_reduction"]),
        total_flop_reduction=float(flops["total_flop_reduction"]),
        ppl=metrics["ppl"],
        ppl_ratio=metrics["ppl_ratio"],
        top1_agreement=metrics["top1_agreement"],
        mean_kl=metrics["mean_kl"],
        target_share=target,
    )


def _curve(
    result: EvalResult,
    model: nn.Module,
    held: _HeldOut,
    ecfg: EvalConfig,
    teacher: nn.Module | None,
    teacher_model: nn.Module,
    teacher_ctx: Callable[[], Any],
    injected: bool,
    baselines_at_sweep: bool,
    metrics: dict,
    tel: RouterTelemetry,
) -> None:
    """Fill ``result.curve``: original, converted, bias sweep, and baselines at matched shares."""
    from zeda.evaluation.baselines import attach_router_policy, calibrate

    teacher_ppl = math.exp(held.teacher_nll)
    result.curve.append(CurvePoint("original", "original", None, 0.0, 0.0, 0.0, teacher_ppl, 1.0, 1.0, 0.0))
    num_zero = result.num_zero_experts
    result.curve.append(_point(model, "zeda", "zeda", 0.0, metrics, tel, num_zero))
    targets = [tel.zero_share]
    if ecfg.zero_bias_sweep:
        if not injected:
            result.notes.append("zero-bias sweep skipped: the model has no zero experts")
        else:
            for b in ecfg.zero_bias_sweep:
                ctx = lambda b=b: router_settings(model, zero_logit_bias=float(b))  # noqa: E731
                m, t = held.score(model, ctx, f"zeda bias={b:+g}")
                result.curve.append(_point(model, f"zeda bias={b:+g}", "zeda", float(b), m, t, num_zero))
                if baselines_at_sweep:
                    targets.append(t.zero_share)

    if not ecfg.baselines:
        return
    if tel.zero_share < 1e-3 and len(targets) == 1:
        result.notes.append(
            "baselines skipped: the model skips no slots, so there is no FLOP budget to match"
        )
        return
    # The baseline model: the original routers with a slot policy (teacher mode of an injected
    # model, or a separate original attached to zeda's router class).
    if teacher is not None:
        bmodel = attach_router_policy(teacher)
        bctx = teacher_ctx
    else:
        bmodel, bctx = teacher_model, teacher_ctx
    cal_batches = held.batches()[:1]  # the share is then measured on all of the text
    for kind in ecfg.baselines:
        for target in sorted({round(s, 6) for s in targets if s >= 1e-3}):
            with bctx():
                cal = calibrate(bmodel, kind, target, cal_batches)
            result.calibrations.append(cal.to_dict())
            policy = cal.policy

            @contextlib.contextmanager
            def ctx(policy: SlotPolicy = policy) -> Iterator[None]:
                with bctx(), router_settings(bmodel, slot_policy=policy):
                    yield

            m, t = held.score(bmodel, ctx, f"{kind} @ {target:.2f}")
            label = (
                f"{kind} {'m' if kind == 'keep_top_m' else ('p' if kind == 'top_p' else 't')}={cal.value:.3g}"
            )
            result.curve.append(_point(bmodel, label, kind, cal.value, m, t, 0, target))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def evaluate_cli(args: Any) -> tuple[EvalResult, Path]:
    """``zeda eval --model DIR --tasks T1,T2 --out DIR [--limit N] [--recipe R] [--teacher DIR]``.

    Returns:
        The evaluation and the directory it was saved to.
    """
    from transformers import AutoTokenizer

    from zeda.config import load_recipe
    from zeda.io import load

    out = Path(args.out)
    if out.exists() and not getattr(args, "overwrite", False):
        raise ZedaError(f"output directory {out} already exists; pass --overwrite to replace it")
    cfg = load_recipe(args.recipe) if getattr(args, "recipe", None) else RunConfig()
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    model = load(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as exc:
        raise ZedaError(f"no tokenizer found at {args.model}: {str(exc).splitlines()[0]}") from exc
    teacher = load(args.teacher) if getattr(args, "teacher", None) else None
    result = evaluate(
        model,
        cfg,
        tokenizer,
        teacher=teacher,
        tasks=tasks,
        limit=args.limit if args.limit is not None else cfg.eval.limit,
        model_name=str(args.model),
    )
    result.save(out, overwrite=getattr(args, "overwrite", False))
    return result, out


class _CallableModule(types.ModuleType):
    """Importing ``zeda.evaluate`` binds the package attribute ``zeda.evaluate`` to this module, shadowing
    the function ``zeda.evaluate(...)``; calling the module calls the function, so both spellings work."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
