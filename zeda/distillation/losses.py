"""Distillation losses over the vocabulary, computed in token chunks.

Every loss is a token mean in float32 whatever the logits dtype, and returns a scalar tensor.
Masks are ``(B, T)`` bool or float; float masks act as per-token weights, and "token mean"
means ``sum(w * x) / sum(w)`` (0 when the mask is empty).

At real vocabularies (V = 151,936) a float32 ``(B, T, V)`` copy of the logits is ~2.5 GB per 4k
tokens, and a plain implementation makes several (masked select, two log-softmaxes, an exp).
Here the kept rows are processed ``chunk_rows`` at a time: each chunk is upcast, its loss and
its exact gradient are computed, and the gradient is written into one buffer in the logits'
own dtype. No float32 tensor larger than one chunk exists at any time.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from zeda.distillation.balance import equilibrium_zero_share, w_for_target
from zeda.errors import ZedaError

__all__ = [
    "PGOutput",
    "default_chunk_rows",
    "distill_loss",
    "equilibrium_zero_share",
    "forward_kl",
    "policy_gradient_reverse_kl",
    "reverse_kl",
    "token_logprobs",
    "token_nll",
    "w_for_target",
]

#: Float32 elements per chunk on accelerators (64 MiB); rows per chunk = this // V.
CHUNK_ELEMENTS = 1 << 24
#: Float32 elements per chunk on CPU (16 MiB). glibc's malloc serves a block above its mmap
#: threshold (32 MiB at most) with a fresh mapping that the kernel faults in and zeroes on every
#: allocation; a chunk's temporaries below it reuse heap memory. At V = 151,936 the loss took
#: 0.37x and 0.66x the time in two runs (`evals/distill_bench/results_loss_chunk.md`).
CPU_CHUNK_ELEMENTS = 1 << 22

LossKind = Literal["forward_kl", "reverse_kl", "nll"]


def default_chunk_rows(vocab: int, device: torch.device | str | None = None) -> int:
    """Rows per chunk so that one float32 chunk holds about `CHUNK_ELEMENTS` values.

    Args:
        vocab: The vocabulary size ``V``.
        device: Where the logits live: on CPU the budget is `CPU_CHUNK_ELEMENTS`; None or an
            accelerator takes `CHUNK_ELEMENTS` (what `zeda.planning.memory` plans for GPUs).
    """
    budget = (
        CPU_CHUNK_ELEMENTS if device is not None and torch.device(device).type == "cpu" else CHUNK_ELEMENTS
    )
    return max(1, budget // max(vocab, 1))


def _kept_rows(mask: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices ``(N,)`` of the positions with ``mask > 0`` and their float32 weights ``(N,)``."""
    if logits.shape[: mask.dim()] != mask.shape:
        raise ZedaError(f"mask shape {tuple(mask.shape)} does not match tensor shape {tuple(logits.shape)}")
    flat = mask.reshape(-1)
    idx = torch.nonzero(flat > 0 if flat.dtype != torch.bool else flat).squeeze(-1).to(logits.device)
    return idx, flat.float().to(logits.device)[idx]


#: Kept share of the rows from which chunks are contiguous slices of all rows (masked rows are
#: computed and then zeroed) instead of gathered kept rows (an index_select and an index_copy
#: per chunk). Packed text keeps all rows but one per sequence.
DENSE_MIN_KEPT = 0.75


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for ``(n, V)`` rows, as one batched GEMV (no ``(n, V)`` temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _chunk_loss(
    kind: str,
    s: Tensor,
    t: Tensor | None,
    y: Tensor | None,
    tau: float,
    want_grad: bool,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-row losses ``(n,)`` of one chunk and their gradients ``(n, V)`` (float32, unweighted).

    Args:
        kind: The loss.
        s: ``(n, V)`` student logits; ``t``: ``(n, V)`` teacher logits (KL kinds);
            ``y``: ``(n,)`` labels (nll).
        tau: Temperature (applied to the gradient too).
        want_grad: Whether to form the gradient.
        out: ``(n, V)`` float32 buffer the gradient is written into; otherwise the gradient
            reuses the chunk's own buffers.
    """
    x = s.float()
    log_p = torch.log_softmax(x / tau if tau != 1.0 else x, dim=-1)
    if kind == "nll":
        per_row = -log_p.gather(-1, y[:, None]).squeeze(-1)
        if not want_grad:
            return per_row, None
        g = torch.exp(log_p, out=out) if out is not None else log_p.exp_()
        g.scatter_add_(-1, y[:, None], torch.full_like(per_row[:, None], -1.0))
        return per_row, g
    z = t.float()
    log_q = torch.log_softmax(z / tau if tau != 1.0 else z, dim=-1)
    if kind == "forward_kl":
        q = log_q.exp()
        per_row = _rowdot(q, log_q.sub_(log_p))  # sum q (log q - log p)
        if not want_grad:
            return per_row, None
        g = (torch.exp(log_p, out=out) if out is not None else log_p.exp_()).sub_(q)  # p - q
    else:
        diff = torch.sub(log_p, log_q, out=log_q)  # log p - log q
        p = log_p.exp_()
        per_row = _rowdot(p, diff)
        if not want_grad:
            return per_row, None
        # p (log p - log q - L)
        g = (
            torch.sub(diff, per_row[:, None], out=out) if out is not None else diff.sub_(per_row[:, None])
        ).mul_(p)
    if tau != 1.0:
        g.div_(tau)
    return per_row, g


class _ChunkedLoss(torch.autograd.Function):
    """``sum_i w_i * loss_i`` over kept rows; the gradient is formed chunk by chunk in forward.

    Per-row losses at temperature ``tau`` (``p = softmax(s / tau)``, ``q = softmax(t / tau)``)
    and their gradients with respect to the student logits ``s``:

    - ``forward_kl``: ``sum q (log q - log p)``; grad ``(p - q) / tau``.
    - ``reverse_kl``: ``L = sum p (log p - log q)``; grad ``p * (log p - log q - L) / tau``.
    - ``nll``: ``-log p[y]``; grad ``p - onehot(y)`` (tau = 1).

    When most rows are kept (`DENSE_MIN_KEPT`), chunks are contiguous slices of all rows: no
    gather and no scatter, and the gradient is written straight into its buffer; masked rows get
    weight 0 and their gradient rows are zero-filled (so non-finite values there never leak).
    Otherwise chunks gather the kept rows.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, idx, weights, kind, tau, chunk):  # noqa: D102
        vocab = student.shape[-1]
        s_flat = student.reshape(-1, vocab)
        t_flat = None if teacher is None else teacher.detach().reshape(-1, vocab)
        y_flat = None if labels is None else labels.reshape(-1)
        n_rows = s_flat.shape[0]
        want_grad = ctx.needs_input_grad[0]
        dense = idx.numel() > 0 and idx.numel() >= DENSE_MIN_KEPT * n_rows
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        if dense:
            w_all = torch.zeros(n_rows, dtype=torch.float32, device=student.device)
            w_all[idx] = weights
            dropped = torch.ones(n_rows, dtype=torch.bool, device=student.device)
            dropped[idx] = False
            grad = torch.empty_like(s_flat) if want_grad else None
            spans = [(a, min(a + chunk, n_rows)) for a in range(0, n_rows, chunk)]
        else:
            grad = torch.zeros_like(s_flat) if want_grad else None
            spans = [(a, min(a + chunk, idx.numel())) for a in range(0, idx.numel(), chunk)]
        for a, b in spans:
            if dense:
                rows, w = None, w_all[a:b]
                s, t = s_flat[a:b], None if t_flat is None else t_flat[a:b]
                y = None if y_flat is None else y_flat[a:b]
            else:
                rows, w = idx[a:b], weights[a:b]
                s = s_flat.index_select(0, rows)
                t = None if t_flat is None else t_flat.index_select(0, rows)
                y = None if y_flat is None else y_flat.index_select(0, rows)
            direct = dense and grad is not None and grad.dtype == torch.float32
            per_row, g = _chunk_loss(kind, s, t, y, tau, want_grad, grad[a:b] if direct else None)
            if dense:
                per_row = torch.where(w > 0, per_row, 0.0)  # a masked row may hold inf/nan
            total = total + torch.dot(per_row, w)
            if g is None:
                continue
            g.mul_(w[:, None])
            if dense:
                off = torch.nonzero(dropped[a:b]).squeeze(-1)
                if off.numel():
                    g.index_fill_(0, off, 0.0)
                if not direct:
                    grad[a:b].copy_(g)
            else:
                grad.index_copy_(0, rows, g.to(grad.dtype))
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.shape = student.shape
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0:
            return (None,) * 8
        # The usual upstream gradient is exactly 1 (the loss is a normalised mean fed straight to
        # backward): skip a full pass over (B, T, V) then. On CPU reading it costs no device sync.
        if not (grad_out.device.type == "cpu" and grad_out.numel() == 1 and float(grad_out) == 1.0):
            grad.mul_(grad_out.to(grad.dtype))
        return (grad.view(ctx.shape), None, None, None, None, None, None, None)


def _token_mean(
    kind: LossKind,
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor | None,
    mask: Tensor,
    temperature: float,
    chunk_rows: int | None,
) -> Tensor:
    idx, weights = _kept_rows(mask, student)
    if teacher is not None and teacher.shape != student.shape:
        raise ZedaError(
            f"teacher logits {tuple(teacher.shape)} and student logits {tuple(student.shape)} differ"
        )
    chunk = chunk_rows or default_chunk_rows(student.shape[-1], student.device)
    # Normalise the weights up front: the loss is then the Function's output itself and its
    # upstream gradient is usually exactly 1 (see `_ChunkedLoss.backward`).
    weights = weights / weights.sum().clamp_min(1e-12)
    return _ChunkedLoss.apply(student, teacher, labels, idx, weights, kind, float(temperature), chunk)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> Tensor:
    """Token-mean KL(teacher || student) over the full vocabulary (mass-covering).

    ``KL = sum_v p_T(v) * (log p_T(v) - log p_S(v))`` with both distributions taken at
    ``temperature`` (no ``T**2`` rescaling).

    Args:
        student_logits: ``(B, T, V)``.
        teacher_logits: ``(B, T, V)``; treated as constant.
        mask: ``(B, T)`` bool or float weights.
        temperature: Softmax temperature, > 0.
        chunk_rows: Tokens per float32 chunk (default: `default_chunk_rows`).

    Returns:
        Scalar float32 loss.
    """
    return _token_mean("forward_kl", student_logits, teacher_logits, None, mask, temperature, chunk_rows)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> Tensor:
    """Token-mean KL(student || teacher) over the full vocabulary (mode-seeking).

    Args:
        student_logits: ``(B, T, V)``.
        teacher_logits: ``(B, T, V)``; treated as constant.
        mask: ``(B, T)`` bool or float weights.
        temperature: Softmax temperature, > 0.
        chunk_rows: Tokens per float32 chunk.

    Returns:
        Scalar float32 loss.
    """
    return _token_mean("reverse_kl", student_logits, teacher_logits, None, mask, temperature, chunk_rows)


def token_nll(logits: Tensor, labels: Tensor, mask: Tensor, chunk_rows: int | None = None) -> Tensor:
    """Token-mean negative log-likelihood of ``labels`` (already aligned with ``logits``).

    ``labels[b, t]`` is the target of ``logits[b, t]``. Positions with a negative label
    (e.g. -100) are ignored as if masked.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` int64.
        mask: ``(B, T)`` bool or float weights.
        chunk_rows: Tokens per float32 chunk.

    Returns:
        Scalar float32 loss.
    """
    if labels.shape != mask.shape:
        raise ZedaError(f"labels shape {tuple(labels.shape)} does not match mask shape {tuple(mask.shape)}")
    mask = mask.float() * (labels >= 0).float()
    return _token_mean("nll", logits, None, labels.clamp_min(0).long(), mask, 1.0, chunk_rows)


class _TokenLogprobs(torch.autograd.Function):
    """``log p(y)`` per position; backward recomputes the softmax chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, labels, chunk):  # noqa: D102
        vocab = logits.shape[-1]
        flat, y = logits.reshape(-1, vocab), labels.reshape(-1)
        out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        for a in range(0, flat.shape[0], chunk):
            x = flat[a : a + chunk].float()
            out[a : a + chunk] = x.gather(-1, y[a : a + chunk, None]).squeeze(-1) - torch.logsumexp(x, -1)
        ctx.save_for_backward(logits, labels)
        ctx.chunk = chunk
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        logits, labels = ctx.saved_tensors
        vocab = logits.shape[-1]
        flat, y, g = logits.reshape(-1, vocab), labels.reshape(-1), grad_out.reshape(-1).float()
        grad = torch.empty_like(flat)
        for a in range(0, flat.shape[0], ctx.chunk):
            p = torch.softmax(flat[a : a + ctx.chunk].float(), -1)
            gc = g[a : a + ctx.chunk, None]
            d = -p * gc
            d.scatter_add_(-1, y[a : a + ctx.chunk, None], gc)
            grad[a : a + ctx.chunk] = d.to(grad.dtype)
        return grad.view(logits.shape), None, None


def token_logprobs(logits: Tensor, labels: Tensor, chunk_rows: int | None = None) -> Tensor:
    """``(B, T)`` float32 ``log softmax(logits)[label]``, chunked over tokens.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` int64 aligned targets (clamped at 0; mask the result as needed).
        chunk_rows: Tokens per float32 chunk.
    """
    chunk = chunk_rows or default_chunk_rows(logits.shape[-1], logits.device)
    return _TokenLogprobs.apply(logits, labels.clamp_min(0).long(), chunk)


class PGOutput(NamedTuple):
    """Result of `policy_gradient_reverse_kl`.

    Attributes:
        loss: Scalar surrogate loss to backpropagate.
        reverse_kl: Scalar detached single-sample estimate of KL(student || teacher) per token.
    """

    loss: Tensor
    reverse_kl: Tensor


def policy_gradient_reverse_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> PGOutput:
    """Single-sample policy-gradient estimator of the reverse KL on student samples.

    For tokens ``y_t`` sampled from the student, the per-token advantage is
    ``A_t = log p_T(y_t) - log p_S(y_t)`` (detached) and the surrogate loss is
    ``-mean_t(A_t * log p_S(y_t))``. Since ``E_{y~p_S}[grad log p_S(y)] = 0``, its gradient equals
    ``grad KL(p_S || p_T)`` per token in expectation (per-token advantage, no credit to earlier
    tokens).

    Args:
        student_logprobs: ``(B, T)`` log p_S of the sampled tokens (with gradient).
        teacher_logprobs: ``(B, T)`` log p_T of the same tokens (constant).
        mask: ``(B, T)`` bool or float weights (response tokens only).

    Returns:
        `PGOutput` ``(loss, reverse_kl)``; ``reverse_kl`` is the token mean of ``-A_t``.
    """
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ZedaError(
            f"student_logprobs {tuple(student_logprobs.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must have the same shape"
        )
    if mask.shape != student_logprobs.shape:
        raise ZedaError(f"mask shape {tuple(mask.shape)} does not match {tuple(student_logprobs.shape)}")
    w = mask.float()
    lps = student_logprobs.float()
    advantage = (teacher_logprobs.detach().float() - lps.detach()).masked_fill(w == 0, 0.0)
    total = w.sum().clamp_min(1e-12)
    loss = -(advantage * lps.masked_fill(w == 0, 0.0) * w).sum() / total
    estimate = (-(advantage * w).sum() / total).detach()
    return PGOutput(loss, estimate)


def distill_loss(
    kind: LossKind,
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None,
    mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Dispatch on ``stage1.kd`` (``forward_kl``, ``reverse_kl`` or ``nll``).

    Args:
        kind: The loss.
        student_logits: ``(B, T, V)``.
        teacher_logits: ``(B, T, V)``; required for the KL kinds.
        labels: ``(B, T)`` aligned targets; required for ``"nll"``.
        mask: ``(B, T)``.
        temperature: Softmax temperature for the KL kinds.

    Returns:
        Scalar float32 loss.
    """
    if kind in ("forward_kl", "reverse_kl"):
        if teacher_logits is None:
            raise ZedaError(f"{kind} distillation needs teacher logits")
        fn = forward_kl if kind == "forward_kl" else reverse_kl
        return fn(student_logits, teacher_logits, mask, temperature)
    if kind == "nll":
        if labels is None:
            raise ZedaError("nll distillation needs labels")
        return token_nll(student_logits, labels, mask)
    raise ZedaError(f"unknown distillation loss {kind!r}; use forward_kl, reverse_kl or nll")
