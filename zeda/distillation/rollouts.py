"""Batches, forwards and sampling: teacher rollouts (stage 1) and student samples (stage 2)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from zeda.config import RunConfig
from zeda.distillation import data as zdata
from zeda.evaluation.head import kept_positions
from zeda.zero.inject import teacher_mode

logger = logging.getLogger(__name__)

__all__ = [
    "Batch",
    "forward_logits",
    "generate",
    "logit_positions",
    "pad_sequences",
    "teacher_rollouts",
    "text_batch",
]

Rollout = tuple[list[int], list[int]]


@dataclass
class Batch:
    """One micro-batch.

    Attributes:
        input_ids: ``(B, T)`` token ids.
        attention_mask: ``(B, T)`` 1 for real tokens, 0 for left padding.
        loss_mask: ``(B, T)`` positions whose *next* token is trained (never the last position).
        positions: ``(P,)`` sorted sequence positions whose logits are computed and trained, the
            same in every row (`logit_positions`); None: all ``T``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    positions: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device``."""
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.loss_mask.to(device),
            None if self.positions is None else self.positions.to(device),
        )

    def _at_positions(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.positions is None else x[:, self.positions]

    @property
    def labels(self) -> torch.Tensor:
        """``(B, T)`` (or ``(B, P)``) the token each logit position predicts (the last position:
        0, always masked)."""
        return self._at_positions(torch.nn.functional.pad(self.input_ids[:, 1:], (0, 1)))

    @property
    def kd_mask(self) -> torch.Tensor:
        """``(B, T)`` (or ``(B, P)``) `loss_mask` at the logit positions: the mask of the losses."""
        return self._at_positions(self.loss_mask)


def logit_positions(
    loss_mask: torch.Tensor, fraction: float, generator: torch.Generator
) -> torch.Tensor | None:
    """A random subset of the trained positions, shared by every row of a batch.

    Args:
        loss_mask: ``(B, T)`` the batch's loss mask.
        fraction: Share of the positions trained in some row to keep, in (0, 1].
        generator: CPU generator that draws them (seeded per step, so a resume draws the same).

    Returns:
        ``(P,)`` sorted positions, ``P = max(1, round(fraction * n))`` of the ``n`` trained
        ones; None when ``fraction >= 1`` (every position).
    """
    if fraction >= 1.0:
        return None
    trained = torch.nonzero(loss_mask.detach().cpu().bool().any(0)).squeeze(-1)
    keep = kept_positions(fraction, trained.numel())
    pick = torch.randperm(trained.numel(), generator=generator)[:keep]
    return trained[pick].sort().values


def text_batch(ids: torch.Tensor) -> Batch:
    """A batch of packed text blocks ``(B, T)``: every position but the last is trained."""
    mask = torch.ones_like(ids)
    loss_mask = mask.clone()
    loss_mask[:, -1] = 0
    return Batch(ids, mask, loss_mask)


def pad_sequences(rows: list[Rollout], pad_id: int) -> Batch:
    """Left-pad prompt+response sequences; the loss covers the response tokens."""
    seqs = [p + r for p, r in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    loss = torch.zeros_like(ids)
    for i, ((_, r), s) in enumerate(zip(rows, seqs, strict=True)):
        ids[i, width - len(s) :] = torch.tensor(s)
        att[i, width - len(s) :] = 1
        # Position t predicts token t+1: train positions whose next token is a response token.
        loss[i, width - len(r) - 1 : width - 1] = 1
    return Batch(ids, att, loss)


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """``(B, T, V)`` logits of a left-padded batch (positions count real tokens only), or
    ``(B, P, V)`` at ``batch.positions`` when set: the model's own ``logits_to_keep`` slices the
    hidden states before the lm_head, so the other positions' logits are never formed."""
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    keep = {} if batch.positions is None else {"logits_to_keep": batch.positions}
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **keep,
    ).logits


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 8,
    desc: str = "generate",
) -> list[Rollout]:
    """Sample continuations with KV cache, batched and left-padded.

    Returns:
        ``(prompt_ids, response_ids)`` per prompt; responses stop after the first EOS.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[Rollout] = []
    was_training = model.training
    model.eval()
    batches = list(zdata.iter_batches(prompts, batch_size))
    for j, chunk in enumerate(tqdm(batches, desc=desc, leave=False, disable=len(batches) < 2)):
        enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, width - len(e) :] = torch.tensor(e)
            att[i, width - len(e) :] = 1
        torch.manual_seed(seed * 100003 + j)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=att.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for i, e in enumerate(enc):
            resp = gen[i, width:].tolist()
            if eos is not None and eos in resp:
                resp = resp[: resp.index(eos) + 1]
            out.append((e, resp or [eos if eos is not None else pad]))
    model.train(was_training)
    return out


def generate_split(
    accelerator: Accelerator, model: nn.Module, tokenizer: Any, prompts: list[str], seed: int, **kwargs: Any
) -> list[Rollout]:
    """`generate` with the prompts split between processes; every rank gets all results in order."""
    with accelerator.split_between_processes(prompts) as mine:
        # Each rank samples its own share under its own seed.
        local = generate(model, tokenizer, list(mine), seed=seed * 1009 + accelerator.process_index, **kwargs)
    return gather_object(local) if accelerator.num_processes > 1 else local


def teacher_rollouts(
    student: nn.Module, tokenizer: Any, cfg: RunConfig, prompts: list[str], accelerator: Accelerator
) -> list[Rollout]:
    """Teacher samples on the prompt set (stage 1 rollout mode).

    With ``data.rollout_cache`` set, rollouts are read from / written to a JSONL file there whose
    name hashes the model, prompts and sampling settings; with ``None`` nothing is cached.
    """
    path = None
    if cfg.data.rollout_cache:
        gen_cfg = {
            "max_new_tokens": cfg.stage1.max_new_tokens,
            "temperature": cfg.stage1.temperature,
            "seed": cfg.train.seed,
            "world": accelerator.num_processes,
        }
        path = zdata.rollout_cache_path(
            Path(cfg.data.rollout_cache), str(cfg.model.name_or_path), prompts, gen_cfg
        )
        if path.exists():
            rows = [json.loads(line) for line in path.open()]
            logger.info("reusing %d teacher rollouts from %s", len(rows), path)
            return [(r["prompt_ids"], r["response_ids"]) for r in rows]
    with teacher_mode(student):
        samples = generate_split(
            accelerator,
            student,
            tokenizer,
            prompts,
            seed=cfg.train.seed,
            max_new_tokens=cfg.stage1.max_new_tokens,
            temperature=cfg.stage1.temperature,
            batch_size=cfg.stage1.rollout_batch_size,
            desc="teacher rollouts",
        )
    if path is not None and accelerator.is_main_process:
        zdata.write_jsonl_atomic(path, [{"prompt_ids": p, "response_ids": r} for p, r in samples])
    return samples
