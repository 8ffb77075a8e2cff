"""One default per router kind: picked from the model's config.json, layered under the recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import zeda
from zeda.cli import main
from zeda.config import (
    _SECTIONS,
    RunConfig,
    apply_overrides,
    load_recipe,
    resolve_recipe,
    save_recipe,
    to_dict,
)
from zeda.defaults import FILES, VARIANTS, default_values, resolve
from zeda.families import all_specs
from zeda.recipe import merge
from zeda.tiny import tiny_model, tiny_tokenizer
from zeda_routing import KINDS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Saved tiny models of one softmax and one sigmoid + bias family (config.json is what counts)."""
    root = tmp_path_factory.mktemp("models")
    for family in ("qwen3_moe", "deepseek_v3"):
        zeda.atomic_save(tiny_model(family), root / family, tokenizer=tiny_tokenizer())
    return root


def _recipe(tmp_path: Path, model: Path, extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"model: {{name_or_path: {model}}}\n"
        "data: {train_file: train.jsonl, eval_file: validation.jsonl}\n"
        f"balance: {{target_zero_share: 0.5}}\n{extra}"
    )
    return path


def _get(cfg: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("kind", sorted(FILES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_default_maps_one_to_one_onto_the_recipe(kind, variant):
    """Each file and variant is a valid recipe layer (unknown keys and bad values fail here)."""
    values = default_values(kind, variant)
    layer: dict = {}
    for key, value in values.items():
        section, name = key.split(".")
        layer.setdefault(section, {})[name] = value
    cfg = OmegaConf.to_object(merge(OmegaConf.structured(RunConfig), layer, _SECTIONS)).validate()
    assert all(_get(cfg, k) == v for k, v in values.items())
    assert _get(cfg, "lora.full_experts") == (variant == "full_experts")


def test_every_router_kind_has_a_default():
    assert set(KINDS) <= set(FILES)  # a new kind of the routing core names its default here
    assert {s.router_kind for s in all_specs()} <= set(FILES)


def test_a_minimal_recipe_gets_its_router_kinds_default(models, tmp_path):
    for family, kind in (("qwen3_moe", "softmax"), ("deepseek_v3", "sigmoid_bias")):
        cfg, d = resolve_recipe(_recipe(tmp_path, models / family))
        assert (d.model_type, d.router_kind, d.variant) == (family, kind, "lora")
        want = default_values(kind, "lora")
        assert d.applied == want
        assert all(_get(cfg, k) == v for k, v in want.items())
        # What the recipe set stays; everything else is the dataclass default.
        assert cfg.balance.target_zero_share == 0.5 and cfg.data.train_file == "train.jsonl"
        plain = load_recipe(_recipe(tmp_path, models / family), router_defaults=False)
        keys = [f"{s}.{k}" for s, values in to_dict(plain).items() for k in values]
        assert [k for k in keys if _get(plain, k) != _get(cfg, k)] == [
            k for k in keys if k in want and _get(plain, k) != want[k]
        ]


def test_the_variant_follows_the_lora_keys_and_explicit_values_win(models, tmp_path):
    model = models / "qwen3_moe"
    full = default_values("softmax", "full_experts")
    for extra, overrides in (
        ("lora: {enabled: false}\n", []),
        ("lora: {full_experts: true, enabled: false}\n", []),
        ("", ["lora.enabled=false", "lora.full_experts=true"]),
    ):
        cfg, d = resolve_recipe(_recipe(tmp_path, model, extra), overrides)
        assert d.variant == "full_experts"
        assert all(_get(cfg, k) == v for k, v in full.items())
    # The recipe's own values win over the default, an override over both, even null.
    cfg = load_recipe(
        _recipe(tmp_path, model, "stage1: {lr: 1.0e-3}\ninject: {num_zero_experts: null}\n"),
        ["lora.r=4", "balance.per_layer=true"],
    )
    assert cfg.stage1.lr == 1e-3 and cfg.lora.r == 4 and cfg.balance.per_layer
    assert cfg.inject.num_zero_experts is None and cfg.inject.zero_ratio is None  # Z = E/2 as written
    assert cfg.stage1.kd == "forward_kl"  # not set by the recipe: the default's
    # An override of one of two exclusive keys clears the default's other one.
    cfg = load_recipe(_recipe(tmp_path, model), ["inject.num_zero_experts=3"])
    assert (cfg.inject.num_zero_experts, cfg.inject.zero_ratio) == (3, None)


def test_resolved_values_are_written_so_resume_and_export_read_them(models, tmp_path):
    cfg = load_recipe(_recipe(tmp_path, models / "deepseek_v3"))
    saved = save_recipe(cfg, tmp_path / "run" / "recipe.yaml")
    assert load_recipe(saved) == cfg == load_recipe(saved, router_defaults=False)


def test_zero_ratio_sets_z_from_e(models, tmp_path):
    cfg = load_recipe(_recipe(tmp_path, models / "qwen3_moe"))
    assert cfg.inject.zero_ratio == 1.0 and cfg.inject.resolve_num_zero(8) == 8
    assert apply_overrides(cfg, ["inject.zero_ratio=0.25"]).inject.resolve_num_zero(8) == 2
    with pytest.raises(zeda.ZedaError, match="not both"):
        apply_overrides(RunConfig(), ["inject.num_zero_experts=2", "inject.zero_ratio=1"])
    from zeda.distillation.student import inject_for_run

    model = tiny_model("qwen3_moe")
    report = inject_for_run(model, cfg)
    assert (report.num_experts, report.num_zero_experts) == (8, 8)


def test_no_readable_model_config_means_the_dataclass_defaults(tmp_path, caplog):
    path = _recipe(tmp_path, tmp_path / "missing")
    assert resolve(str(tmp_path / "missing"), {}) is None
    assert load_recipe(path) == load_recipe(path, router_defaults=False)


def test_shipped_minimal_recipe_and_zeda_validate_show_the_default(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["validate", "recipes/minimal.yaml"]) == 0
    out = capsys.readouterr().out
    assert "ok  recipes/minimal.yaml" in out and "softmax router (qwen3_moe), variant lora" in out
    assert "stage1.kd = 'forward_kl'" in out and "zeda/defaults/softmax.yaml" in out
