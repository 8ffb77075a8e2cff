"""zeda.evaluation.flops: exact parameter counts against meta-device models, published figures, FLOP scaling."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from zeda.errors import ZedaError
from zeda.evaluation.flops import (
    COMPONENTS,
    FlopReport,
    builtin_config_names,
    flop_report,
    load_config,
    measured_report,
)
from zeda.families import get_spec
from zeda.tiny import TINY, tiny_config

FAMILIES = sorted(TINY)

# Family-feature variants on top of the tiny configs: every code path of the analytic count.
VARIANTS: list[tuple[str, dict]] = [
    ("qwen3_moe", {"attention_bias": True, "tie_word_embeddings": True}),
    ("qwen3_moe", {"num_hidden_layers": 4, "mlp_only_layers": [0], "decoder_sparse_step": 2}),
    ("qwen2_moe", {"qkv_bias": False, "num_hidden_layers": 3, "mlp_only_layers": [1]}),
    ("olmoe", {"num_key_value_heads": 4}),
    ("mixtral", {"head_dim": 16}),
    ("deepseek_v3", {"q_lora_rank": None}),
    ("deepseek_v3", {"attention_bias": True, "n_shared_experts": 2}),
    ("glm4_moe", {"use_qk_norm": True, "attention_bias": True}),
    ("glm4_moe_lite", {"q_lora_rank": None, "mlp_layer_types": ["dense", "dense", "sparse"]}),
    ("gpt_oss", {"attention_bias": False}),
    ("deepseek_v2", {"q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1}),
    ("minimax_m2", {"num_key_value_heads": 4, "head_dim": 16}),
    ("qwen3_5_moe_text", {"layer_types": ["full_attention", "linear_attention"], "attention_bias": True}),
    ("llama4_text", {"moe_layers": [0, 1, 2], "attention_bias": True, "tie_word_embeddings": True}),
]

# Published figures: (total, active, source). Totals must land within 3 %, actives within 5 %.
PUBLISHED: dict[str, tuple[float, float, str]] = {
    "qwen3-30b-a3b": (30.5e9, 3.3e9, "Qwen3-30B-A3B model card: 30.5B total, 3.3B activated"),
    "qwen1.5-moe-a2.7b": (14.3e9, 2.7e9, "Qwen1.5-MoE-A2.7B blog/model card: 14.3B total, 2.7B activated"),
    "mixtral-8x7b": (46.7e9, 12.9e9, "Mixtral of Experts paper/blog: 46.7B total, 12.9B active"),
    "olmoe-1b-7b": (6.9e9, 1.3e9, "OLMoE paper: 6.9B total, 1.3B active"),
    "deepseek-v3": (671e9, 37e9, "DeepSeek-V3 technical report: 671B total (MTP excluded), 37B activated"),
    "gpt-oss-20b": (20.91e9, 3.61e9, "gpt-oss model card Table 1: 20.91B total, 3.61B active"),
    "deepseek-v2": (236e9, 21e9, "DeepSeek-V2 model card/paper: 236B total, 21B activated"),
    "minimax-m2": (230e9, 10e9, "MiniMax-M2 model card: 230B total, 10B active (non-embedding)"),
    # Llama 4 cards count the vision encoder in the total (Scout: 109.68B with it); zeda counts the
    # text model that transformers' causal LM builds.
    "llama-4-scout-17b-16e": (109e9, 17e9, "Llama 4 model card: Scout 17B active, 109B total"),
    "llama-4-maverick-17b-128e": (400e9, 17e9, "Llama 4 model card: Maverick 17B active, 400B total"),
    "qwen3.5-397b-a17b": (397e9, 17e9, "Qwen3.5-397B-A17B model card: 397B total, 17B activated"),
    # No exact active count is published for GLM-4.7-Flash: the Z.ai model card calls it a
    # "30B-A3B MoE model" and NVIDIA's Megatron-Bridge docs say "about 30B total parameters and 3B
    # active". "A3B" is a rounded class label; see test_glm_4_7_flash_against_its_label.
    "glm-4.7-flash": (30e9, 3e9, "zai-org/GLM-4.7-Flash model card: 30B-A3B"),
}


def meta_model(config) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def params_by_role(model: torch.nn.Module, config) -> dict[str, int]:
    """Split a real model's parameters by name, using only the family spec's attribute names."""
    spec = get_spec(config.model_type)
    out = {"embedding": 0, "routed_experts": 0, "router": 0, "lm_head": 0}
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            out["embedding"] += p.numel()
        elif name.startswith("lm_head."):
            out["lm_head"] += p.numel()
        elif f".{spec.moe_block_attr}.{spec.experts_attr}." in name:
            out["routed_experts"] += p.numel()
        elif f".{spec.moe_block_attr}.{spec.router_attr}." in name:
            out["router"] += p.numel()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_total_params_exact(family: str) -> None:
    config = tiny_config(family)
    model = meta_model(config)
    report = flop_report(config)
    assert report.total_params == numel(model)
    by_role = params_by_role(model, config)
    for role, count in by_role.items():
        assert report.params_by_component[role] == count, role
    assert sum(report.params_by_component.values()) == report.total_params


@pytest.mark.parametrize(
    ("family", "overrides"), VARIANTS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(VARIANTS)]
)
def test_variant_total_params_exact(family: str, overrides: dict) -> None:
    config = tiny_config(family, **overrides)
    assert flop_report(config).total_params == numel(meta_model(config))


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_expert_router_rows_counted(family: str) -> None:
    """An injected (``zeda_<family>``) model built on meta has exactly Z router rows more per MoE layer."""
    from zeda.zero import modeling

    z = 3
    base = tiny_config(family)
    cfg_cls, _ = modeling.zeda_classes(family)
    injected = cfg_cls(**{k: v for k, v in base.to_dict().items() if k != "model_type"})
    injected.zeda = {"num_zero_experts": z}
    spec = get_spec(family)
    n_moe = len(spec.moe_layer_indices(base))
    extra = n_moe * z * (base.hidden_size + spec.router_bias)

    report = flop_report(injected)  # Z read from config.zeda
    assert report.num_zero_experts == z
    assert report.total_params == numel(meta_model(injected))
    assert report.total_params == report.native_total_params + extra
    assert report.params_by_component["router"] == n_moe * (spec.num_experts(base) + z) * (
        base.hidden_size + spec.router_bias
    )
    # The same from a native config with num_zero_experts given explicitly.
    assert flop_report(base, num_zero_experts=z).total_params == report.total_params
    # Router FLOPs grow with Z, so at s = 0 the injected model costs slightly more.
    assert report.flops_by_component["router"] == 2 * n_moe * (spec.num_experts(base) + z) * base.hidden_size
    assert report.total_flop_reduction < 0


def test_builtin_names() -> None:
    assert builtin_config_names() == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_builtin_config_builds_and_counts_exactly(name: str) -> None:
    config = load_config(name)
    assert flop_report(config).total_params == numel(meta_model(config))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_builtin_matches_published(name: str) -> None:
    total, active, source = PUBLISHED[name]
    report = flop_report(name)
    assert abs(report.total_params / total - 1) < 0.03, (name, report.total_params, source)
    if name == "glm-4.7-flash":
        return  # see test_glm_4_7_flash_against_its_label
    # active_params counts as each family's card does (the gpt-oss card leaves the embedding out).
    assert abs(report.active_params / active - 1) < 0.05, (name, report.active_params, source)


@pytest.mark.parametrize(
    ("name", "excluded"),
    [
        ("qwen3-30b-a3b", ()),
        ("deepseek-v3", ()),
        ("gpt-oss-20b", ("embedding",)),
        ("glm-4.7-flash", ("embedding", "lm_head")),
        ("minimax-m2", ("embedding", "lm_head")),
        ("llama-4-scout-17b-16e", ()),
        ("deepseek-v2", ()),
        ("qwen3.5-397b-a17b", ()),
    ],
)
def test_active_params_follow_the_family_card(name: str, excluded: tuple[str, ...]) -> None:
    for s in (0.0, 0.5):
        r = flop_report(name, zero_share=s)
        by = r.active_params_by_component
        assert r.active_params_all == sum(by.values())
        assert r.active_params == r.active_params_all - sum(by[c] for c in excluded)
        assert r.active_params_excl_embeddings == r.active_params_all - by["embedding"]
        assert all(c in r.active_params_convention for c in excluded)
    # What `zeda flops --model-config gpt-oss-20b` prints: the card's 3.61B, not 4.19B.
    if name == "gpt-oss-20b":
        assert "| Active params | 3.61B | 3.61B |" in flop_report(name)._repr_markdown_()


def test_glm_4_7_flash_against_its_label() -> None:
    """GLM-4.7-Flash ("30B-A3B"): 29.94B total; 3.90B active with embedding and lm_head, of which
    3.26B are non-embedding (the label's rounding; no exact active figure is published). The exact counts are pinned, and checked
    against the meta model above."""
    report = flop_report("glm-4.7-flash")
    assert report.total_params == 29_943_390_976
    non_embedding = (
        report.active_params_all
        - report.params_by_component["embedding"]
        - report.params_by_component["lm_head"]
    )
    assert round(non_embedding / 1e9) == 3
    assert abs(non_embedding / 3e9 - 1) < 0.10
    assert report.active_params == non_embedding  # Z.ai counts active parameters without either table
    assert report.active_params_all == pytest.approx(3.90e9, rel=0.01)


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_flops_linear_in_zero_share(family: str) -> None:
    config = tiny_config(family)
    native = flop_report(config)
    for s in (0.0, 0.25, 0.5, 0.75, 1.0):
        report = flop_report(config, zero_share=s, num_zero_experts=4)
        assert report.routed_expert_flops_per_token == pytest.approx(
            (1 - s) * native.routed_expert_flops_per_token
        )
        assert report.routed_flop_reduction == pytest.approx(s)
        assert report.native_flops_per_token == native.flops_per_token
        for c in COMPONENTS:
            if c not in ("routed_experts", "router"):
                assert report.flops_by_component[c] == native.flops_by_component[c], c
        assert report.flops_per_token == pytest.approx(sum(report.flops_by_component.values()))
        if s > 0:
            # attention, lm_head and the rest do not shrink: the total falls by less than the routed part
            assert 0 < report.total_flop_reduction < report.routed_flop_reduction
        assert report.active_params <= native.active_params + report.total_params - native.total_params


def test_routed_flops_formula_qwen3() -> None:
    report = flop_report("qwen3-30b-a3b", zero_share=0.5)
    per_slot = 2 * 3 * 2048 * 768
    assert report.native_routed_expert_flops_per_token == 48 * 8 * per_slot
    assert report.routed_expert_flops_per_token == 48 * 8 * 0.5 * per_slot
    assert report.flops_by_component["lm_head"] == 2 * 2048 * 151936
    assert report.flops_by_component["embedding"] == 0


@pytest.mark.parametrize(
    "name", ["qwen3-30b-a3b", "mixtral-8x7b", "olmoe-1b-7b", "deepseek-v3", "glm-4.7-flash"]
)
def test_flops_are_twice_the_active_matmul_weights(name: str) -> None:
    """Bias-free families: FLOPs = 2 × (active params − embedding − norms) at any zero share."""
    for s in (0.0, 0.3):
        r = flop_report(name, zero_share=s)
        matmul = (
            r.active_params_all
            - r.active_params_by_component["embedding"]
            - r.active_params_by_component["norms"]
        )
        assert r.flops_per_token == pytest.approx(2 * matmul, rel=1e-9)


def test_attention_scores_term() -> None:
    ctx = 1000
    r = flop_report("mixtral-8x7b", context_len=ctx)
    assert r.flops_by_component["attention_scores"] == 32 * 2 * 32 * (128 + 128) * ctx
    assert flop_report("mixtral-8x7b").flops_by_component["attention_scores"] == 0
    # gpt-oss: half the layers use a 128-token sliding window
    g = flop_report("gpt-oss-20b", context_len=ctx)
    assert g.flops_by_component["attention_scores"] == 2 * 64 * 128 * (12 * ctx + 12 * 128)
    # DeepSeek MLA: qk head 128 + 64, v head 128
    d = flop_report("deepseek-v3", context_len=ctx)
    assert d.flops_by_component["attention_scores"] == 61 * 2 * 128 * (192 + 128) * ctx
    # The score term is unaffected by zero share, so it dilutes the total reduction
    assert (
        flop_report("mixtral-8x7b", zero_share=0.5, context_len=ctx).total_flop_reduction
        < flop_report("mixtral-8x7b", zero_share=0.5).total_flop_reduction
    )


def test_measured_report_weights_layers() -> None:
    config = tiny_config("deepseek_v3")  # layer 0 dense, layers 1 and 2 MoE
    measured = measured_report(config, [0.2, 0.6])
    assert measured.per_layer_zero_share == [0.2, 0.6]
    assert measured.zero_share == pytest.approx(0.4)
    uniform = flop_report(config, zero_share=0.4)
    assert measured.flops_per_token == pytest.approx(uniform.flops_per_token)
    assert measured.routed_expert_flops_per_token == pytest.approx(uniform.routed_expert_flops_per_token)
    by_index = measured_report(config, {1: 0.2, 2: 0.6})
    assert by_index.flops_per_token == pytest.approx(measured.flops_per_token)
    with pytest.raises(ZedaError, match="MoE layers"):
        measured_report(config, [0.1, 0.2, 0.3])
    with pytest.raises(ZedaError, match="MoE layers"):
        measured_report(config, {0: 0.1, 1: 0.2})
    with pytest.raises(ZedaError, match=r"outside \[0, 1\]"):
        measured_report(config, [0.1, 1.5])


def test_bad_name_is_one_line_error() -> None:
    with pytest.raises(ZedaError) as err:
        flop_report("qwen9-moe-huge")
    message = str(err.value)
    assert "\n" not in message
    for name in builtin_config_names():
        assert name in message
    assert "config.json" in message and "directory" in message
    with pytest.raises(ZedaError, match="zero_share"):
        flop_report("olmoe-1b-7b", zero_share=1.2)
    with pytest.raises(ZedaError, match="unsupported model family"):
        load_config({"model_type": "llama"})


def test_load_config_from_path_dir_and_dict(tmp_path) -> None:
    config = tiny_config("qwen2_moe")
    config.save_pretrained(tmp_path)
    from_dir = flop_report(tmp_path)
    from_file = flop_report(tmp_path / "config.json")
    from_dict = flop_report(json.loads((tmp_path / "config.json").read_text()))
    assert (
        from_dir.total_params
        == from_file.total_params
        == from_dict.total_params
        == flop_report(config).total_params
    )
    assert from_dir.name == tmp_path.name
    assert type(load_config("Qwen3-30B-A3B")).__name__ == "Qwen3MoeConfig"


def test_report_serialisation_and_rendering() -> None:
    report = flop_report("qwen1.5-moe-a2.7b", zero_share=0.3, num_zero_experts=30)
    assert isinstance(report, FlopReport)
    data = json.loads(json.dumps(report.to_dict()))
    for key in ("total_params", "active_params", "flops_per_token", "routed_expert_flops_per_token"):
        assert key in data
    assert data["zero_share"] == 0.3
    assert math.isclose(data["relative_flops"], 1 - report.total_flop_reduction)
    assert report.flops_by_component["shared_experts"] == 24 * 2 * (3 * 2048 * 5632 + 2048)
    md, page = report._repr_markdown_(), report._repr_html_()
    assert "| Total FLOP reduction |" in md and "shared_experts" in md
    assert page.startswith("<p><b>") and "<table>" in page
