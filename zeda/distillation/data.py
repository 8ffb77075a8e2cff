"""Training and evaluation data: packed text blocks, prompts, and cached teacher rollouts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from zeda.errors import ZedaError

logger = logging.getLogger(__name__)


def read_jsonl(path: str | os.PathLike, field: str = "text", limit: int | None = None) -> list[str]:
    """Read one text field per line of a JSONL file (plain ``.txt`` files: one document per file).

    Raises:
        ZedaError: if the file is missing, empty or lacks ``field``.
    """
    p = Path(path)
    if not p.exists():
        raise ZedaError(f"data file {p} does not exist; check data.train_file / data.eval_file")
    if p.suffix == ".txt":
        return [p.read_text(encoding="utf-8")]
    out: list[str] = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ZedaError(f"{p}:{n} is not valid JSON ({exc.msg}); fix or regenerate the file") from exc
            if field not in row:
                raise ZedaError(
                    f"{p}:{n} has no field {field!r}; set data.text_field to one of {sorted(row)}"
                )
            out.append(str(row[field]))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ZedaError(f"data file {p} has no records")
    return out


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
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise ZedaError(f"only {len(ids)} tokens of text, fewer than one block of data.seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


class BlockSampler:
    """Deterministic, resumable batches of packed blocks: epoch ``e`` uses permutation seed+e.

    The batch for a given step depends only on (seed, step), so a resumed run sees exactly the
    batches an uninterrupted run would.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int) -> None:
        if blocks.shape[0] < batch_size:
            raise ZedaError(f"{blocks.shape[0]} blocks of text are fewer than train.batch_size={batch_size}")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.per_epoch = blocks.shape[0] // batch_size

    def batch(self, step: int) -> torch.Tensor:
        """``(batch_size, seq_len)`` block ids of optimisation micro-step ``step``."""
        epoch, i = divmod(step, self.per_epoch)
        perm = torch.randperm(
            self.blocks.shape[0], generator=torch.Generator().manual_seed(self.seed + epoch)
        )
        return self.blocks[perm[i * self.batch_size : (i + 1) * self.batch_size]]


def format_prompt(tokenizer: Any, prompt: str, chat_template: bool) -> str:
    """Apply the tokenizer's chat template when it has one and it is wanted."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def prompts_from_texts(texts: list[str], tokenizer: Any, prompt_tokens: int, limit: int) -> list[str]:
    """Cut the first ``prompt_tokens`` tokens of each document into a continuation prompt."""
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][:prompt_tokens]
        if len(ids) >= max(4, prompt_tokens // 2):
            out.append(tokenizer.decode(ids))
        if len(out) >= limit:
            break
    return out


def rollout_cache_path(out_dir: str | os.PathLike, model_id: str, prompts: list[str], gen_cfg: dict) -> Path:
    """A cache file name that changes whenever the model, prompts or sampling settings change."""
    h = hashlib.sha256(json.dumps([model_id, prompts, gen_cfg], sort_keys=True).encode()).hexdigest()[:16]
    return Path(out_dir) / f"rollouts-{h}.jsonl"


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write rows to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def iter_batches(items: list[Any], batch_size: int) -> Iterator[list[Any]]:
    """Consecutive slices of ``items``."""
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]
