"""Tests for zeda.losses: distillation losses, PG reverse KL, and the group balance loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zeda.distillation.losses import (
    GroupStats,
    all_reduce_counts,
    balance_loss_from_logits,
    distill_loss,
    equilibrium_zero_share,
    forward_kl,
    group_balance_loss,
    group_balance_stats,
    policy_gradient_reverse_kl,
    reverse_kl,
    router_probs,
    sum_stats,
    token_nll,
    w_for_target,
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
# Group balance loss
# ------------------------------------------------------------------------------------------


def _tiny_probs() -> torch.Tensor:
    # E = 2 real experts (cols 0, 1), Z = 1 zero expert (col 2), T = 2 tokens, k = 1.
    return torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.3, 0.6]], requires_grad=True)


def test_group_balance_loss_hand_computed() -> None:
    probs = _tiny_probs()
    st = group_balance_stats(probs, num_real=2, top_k=1)
    # top-1: token 0 -> col 0 (real), token 1 -> col 2 (zero)
    assert (st.count_E.item(), st.count_Z.item(), st.n_tokens.item()) == (1.0, 1.0, 2.0)
    # prob sums: real = (0.5+0.2) + (0.1+0.3) = 1.1, zero = 0.3 + 0.6 = 0.9
    assert st.prob_sum_E.item() == pytest.approx(1.1)
    assert st.prob_sum_Z.item() == pytest.approx(0.9)
    # f_E = f_Z = 1/2, P_E = 0.55, P_Z = 0.45; alpha = 0.1, w = 3, E = 2, Z = 1:
    # L = 0.1 * (2 + 3*1) * (0.5*0.55/2 + 0.5*0.45/3) = 0.5 * (0.1375 + 0.075) = 0.10625
    loss = group_balance_loss([st], num_real=2, num_zero=1, top_k=1, alpha=0.1, w=3.0)
    assert loss.item() == pytest.approx(0.10625, abs=1e-7)
    # two identical layers sum
    loss2 = group_balance_loss([st, st], num_real=2, num_zero=1, top_k=1, alpha=0.1, w=3.0)
    assert loss2.item() == pytest.approx(0.2125, abs=1e-7)


def test_group_balance_loss_only_probs_carry_gradient() -> None:
    probs = _tiny_probs()
    st = group_balance_stats(probs, num_real=2, top_k=1)
    assert not st.count_E.requires_grad and not st.count_Z.requires_grad and not st.n_tokens.requires_grad
    assert st.prob_sum_E.requires_grad and st.prob_sum_Z.requires_grad
    group_balance_loss([st], 2, 1, 1, alpha=0.1, w=3.0).backward()
    # dL/dp[t, j] = alpha (E + wZ) / n * (f_E / E for real j, f_Z / (wZ) for zero j)
    real = 0.1 * 5 / 2 * (0.5 / 2)  # 0.0625
    zero = 0.1 * 5 / 2 * (0.5 / 3)  # 0.041666...
    expected = torch.tensor([[real, real, zero], [real, real, zero]])
    torch.testing.assert_close(probs.grad, expected)


def test_group_balance_stats_mask() -> None:
    probs = _tiny_probs()
    st = group_balance_stats(probs, num_real=2, top_k=1, mask=torch.tensor([True, False]))
    assert (st.count_E.item(), st.count_Z.item(), st.n_tokens.item()) == (1.0, 0.0, 1.0)
    assert st.prob_sum_Z.item() == pytest.approx(0.3)
    assert st.zero_share.item() == 0.0


def test_group_balance_stats_top_k_counts() -> None:
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    st = group_balance_stats(probs, num_real=3, top_k=2)
    # token 0 picks cols 3 (zero), 2 (real); token 1 picks cols 0, 1 (real)
    assert (st.count_E.item(), st.count_Z.item()) == (3.0, 1.0)
    assert st.zero_share.item() == pytest.approx(0.25)


def test_router_probs_kinds() -> None:
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(6))
    for kind in ("softmax", "topk_softmax"):
        torch.testing.assert_close(router_probs(logits, kind), torch.softmax(logits, -1))
    sig = torch.sigmoid(logits)
    torch.testing.assert_close(router_probs(logits, "sigmoid_bias"), sig / sig.sum(-1, keepdim=True))
    for kind in ("softmax", "sigmoid_bias"):
        torch.testing.assert_close(router_probs(logits, kind).sum(-1), torch.ones(4))
    with pytest.raises(ZedaError):
        router_probs(logits, "nope")  # type: ignore[arg-type]


def test_w_for_target_inverts_equilibrium() -> None:
    assert w_for_target(0.5, 8, 4) == pytest.approx(2.0)  # Z = E/2, 50 % -> reference w = 2
    for s, e, z in [(0.3, 16, 4), (0.5, 64, 32), (0.25, 8, 4), (0.7, 128, 64)]:
        assert equilibrium_zero_share(e, z, w_for_target(s, e, z)) == pytest.approx(s)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ZedaError):
            w_for_target(bad, 8, 4)


def _train_toy_router(
    num_real: int, num_zero: int, top_k: int, w: float, kind: str, init_zero_bias: float
) -> tuple[float, float]:
    """SGD on a learnable bias vector (logits = bias + per-token noise) with the balance loss only.

    Returns:
        (initial zero share, mean zero share over the last 50 steps).
    """
    g = torch.Generator().manual_seed(0)
    bias = torch.zeros(num_real + num_zero)
    bias[num_real:] = init_zero_bias
    bias.requires_grad_(True)
    opt = torch.optim.SGD([bias], lr=30.0)
    shares = []
    for _ in range(200):
        logits = bias + torch.randn(512, num_real + num_zero, generator=g)
        loss, stats = balance_loss_from_logits([logits], kind, num_real, num_zero, top_k, alpha=0.1, w=w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        shares.append(stats[0].zero_share.item())
    return shares[0], sum(shares[-50:]) / 50


def test_equilibrium_share_reference_setting() -> None:
    """E=8, Z=4, w=2 (reference): wZ/(wZ+E) = 8/16 = 0.5, starting from almost no zero routing."""
    start, final = _train_toy_router(8, 4, 2, 2.0, "softmax", init_zero_bias=-3.0)
    assert start < 0.05
    assert final == pytest.approx(equilibrium_zero_share(8, 4, 2.0), abs=0.05)
    assert equilibrium_zero_share(8, 4, 2.0) == 0.5


def test_equilibrium_share_via_target_sigmoid_router() -> None:
    """E=16, Z=4, k=4, target s=0.3 -> w = 0.3*16/(4*0.7); start from too much zero routing."""
    w = w_for_target(0.3, 16, 4)
    start, final = _train_toy_router(16, 4, 4, w, "sigmoid_bias", init_zero_bias=2.0)
    assert start > 0.6
    assert final == pytest.approx(0.3, abs=0.05)


def test_global_batch_accumulation_equals_concatenated_batch() -> None:
    g = torch.Generator().manual_seed(7)
    num_real, num_zero, k = 6, 3, 2
    logits = torch.randn(30, num_real + num_zero, generator=g) * 2
    mask = torch.rand(30, generator=g) > 0.2

    full = logits.clone().requires_grad_(True)
    st_full = group_balance_stats(router_probs(full, "softmax"), num_real, k, mask)
    loss_full = group_balance_loss([st_full], num_real, num_zero, k, alpha=0.1, w=2.0)
    loss_full.backward()

    parts = logits.clone().requires_grad_(True)
    chunks = [(0, 7), (7, 19), (19, 30)]  # uneven micro-batches
    micro = [
        group_balance_stats(router_probs(parts[a:b], "softmax"), num_real, k, mask[a:b]) for a, b in chunks
    ]
    st_acc = sum_stats(micro)
    st_add = micro[0] + micro[1] + micro[2]
    for name in ("count_E", "count_Z", "prob_sum_E", "prob_sum_Z", "n_tokens"):
        torch.testing.assert_close(getattr(st_acc, name), getattr(st_full, name))
        torch.testing.assert_close(getattr(st_add, name), getattr(st_full, name))
    loss_acc = group_balance_loss([st_acc], num_real, num_zero, k, alpha=0.1, w=2.0)
    loss_acc.backward()
    torch.testing.assert_close(loss_acc, loss_full)
    torch.testing.assert_close(parts.grad, full.grad)

    # averaging per-micro-batch losses is NOT the global-batch loss (f differs per micro-batch)
    per_micro = torch.stack([group_balance_loss([m], num_real, num_zero, k, 0.1, 2.0) for m in micro])
    weights = torch.stack([m.n_tokens for m in micro])
    assert abs((per_micro * weights).sum() / weights.sum() - loss_full.detach()).item() > 1e-6


def test_all_reduce_counts_noop_without_distributed() -> None:
    st = group_balance_stats(_tiny_probs(), 2, 1)
    assert all_reduce_counts(st) is st


def test_group_stats_detach_and_add() -> None:
    st = group_balance_stats(_tiny_probs(), 2, 1)
    d = st.detach()
    assert not d.prob_sum_E.requires_grad
    both = st + d
    assert isinstance(both, GroupStats)
    assert both.count_E.item() == 2.0 and both.prob_sum_Z.item() == pytest.approx(1.8)


def test_balance_argument_errors() -> None:
    st = group_balance_stats(_tiny_probs(), 2, 1)
    with pytest.raises(ZedaError):
        group_balance_loss([st], 2, 0, 1, 0.1, 2.0)
    with pytest.raises(ZedaError):
        group_balance_loss([st], 2, 1, 1, 0.1, 0.0)
    with pytest.raises(ZedaError):
        group_balance_stats(_tiny_probs(), 3, 1)
    with pytest.raises(ZedaError):
        balance_loss_from_logits([torch.zeros(2, 5)], "softmax", 2, 1, 1, 0.1, 2.0)
    assert group_balance_loss([], 2, 1, 1, 0.1, 2.0).item() == 0.0
