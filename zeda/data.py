"""Reading and packing text: JSONL documents and fixed-length token blocks.

Shared by calibration (`zeda.zero.calibrate`), distillation and evaluation; imports nothing of
zeda but its errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from zeda.errors import ZedaError

__all__ = ["pack_texts", "read_jsonl"]


def read_jsonl(path: str | os.PathLike, field: str = "text", limit: int | None = None) -> list[str]:
    """Read one text field per line of a JSONL file (plain ``.txt`` files: one document per file).

    Args:
        path: The file.
        field: JSON key holding the text; its value must be a string.
        limit: Stop after this many records (``None`` = all).

    Raises:
        ZedaError: if the file is missing, not UTF-8, empty, or a record lacks a string ``field``.
    """
    p = Path(path)
    if not p.is_file():
        raise ZedaError(
            f"data file {p} does not exist; check data.train_file / data.prompt_file / data.eval_file"
        )
    try:
        if p.suffix == ".txt":
            return [p.read_text(encoding="utf-8")]
        out: list[str] = []
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                out.append(_record_text(p, n, line, field))
                if limit is not None and len(out) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise ZedaError(
            f"data file {p} is not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8"
        ) from None
    if not out:
        raise ZedaError(f"data file {p} has no records")
    return out


def _record_text(path: Path, line_no: int, line: str, field: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ZedaError(
            f"{path}:{line_no} is not valid JSON ({exc.msg}); fix or regenerate the file"
        ) from None
    if not isinstance(row, dict):
        raise ZedaError(f'{path}:{line_no} is not a JSON object; each line must be like {{{field!r}: "..."}}')
    if field not in row:
        raise ZedaError(
            f"{path}:{line_no} has no field {field!r}; set data.text_field to one of {sorted(row)}"
        )
    value = row[field]
    if not isinstance(value, str):
        raise ZedaError(
            f"{path}:{line_no} field {field!r} is {type(value).__name__ if value is not None else 'null'}, "
            "not a string; fix or drop that record"
        )
    return value


def pack_texts(texts: list[str], tokenizer: Any, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize documents, join them with EOS, and cut into full blocks.

    Args:
        texts: Documents.
        tokenizer: A HF tokenizer.
        seq_len: Block length.
        max_tokens: Stop once this many tokens are collected.

    Returns:
        ``(N, seq_len)`` int64 token ids.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        # Whole documents are longer than the model context on purpose (cut into blocks below).
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise ZedaError(f"only {len(ids)} tokens of text, fewer than one block of data.seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
