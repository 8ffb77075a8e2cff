"""Reading and writing checkpoints: load, tokenizer check, atomic save, export + verify.

- `load`: an original, an injected (``zeda_<family>``) or a ZEDA-reference checkpoint.
- `load_tokenizer`: a tokenizer checked against the model it will feed.
- `atomic_save`: ``save_pretrained`` through `zeda.atomic.atomic_write` (a temporary sibling
  renamed into place; a failed or killed write leaves the previous output and nothing else).
- `check_source`, `check_finite`, `weights_bytes`: checks made before the work.
- `export` (`zeda.exporting`, re-exported here): merge a student's adapters, write a standard
  checkpoint with a model card, reload it and check that its logits equal the student's before it
  is moved into place. Loading the result needs only ``import zeda``::

      import zeda
      from transformers import AutoModelForCausalLM
      model = AutoModelForCausalLM.from_pretrained("runs/quickstart/export")
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from zeda.atomic import atomic_write
from zeda.errors import ZedaError
from zeda.exporting import EXPORT_FORMATS, RELOAD_TOLERANCE, export, merge_student
from zeda.families import get_spec, supported_model_types
from zeda.fs import check_space, check_writable
from zeda.zero import reference_format
from zeda.zero.modeling import check_loading_info

logger = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FORMATS",
    "RELOAD_TOLERANCE",
    "atomic_save",
    "atomic_write",
    "check_finite",
    "check_output",
    "check_source",
    "check_tokenizer",
    "export",
    "load",
    "load_tokenizer",
    "merge_student",
    "model_bytes",
    "weights_bytes",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _hub_id_form(path: str) -> bool:
    """``org/name``, the form of a hub MoE checkpoint id (a local path may have it too)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) is not None


def check_source(path: str | os.PathLike, run_ok: bool = False) -> None:
    """Refuse a ``--model`` that is neither a model directory nor (where allowed) a zeda run.

    A path that does not exist is "no such directory", unless it has the ``org/name`` form of a
    hub id: that is left for transformers (the hub, or its local cache when offline).

    Args:
        path: A local directory or a hub id.
        run_ok: A zeda run directory (``recipe.yaml``) is accepted too (export).

    Raises:
        ZedaError: one line naming the problem and what to pass instead.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file() or (run_ok and (local / "recipe.yaml").is_file()):
            return
        if (local / "recipe.yaml").is_file():
            raise ZedaError(
                f"{path} is a zeda run directory, not a model; export it first "
                f"(zeda export --model {path} --out DIR) and pass the export"
            )
        if run_ok:
            raise ZedaError(
                f"{path} is neither a model directory (no config.json) nor a zeda run (no recipe.yaml); "
                "pass a saved model or a run directory"
            )
        raise ZedaError(f"{path} is not a model directory (no config.json); pass a saved model directory")
    if local.exists():
        raise ZedaError(f"{path} is a file, not a model directory; pass the directory that holds config.json")
    if not _hub_id_form(str(path)):
        raise ZedaError(f"no such directory: {path}; pass the path of a saved model directory")


def _read_config(path: str) -> Any:
    check_source(path)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        if not Path(path).expanduser().exists():  # an org/name id: neither here nor on the hub
            raise ZedaError(
                f"no such directory {path!r}, and no hub model of that id could be loaded ({_first_line(exc)})"
            ) from exc
        raise ZedaError(f"cannot read a model config at {path!r}: {_first_line(exc)}") from exc


def check_finite(model: nn.Module, source: str) -> None:
    """Refuse a model whose weights or buffers hold NaN or Inf (a damaged checkpoint, or an
    injection that overflowed), before anything is trained on or written from it.

    Raises:
        ZedaError: naming the first offending tensor.
    """
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise ZedaError(
                f"{source}: {name} holds NaN or Inf values; the weights are damaged: "
                "use an intact copy of the model"
            )


#: transformers' default ``max_shard_size`` (the largest weights file ``save_pretrained`` writes).
_SHARD_BYTES = 50 * 10**9


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """``(total, largest file)`` bytes ``save_pretrained`` will write for ``model`` (adapters
    merged, so LoRA factors are not counted), with 1 MiB for config, tokenizer and card."""
    total = sum(
        t.numel() * t.element_size()
        for n, t in (*model.named_parameters(), *model.named_buffers())
        if "lora_" not in n and "original_module" not in n  # adapters, frozen copies of trained modules
    )
    return total + 2**20, min(total, _SHARD_BYTES) + 2**20


def check_output(out: str | os.PathLike, size: tuple[int, int], what: str, fix: str) -> None:
    """Refuse, before the work, an output place that is read-only or short of space.

    Args:
        out: The output directory.
        size: ``(total, largest file)`` bytes the command writes there.
        what: What is written, for the message (e.g. ``"the export"``).
        fix: The end of the read-only message (e.g. ``"choose another --out"``).
    """
    check_writable(Path(out).expanduser().absolute().parent, fix)
    check_space(Path(out).expanduser().absolute().parent, size[0], size[1], what)


def weights_bytes(path: str | os.PathLike) -> tuple[int, int]:
    """``(total, largest file)`` bytes of the weight files in a model directory (0, 0 if none)."""
    sizes = [
        f.stat().st_size
        for f in Path(path).expanduser().glob("*")
        if f.is_file() and f.suffix in (".safetensors", ".bin")
    ]
    return sum(sizes), max(sizes, default=0)


def load(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    experts_implementation: str | None = None,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load an original, an injected (``zeda_<family>``) or a ZEDA-reference MoE checkpoint, in eval mode.

    A ZEDA-reference checkpoint (``Qwen3MoePlusPlusForCausalLM`` /
    ``Glm4MoeLitePlusPlusForCausalLM``, see `zeda.zero.reference_format`) is converted to zeda's
    format on the fly.

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
        ZedaError: for a missing path or config.json, an unsupported family, or a corrupt or
            incomplete checkpoint.
    """
    path = str(name_or_path)
    if isinstance(dtype, str) and dtype not in _DTYPES:
        raise ZedaError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    torch_dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    check_source(path)
    if reference_format.is_reference_checkpoint(path):
        model = reference_format.load_reference(path, dtype=torch_dtype, **kwargs)
        check_finite(model, path)
        return model.to(device).eval() if device is not None else model.eval()
    config = _read_config(path)
    model_type = getattr(config, "model_type", "")
    if model_type.removeprefix("zeda_") not in supported_model_types():
        raise ZedaError(
            f"{path}: model_type {model_type!r} is not a supported MoE family; "
            f"zeda supports: {', '.join(supported_model_types())}"
        )
    get_spec(model_type)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=torch_dtype, output_loading_info=True, **kwargs
        )
    except ZedaError:
        raise
    except Exception as exc:  # safetensors / torch raise several types for damaged files
        msg = _first_line(exc)
        if any(word in msg.lower() for word in ("deserializ", "header", "truncat", "incomplete")):
            raise ZedaError(
                f"{path}: a weights file is corrupt or truncated ({msg}); re-save or re-download it"
            ) from exc
        raise ZedaError(f"cannot load {path}: {msg}") from exc
    check_loading_info(info, path)
    check_finite(model, path)
    if device is not None:
        model.to(device)
    return model.eval()


def check_tokenizer(tokenizer: Any, model_or_config: Any, source: str = "tokenizer") -> None:
    """Refuse a tokenizer that cannot feed the model: empty, or with ids beyond its embedding.

    Args:
        tokenizer: A transformers tokenizer.
        model_or_config: The model (its input embedding is read) or its config (``vocab_size``).
        source: Where the tokenizer came from, for the message.

    Raises:
        ZedaError: one line naming the problem.
    """
    n = len(tokenizer)
    if n <= 1:
        raise ZedaError(
            f"{source}: the tokenizer is empty ({n} token); the directory lacks tokenizer files "
            "(tokenizer.json / tokenizer_config.json): copy them from the original model"
        )
    emb = getattr(model_or_config, "get_input_embeddings", lambda: None)()
    config = getattr(model_or_config, "config", model_or_config)
    vocab = int(emb.num_embeddings) if emb is not None else getattr(config, "vocab_size", None)
    if vocab is not None and n > int(vocab):
        raise ZedaError(
            f"{source}: the tokenizer has {n} tokens but the model's embedding has {vocab} rows; "
            "use the tokenizer of this model"
        )


def load_tokenizer(path: str | os.PathLike, model: nn.Module | None = None) -> Any:
    """Load the tokenizer at ``path`` and check it against ``model`` (or the config at ``path``).

    Raises:
        ZedaError: if ``path`` is not a model directory, no tokenizer can be read, it is empty,
            or it has more tokens than the model's embedding has rows.
    """
    check_source(path)
    local = Path(path)
    if local.is_dir() and not any((local / name).is_file() for name in _TOKENIZER_FILES):
        raise ZedaError(
            f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...): "
            "copy them from the original model"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        if not local.expanduser().exists():  # an org/name id: neither here nor on the hub
            raise ZedaError(
                f"no such directory {str(path)!r}, and no hub model of that id could be loaded "
                f"({_first_line(exc)})"
            ) from exc
        raise ZedaError(f"{path}: cannot read a tokenizer ({_first_line(exc)})") from exc
    target: Any = model
    if target is None and (Path(path) / "config.json").is_file():
        target = AutoConfig.from_pretrained(str(path))
    check_tokenizer(tokenizer, target, str(path))
    return tokenizer


def atomic_save(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """``save_pretrained`` (model and tokenizer) through `atomic_write`.

    Raises:
        ZedaError: if ``out_dir`` exists and ``overwrite`` is False.
    """

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    if Path(out_dir).exists() and not overwrite:
        raise ZedaError(
            f"output directory {out_dir} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    check_output(out_dir, model_bytes(model), "saving the model", "choose another output directory")
    out = atomic_write(out_dir, write, overwrite)
    logger.info("saved %s", out)
    return out
