"""Export a distilled student as a standard, self-describing Hugging Face checkpoint.

`export` merges the LoRA adapters into the fused expert weights, swaps in the trained router
copies, writes a plain ``Zeda<Family>ForCausalLM`` checkpoint (``config.zeda`` carries the zero
expert metadata) with the tokenizer and a model card listing the FLOP and accuracy figures, then
reloads it through ``AutoModelForCausalLM`` and checks that its logits equal the adapter model's
before the checkpoint is moved into place. A failed check leaves nothing behind.

Loading the result needs only ``import zeda`` (which registers the ``zeda_<family>`` classes)::

    import zeda
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("runs/quickstart/export")
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zeda.errors import ZedaError
from zeda.io import atomic_save
from zeda.zero.inject import find_moe_layers, is_injected

logger = logging.getLogger(__name__)

__all__ = ["export", "export_cli", "merge_student", "model_card"]

#: Logit tolerance of the reload check, relative to the largest logit magnitude, per dtype.
#: Merging LoRA (``W + s·BA`` instead of ``xW + s·xAB``) is not bit-exact.
RELOAD_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _unwrap_modules_to_save(model: nn.Module) -> int:
    """Replace every PEFT ``ModulesToSaveWrapper`` by its active trained copy; return how many."""
    from peft.utils.other import ModulesToSaveWrapper

    n = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, ModulesToSaveWrapper):
            continue
        active = module.active_adapters[0] if module.active_adapters else None
        replacement = (
            module.modules_to_save[active] if active in module.modules_to_save else module.original_module
        )
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, replacement)
        n += 1
    return n


def merge_student(model: nn.Module) -> nn.Module:
    """Fold a student's adapters into a plain injected model (in place where PEFT allows).

    LoRA on the fused expert parameters (PEFT ``target_parameters``) is merged by PEFT's
    ``merge_and_unload``; trained router/expert copies (``modules_to_save``) replace the frozen
    originals. A model that is neither a ``PeftModel`` nor holds wrappers is returned unchanged.

    Args:
        model: A `zeda.lora.make_student` model, or an injected model.

    Returns:
        The plain ``Zeda<Family>ForCausalLM``.

    Raises:
        ZedaError: if adapter modules remain after merging.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload(progressbar=False, safe_merge=True)
    _unwrap_modules_to_save(model)
    leftovers = [n for n, m in model.named_modules() if hasattr(m, "lora_A") or hasattr(m, "base_layer")]
    if leftovers:
        raise ZedaError(
            f"LoRA modules remain after merging (e.g. {leftovers[0]}); cannot export a plain checkpoint"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _fmt_pct(x: Any) -> str:
    return f"{100 * float(x):.1f}%" if isinstance(x, (int, float)) else "-"


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def model_card(model: nn.Module, card_metrics: dict[str, Any] | None, base_model: str | None = None) -> str:
    """The README.md model card: zeda metadata, FLOP figures, accuracy figures and usage.

    Args:
        model: The merged injected model.
        card_metrics: Figures to list (e.g. `zeda.evaluate.EvalResult.card_metrics`); the
            FLOP rows fall back to the analytic accounting when no measurement is given.
        base_model: The original checkpoint's name or path, if known.
    """
    from zeda import __version__
    from zeda.evaluation.flops import flop_report

    cfg = model.config
    z = dict(getattr(cfg, "zeda", None) or {})
    layers = find_moe_layers(model)
    e, k = layers[0].router.num_experts, layers[0].router.top_k
    metrics = dict(card_metrics or {})
    lines = ["---", "library_name: transformers", "tags:", "- zeda", "- mixture-of-experts", "- zero-experts"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += [
        "---",
        "",
        f"# {Path(str(base_model or cfg.model_type)).name} with zero-output experts (zeda)",
        "",
    ]
    lines += [
        f"This checkpoint adds **{z.get('num_zero_experts')} parameter-free zero-output experts** to each of the "
        f"{len(layers)} MoE routers of a `{z.get('base_model_type', cfg.model_type)}` model ({e} real experts, "
        f"top-{k} unchanged). A top-k slot routed to a zero expert does no expert work, so the routed-expert "
        "FLOPs per token fall by the share of slots the router sends to zero experts. The experts were distilled "
        "(LoRA, merged here) against the frozen original.",
        "",
        "## zeda metadata",
        "",
        "| field | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in z.items()]
    lines += [f"| real experts E | {e} |", f"| top-k | {k} |", f"| MoE layers | {len(layers)} |", ""]

    lines += ["## FLOPs", ""]
    if "routed_flop_reduction" in metrics:
        tok = metrics.get("measured_tokens")
        lines += [
            f"Measured with router telemetry during evaluation{f' ({tok:,} tokens)' if tok else ''}, "
            "relative to the original model at its native top-k:",
            "",
            "| figure | value |",
            "|---|---|",
            f"| zero-expert share of routed slots | {_fmt_pct(metrics.get('zero_share'))} |",
            f"| routed-expert FLOP reduction | {_fmt_pct(metrics.get('routed_flop_reduction'))} |",
            f"| total FLOP reduction (per token) | {_fmt_pct(metrics.get('total_flop_reduction'))} |",
            "",
        ]
    else:
        try:
            rep = flop_report(cfg)
            lines += [
                "Not measured at export time (run `zeda eval`). Analytic size of this checkpoint:",
                "",
                f"- total parameters: {rep.total_params:,} (original: {rep.native_total_params:,})",
                f"- FLOPs per token at zero share 0: {rep.flops_per_token:.4g}",
                "",
            ]
        except Exception as exc:  # pragma: no cover - accounting is informative only
            lines += [f"Not measured (FLOP accounting unavailable: {exc}).", ""]

    rest = {
        key: v
        for key, v in metrics.items()
        if key not in ("zero_share", "routed_flop_reduction", "total_flop_reduction", "measured_tokens")
    }
    lines += ["## Accuracy", ""]
    if rest:
        lines += ["| metric | value |", "|---|---|"] + [f"| {key} | {_fmt(v)} |" for key, v in rest.items()]
        lines += [
            "",
            "`ppl_ratio` is held-out perplexity divided by the original's, `top1_agreement` the share of "
            "positions whose greedy token matches the original, `mean_kl` the mean KL(original ‖ this) in "
            "nats; `recovery` rows are converted/original (inverted where lower is better).",
        ]
    else:
        lines += ["Not measured at export time (run `zeda eval`)."]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import zeda  # registers the zeda_<family> model classes with transformers' Auto classes",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "",
        "with zeda.router_settings(model, zero_logit_bias=1.0):  # trade accuracy for more FLOPs saved",
        "    ...",
        "```",
        "",
        f"Exported with zeda {__version__}.",
        "",
    ]
    return "\n".join(lines)


def _probe_ids(model: nn.Module, n: int = 4, length: int = 32) -> torch.Tensor:
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (n, length), generator=g)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def export(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    card_metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
    inplace: bool = False,
    base_model: str | None = None,
) -> Path:
    """Merge LoRA, save a standard HF checkpoint with a model card, reload it and verify it.

    Args:
        model: A distilled student (`zeda.distill` / `zeda.lora.make_student`) or an injected
            model.
        out_dir: Output directory.
        tokenizer: Saved alongside when given.
        card_metrics: FLOP and accuracy figures for the model card
            (`zeda.evaluate.EvalResult.card_metrics`); also written to ``zeda_metrics.json``.
        overwrite: Replace an existing ``out_dir`` (only once the new checkpoint is verified).
        inplace: Merge into ``model`` itself (saves memory; the adapters are gone afterwards).
            By default a copy is merged and ``model`` stays a usable student.
        base_model: The original checkpoint's name or path for the card (default:
            ``config._name_or_path``).

    Returns:
        The output directory.

    Raises:
        ZedaError: if ``out_dir`` exists and ``overwrite`` is False, if the model has no zero
            experts, or if the reloaded checkpoint's logits differ from the adapter model's (the
            output is then removed).
    """
    from transformers import AutoModelForCausalLM

    from zeda import __version__

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ZedaError(
            f"output directory {out} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    if not is_injected(model):
        raise ZedaError("export needs a model with zero experts (inject and distill it first)")
    was_training = model.training
    model.eval()
    ids = _probe_ids(model)
    want = _logits(model, ids)  # the adapter model: what the checkpoint must reproduce
    base_name = base_model or str(getattr(model.config, "_name_or_path", "") or "") or None
    merged = merge_student(model if inplace else copy.deepcopy(model))
    merged.eval()
    dtype = next(merged.parameters()).dtype
    cfg_zeda = dict(getattr(merged.config, "zeda", None) or {})
    cfg_zeda.update({"merged_lora": True, "zeda_version": __version__})
    merged.config.zeda = cfg_zeda

    out.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    staging = staging_root / "model"
    try:
        atomic_save(merged, staging, tokenizer=tokenizer)
        (staging / "README.md").write_text(model_card(merged, card_metrics, base_name))
        if card_metrics:
            (staging / "zeda_metrics.json").write_text(json.dumps(card_metrics, indent=1, default=float))
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=dtype)
        reloaded.to(next(merged.parameters()).device).eval()
        got = _logits(reloaded, ids)
        scale = max(1.0, float(want.abs().max()))
        err = float((got - want).abs().max())
        tol = RELOAD_TOLERANCE.get(dtype, 1e-2) * scale
        if type(reloaded).__name__ != type(merged).__name__ or not torch.isfinite(got).all() or err > tol:
            raise ZedaError(
                f"export check failed: the reloaded {type(reloaded).__name__} differs from the adapter model "
                f"(max |Δlogit| = {err:.3g} > {tol:.3g}); nothing was written to {out}"
            )
        logger.info("export verified: max |Δlogit| = %.3g (tolerance %.3g)", err, tol)
        del reloaded
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            out.rename(backup)
            staging.rename(out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
        if not inplace:
            model.train(was_training)
    logger.info("exported %s", out)
    return out


def _student_from_run(run_dir: Path) -> tuple[nn.Module, Any, dict | None, str]:
    """Rebuild the student of a ``zeda run`` directory: original + injection + LoRA + checkpoint."""
    from transformers import AutoTokenizer

    from zeda.config import load_recipe
    from zeda.distillation.loop import load_checkpoint
    from zeda.distillation.student import make_student
    from zeda.io import load
    from zeda.zero.inject import inject_zero_experts

    cfg = load_recipe(run_dir / "recipe.yaml")
    model = load(cfg.model.name_or_path, dtype=cfg.model.dtype)
    inject_zero_experts(model, num_zero_experts=cfg.inject.num_zero_experts, seed=cfg.inject.seed)
    student = make_student(model, cfg.lora)
    if load_checkpoint(run_dir, student) is None:
        raise ZedaError(f"{run_dir} holds no checkpoint/ to export")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    metrics = None
    results = run_dir / "eval" / "results.json"
    if results.exists():
        metrics = _card_metrics_from_json(json.loads(results.read_text()))
    return student, tokenizer, metrics, cfg.model.name_or_path


def _card_metrics_from_json(d: dict) -> dict[str, Any]:
    out = {k: d.get(k) for k in ("zero_share", "routed_flop_reduction", "total_flop_reduction")}
    out["measured_tokens"] = d.get("measured_tokens")
    for key in ("ppl_ratio", "top1_agreement", "mean_kl", "ppl", "teacher_ppl"):
        if d.get("intrinsic"):
            out[key] = d["intrinsic"].get(key)
    for task, metrics in (d.get("tasks") or {}).items():
        for name, value in metrics.items():
            out[f"{task}/{name}"] = value
            rec = (d.get("recovery") or {}).get(task, {}).get(name)
            if rec is not None:
                out[f"{task}/{name} recovery"] = rec
    return {k: v for k, v in out.items() if v is not None}


def export_cli(args: Any) -> Path:
    """``zeda export --model DIR --out DIR [--overwrite]``: DIR is a run directory or a model directory.

    Returns:
        The exported (reloaded and verified) directory.
    """
    from transformers import AutoTokenizer

    from zeda.io import load

    out = Path(args.out)
    if out.exists() and not getattr(args, "overwrite", False):
        raise ZedaError(f"output directory {out} already exists; pass --overwrite to replace it")
    src = Path(args.model)
    if (src / "checkpoint").is_dir() and (src / "recipe.yaml").exists():
        model, tokenizer, metrics, base = _student_from_run(src)
    else:
        model = load(src)
        try:
            tokenizer = AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError):
            tokenizer = None
        metrics_file = src / "zeda_metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
        base = None
    export(
        model,
        out,
        tokenizer=tokenizer,
        card_metrics=metrics,
        overwrite=getattr(args, "overwrite", False),
        inplace=True,
        base_model=base,
    )
    return out


class _CallableModule(types.ModuleType):
    """Importing ``zeda.export`` binds the package attribute ``zeda.export`` to this module, shadowing
    the function ``zeda.export(...)``; calling the module calls the function, so both spellings work."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
