"""zeda_sglang's routing (SGLang ``custom_routing_function``) against zeda's routers; no SGLang needed.

SGLang does not run on this machine (see docs/serving.md, "SGLang"), so the SGLang models
themselves are untested; these tests pin what they route with: `zeda_sglang.routing.ZedaRouting`
on injected tiny models of every family they serve (natural routing with zero-logit biases,
forced shares on teacher routing, the expert-0 fallback for kernels that do not skip -1, the
refusals), and the config registration SGLang's parser relies on.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from enum import Enum
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import zeda
from zeda.tiny import tiny_model
from zeda_sglang.compat import check_runner_backend, folded_scaling, shared_topk_slots, supports_kwarg
from zeda_sglang.routing import DROPPED, ZedaRouting

REPO = Path(__file__).resolve().parents[2]

FAMILIES = {
    "qwen3_moe": ("softmax", {}),
    "mixtral": ("softmax", {}),
    # group-limited sigmoid routing with a routed scaling factor that SGLang applies itself
    "glm4_moe": ("sigmoid_bias", {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}),
}


def _router(family: str):
    kind, overrides = FAMILIES[family]
    model = tiny_model(family, **overrides)
    zeda.inject_zero_experts(model, seed=0)
    routers = [
        m for m in model.modules() if getattr(m, "num_zero_experts", 0) > 0 and hasattr(m, "zeda_layer_index")
    ]
    router = routers[0]
    if kind == "sigmoid_bias":  # a non-trivial correction bias, so the selection depends on it
        with torch.no_grad():
            router.e_score_correction_bias.copy_(
                torch.randn(router.e_score_correction_bias.shape, generator=torch.Generator().manual_seed(5))
                * 0.1
            )
    return kind, router


def _sglang_routing(kind: str, router, **kwargs) -> tuple[ZedaRouting, torch.Tensor]:
    """The routing SGLang would build for this layer, and the gate weight it would load."""
    extra = {}
    if kind == "sigmoid_bias":
        extra = {"gate": router, "num_expert_group": router.num_group, "topk_group": router.topk_group}
    routing = ZedaRouting(
        kind=kind,
        num_experts=router.num_experts,
        num_zero_experts=router.num_zero_experts,
        top_k=router.top_k,
        renormalize=bool(getattr(router, "norm_topk_prob", True)),
        **extra,
        **kwargs,
    )
    return routing, router.weight


def _logits(kind: str, weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # SGLang's gates: ReplicatedLinear in the model dtype (qwen3/mixtral), fp32 Glm4MoeGate (glm4)
    return F.linear(h.float(), weight.float()) if kind == "sigmoid_bias" else F.linear(h, weight)


def _as_sets(weights: torch.Tensor, ids: torch.Tensor, e: int) -> list[dict[int, float]]:
    return [
        {i: w for w, i in zip(w_row, i_row, strict=True) if 0 <= i < e}
        for w_row, i_row in zip(weights.tolist(), ids.tolist(), strict=True)
    ]


def _assert_same(theirs, mine, e: int, scale: float) -> None:
    a = _as_sets(theirs[1], theirs[2], e)
    b = _as_sets(mine[0] * scale, mine[1], e)
    assert [sorted(x) for x in a] == [sorted(x) for x in b]
    for x, y in zip(a, b, strict=True):
        for k in x:
            assert abs(x[k] - y[k]) < 1e-5


def _scale(kind: str, router) -> float:
    return float(router.routed_scaling_factor) if kind == "sigmoid_bias" else 1.0


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("bias", [0.0, 0.7, -0.4])
def test_natural_routing_matches_zeda(family: str, bias: float) -> None:
    kind, router = _router(family)
    h = torch.randn(64, router.hidden_dim, generator=torch.Generator().manual_seed(3))
    router.zero_logit_bias = bias
    routing, weight = _sglang_routing(kind, router, zero_logit_bias=bias)
    with torch.no_grad():
        theirs = router(h)
        logits = _logits(kind, weight, h)
        mine = routing(
            hidden_states=h, gating_output=logits, topk=router.top_k, renormalize=routing.renormalize
        )
    assert mine[0].dtype == torch.float32 and mine[1].dtype == torch.int32
    assert mine[0].shape == mine[1].shape == (64, router.top_k)
    zero_slots = theirs[2] >= router.num_experts
    if bias >= 0:
        assert bool(zero_slots.any()), "test needs some zero slots"
    # every zero slot is expert id -1 with weight 0, and only those
    assert torch.equal(mine[1] == DROPPED, zero_slots)
    assert bool((mine[0][mine[1] == DROPPED] == 0).all())
    _assert_same(theirs, mine, router.num_experts, _scale(kind, router))
    if kind == "softmax" and bool(zero_slots.any()):
        # renormalised over the k chosen slots first, then dropped: kept weights sum below 1
        sums = mine[0].sum(-1)
        assert bool((sums[zero_slots.any(-1)] < 1 - 1e-4).all()) and bool((sums <= 1 + 1e-5).all())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.75])
def test_forced_share_matches_zeda_teacher_routing(family: str, share: float) -> None:
    kind, router = _router(family)
    h = torch.randn(37, router.hidden_dim, generator=torch.Generator().manual_seed(4))
    router.zero_experts_enabled = False
    router.forced_zero_share = share
    routing, weight = _sglang_routing(kind, router, forced_share=share)
    with torch.no_grad():
        theirs = router(h)
        mine = routing(h, _logits(kind, weight, h), router.top_k, routing.renormalize)
    _assert_same(theirs, mine, router.num_experts, _scale(kind, router))
    assert int((mine[1] == DROPPED).sum()) == int(share * h.shape[0] * router.top_k + 1e-9)


def test_kernels_that_do_not_skip_get_expert_zero_with_weight_zero() -> None:
    kind, router = _router("qwen3_moe")
    h = torch.randn(32, router.hidden_dim, generator=torch.Generator().manual_seed(6))
    skip, weight = _sglang_routing(kind, router, zero_logit_bias=0.7)
    keep, _ = _sglang_routing(kind, router, zero_logit_bias=0.7, kernel_skips_dropped=False)
    with torch.no_grad():
        w1, i1 = skip(h, F.linear(h, weight), router.top_k, True)
        w2, i2 = keep(h, F.linear(h, weight), router.top_k, True)
    dropped = i1 == DROPPED
    assert bool(dropped.any())
    assert torch.equal(w1, w2) and bool((i2 >= 0).all())
    assert bool((i2[dropped] == 0).all()) and torch.equal(i2[~dropped], i1[~dropped])


def test_mismatched_calls_are_refused() -> None:
    kind, router = _router("mixtral")
    routing, weight = _sglang_routing(kind, router)
    h = torch.randn(4, router.hidden_dim)
    with pytest.raises(ValueError, match="fused shared-expert slots are not supported"):
        routing(h, F.linear(h, weight), router.top_k + 1, True)
    with pytest.raises(ValueError, match=r"expected E \+ Z"):
        routing(h, F.linear(h, weight)[:, : router.num_experts], router.top_k, True)
    with pytest.raises(ValueError, match="need a gate with e_score_correction_bias"):
        ZedaRouting(kind="sigmoid_bias", num_experts=8, num_zero_experts=4, top_k=2, renormalize=True)


_CONFIG_PROBE = """
import json, sys
import zeda_sglang
from transformers import AutoConfig
zeda_sglang.register()
out = {}
for path in sys.argv[1:]:
    try:
        c = AutoConfig.from_pretrained(path)
        out[path] = [type(c).__name__, c.zeda["num_zero_experts"]]
    except ValueError as err:
        out[path] = ["refused", str(err)]
print(json.dumps(out))
"""


def test_sglang_config_parser_reads_exports_and_refuses_other_families(tmp_path: Path) -> None:
    paths = {}
    for family in ("qwen3_moe", "glm4_moe", "mixtral", "qwen2_moe"):
        model = tiny_model(family)
        zeda.inject_zero_experts(model, seed=0)
        paths[family] = str(tmp_path / family)
        zeda.export(model, paths[family])
    # a fresh process: registering zeda_sglang's config classes must not touch zeda's own here
    proc = subprocess.run(
        [sys.executable, "-c", _CONFIG_PROBE, *paths.values()],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got[paths["qwen3_moe"]][0] == "ZedaQwen3MoeConfig"
    assert got[paths["glm4_moe"]][0] == "ZedaGlm4MoeConfig"
    assert got[paths["mixtral"]][0] == "ZedaMixtralConfig"
    assert all(got[paths[f]][1] > 0 for f in ("qwen3_moe", "glm4_moe", "mixtral"))
    assert got[paths["qwen2_moe"]] == [
        "refused",
        "zeda_sglang: zeda family 'qwen2_moe' (model_type 'zeda_qwen2_moe') is not supported by the "
        "SGLang models; supported families: glm4_moe, mixtral, qwen3_moe",
    ]


def test_folded_scaling_matches_zeda_weights_with_the_factor() -> None:
    """Where SGLang expects the factor in the top-k weights, the routing folds it in (glm4_moe)."""
    kind, router = _router("glm4_moe")
    h = torch.randn(32, router.hidden_dim, generator=torch.Generator().manual_seed(8))
    cfg = SimpleNamespace(apply_routed_scaling_factor_on_output=True, routed_scaling_factor=2.5)
    router.zero_logit_bias = 0.3
    routing, weight = _sglang_routing(
        kind, router, zero_logit_bias=0.3, routed_scaling_factor=folded_scaling(cfg)
    )
    with torch.no_grad():
        theirs = router(h)
        mine = routing(h, _logits(kind, weight, h), router.top_k, routing.renormalize)
    _assert_same(theirs, mine, router.num_experts, 1.0)
    assert (
        folded_scaling(
            SimpleNamespace(apply_routed_scaling_factor_on_output=False, routed_scaling_factor=2.5)
        )
        == 1.0
    )


# SGLang cannot be installed here: the release-dependent names are read through zeda_sglang.compat,
# exercised with plain objects carrying the attributes each SGLang release spells differently.
def test_compat_reads_either_spelling_of_fused_shared_slots() -> None:
    assert shared_topk_slots(SimpleNamespace(num_shared_topk_slots=1)) == 1
    assert shared_topk_slots(SimpleNamespace(num_fused_shared_experts=2)) == 2
    assert shared_topk_slots(SimpleNamespace()) == 0


class _Backend(Enum):
    TRITON = "triton"
    FLASHINFER_TRTLLM = "flashinfer_trtllm"
    TRITON_KERNEL = "triton_kernel"


def test_backends_that_route_in_their_kernel_are_refused_in_one_line() -> None:
    for ok in (None, "auto", "triton", _Backend.TRITON, "flashinfer_cutlass"):
        check_runner_backend(ok)
    for bad in ("flashinfer_trtllm", "flashinfer_mxfp4", _Backend.FLASHINFER_TRTLLM, _Backend.TRITON_KERNEL):
        with pytest.raises(
            ValueError, match=r"^zeda_sglang: --moe-runner-backend \S+ routes inside its kernel"
        ) as err:
            check_runner_backend(bad)
        assert "\n" not in str(err.value)


def test_install_reads_release_dependent_names_through_compat() -> None:
    """install.py builds its TopK with the scaling flag off and the standard output format, and
    touches ``bind_runner_backend`` only where it exists."""
    tree = ast.parse((REPO / "zeda_sglang" / "install.py").read_text())
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not attrs & {"num_shared_topk_slots", "num_fused_shared_experts"}
    (topk_call,) = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "TopK"
    ]
    kwargs = {k.arg: k.value for k in topk_call.keywords}
    assert isinstance(kwargs["apply_routed_scaling_factor_on_output"], ast.Constant)
    assert kwargs["apply_routed_scaling_factor_on_output"].value is False
    assert any(k.arg is None for k in topk_call.keywords)  # **standard: the output format
    guarded = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.If)
        and "hasattr" in ast.unparse(n.test)
        and "bind_runner_backend" in ast.unparse(n.test)
    ]
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "bind_runner_backend"]
    assert guarded and all(any(c in ast.walk(g) for g in guarded) for c in calls)
    assert supports_kwarg(lambda a, *, output_format=None: a, "output_format")
    assert not supports_kwarg(lambda a: a, "output_format")
