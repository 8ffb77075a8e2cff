"""Loading and atomic saving of original and injected checkpoints."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from zeda.errors import ZedaError
from zeda.families import get_spec, supported_model_types
from zeda.zero.modeling import check_loading_info

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    experts_implementation: str | None = None,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load an original or an injected (``zeda_<family>``) MoE checkpoint, in eval mode.

    Args:
        name_or_path: A local directory or a hub id (hub ids need network access).
        dtype: ``"float32"`` (default, exact teacher comparisons), ``"bfloat16"``, ``"float16"``,
            ``"auto"`` or a torch dtype.
        device: Device to move the model to (``None`` keeps CPU).
        experts_implementation: Experts backend; ``None`` gives zeda's backend for injected
            models and transformers' default for originals.
        attn_implementation: Attention backend passed to transformers.
        **kwargs: Passed to ``from_pretrained``.

    Returns:
        The model. Loading refuses to leave any weight randomly initialised.

    Raises:
        ZedaError: for a missing path, an unsupported family, or a corrupt/incomplete checkpoint.
    """
    path = str(name_or_path)
    torch_dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if isinstance(dtype, str) and dtype not in _DTYPES:
        raise ZedaError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        hint = "" if Path(path).exists() else " (no such directory; a hub id needs network access)"
        raise ZedaError(f"cannot read a model config at {path!r}{hint}: {_first_line(exc)}") from exc
    model_type = getattr(config, "model_type", "")
    if model_type.removeprefix("zeda_") not in supported_model_types():
        raise ZedaError(
            f"{path}: model_type {model_type!r} is not a supported MoE family; "
            f"zeda supports: {', '.join(supported_model_types())}"
        )
    get_spec(model_type)
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=torch_dtype, output_loading_info=True, **kwargs
        )
    except ZedaError:
        raise
    except Exception as exc:  # safetensors / torch raise several types for damaged files
        msg = _first_line(exc)
        if (
            "deserializ" in msg
            or "header" in msg.lower()
            or "truncat" in msg.lower()
            or "incomplete" in msg.lower()
        ):
            raise ZedaError(
                f"{path}: a weights file is corrupt or truncated ({msg}); re-save or re-download it"
            ) from exc
        raise ZedaError(f"cannot load {path}: {msg}") from exc
    check_loading_info(info, path)
    if device is not None:
        model.to(device)
    return model.eval()


def atomic_save(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """``save_pretrained`` into a temporary sibling directory, then rename it into place.

    A crash mid-write never leaves a half-written checkpoint at ``out_dir``, and an existing
    directory is only replaced when ``overwrite`` is set (after the new one is complete).

    Raises:
        ZedaError: if ``out_dir`` exists and ``overwrite`` is False.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ZedaError(
            f"output directory {out} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            out.rename(backup)
            tmp.rename(out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved %s", out)
    return out
