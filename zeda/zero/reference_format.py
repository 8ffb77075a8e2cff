"""The ZEDA authors' checkpoint format (``...PlusPlusForCausalLM``): detection and conversion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from zeda.errors import ZedaError

ARCHITECTURES = {
    "Qwen3MoePlusPlusForCausalLM": "qwen3_moe",
    "Glm4MoeLitePlusPlusForCausalLM": "glm4_moe_lite",
}


def is_reference_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a local directory holding a ZEDA-reference checkpoint."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except (ValueError, OSError):
        return False
    return any(a in ARCHITECTURES for a in archs)


def load_reference(path: str | Path, dtype: Any = None, **kwargs: Any) -> nn.Module:
    raise ZedaError(f"{path}: ZEDA-reference checkpoints are not supported yet")


def check_exportable(model: nn.Module) -> None:
    raise ZedaError("export format 'zeda-reference' is not supported yet")


def save_reference(model: nn.Module, out: Path) -> None:
    raise ZedaError("export format 'zeda-reference' is not supported yet")
