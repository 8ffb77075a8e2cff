"""``zeda run``: load → inject → stage 1 → stage 2 → evaluate → export, readable top-down.

The CLI and the Python API call these same functions.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import AutoTokenizer

from zeda.config import RunConfig, load_recipe, save_recipe
from zeda.distillation.loop import DistillResult, distill
from zeda.errors import ZedaError
from zeda.io import load
from zeda.zero.inject import InjectionReport, inject_zero_experts

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Everything one `run` produced.

    Attributes:
        injection: What injection did.
        distill: Training outcome.
        evaluation: Evaluation results (None when no tasks/eval ran).
        export_dir: Where the merged model was written.
        output_dir: The run directory.
    """

    injection: InjectionReport | None
    distill: DistillResult | None
    evaluation: Any = None
    export_dir: str | None = None
    output_dir: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serialisable)."""
        ev = self.evaluation.to_dict() if hasattr(self.evaluation, "to_dict") else self.evaluation
        return {
            "injection": self.injection.to_dict() if self.injection else None,
            "distill": self.distill.to_dict() if self.distill else None,
            "evaluation": ev,
            "export_dir": self.export_dir,
            "output_dir": self.output_dir,
        }

    def _repr_markdown_(self) -> str:
        parts = []
        for obj in (self.injection, self.distill, self.evaluation):
            if obj is not None and hasattr(obj, "_repr_markdown_"):
                parts.append(obj._repr_markdown_())
        return "\n\n".join(parts)


def load_model_and_tokenizer(cfg: RunConfig) -> tuple[Any, Any]:
    """Load the model named by ``cfg.model`` (original or injected) and its tokenizer."""
    model = load(
        cfg.model.name_or_path,
        dtype=cfg.model.dtype,
        experts_implementation=cfg.model.experts_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    except (OSError, ValueError) as exc:
        raise ZedaError(f"no tokenizer found at {cfg.model.name_or_path}: {exc}".splitlines()[0]) from exc
    return model, tokenizer


def run(
    cfg: RunConfig | str | Path, overrides: list[str] | tuple[str, ...] = (), evaluate: bool = True
) -> RunResult:
    """Run a whole recipe.

    Args:
        cfg: A `RunConfig` or the path of a recipe YAML.
        overrides: ``key=value`` overrides (only with a recipe path).
        evaluate: Run the evaluation section after training.

    Returns:
        A `RunResult`.
    """
    if not isinstance(cfg, RunConfig):
        cfg = load_recipe(cfg, overrides)
    cfg.validate()

    # 1. The original model and its tokenizer.
    model, tokenizer = load_model_and_tokenizer(cfg)

    # 2. Zero experts (skipped when the checkpoint is already injected).
    injection = None
    if not getattr(model.config, "zeda", None):
        injection = inject_zero_experts(
            model,
            num_zero_experts=cfg.inject.num_zero_experts,
            seed=cfg.inject.seed,
            experts_implementation=cfg.model.experts_implementation or "zeda",
        )

    # 3. Stage 1 and stage 2 self-distillation (LoRA experts, routers in full).
    student, result = distill(model, cfg, tokenizer)
    out = Path(cfg.train.output_dir)
    state = PartialState()
    state.wait_for_everyone()
    if not state.is_main_process:  # evaluation and export run once, on the main process
        return RunResult(injection, result, None, None, str(out))
    save_recipe(cfg, out / "recipe.yaml")

    # 4. Evaluation against the teacher (the same weights in teacher mode).
    evaluation = None
    if evaluate and cfg.eval.tasks is not None:
        from zeda.evaluation.evaluator import evaluate as run_eval

        evaluation = run_eval(student, cfg, tokenizer)
        evaluation.save(out / "eval", overwrite=True)

    # 5. Export: merge LoRA, save a standard checkpoint, reload and compare.
    from zeda.export import export

    export_dir = Path(cfg.export.out_dir) if cfg.export.out_dir else out / "export"
    metrics = evaluation.card_metrics() if hasattr(evaluation, "card_metrics") else None
    export(student, export_dir, tokenizer=tokenizer, card_metrics=metrics, overwrite=True)
    run_result = RunResult(injection, result, evaluation, str(export_dir), str(out))
    (out / "run.json").write_text(json.dumps(run_result.to_dict(), indent=1, default=str))
    return run_result
