"""The group balance loss and `BalanceTracker` (the code the loop uses), against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from zeda.distillation.balance import (
    BalanceTracker,
    GroupStats,
    RouterRecord,
    all_reduce_sum,
    equilibrium_zero_share,
    group_balance_loss,
    group_balance_stats,
    router_probs,
    sum_stats,
    w_for_target,
)
from zeda.errors import ZedaError


def _topk(probs: torch.Tensor, k: int) -> torch.Tensor:
    return probs.detach().topk(k, dim=-1).indices


def _tiny_probs() -> torch.Tensor:
    # E = 2 real experts (cols 0, 1), Z = 1 zero expert (col 2), T = 2 tokens, k = 1.
    return torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.3, 0.6]], requires_grad=True)


def test_group_balance_loss_hand_computed() -> None:
    probs = _tiny_probs()
    st = group_balance_stats(probs, num_real=2, indices=_topk(probs, 1))
    # top-1: token 0 -> col 0 (real), token 1 -> col 2 (zero)
    assert (st.count_E.item(), st.count_Z.item(), st.n_tokens.item()) == (1.0, 1.0, 2.0)
    # prob sums: real = (0.5+0.2) + (0.1+0.3) = 1.1, zero = 0.3 + 0.6 = 0.9
    assert st.prob_sum_E.item() == pytest.approx(1.1)
    assert st.prob_sum_Z.item() == pytest.approx(0.9)
    # f_E = f_Z = 1/2, P_E = 0.55, P_Z = 0.45; alpha = 0.1, w = 3, E = 2, Z = 1:
    # L = 0.1 * (2 + 3*1) * (0.5*0.55/2 + 0.5*0.45/3) = 0.5 * (0.1375 + 0.075) = 0.10625
    loss = group_balance_loss([st], num_real=2, num_zero=1, alpha=0.1, w=3.0)
    assert loss.item() == pytest.approx(0.10625, abs=1e-7)
    # two identical layers sum
    loss2 = group_balance_loss([st, st], num_real=2, num_zero=1, alpha=0.1, w=3.0)
    assert loss2.item() == pytest.approx(0.2125, abs=1e-7)


def test_group_balance_loss_only_probs_carry_gradient() -> None:
    probs = _tiny_probs()
    st = group_balance_stats(probs, num_real=2, indices=_topk(probs, 1))
    assert not st.count_E.requires_grad and not st.count_Z.requires_grad and not st.n_tokens.requires_grad
    assert st.prob_sum_E.requires_grad and st.prob_sum_Z.requires_grad
    group_balance_loss([st], 2, 1, alpha=0.1, w=3.0).backward()
    # dL/dp[t, j] = alpha (E + wZ) / n * (f_E / E for real j, f_Z / (wZ) for zero j)
    real = 0.1 * 5 / 2 * (0.5 / 2)  # 0.0625
    zero = 0.1 * 5 / 2 * (0.5 / 3)  # 0.041666...
    expected = torch.tensor([[real, real, zero], [real, real, zero]])
    torch.testing.assert_close(probs.grad, expected)


def test_group_balance_stats_mask() -> None:
    probs = _tiny_probs()
    st = group_balance_stats(probs, num_real=2, indices=_topk(probs, 1), mask=torch.tensor([True, False]))
    assert (st.count_E.item(), st.count_Z.item(), st.n_tokens.item()) == (1.0, 0.0, 1.0)
    assert st.prob_sum_Z.item() == pytest.approx(0.3)
    assert st.zero_share.item() == 0.0


def test_group_balance_stats_top_k_counts() -> None:
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    st = group_balance_stats(probs, num_real=3, indices=_topk(probs, 2))
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
    with pytest.raises(ValueError, match="unknown router kind 'nope'"):
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
        probs = router_probs(logits, kind)
        stats = [group_balance_stats(probs, num_real, _topk(probs, top_k))]
        loss = group_balance_loss(stats, num_real, num_zero, alpha=0.1, w=w)
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
    p_full = router_probs(full, "softmax")
    st_full = group_balance_stats(p_full, num_real, _topk(p_full, k), mask)
    loss_full = group_balance_loss([st_full], num_real, num_zero, alpha=0.1, w=2.0)
    loss_full.backward()

    parts = logits.clone().requires_grad_(True)
    chunks = [(0, 7), (7, 19), (19, 30)]  # uneven micro-batches
    micro = [
        group_balance_stats(router_probs(parts[a:b], "softmax"), num_real, _topk(parts[a:b], k), mask[a:b])
        for a, b in chunks
    ]
    st_acc = sum_stats(micro)
    st_add = micro[0] + micro[1] + micro[2]
    for name in ("count_E", "count_Z", "prob_sum_E", "prob_sum_Z", "n_tokens"):
        torch.testing.assert_close(getattr(st_acc, name), getattr(st_full, name))
        torch.testing.assert_close(getattr(st_add, name), getattr(st_full, name))
    loss_acc = group_balance_loss([st_acc], num_real, num_zero, alpha=0.1, w=2.0)
    loss_acc.backward()
    torch.testing.assert_close(loss_acc, loss_full)
    torch.testing.assert_close(parts.grad, full.grad)

    # averaging per-micro-batch losses is NOT the global-batch loss (f differs per micro-batch)
    per_micro = torch.stack([group_balance_loss([m], num_real, num_zero, 0.1, 2.0) for m in micro])
    weights = torch.stack([m.n_tokens for m in micro])
    assert abs((per_micro * weights).sum() / weights.sum() - loss_full.detach()).item() > 1e-6


def test_all_reduce_sum_is_a_copy_without_distributed() -> None:
    t = torch.tensor([1.0, 2.0])
    out = all_reduce_sum(t)
    assert torch.equal(out, t) and out is not t


def test_group_stats_detach_and_add() -> None:
    st = group_balance_stats(_tiny_probs(), 2, _topk(_tiny_probs(), 1))
    d = st.detach()
    assert not d.prob_sum_E.requires_grad
    both = st + d
    assert isinstance(both, GroupStats)
    assert both.count_E.item() == 2.0 and both.prob_sum_Z.item() == pytest.approx(1.8)


def test_balance_argument_errors() -> None:
    st = group_balance_stats(_tiny_probs(), 2, _topk(_tiny_probs(), 1))
    with pytest.raises(ZedaError):
        group_balance_loss([st], 2, 0, 0.1, 2.0)
    with pytest.raises(ZedaError):
        group_balance_loss([st], 2, 1, 0.1, 0.0)
    with pytest.raises(ZedaError):
        group_balance_stats(_tiny_probs(), 3, _topk(_tiny_probs(), 1))
    with pytest.raises(ZedaError):
        group_balance_stats(_tiny_probs(), 2, torch.zeros(5, 1, dtype=torch.long))
    assert group_balance_loss([], 2, 1, 0.1, 2.0).item() == 0.0


class _Router(torch.nn.Module):
    """The attributes `BalanceTracker` reads from a zeda router."""

    def __init__(self, e: int, z: int, kind: str = "softmax") -> None:
        super().__init__()
        self.num_experts, self.num_zero_experts, self.zeda_router_kind = e, z, kind


def test_balance_tracker_counts_the_routers_real_indices_against_a_hand_computation() -> None:
    """f from the indices the router chose (here NOT the top-k of the probabilities), P from probs."""
    router = _Router(2, 1)
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.3, 0.6]])).requires_grad_(True)
    # The router's real choice (e.g. after a correction bias): token 0 -> zero slot (sentinel E=2),
    # token 1 -> real expert 1; a fresh top-1 would say the opposite.
    indices = torch.tensor([[2], [1]])
    tracker = BalanceTracker(alpha=0.1, w=3.0, global_batch=False)
    tracker.start_step()
    loss = tracker.loss([RouterRecord(router, logits, indices)], mask=None)
    # f_E = f_Z = 1/2; P_E = (0.7 + 0.4) / 2 = 0.55; P_Z = 0.45 -> L = 0.10625 (as by hand above)
    assert loss.item() == pytest.approx(0.10625, abs=1e-6)
    assert tracker.pop_share() == pytest.approx(0.5)
    # Now a choice with both tokens on real experts: f_Z = 0, L = 0.1 * 5 * (1 * 0.55 / 2) = 0.1375
    tracker.start_step()
    loss = tracker.loss([RouterRecord(router, logits, torch.tensor([[0], [1]]))], mask=None)
    assert loss.item() == pytest.approx(0.1375, abs=1e-6)
    assert tracker.pop_share() == 0.0


def test_balance_tracker_global_batch_accumulates_counts_over_micro_steps() -> None:
    router = _Router(2, 1)
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.3, 0.6]]))
    tracker = BalanceTracker(alpha=0.1, w=3.0, global_batch=True)
    tracker.start_step()
    # micro-step 0: both tokens on zero slots -> f_Z = 1
    first = tracker.loss([RouterRecord(router, logits, torch.tensor([[2], [2]]))], mask=None)
    assert first.item() == pytest.approx(0.1 * 5 * (0.45 / 3), abs=1e-6)
    # micro-step 1: both real; counts so far over the step: 2 real, 2 zero -> f = 1/2 each
    second = tracker.loss([RouterRecord(router, logits, torch.tensor([[0], [1]]))], mask=None)
    assert second.item() == pytest.approx(0.10625, abs=1e-6)
    assert tracker.pop_share() == pytest.approx(0.5)
    # a new step forgets the old counts: f_Z = 0 again
    tracker.start_step()
    third = tracker.loss([RouterRecord(router, logits, torch.tensor([[0], [1]]))], mask=None)
    assert third.item() == pytest.approx(0.1375, abs=1e-6)


def test_balance_tracker_mask_excludes_padding() -> None:
    router = _Router(2, 1)
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.3, 0.6]]))
    tracker = BalanceTracker(alpha=0.1, w=3.0, global_batch=False)
    tracker.start_step()
    tracker.loss([RouterRecord(router, logits, torch.tensor([[2], [0]]))], mask=torch.tensor([0, 1]))
    assert tracker.pop_share() == 0.0


def test_balance_tracker_across_layers_drives_only_the_model_wide_share() -> None:
    """balance.per_layer=false: every layer's f is the share over all layers' slots."""
    router = _Router(2, 1)
    layer_a = torch.log(torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.3, 0.6]]))  # P_E 0.55, P_Z 0.45
    layer_b = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]))  # P_E 0.65, P_Z 0.35
    records = [
        RouterRecord(router, layer_a, torch.tensor([[2], [2]])),  # layer a skips every slot
        RouterRecord(router, layer_b, torch.tensor([[0], [1]])),  # layer b skips none
    ]
    scale = 0.1 * (2 + 3.0 * 1)
    each = BalanceTracker(alpha=0.1, w=3.0, global_batch=False)
    each.start_step()
    assert each.loss(records, mask=None).item() == pytest.approx(scale * (0.45 / 3 + 0.65 / 2), abs=1e-6)
    for global_batch in (False, True):
        pooled = BalanceTracker(alpha=0.1, w=3.0, global_batch=global_batch, per_layer=False)
        pooled.start_step()
        # f_E = f_Z = 1/2 for both layers (2 of the 4 slots skipped)
        expected = scale * 0.5 * ((0.55 / 2 + 0.45 / 3) + (0.65 / 2 + 0.35 / 3))
        assert pooled.loss(records, mask=None).item() == pytest.approx(expected, abs=1e-6)
        assert pooled.pop_share() == pytest.approx(0.5)


def test_share_controller_moves_log_w_by_gain_times_the_shortfall_of_the_step_that_ended() -> None:
    """balance.share_gain: w *= exp(gain * (target - the step's share)), within W_RANGE."""
    router = _Router(2, 1)
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.3, 0.6]]))
    tracker = BalanceTracker(alpha=0.1, w=3.0, global_batch=True, target=0.75, share_gain=0.5)
    tracker.end_step()  # no step has run yet: w stays
    tracker.start_step()
    assert tracker.w == 3.0
    # two micro-steps: 1 of 4 slots skipped -> share 0.25, shortfall 0.5
    tracker.loss([RouterRecord(router, logits, torch.tensor([[2], [0]]))], mask=None)
    tracker.loss([RouterRecord(router, logits, torch.tensor([[1], [0]]))], mask=None)
    tracker.end_step()
    assert tracker.w == pytest.approx(3.0 * math.exp(0.5 * 0.5))
    # The new w weighs the next step's loss: f_Z = 1 -> L = 0.1 * (2 + w) * (P_Z / w)
    tracker.start_step()
    loss = tracker.loss([RouterRecord(router, logits, torch.tensor([[2], [2]]))], mask=None)
    assert loss.item() == pytest.approx(0.1 * (2 + tracker.w) * 0.45 / tracker.w, abs=1e-6)
    w = tracker.w
    tracker.end_step()  # share 1.0 overshoots: w falls
    assert tracker.w == pytest.approx(w * math.exp(0.5 * -0.25))
    # No wind-up: w stays within W_RANGE of its start.
    stuck = BalanceTracker(alpha=0.1, w=3.0, global_batch=False, target=0.75, share_gain=100.0)
    for _ in range(3):
        stuck.start_step()
        stuck.loss([RouterRecord(router, logits, torch.tensor([[0], [1]]))], mask=None)
        stuck.end_step()
    assert stuck.w == pytest.approx(3.0 * BalanceTracker.W_RANGE)
    # Off (the default): w never moves.
    off = BalanceTracker(alpha=0.1, w=3.0, global_batch=False)
    off.start_step()
    off.loss([RouterRecord(router, logits, torch.tensor([[0], [1]]))], mask=None)
    off.end_step()
    assert off.w == 3.0
    with pytest.raises(ZedaError, match="share_gain needs balance.target_zero_share"):
        BalanceTracker(alpha=0.1, w=3.0, global_batch=False, share_gain=0.1)
