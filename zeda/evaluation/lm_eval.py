"""lm-eval on an in-memory model: task lookup, an `HFLM` subclass that measures routing, recovery.

`ZedaLM` is lm-eval's `HFLM` over a model object. It overrides two of HFLM's own methods so that
`RouterTelemetry` counts only real tokens: lm-eval right-pads loglikelihood batches with token
id 0 and passes no attention mask, so `ZedaLM` remembers the unpadded inputs of the requests it
is given and masks each row of a batch to its true length. Tasks run through lm-eval's public
``TaskManager.load`` + ``lm_eval.evaluator.evaluate`` (``simple_evaluate`` minus its environment
report, which shells out for pip/CUDA versions and git hashes: seconds per call).

Task names are looked up in the project's offline ``evals/tasks``, in user include paths and in
lm-eval's own registry (hub datasets need network).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lm_eval.models.huggingface import HFLM
from torch import nn

from zeda.errors import ZedaError
from zeda.zero.telemetry import RouterTelemetry

logger = logging.getLogger(__name__)

__all__ = ["ZedaLM", "recovery", "run_tasks", "task_include_paths", "task_manager"]

REPO_ROOT = Path(__file__).resolve().parents[2]

# lm-eval notices that are expected when zeda hands it a model object and the project's tasks;
# matched exactly (as substrings) on the logger that emits them, only while zeda calls lm-eval.
_EXPECTED_NOTICES: dict[str, tuple[str, ...]] = {
    "lm_eval.models.huggingface": (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    ),
    "lm_eval.api.task": ("Custom kwargs can be passed to `--metadata`",),  # any custom_dataset task
}


class _DropMessages(logging.Filter):
    def __init__(self, texts: Sequence[str]) -> None:
        super().__init__()
        self.texts = tuple(texts)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(t in message for t in self.texts)


@contextlib.contextmanager
def _expected_notices_silenced() -> Iterator[None]:
    """Drop the `_EXPECTED_NOTICES` while lm-eval runs; every other lm-eval warning passes."""
    installed = [(logging.getLogger(name), _DropMessages(p)) for name, p in _EXPECTED_NOTICES.items()]
    for log, flt in installed:
        log.addFilter(flt)
    try:
        yield
    finally:
        for log, flt in installed:
            log.removeFilter(flt)


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


def task_manager(tasks: Sequence[str], include_paths: Sequence[Path]) -> Any:
    """A ``TaskManager`` that knows every task in ``tasks``; only index lm-eval's registry if needed.

    lm-eval's own registry (thousands of YAMLs, seconds to index) is searched only when a task is
    not in ``include_paths``, and not at all with ``ZEDA_LM_EVAL_REGISTRY=0``.

    Raises:
        ZedaError: naming the unknown tasks and where they were looked up.
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


class ZedaLM(HFLM):
    """lm-eval's `HFLM` over an in-memory model whose router telemetry excludes padding.

    Args:
        model: The causal LM (zeda-injected, a PEFT student, or an original model).
        tokenizer: Its tokenizer.
        batch_size: Sequences per forward.
        max_length: Context length (default: lm-eval's choice from the config).
        telemetry: Open collectors to tell the token mask of every forward.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        batch_size: int,
        max_length: int | None = None,
        telemetry: Sequence[RouterTelemetry] = (),
    ) -> None:
        kwargs: dict[str, Any] = {"max_length": max_length} if max_length is not None else {}
        with _expected_notices_silenced():
            super().__init__(
                pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, **kwargs
            )
        self._telemetry = list(telemetry)
        self._inputs: set[tuple[int, ...]] = set()

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """HFLM's encoding without the tokenizer's "longer than model_max_length" warning.

        lm-eval encodes whole documents and cuts them into model-sized windows itself
        (``loglikelihood_rolling``), so a long document is expected here, not an indexing error.
        """
        tok = self.tokenizer
        limit = tok.model_max_length
        tok.model_max_length = int(1e30)
        try:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        finally:
            tok.model_max_length = limit

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kw: Any,
    ) -> list[tuple[float, bool]]:
        # HFLM feeds each request as (context + continuation)[-(max_length + 1):][:-1], right-padded
        # with id 0 to the longest row of its batch; remember the unpadded rows to find each length.
        self._inputs = {tuple((ctx + cont)[-(self.max_length + 1) :][:-1]) for _, ctx, cont in requests}
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, **kw)
        finally:
            self._inputs = set()

    def _row_mask(self, inps: torch.Tensor) -> torch.Tensor | None:
        """``(B, T)`` bool mask of each row's true tokens, or None if a row is not a known request."""
        if not self._inputs:
            return None
        rows = inps.tolist()
        lengths = []
        for row in rows:
            last = max((i for i, t in enumerate(row) if t != 0), default=-1) + 1
            # Trailing genuine id-0 tokens are ambiguous with padding: take the longest known row.
            found = next((n for n in range(len(row), last - 1, -1) if tuple(row[:n]) in self._inputs), None)
            if found is None:
                return None
            lengths.append(found)
        pos = torch.arange(inps.shape[1])[None, :]
        return pos < torch.tensor(lengths)[:, None]

    def _set_mask(self, mask: torch.Tensor | None) -> None:
        for t in self._telemetry:
            t.set_mask(mask)

    def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
        self._set_mask(self._row_mask(inps) if self._telemetry else None)
        try:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        finally:
            self._set_mask(None)

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **kw: Any
    ) -> torch.Tensor:
        # The prefill carries the attention mask; the decode steps count every row.
        self._set_mask(kw.get("attention_mask"))
        try:
            return super()._model_generate(context, max_length, stop, **kw)
        finally:
            self._set_mask(None)


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


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    manager: Any,
    limit: int | None,
    batch_size: int,
    max_length: int | None,
    telemetry: Sequence[RouterTelemetry] = (),
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, bool]]]:
    """Run lm-eval ``tasks`` on ``model`` as ``simple_evaluate`` would (same seeds, 0-shot default).

    Args:
        model: The model to evaluate (put it in teacher mode first to evaluate the original).
        tokenizer: Its tokenizer.
        tasks: Task names or YAML paths known to ``manager``.
        manager: A ``TaskManager`` from `task_manager`.
        limit: Examples per task (None: all).
        batch_size: Sequences per forward.
        max_length: Context length (None: lm-eval's default for the model).
        telemetry: Open `RouterTelemetry` collectors; padding is masked out of their counts.

    Returns:
        ``(task -> metric -> value, task -> metric -> higher_is_better)``.
    """
    from lm_eval.evaluator import evaluate as lm_evaluate

    lm = ZedaLM(model, tokenizer, batch_size, max_length, telemetry)
    # simple_evaluate's default seeds, so numbers match a plain lm-eval run.
    random.seed(0)
    np.random.seed(1234)
    torch.manual_seed(1234)
    with _expected_notices_silenced():
        loaded = manager.load(list(tasks))
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)
        results = lm_evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False)
    if results is None:  # pragma: no cover - only on non-zero ranks
        return {}, {}
    return _parse_results(results)


def recovery(
    student: dict[str, dict[str, float]],
    teacher: dict[str, dict[str, float]],
    hib: dict[str, dict[str, bool]],
) -> dict[str, dict[str, float | None]]:
    """``task -> metric -> converted/original`` (original/converted when lower is better)."""
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
