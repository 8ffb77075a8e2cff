"""Distillation losses: hand computations, masks, gradients, and the chunked memory bound."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from zeda.distillation import losses
from zeda.distillation.losses import (
    distill_loss,
    forward_kl,
    policy_gradient_reverse_kl,
    reverse_kl,
    token_logprobs,
    token_nll,
)
from zeda.errors import ZedaError

# ------------------------------------------------------------------------------------------
# KD losses
# ------------------------------------------------------------------------------------------


def _two_way() -> tuple[torch.Tensor, torch.Tensor]:
    """Student p_S = [1/2, 1/2], teacher p_T = [3/4, 1/4], as (1, 1, 2) logits."""
    student = torch.zeros(1, 1, 2)
    teacher = torch.tensor([[[math.log(3.0), 0.0]]])
    return student, teacher


def test_forward_kl_hand_computed() -> None:
    student, teacher = _two_way()
    mask = torch.ones(1, 1, dtype=torch.bool)
    # KL(T||S) = 3/4 ln((3/4)/(1/2)) + 1/4 ln((1/4)/(1/2)) = 0.75 ln 1.5 + 0.25 ln 0.5
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert forward_kl(student, teacher, mask).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.130812, abs=1e-6)


def test_reverse_kl_hand_computed() -> None:
    student, teacher = _two_way()
    mask = torch.ones(1, 1, dtype=torch.bool)
    # KL(S||T) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 0.5 ln(2/3) + 0.5 ln 2
    expected = 0.5 * math.log(2 / 3) + 0.5 * math.log(2.0)
    assert reverse_kl(student, teacher, mask).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.143841, abs=1e-6)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl])
def test_kl_zero_for_equal_logits(fn) -> None:
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0)) * 3
    mask = torch.ones(2, 5)
    assert fn(logits, logits.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    assert fn(logits, logits.clone(), mask, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    # and strictly positive for different logits
    assert fn(logits, logits.flip(-1), mask).item() > 1e-3


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl])
def test_kl_mask_respected(fn) -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    per_token = torch.stack(
        [
            fn(s[b : b + 1, i : i + 1], t[b : b + 1, i : i + 1], torch.ones(1, 1))
            for b in range(2)
            for i in range(3)
        ]
    ).view(2, 3)
    expected = per_token[mask].mean()
    assert fn(s, t, mask).item() == pytest.approx(expected.item(), abs=1e-6)
    # garbage at masked positions changes nothing
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 1e4
    t2[~mask] = -1e4
    assert fn(s2, t2, mask).item() == pytest.approx(expected.item(), abs=1e-6)
    # float weights: weighted token mean
    wmask = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    weighted = (per_token * wmask).sum() / wmask.sum()
    assert fn(s, t, wmask).item() == pytest.approx(weighted.item(), abs=1e-6)


def test_kl_empty_mask_is_zero_and_differentiable() -> None:
    s = torch.randn(1, 4, 5, requires_grad=True)
    loss = forward_kl(s, torch.randn(1, 4, 5), torch.zeros(1, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and s.grad is not None and torch.all(s.grad == 0)


def test_kl_temperature_scales_logits() -> None:
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(1, 3, 6, generator=g), torch.randn(1, 3, 6, generator=g)
    mask = torch.ones(1, 3)
    assert forward_kl(s, t, mask, temperature=2.0).item() == pytest.approx(
        forward_kl(s / 2, t / 2, mask).item(), abs=1e-6
    )


def test_kl_fp32_and_stable_for_bf16_and_huge_logits() -> None:
    s = torch.tensor([[[1e4, 0.0, -1e4]]], dtype=torch.bfloat16)
    t = torch.tensor([[[0.0, 1e4, -1e4]]], dtype=torch.bfloat16)
    mask = torch.ones(1, 1)
    fk, rk = forward_kl(s, t, mask), reverse_kl(s, t, mask)
    assert fk.dtype == torch.float32 and rk.dtype == torch.float32
    assert math.isfinite(fk.item()) and math.isfinite(rk.item())
    assert fk.item() == pytest.approx(1e4, rel=1e-2)  # -log p_S(teacher's token) ~ 1e4


def test_kl_gradient_only_to_student() -> None:
    s = torch.randn(1, 2, 4, requires_grad=True)
    t = torch.randn(1, 2, 4, requires_grad=True)
    forward_kl(s, t, torch.ones(1, 2)).backward()
    assert s.grad is not None and t.grad is None


def test_token_nll_matches_cross_entropy_and_ignores_masked() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 9, generator=g)
    labels = torch.randint(0, 9, (2, 4), generator=g)
    labels[1, 3] = -100
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=torch.bool)
    keep = mask & (labels >= 0)
    expected = F.cross_entropy(logits[keep], labels[keep])
    assert token_nll(logits, labels, mask).item() == pytest.approx(expected.item(), abs=1e-6)
    assert distill_loss("nll", logits, None, labels, mask).item() == pytest.approx(expected.item(), abs=1e-6)


def test_distill_loss_dispatch() -> None:
    s, t = _two_way()
    m = torch.ones(1, 1)
    assert distill_loss("forward_kl", s, t, None, m).item() == pytest.approx(forward_kl(s, t, m).item())
    assert distill_loss("reverse_kl", s, t, None, m).item() == pytest.approx(reverse_kl(s, t, m).item())
    with pytest.raises(ZedaError):
        distill_loss("forward_kl", s, None, None, m)
    with pytest.raises(ZedaError):
        distill_loss("bogus", s, t, None, m)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Policy-gradient reverse KL
# ------------------------------------------------------------------------------------------


def test_pg_gradient_equals_reverse_kl_gradient_in_expectation() -> None:
    """Treat every vocabulary entry as a 'sample' weighted by p_S: the PG surrogate then is the
    exact expectation, so its gradient must equal the gradient of the full reverse KL."""
    g = torch.Generator().manual_seed(4)
    v = 6
    teacher = torch.randn(v, generator=g)
    s1 = torch.randn(v, generator=g).requires_grad_(True)
    s2 = s1.detach().clone().requires_grad_(True)

    log_ps = F.log_softmax(s1, -1)
    log_pt = F.log_softmax(teacher, -1)
    weights = log_ps.detach().exp()  # p_S(y) for y = 0..V-1, a (1, V) "batch" of samples
    out = policy_gradient_reverse_kl(log_ps.view(1, v), log_pt.view(1, v), weights.view(1, v))
    out.loss.backward()

    exact = reverse_kl(s2.view(1, 1, v), teacher.view(1, 1, v), torch.ones(1, 1))
    exact.backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-6, rtol=1e-5)
    assert out.reverse_kl.item() == pytest.approx(exact.item(), abs=1e-6)
    assert not out.reverse_kl.requires_grad


def test_pg_sampled_gradient_points_along_reverse_kl_gradient() -> None:
    g = torch.Generator().manual_seed(5)
    v, n = 5, 20000
    teacher = torch.randn(v, generator=g)
    s = torch.randn(v, generator=g).requires_grad_(True)
    log_ps = F.log_softmax(s, -1)
    samples = torch.multinomial(log_ps.detach().exp(), n, replacement=True, generator=g)
    lps = log_ps[samples].view(1, n)
    lpt = F.log_softmax(teacher, -1)[samples].view(1, n)
    policy_gradient_reverse_kl(lps, lpt, torch.ones(1, n)).loss.backward()
    pg_grad = s.grad.clone()

    s.grad = None
    reverse_kl(s.view(1, 1, v), teacher.view(1, 1, v), torch.ones(1, 1)).backward()
    cos = F.cosine_similarity(pg_grad, s.grad, dim=0)
    assert cos.item() > 0.95

    # one descent step on the PG surrogate lowers the true reverse KL
    with torch.no_grad():
        before = reverse_kl(s.view(1, 1, v), teacher.view(1, 1, v), torch.ones(1, 1))
        after = reverse_kl((s - 0.5 * pg_grad).view(1, 1, v), teacher.view(1, 1, v), torch.ones(1, 1))
    assert after.item() < before.item()


def test_pg_advantage_is_detached_and_mask_respected() -> None:
    lps = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    lpt = torch.tensor([[-0.5, -2.5, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    out = policy_gradient_reverse_kl(lps, lpt, mask)
    out.loss.backward()
    # A = [0.5, -0.5]; loss = -mean(A * lps) -> d/d lps = -A / 2
    torch.testing.assert_close(lps.grad, torch.tensor([[-0.25, 0.25, 0.0]]))
    assert lpt.grad is None
    assert out.loss.item() == pytest.approx(-(0.5 * -1.0 + -0.5 * -2.0) / 2)
    assert out.reverse_kl.item() == pytest.approx(0.0)  # mean(-A) over the two kept tokens


# ------------------------------------------------------------------------------------------
# Chunking: exact gradients, and no float32 (B, T, V) copy beyond one chunk
# ------------------------------------------------------------------------------------------


def _reference(kind: str, s, t, labels, mask, tau):
    w = mask.float()
    log_p = F.log_softmax(s.float() / tau, -1)
    if kind == "nll":
        per = -log_p.gather(-1, labels[..., None]).squeeze(-1)
    else:
        log_q = F.log_softmax(t.float() / tau, -1)
        per = (
            (log_q.exp() * (log_q - log_p)).sum(-1)
            if kind == "forward_kl"
            else (log_p.exp() * (log_p - log_q)).sum(-1)
        )
    return (per * w).sum() / w.sum()


@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "nll"])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_loss_and_gradient_match_plain_autograd(kind, chunk, dense, monkeypatch) -> None:
    # Both chunk layouts: gathered kept rows, and contiguous slices of all rows (masked zeroed).
    monkeypatch.setattr(losses, "DENSE_MIN_KEPT", 0.0 if dense else 1.1)
    g = torch.Generator().manual_seed(11)
    s0, t = torch.randn(2, 5, 13, generator=g) * 2, torch.randn(2, 5, 13, generator=g) * 2
    labels = torch.randint(0, 13, (2, 5), generator=g)
    mask = torch.tensor([[1.0, 0.0, 2.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.5, 0.0]])
    tau = 1.0 if kind == "nll" else 1.5
    ref_s = s0.clone().requires_grad_(True)
    ref = _reference(kind, ref_s, t, labels, mask, tau)
    ref.backward()
    s = s0.clone().requires_grad_(True)
    if kind == "nll":
        got = token_nll(s, labels, mask, chunk_rows=chunk)
    else:
        fn = forward_kl if kind == "forward_kl" else reverse_kl
        got = fn(s, t, mask, tau, chunk_rows=chunk)
    (got * 3.0).backward()  # a non-unit upstream gradient
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(s.grad, 3.0 * ref_s.grad)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "nll"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_chunks_ignore_non_finite_masked_rows(kind, dtype) -> None:
    """Packed text (all rows kept but the last of each sequence) takes the dense layout: the
    masked rows are computed, so inf/nan there must not reach the loss or any gradient row."""
    g = torch.Generator().manual_seed(13)
    s0, t0 = torch.randn(3, 6, 17, generator=g) * 2, torch.randn(3, 6, 17, generator=g) * 2
    labels = torch.randint(0, 17, (3, 6), generator=g)
    mask = torch.ones(3, 6)
    mask[:, -1] = 0
    assert mask.mean() >= losses.DENSE_MIN_KEPT
    ref_s = s0.clone().requires_grad_(True)
    ref = _reference(kind, ref_s, t0, labels, mask, 1.0)
    ref.backward()
    s_bad, t_bad = s0.clone(), t0.clone()
    s_bad[:, -1, 0], s_bad[:, -1, 1] = float("nan"), float("inf")
    t_bad[:, -1, 2] = float("-inf")
    s = s_bad.to(dtype).requires_grad_(True)
    if kind == "nll":
        got = token_nll(s, labels, mask, chunk_rows=4)
    else:
        fn = forward_kl if kind == "forward_kl" else reverse_kl
        got = fn(s, t_bad.to(dtype), mask, chunk_rows=4)
    got.backward()
    tol = {} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.05}
    assert torch.isfinite(got) and torch.isfinite(s.grad.float()).all()
    assert torch.all(s.grad[:, -1] == 0)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref)
    torch.testing.assert_close(s.grad.float(), ref_s.grad, **tol)


def test_token_logprobs_match_log_softmax_with_gradient() -> None:
    g = torch.Generator().manual_seed(12)
    s0 = torch.randn(2, 4, 9, generator=g)
    labels = torch.randint(0, 9, (2, 4), generator=g)
    weights = torch.rand(2, 4, generator=g)
    ref_s = s0.clone().requires_grad_(True)
    ref = F.log_softmax(ref_s, -1).gather(-1, labels[..., None]).squeeze(-1)
    (ref * weights).sum().backward()
    s = s0.clone().requires_grad_(True)
    got = token_logprobs(s, labels, chunk_rows=3)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(s.grad, ref_s.grad)


class _LargestFloat32(TorchDispatchMode):
    """Records the element count of the largest float32 tensor any op makes while active."""

    def __init__(self) -> None:
        super().__init__()
        self.fp32 = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.dtype == torch.float32:
                self.fp32 = max(self.fp32, o.numel())
        return out


def test_kd_losses_at_real_vocabulary_never_hold_a_full_fp32_copy() -> None:
    """V = 151,936 (Qwen3): every float32 tensor made during forward+backward is at most one chunk."""
    vocab, b, t, chunk = 151_936, 2, 24, 8
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(b, t, vocab, generator=g) * 2).to(torch.bfloat16).requires_grad_(True)
    teacher = (torch.randn(b, t, vocab, generator=g) * 2).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones(b, t)
    for fn in (
        lambda: forward_kl(student, teacher, mask, chunk_rows=chunk),
        lambda: reverse_kl(student, teacher, mask, chunk_rows=chunk),
        lambda: token_nll(student, labels, mask, chunk_rows=chunk),
        lambda: token_logprobs(student, labels, chunk_rows=chunk).sum(),
    ):
        with _LargestFloat32() as probe:
            fn().backward()
        assert probe.fp32 <= chunk * vocab, f"a float32 tensor of {probe.fp32} elements (> one chunk)"
        assert student.grad.dtype == torch.bfloat16
        student.grad = None


def test_cpu_chunks_stay_below_glibc_mmap_threshold_and_are_used_by_default() -> None:
    """On CPU a float32 chunk stays under glibc's largest mmap threshold (32 MiB): larger blocks
    are mapped and faulted in afresh on every allocation. Accelerators keep the larger budget
    that `zeda.planning.memory` plans with."""
    from zeda.distillation import losses

    for vocab in (4_096, 32_000, 151_936):
        rows = losses.default_chunk_rows(vocab, "cpu")
        assert rows * vocab * 4 <= 32 * 2**20
        assert rows * vocab * 4 > 8 * 2**20  # not so small that per-chunk overhead dominates
        assert losses.default_chunk_rows(vocab, "cuda") == losses.default_chunk_rows(vocab) == 2**24 // vocab
    assert losses.default_chunk_rows(2**30, "cpu") == 1

    # bf16 logits: the only float32 tensors are the chunks, so the largest one shows the default.
    vocab = 151_936
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(2, 40, vocab, generator=g) * 2).to(torch.bfloat16).requires_grad_(True)
    teacher = (torch.randn(2, 40, vocab, generator=g) * 2).to(torch.bfloat16)
    with _LargestFloat32() as probe:
        forward_kl(student, teacher, torch.ones(2, 40)).backward()
    assert probe.fp32 == losses.default_chunk_rows(vocab, "cpu") * vocab
