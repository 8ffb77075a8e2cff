"""Export: merge a student's adapters, write a standard checkpoint with a model card, reload it
and check that its logits equal the student's before it is moved into place (`export`, also
importable from `zeda.io`)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zeda.atomic import atomic_write
from zeda.card import model_card, zeda_version
from zeda.errors import ZedaError
from zeda.zero import reference_format
from zeda.zero.modeling import zeda_classes
from zeda.zero.structure import current_zero_logit_bias, is_injected

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_FORMATS", "RELOAD_TOLERANCE", "export", "merge_student"]

#: Logit tolerance of the export check, relative to the largest logit magnitude, per dtype.
#: Merging LoRA (``W + s·BA`` instead of ``xW + s·xAB``) is not bit-exact.
RELOAD_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}

EXPORT_FORMATS = ("zeda", "zeda-reference")


def merge_student(model: nn.Module) -> nn.Module:
    """Fold a student's adapters into a plain injected model (in place where PEFT allows).

    LoRA on the fused expert parameters (PEFT ``target_parameters``) is merged by PEFT's
    ``merge_and_unload``; trained router/expert copies (``modules_to_save``) replace the frozen
    originals. A model that is neither a ``PeftModel`` nor holds wrappers is returned unchanged.

    Raises:
        ZedaError: if adapter modules remain after merging.
    """
    from peft import PeftModel
    from peft.utils import ModulesToSaveWrapper

    if isinstance(model, PeftModel):
        model = model.merge_and_unload(progressbar=False, safe_merge=True)
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            active = module.active_adapters[0] if module.active_adapters else None
            keep = (
                module.modules_to_save[active] if active in module.modules_to_save else module.original_module
            )
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, keep)
    leftovers = [n for n, m in model.named_modules() if hasattr(m, "lora_A") or hasattr(m, "base_layer")]
    if leftovers:
        raise ZedaError(
            f"LoRA modules remain after merging (e.g. {leftovers[0]}); cannot export a plain checkpoint"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def export(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    card_metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
    inplace: bool = False,
    base_model: str | None = None,
    format: str = "zeda",
) -> Path:
    """Merge LoRA, save a standard HF checkpoint with a model card, reload it and verify it.

    At most one extra copy of the model is held at a time: the merged copy (none with
    ``inplace``) while writing, then the reloaded checkpoint while verifying. The routers'
    current ``zero_logit_bias`` is stored in ``config.zeda``.

    Args:
        model: A distilled student or an injected model.
        out_dir: Output directory.
        tokenizer: Saved alongside when given.
        card_metrics: FLOP and accuracy figures for the model card (`EvalResult.card_metrics`);
            also written to ``zeda_metrics.json``.
        overwrite: Replace an existing ``out_dir`` (only once the new checkpoint is verified).
        inplace: Merge into ``model`` itself (saves memory; the adapters are gone afterwards).
            By default a copy is merged and ``model`` stays a usable student.
        base_model: The original checkpoint's name or path for the card (default:
            ``config._name_or_path``).
        format: ``"zeda"`` (``zeda_<family>`` classes, loads after ``import zeda``) or
            ``"zeda-reference"`` (the ZEDA authors' ``...PlusPlusForCausalLM`` layout, qwen3_moe
            and glm4_moe_lite only).

    Returns:
        The output directory.

    Raises:
        ZedaError: if ``out_dir`` exists and ``overwrite`` is False, for an unknown format, if
            the model has no zero experts, or if the reloaded checkpoint's logits differ from the
            model's (nothing is written then).
    """
    from zeda.io import check_output, load, model_bytes  # zeda.io imports this module

    out = Path(out_dir)
    if format not in EXPORT_FORMATS:
        raise ZedaError(f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if out.exists() and not overwrite:
        raise ZedaError(
            f"output directory {out} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    if not is_injected(model):
        raise ZedaError("export needs a model with zero experts (inject and distill it first)")
    check_output(out, model_bytes(model), "the export", "choose another output directory")
    if format == "zeda-reference":
        reference_format.check_exportable(model)
    base_name = base_model or str(getattr(model.config, "_name_or_path", "") or "") or None
    ids = torch.randint(
        0, int(model.config.vocab_size), (4, 32), generator=torch.Generator().manual_seed(1234)
    )
    with _eval_mode(model):
        want = _logits(model, ids)  # what the checkpoint must reproduce
        bias = current_zero_logit_bias(model)
        merged = merge_student(model if inplace else copy.deepcopy(model)).eval()
    device, dtype = next(merged.parameters()).device, next(merged.parameters()).dtype
    zeda_meta = dict(getattr(merged.config, "zeda", None) or {})
    zeda_meta.update({"merged_lora": True, "zeda_version": zeda_version()})
    zeda_meta.pop("zero_logit_bias", None)
    if bias is not None:
        zeda_meta["zero_logit_bias"] = bias
    merged.config.zeda = zeda_meta
    card = model_card(merged, card_metrics, base_name)

    def write(tmp: Path) -> None:
        nonlocal merged
        if format == "zeda":
            merged.save_pretrained(tmp)
        else:
            reference_format.save_reference(merged, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        if card_metrics:
            (tmp / "zeda_metrics.json").write_text(json.dumps(card_metrics, indent=1, default=float))
        if not inplace:
            merged = None  # the merged copy is on disk now: free it before the reload
        reloaded = load(tmp, dtype=dtype).to(device)
        got = _logits(reloaded, ids)
        _, expected_cls = zeda_classes(reloaded.config.model_type)
        err = float((got - want).abs().max())
        tol = RELOAD_TOLERANCE.get(dtype, 1e-2) * max(1.0, float(want.abs().max()))
        if not isinstance(reloaded, expected_cls) or not torch.isfinite(got).all() or err > tol:
            raise ZedaError(
                f"export check failed: the reloaded {type(reloaded).__name__} differs from the model "
                f"(max |Δlogit| = {err:.3g} > {tol:.3g}); nothing was written to {out}"
            )
        logger.info("export verified: max |Δlogit| = %.3g (tolerance %.3g)", err, tol)

    atomic_write(out, write, overwrite)
    logger.info("exported %s", out)
    return out
