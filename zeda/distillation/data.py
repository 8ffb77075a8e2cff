"""Training and evaluation data: packed text blocks, prompts, and cached teacher rollouts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zeda.data import pack_texts, read_jsonl  # noqa: F401  (part of distillation's data API)
from zeda.errors import ZedaError

if TYPE_CHECKING:
    from zeda.config import RunConfig

logger = logging.getLogger(__name__)


def validate_data(cfg: RunConfig) -> None:
    """Read every data file the recipe will train on, before any model is loaded.

    Checks ``data.train_file`` (text of stage 1, and the prompt source when no prompt file is
    set), ``data.prompt_file`` when rollouts or stage 2 use it, and ``data.eval_file`` when it
    exists (a missing eval file only skips held-out scoring).

    Raises:
        ZedaError: one line naming the file and the problem.
    """
    d = cfg.data
    uses_prompts = (cfg.stage1.enabled and cfg.stage1.mode == "rollout") or cfg.stage2.enabled
    if d.prompt_file and uses_prompts:
        read_jsonl(d.prompt_file, d.text_field)
    if (cfg.stage1.enabled and cfg.stage1.mode == "text") or (uses_prompts and not d.prompt_file):
        read_jsonl(d.train_file, d.text_field)
    if Path(d.eval_file).exists():
        read_jsonl(d.eval_file, d.text_field)


def load_prompts(cfg: RunConfig, tokenizer: Any) -> list[str]:
    """The prompt set of rollouts and stage 2, formatted with the chat template when wanted.

    ``data.prompt_file`` when set, else the first tokens of each ``data.train_file`` document;
    at most ``data.max_prompts`` of them (``None`` = all).
    """
    d = cfg.data
    if d.prompt_file:
        raw = read_jsonl(d.prompt_file, d.text_field, d.max_prompts)
    else:
        texts = read_jsonl(d.train_file, d.text_field)
        raw = prompts_from_texts(texts, tokenizer, prompt_tokens=min(64, d.seq_len // 2), limit=d.max_prompts)
    if not raw:
        raise ZedaError(f"no prompts of at least 4 tokens in {d.prompt_file or d.train_file}")
    return [format_prompt(tokenizer, p, d.chat_template) for p in raw]


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


def prompts_from_texts(
    texts: list[str], tokenizer: Any, prompt_tokens: int, limit: int | None = None
) -> list[str]:
    """Cut the first ``prompt_tokens`` tokens of each document into a continuation prompt (``limit`` None = all)."""
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"][:prompt_tokens]
        if len(ids) >= max(4, prompt_tokens // 2):
            out.append(tokenizer.decode(ids))
        if limit is not None and len(out) >= limit:
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
