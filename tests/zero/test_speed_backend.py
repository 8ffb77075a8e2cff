"""zeda's experts backends equal stock eager on injected models, work under torch.compile, and the
speed benchmark runs end to end (tiny shapes; speed itself is never asserted here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import DECORATED_FAMILIES

import zeda
from zeda.tiny import tiny_model
from zeda.zero import experts as zx
from zeda.zero.inject import set_experts_backend
from zeda.zero.routing import router_settings

ROOT = Path(__file__).resolve().parents[2]


def _eager(experts: torch.nn.Module):
    """The family's stock eager experts forward (what ``@use_experts_implementation`` wraps)."""
    return type(experts).forward.__wrapped__


def _injected(family: str) -> torch.nn.Module:
    model = tiny_model(family)
    zeda.inject_zero_experts(model)
    return model


def _routed(model: torch.nn.Module, dtype: torch.dtype, share: float, tokens: int = 24):
    layer = zeda.find_moe_layers(model)[0]
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(dtype)
    # A large negative zero-logit bias keeps the router's own picks off the zero experts, so the
    # forced share is exact.
    with torch.no_grad(), router_settings(model, forced_zero_share=share, zero_logit_bias=-1e4):
        _, w, idx = layer.route(x)
    e = layer.router.num_experts
    assert int((idx >= e).sum()) == int(share * idx.numel())
    return layer, x, idx, w


@pytest.mark.parametrize("family", DECORATED_FAMILIES)
def test_zeda_backends_equal_eager(family):
    """Both zeda strategies equal stock eager at zero shares 0 and 0.5 (sentinel slots skipped).

    Stock eager of a family that cannot skip the sentinel (gpt-oss) runs with zero slots pointed
    at expert 0 with weight 0, which adds exact zeros.
    """
    model = _injected(family)
    for dtype, share in [(d, s) for d in (torch.float32, torch.bfloat16) for s in (0.0, 0.5)]:
        model.to(dtype)
        layer, x, idx, w = _routed(model, dtype, share)
        e = layer.router.num_experts
        spec = zeda.get_spec(family)
        ref_idx = idx if spec.eager_skips_sentinel else idx.masked_fill(idx >= e, 0)
        with torch.no_grad():
            ref = _eager(layer.experts)(layer.experts, x, ref_idx, w)
            loop = zx.zeda_loop_forward(layer.experts, x, idx, w)
            grouped = zx.zeda_grouped_forward(layer.experts, x, idx, w)
            auto = zx.zeda_experts_forward(layer.experts, x, idx, w)
        assert torch.isfinite(ref).all()
        if dtype == torch.float32 and spec.eager_skips_sentinel:
            assert torch.equal(loop, ref), f"{family} share={share}"  # same rows, same order
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(loop, ref, **tol, msg=f"loop {family} {dtype} {share}")
        torch.testing.assert_close(grouped, ref, **tol, msg=f"grouped {family} {dtype} {share}")
        # CPU: the loop in fp32 (bit-exact with eager), compaction + grouped_mm for bf16 inference.
        assert torch.equal(auto, loop if dtype == torch.float32 else grouped)


def test_sentinel_rows_never_read():
    """Garbage (NaN) in every row a sentinel slot could alias never reaches the output."""
    layer, x, idx, w = _routed(_injected("qwen3_moe"), torch.float32, 0.5)
    e = layer.router.num_experts
    zero_tokens = (idx >= e).all(-1)
    x_bad = x.clone()
    # Tokens whose every slot is a zero expert may hold NaN: no expert may read them.
    idx2 = idx.clone()
    idx2[:4] = e
    x_bad[:4] = float("nan")
    w2 = w.masked_fill(idx2 >= e, 0)
    for fn in (zx.zeda_loop_forward, zx.zeda_grouped_forward):
        with torch.no_grad():
            out = fn(layer.experts, x_bad, idx2, w2)
        assert torch.isfinite(out).all(), fn.__name__
        assert torch.equal(out[:4], torch.zeros_like(out[:4]))
    assert zero_tokens.dtype == torch.bool


@pytest.mark.parametrize("backend", ["zeda", "zeda_grouped"])
def test_torch_compile_matches_eager(backend):
    """A compiled MoE block of an injected tiny model equals it run eagerly, for new shapes and
    routings too (dynamo + AOT autograd; inductor's C++ build is too slow for a unit test)."""
    torch._dynamo.reset()
    model = _injected("qwen3_moe")
    set_experts_backend(model, backend)
    block = zeda.find_moe_layers(model)[0].block
    compiled = torch.compile(block, backend="aot_eager")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), router_settings(model, forced_zero_share=0.5):
        for shape in [(2, 12, 32), (1, 7, 32)]:
            x = torch.randn(shape, generator=gen)
            torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-6)


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "evals" / "speed" / "bench_speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_speed"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_smoke_runs_end_to_end(tmp_path):
    bench = _bench_module()
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    assert bench.main(["--smoke", "--dtypes", "fp32", "--out", str(out), "--markdown", str(md)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["phase"] for r in rows} == {"prefill", "decode"}
    half = [r for r in rows if r["variant"] == "zeda@0.5"]
    assert half and all(r["zero_share"] == pytest.approx(0.5) for r in half)
    for r in half:
        assert r["speedup"] > 0 and r["ideal"] >= 1.0 and 0.0 <= r["f_experts"] <= 1.0
        if r["phase"] == "decode":
            assert r["distinct_experts"] <= r["distinct_experts_original"]
    assert "not measured" in report["meta"]["gpu"] or torch.cuda.is_available()
    assert "| zeda@0.5 |" in md.read_text()


def test_benchmark_smoke_reference_checkpoint(tmp_path):
    """``--model DIR``: a saved checkpoint, converted in memory, real routing, generate tokens/s."""
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "ref")
    bench = _bench_module()
    out = tmp_path / "r.json"
    argv = ["--smoke", "--dtypes", "fp32", "--model", str(tmp_path / "ref"), "--out", str(out)]
    assert bench.main([*argv, "--markdown", str(tmp_path / "r.md")]) == 0
    rows = json.loads(out.read_text())["rows"]
    gen = [r for r in rows if r["phase"] == "reference-generate" and r["variant"] == "zeda@real"]
    assert gen and gen[0]["tokens_per_s"] > 0 and 0.0 < gen[0]["zero_share"] < 1.0
