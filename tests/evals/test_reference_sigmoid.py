"""The committed sigmoid reference model (evals/reference_sigmoid/model) is what its card says.

It loads with stock transformers as ``glm4_moe``; routing is sigmoid + a learned, non-trivial
``e_score_correction_bias`` + group-limited (``n_group`` > 1) with a shared expert; the card's
figures match the weights; zeda injects it and its teacher mode is bit-exact against the
original logits. A missing model fails these tests (it is committed with them), never skips them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeForCausalLM, Glm4MoeTopkRouter

import zeda
from zeda.config import load_recipe
from zeda.zero.inject import find_moe_layers, teacher_mode

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "evals" / "reference_sigmoid" / "model"
TEST_TEXT = ROOT / "evals" / "reference" / "data" / "test.jsonl"


@pytest.fixture(scope="module")
def results() -> dict:
    path = MODEL / "training_results.json"
    assert path.is_file(), (
        f"{path} missing: run python -m evals.zoo.train reference_sigmoid --finalize and commit it"
    )
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def model(results) -> Glm4MoeForCausalLM:
    m = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    m.set_experts_implementation("eager")
    return m.eval()


@pytest.fixture(scope="module")
def tokens(results) -> torch.Tensor:
    """The first ``check.tokens`` tokens of the test split, documents joined by EOS. ``(n,)``."""
    tok = AutoTokenizer.from_pretrained(MODEL)
    n = results["check"]["tokens"]
    ids: list[int] = []
    with open(TEST_TEXT, encoding="utf-8") as f:
        for line in f:
            ids += tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
            if len(ids) >= n:
                break
    return torch.tensor(ids[:n])


def _routers(model) -> list[Glm4MoeTopkRouter]:
    return [m for m in model.modules() if isinstance(m, Glm4MoeTopkRouter)]


@pytest.fixture(scope="module")
def router_inputs(model, tokens) -> list[torch.Tensor]:
    """Each router's input hidden states on the first 512 test tokens. ``[(512, hidden)] * layers``."""
    seen: list[torch.Tensor] = []
    hooks = [
        r.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach())) for r in _routers(model)
    ]
    try:
        with torch.no_grad():
            model(tokens[:512].view(2, 256).long())
    finally:
        for h in hooks:
            h.remove()
    return [x.reshape(-1, x.shape[-1]) for x in seen]


def test_architecture_is_the_cards(model, results):
    c = model.config
    assert type(model) is Glm4MoeForCausalLM and c.model_type == results["model_type"] == "glm4_moe"
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (32, 4, 4, 2)
    assert c.n_shared_experts == 1 and c.first_k_dense_replace == 0 and c.norm_topk_prob
    assert c.routed_scaling_factor == 2.5 and c.vocab_size == 8192 and c.hidden_size == 256
    assert sum(p.numel() for p in model.parameters()) == results["params"]
    layers = model.model.layers
    assert len(layers) == 4 and len(_routers(model)) == 4
    for layer in layers:
        shared = layer.mlp.shared_experts  # a real, trained shared expert in every layer
        assert shared.gate_proj.weight.shape == (128, 256) and shared.down_proj.weight.abs().sum() > 0
    card = (MODEL / "README.md").read_text()
    assert f"| test | {results['test_ppl']:.2f} |" in card and f"{results['steps']} of a" in card
    assert (MODEL / "model.safetensors").stat().st_size < 40e6  # bf16, small enough for git
    with safe_open(MODEL / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        fp32 = {k for k in keys if f.get_slice(k).get_dtype() == "F32"}
        assert fp32 == {k for k in keys if k.endswith(("mlp.gate.weight", "e_score_correction_bias"))}
        assert len(fp32) == 8 and all(f.get_slice(k).get_dtype() == "BF16" for k in set(keys) - fp32)


def test_routing_is_sigmoid_with_bias_and_group_limited(model, router_inputs):
    """The router's choice and weights equal an independent DeepSeek-V3 reference on real tokens,
    and both the group limit and the learned bias change the choice of some tokens."""
    c = model.config
    per_group = c.n_routed_experts // c.n_group
    for router, x in zip(_routers(model), router_inputs, strict=True):
        with torch.no_grad():
            _, weights, idx = router(x)
            scores = torch.sigmoid(x @ router.weight.T)  # (N, E)
            choice = scores + router.e_score_correction_bias
            groups = choice.view(-1, c.n_group, per_group).topk(2, -1).values.sum(-1)  # (N, G)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(
                1, groups.topk(c.topk_group, -1).indices, True
            )
            masked = choice.masked_fill(~keep.repeat_interleave(per_group, 1), -math.inf)
            want = masked.topk(c.num_experts_per_tok, -1).indices
            ungrouped = choice.topk(c.num_experts_per_tok, -1).indices
            unbiased = (
                scores.masked_fill(~keep.repeat_interleave(per_group, 1), -math.inf).topk(4, -1).indices
            )
        assert torch.equal(idx.sort(-1).values, want.sort(-1).values)
        w = scores.gather(1, idx)
        torch.testing.assert_close(weights, w / w.sum(-1, keepdim=True) * c.routed_scaling_factor)
        n = x.shape[0]
        grouped_changed = (idx.sort(-1).values != ungrouped.sort(-1).values).any(-1).sum()
        bias_changed = (idx.sort(-1).values != unbiased.sort(-1).values).any(-1).sum()
        assert grouped_changed >= 0.01 * n, "the group limit never matters: n_group is decorative"
        assert bias_changed >= 0.05 * n, "the correction bias barely changes routing"
        assert len({int(g) for g in (idx // per_group).unique()}) == c.n_group  # every group is used


def test_learned_bias_is_the_cards_and_not_trivial(model, results):
    for router, card in zip(_routers(model), results["correction_bias"], strict=True):
        b = router.e_score_correction_bias
        assert b.dtype == torch.float32 and b.shape == (32,)
        assert float(b.min()) == pytest.approx(card["min"], abs=1e-6)
        assert float(b.max()) == pytest.approx(card["max"], abs=1e-6)
        assert float(b.std()) > 0.02 and float(b.max() - b.min()) > 0.1


def test_perplexity_matches_the_card(model, tokens, results):
    """The card's check figure, recomputed from the committed weights and data, with and without bias."""

    def ppl() -> float:
        ids = tokens.view(-1, 256).long()
        with torch.no_grad():
            return math.exp(float(model(ids, labels=ids).loss))

    check = results["check"]
    assert ppl() == pytest.approx(check["ppl"], rel=1e-4)
    saved = [r.e_score_correction_bias.clone() for r in _routers(model)]
    try:
        with torch.no_grad():
            for r in _routers(model):
                r.e_score_correction_bias.zero_()
        assert ppl() == pytest.approx(check["ppl_no_bias"], rel=1e-4)
    finally:
        with torch.no_grad():
            for r, b in zip(_routers(model), saved, strict=True):
                r.e_score_correction_bias.copy_(b)
    assert results["test_ppl"] < results["unigram_test_ppl"] / 3  # it learned language, not unigrams


def test_zeda_injects_it_and_teacher_mode_is_bit_exact(results, tokens):
    original = zeda.load(MODEL, experts_implementation="eager")
    injected = zeda.load(MODEL)
    report = zeda.inject_zero_experts(injected)
    assert (report.num_experts, report.num_zero_experts, report.top_k) == (32, 16, 4)
    for lo, li in zip(find_moe_layers(original), find_moe_layers(injected), strict=True):
        e = lo.router.e_score_correction_bias
        assert torch.equal(li.router.e_score_correction_bias[:32], e) and li.router.weight.shape[0] == 48
    ids = tokens[:128].view(2, 64).long()
    with torch.no_grad():
        ref = original(ids).logits
        student = injected(ids).logits
        with teacher_mode(injected):
            teacher = injected(ids).logits
    assert torch.equal(teacher, ref)
    assert not torch.equal(student, ref)  # the zero experts are live outside teacher mode


def test_quickstart_recipe_points_at_it():
    cfg = load_recipe(ROOT / "recipes" / "reference_sigmoid" / "quickstart.yaml")
    assert (ROOT / cfg.model.name_or_path).resolve() == MODEL.resolve()
    assert (MODEL / "config.json").is_file()
