"""Held-out text scoring against the original: perplexity, top-1 agreement and KL, chunked over tokens.

At real vocabularies (151,936 for Qwen3) a ``(B, T, V)`` fp32 tensor of logits is gigabytes, so
nothing here holds one: each model runs its decoder to the final hidden states ``(B, T, H)``,
and the output head, the log-softmaxes and the comparison run over chunks of ``chunk_tokens``
positions, keeping only running sums. The teacher's final hidden states (small: ``H`` per
token) are cached when they fit `TEACHER_CACHE_BYTES`; otherwise the teacher is recomputed per
batch.

The teacher's forwards always run outside the telemetry of the model under test, so the
measured share counts the model under test only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zeda.zero.telemetry import RouterTelemetry

__all__ = ["CHUNK_BYTES", "TEACHER_CACHE_BYTES", "HeldOut", "final_hidden", "output_head"]

TEACHER_CACHE_BYTES = 1 << 30
"""The teacher's final hidden states of the held-out text are cached up to this size (bytes)."""
CHUNK_BYTES = 1 << 24
"""Size of one chunk of fp32 logits ``(chunk_tokens, V)`` in the comparison (16 MiB; about five
such tensors are alive at once)."""


def _base(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def output_head(model: nn.Module) -> nn.Module:
    """The model's output embedding (``lm_head``), which maps ``(..., H)`` to ``(..., V)`` logits."""
    return _base(model).get_output_embeddings()


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's final (normed) hidden states, as the causal LM feeds its ``lm_head``.

    Args:
        model: A transformers causal LM (PEFT wrappers allowed: their adapters live in the modules).
        ids: ``(B, T)`` token ids.

    Returns:
        ``(B, T, H)`` hidden states.
    """
    decoder = _base(model).get_decoder()
    return decoder(input_ids=ids.to(next(model.parameters()).device)).last_hidden_state


def _head_ctx(head: nn.Module, ctx: Callable[[], Any]) -> Callable[[], Any]:
    """``ctx`` for an output head that adapters may change; a plain ``nn.Linear`` needs none.

    Entering teacher mode walks every module, which would cost more than the head's matmul on
    each chunk of a large model.
    """
    return contextlib.nullcontext if type(head) is nn.Linear else ctx


class HeldOut:
    """Held-out blocks, the teacher's NLL on them, and the scoring of any model against it.

    Args:
        blocks: ``(N, T)`` token ids.
        teacher: The original model (or the converted one, used inside ``teacher_ctx``).
        teacher_ctx: Context factory that turns ``teacher`` into the original (e.g. teacher mode).
        batch_size: Blocks per forward.
        progress: Show tqdm bars.
        chunk_tokens: Positions per head/log-softmax chunk (default: `CHUNK_BYTES` of fp32 logits).
    """

    def __init__(
        self,
        blocks: torch.Tensor,
        teacher: nn.Module,
        teacher_ctx: Callable[[], Any],
        batch_size: int,
        progress: bool,
        chunk_tokens: int | None = None,
    ) -> None:
        self.blocks, self.teacher, self.teacher_ctx = blocks, teacher, teacher_ctx
        self.batch_size, self.progress = batch_size, progress
        vocab = int(output_head(teacher).weight.shape[0])
        self.chunk_tokens = chunk_tokens or max(1, CHUNK_BYTES // (4 * vocab))
        self.cache: list[torch.Tensor] | None = None
        self.teacher_nll: float = math.nan

    def batches(self) -> list[torch.Tensor]:
        """The blocks split into ``(B, T)`` batches."""
        return list(torch.split(self.blocks, self.batch_size))

    @torch.no_grad()
    def teacher_hidden(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` final hidden states of the teacher on batch ``i`` (cached or recomputed)."""
        if self.cache is not None and i < len(self.cache):
            return self.cache[i]
        with self.teacher_ctx():
            return final_hidden(self.teacher, ids)

    def _chunks(self, hidden: torch.Tensor, ids: torch.Tensor) -> Any:
        """Yield ``(h (n, H), labels (n,))`` chunks of the positions that predict a next token."""
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        labels = ids[:, 1:].reshape(-1).to(h.device)
        for s in range(0, h.shape[0], self.chunk_tokens):
            yield (
                slice(s, s + self.chunk_tokens),
                h[s : s + self.chunk_tokens],
                labels[s : s + self.chunk_tokens],
            )

    @torch.no_grad()
    def prepare(self, telemetry: Sequence[RouterTelemetry] = ()) -> None:
        """One teacher pass: its NLL, and the hidden-state cache if it fits `TEACHER_CACHE_BYTES`.

        Args:
            telemetry: Collectors to count the teacher's forwards in (``count_original=True``
                ones measure the original model's routing, e.g. its expert loads).
        """
        head = output_head(self.teacher)
        nll, n, size = 0.0, 0, 0
        cache: list[torch.Tensor] | None = []
        for ids in tqdm(self.batches(), desc="original (held-out)", disable=not self.progress, leave=False):
            with self.teacher_ctx():
                with contextlib.ExitStack() as stack:
                    for collector in telemetry:
                        stack.enter_context(collector)
                    hidden = final_hidden(self.teacher, ids)
                for _, h, labels in self._chunks(hidden, ids):
                    lp = F.log_softmax(head(h).float(), dim=-1)
                    nll += float(-lp.gather(-1, labels[:, None]).sum())
                    n += labels.numel()
            size += hidden.numel() * hidden.element_size()
            if cache is not None and size <= TEACHER_CACHE_BYTES:
                cache.append(hidden)
            else:
                cache = None
        self.cache = cache
        self.teacher_nll = nll / n

    def score(
        self,
        model: nn.Module,
        ctx: Callable[[], Any],
        desc: str,
        telemetry: Sequence[RouterTelemetry] = (),
    ) -> tuple[dict[str, float], RouterTelemetry]:
        """Perplexity, agreement and KL of ``model`` (inside ``ctx``) against the teacher.

        Only ``model``'s own forwards are measured: the teacher runs before the collectors open.

        Args:
            model: The model under test.
            ctx: Context factory that sets it up (a bias, a slot policy, teacher mode...).
            desc: Progress-bar label.
            telemetry: Further collectors to count this model's forwards in (e.g. the headline one).

        Returns:
            ``({"ppl", "ppl_ratio", "top1_agreement", "mean_kl", "tokens"}, telemetry of these forwards)``.
        """
        return self.score_many(model, [ctx], desc, [telemetry])[0]

    @torch.no_grad()
    def score_many(
        self,
        model: nn.Module,
        ctxs: Sequence[Callable[[], Any]],
        desc: str,
        telemetry: Sequence[Sequence[RouterTelemetry]] | None = None,
    ) -> list[tuple[dict[str, float], RouterTelemetry]]:
        """`score` of ``model`` under each of ``ctxs``, in one pass over the text.

        The teacher's log-probabilities of each chunk are formed once and compared with every
        setting's (at a large vocabulary the output head and the log-softmax dominate the cost
        of scoring), so scoring ``n`` settings costs ``n + 1`` head passes instead of ``2n``.
        Each setting's figures are those `score` gives it alone.

        Args:
            model: The model under test.
            ctxs: Context factories, one per setting (a slot policy, a bias...).
            desc: Progress-bar label.
            telemetry: Per setting, further collectors to count its forwards in.

        Returns:
            Per setting, ``(metrics, telemetry of its forwards)`` as `score` returns them.
        """
        if not ctxs:
            return []
        head, t_head = output_head(model), output_head(self.teacher)
        t_head_ctx = _head_ctx(t_head, self.teacher_ctx)
        head_ctxs = [_head_ctx(head, ctx) for ctx in ctxs]
        extra = list(telemetry) if telemetry is not None else [()] * len(ctxs)
        tels = [RouterTelemetry(model) for _ in ctxs]
        sums = [[0.0, 0.0, 0.0] for _ in ctxs]  # nll, agreement, KL
        n = 0
        for i, ids in enumerate(tqdm(self.batches(), desc=desc, disable=not self.progress, leave=False)):
            t_hidden = self.teacher_hidden(i, ids)
            hiddens = []
            for ctx, tel, more in zip(ctxs, tels, extra, strict=True):
                with ctx(), contextlib.ExitStack() as stack:
                    for collector in (tel, *more):
                        stack.enter_context(collector)
                    hiddens.append(final_hidden(model, ids))
            # The positions that predict a next token, flattened once per batch (a copy: the
            # slice is not contiguous), then cut into chunks.
            t_flat = t_hidden[:, :-1].reshape(-1, t_hidden.shape[-1])
            flats = [hidden[:, :-1].reshape(-1, hidden.shape[-1]) for hidden in hiddens]
            for sl, _, labels in self._chunks(hiddens[0], ids):
                with t_head_ctx():
                    t_lp = F.log_softmax(t_head(t_flat[sl].to(labels.device)).float(), dim=-1)
                t_top = t_lp.argmax(-1)
                for flat, head_ctx, acc in zip(flats, head_ctxs, sums, strict=True):
                    h = flat[sl]
                    with head_ctx():
                        s_lp = F.log_softmax(head(h).float(), dim=-1)
                    acc[0] += float(-s_lp.gather(-1, labels[:, None]).sum())
                    acc[1] += float((s_lp.argmax(-1) == t_top).sum())
                    acc[2] += float(F.kl_div(s_lp, t_lp, log_target=True, reduction="sum"))
                n += labels.numel()
        out = []
        for (nll, agree, kl), tel in zip(sums, tels, strict=True):
            ppl = math.exp(nll / n)
            metrics = {
                "ppl": ppl,
                "ppl_ratio": ppl / math.exp(self.teacher_nll),
                "top1_agreement": agree / n,
                "mean_kl": kl / n,
                "tokens": n,
            }
            out.append((metrics, tel))
        return out
