"""``zeda run``: the whole method, top-down.

0. check every input (recipe, data, tokenizer, model) before anything is written or deleted;
1. load the original model;
2. inject zero experts;
3. distill: stage 1 (sequence-level) then stage 2 (on-policy), `zeda.distillation.loop`;
4. evaluate against the teacher, with the training-free baselines at the same measured share;
5. export: merge LoRA, save a standard checkpoint, reload and verify.

The CLI (``zeda run`` / ``zeda distill``) and the Python API (`zeda.run`) call `run`; each step
is itself a public function (`zeda.load`, `zeda.inject_zero_experts`, `zeda.distill`,
`zeda.evaluate`, `zeda.export`) that a notebook can call one by one.

`calibrate_export` (``zeda calibrate``) is the other top-down path: load, calibrate a FLOP
budget, export.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from zeda.config import RunConfig, load_recipe
from zeda.cpu_memory import reuse_freed_memory
from zeda.data import read_jsonl
from zeda.distillation.data import validate_data
from zeda.distillation.inputs import check_resume_inputs, run_inputs
from zeda.distillation.loop import DistillResult, distill
from zeda.distillation.run_dir import RunDir, prepare_run_dir
from zeda.distillation.sharding import cpu_fsdp2_plugin, is_sharded
from zeda.distillation.student import inject_for_run, load_run
from zeda.errors import ZedaError
from zeda.evaluation.result import EvalResult
from zeda.evaluation.run_eval import evaluate as evaluate_model
from zeda.fs import check_space
from zeda.io import check_finite, export, load, load_tokenizer, weights_bytes
from zeda.zero.calibrate import CalibrationResult, calibrate
from zeda.zero.inject import InjectionReport

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Everything one `run` produced.

    Attributes:
        injection: What injection did (None when the checkpoint was already injected).
        distill: Training outcome.
        evaluation: Evaluation results (None for ``zeda distill`` or ``eval.tasks: null``).
        export_dir: Where the merged model was written.
        output_dir: The run directory.
    """

    injection: InjectionReport | None
    distill: DistillResult | None
    evaluation: EvalResult | None = None
    export_dir: str | None = None
    output_dir: str = ""

    @property
    def report_path(self) -> Path | None:
        """The evaluation report (``eval/report.md`` in the run directory), if one was written."""
        return Path(self.output_dir) / "eval" / "report.md" if self.evaluation is not None else None

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serialisable); ``run.json`` in the run directory."""
        return {
            "injection": self.injection.to_dict() if self.injection else None,
            "distill": self.distill.to_dict() if self.distill else None,
            "evaluation": self.evaluation.to_dict() if self.evaluation is not None else None,
            "export_dir": self.export_dir,
            "output_dir": self.output_dir,
        }

    def summary(self) -> str:
        """A short console summary: the evaluation table, the training outcome with the validation
        verdict against the best training-free rule, and the paths."""
        lines: list[str] = []
        if self.evaluation is not None:
            lines.append(self.evaluation.summary_table())
        if self.distill is not None:
            # The training outcome and the validation verdict against the best training-free rule.
            lines.append(self.distill.summary())
        paths = {
            "report": self.report_path,
            "export": self.export_dir,
            "run": Path(self.output_dir) / "run.json" if self.output_dir else None,
        }
        lines.append("")
        lines += [f"{key:<6}  {value}" for key, value in paths.items() if value is not None]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        parts = []
        for obj in (self.injection, self.distill, self.evaluation):
            if obj is not None and hasattr(obj, "_repr_markdown_"):
                parts.append(obj._repr_markdown_())
        return "\n\n".join(parts)


def _check_export_dir(export_dir: Path, inputs: list[Path]) -> None:
    """Refuse an export directory that the export would wrongly replace.

    The export replaces its directory once the new checkpoint is verified, so that directory
    must not be or contain an input, and an existing one must be an earlier zeda export.
    """
    target = export_dir.expanduser().resolve()
    for inp in inputs:
        src = Path(inp).expanduser().resolve()
        if src == target or target in src.parents:
            raise ZedaError(f"export.out_dir {export_dir} is or contains the input {inp}; choose another")
    if target.is_dir() and any(target.iterdir()):
        config = target / "config.json"
        if not (config.is_file() and '"zeda"' in config.read_text(errors="replace")):
            raise ZedaError(
                f"export.out_dir {export_dir} exists and is not a zeda export; remove it or choose another"
            )


def run(
    cfg: RunConfig | str | Path, overrides: list[str] | tuple[str, ...] = (), evaluate: bool = True
) -> RunResult:
    """Run a whole recipe: load → inject → stage 1 → stage 2 → evaluate (+ baselines) → export.

    Args:
        cfg: A `RunConfig` or the path of a recipe YAML.
        overrides: ``key=value`` overrides (only with a recipe path).
        evaluate: Run the evaluation section after training.

    On CPU the run keeps the host memory it frees and reuses it (`zeda.cpu_memory`): the resident
    set stays at the run's peak until it returns.

    Returns:
        A `RunResult`.

    Raises:
        ZedaError: on any bad input, before the run directory is touched.
    """
    explicit_out = any(o.split("=", 1)[0].strip() == "train.output_dir" for o in overrides)
    if not isinstance(cfg, RunConfig):
        cfg = load_recipe(cfg, overrides)
    cfg.validate()
    out = Path(cfg.train.output_dir)
    export_dir = Path(cfg.export.out_dir) if cfg.export.out_dir else out / "export"

    # 0. Every input is checked before anything is written or deleted: the data files, the run
    #    directory (never an input, never a non-zeda directory to overwrite, a resume only with a
    #    checkpoint), the export directory, the tokenizer (not empty, not larger than the model's
    #    vocabulary) and the model (config, family, every weight present and readable).
    validate_data(cfg)
    # The process state, CPU when the launch says so (as accelerate's AcceleratorState decides);
    # then FSDP launch options that the CPU path cannot honour are refused here.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    cpu_fsdp2_plugin(state.distributed_type)
    inputs = run_inputs(cfg)
    run_dir = prepare_run_dir(cfg, inputs, explicit=explicit_out)
    _check_export_dir(export_dir, inputs)
    # The run directory is locked while this process writes it; a failure before its first
    # checkpoint leaves nothing behind. On CPU, freed host memory is reused during the run
    # instead of faulted in again (`zeda.cpu_memory`).
    with run_dir.session(state.is_main_process), reuse_freed_memory(state.device):
        return _run(cfg, run_dir, export_dir, state, evaluate)


def _run(cfg: RunConfig, run_dir: RunDir, export_dir: Path, state: PartialState, evaluate: bool) -> RunResult:
    out = Path(cfg.train.output_dir)
    if run_dir.resuming:  # the recorded base model and recipe, before the model is loaded
        check_resume_inputs(run_dir.final, cfg)
    # Room for the export (about the base model's size) and the evaluation, before any work.
    total, largest = weights_bytes(cfg.model.name_or_path)
    check_space(export_dir.absolute().parent, total + 2 * 2**20, largest + 2**20, "the run's export")
    tokenizer = load_tokenizer(cfg.model.name_or_path)

    # 1. The original model.
    model = load(
        cfg.model.name_or_path,
        dtype=cfg.model.dtype,
        experts_implementation=cfg.model.experts_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )

    # 2. Zero experts: Z rows per router (skipped when the checkpoint is already injected).
    injection = inject_for_run(model, cfg)
    if injection is not None:
        check_finite(model, f"{cfg.model.name_or_path} after injection")

    # 3. Stage 1 and stage 2 self-distillation against the model's own teacher mode
    #    (LoRA on the experts, routers trained in full, the group balance loss sets the share).
    student, result = distill(model, cfg, tokenizer, run_dir=run_dir)
    del model  # the student wraps it
    state.wait_for_everyone()
    if not state.is_main_process:  # evaluation and export run once, on the main process
        return RunResult(injection, result, None, None, str(out))
    if is_sharded(student):
        # Each rank holds only its shards (FSDP2), and the main process cannot run them alone:
        # rebuild the full student from the original weights and the run's consolidated
        # checkpoint (the full trained tensors, written at the last step).
        del student
        student, tokenizer, _, _ = load_run(out)

    # 4. Evaluation against the teacher (the same weights in teacher mode), then the
    #    training-free baselines calibrated to the same measured share (``eval.baselines``).
    evaluation = None
    if evaluate and cfg.eval.tasks is not None:
        evaluation = evaluate_model(student, cfg, tokenizer)
        evaluation.save(out / "eval", overwrite=True)

    # 5. Export: merge LoRA, save a standard checkpoint, reload and compare logits.
    metrics = evaluation.card_metrics() if evaluation is not None else None
    export(student, export_dir, tokenizer=tokenizer, card_metrics=metrics, overwrite=True)
    run_result = RunResult(injection, result, evaluation, str(export_dir), str(out))
    (out / "run.json").write_text(json.dumps(run_result.to_dict(), indent=1, default=str))
    return run_result


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
