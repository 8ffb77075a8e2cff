"""Tests for zeda.config: schema, YAML recipes, overrides, validation and the shipped recipes."""

from __future__ import annotations

import ast
import dataclasses
import logging
import typing
from pathlib import Path

import pytest
import yaml

from zeda.config import (
    RESUMABLE_KEYS,
    BalanceConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    HardwareConfig,
    InjectConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    Stage1Config,
    Stage2Config,
    TrainConfig,
    apply_overrides,
    field_docs,
    from_dict,
    load_recipe,
    parse_overrides,
    recipe_differences,
    save_recipe,
    to_dict,
    valid_keys,
    validate_recipe,
)
from zeda.distillation.losses import equilibrium_zero_share, w_for_target
from zeda.errors import ZedaError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def _write(path: Path, data: object) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _err(fn, *args) -> str:
    with pytest.raises(ZedaError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    return msg


# ------------------------------------------------------------------------------------------
# Schema
# ------------------------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = RunConfig().validate()
    assert from_dict({}) == cfg
    assert cfg.model.name_or_path == "evals/reference/model" and cfg.model.dtype == "float32"
    assert cfg.inject.num_zero_experts is None and cfg.inject.resolve_num_zero(64) == 32
    assert cfg.lora.r == 8 and cfg.lora.alpha == 16 and cfg.lora.train_router
    assert cfg.balance.alpha == 0.1 and cfg.balance.w is None and cfg.balance.target_zero_share is None
    assert cfg.balance.resolve_w(64, 32) == 2.0
    assert cfg.stage1.mode == "text" and cfg.stage1.kd == "forward_kl" and cfg.stage1.lr == 2e-4
    assert not cfg.stage2.enabled and cfg.stage2.loss == "pg"
    assert cfg.eval.tasks == ["ref_perplexity"] and cfg.eval.zero_bias_sweep == []
    assert cfg.eval.baselines == ["keep_top_m", "top_p", "top_p_no_renorm", "threshold", "adaptive_k"]
    # list defaults are not shared between instances
    a, b = RunConfig(), RunConfig()
    a.eval.tasks.append("x")
    assert b.eval.tasks == ["ref_perplexity"]


def test_sections_live_next_to_their_code() -> None:
    homes = {
        InjectConfig: "zeda.zero.config",
        LoraConfig: "zeda.distillation.config",
        BalanceConfig: "zeda.distillation.config",
        DataConfig: "zeda.distillation.config",
        Stage1Config: "zeda.distillation.config",
        Stage2Config: "zeda.distillation.config",
        TrainConfig: "zeda.distillation.config",
        EvalConfig: "zeda.evaluation.config",
        ModelConfig: "zeda.config",
        ExportConfig: "zeda.config",
        HardwareConfig: "zeda.config",
    }
    for cls, module in homes.items():
        assert cls.__module__ == module, cls
    hints = typing.get_type_hints(RunConfig)
    assert {hints[f.name] for f in dataclasses.fields(RunConfig)} == set(homes)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_config_modules_import_nothing_heavy() -> None:
    """The section files import only the standard library and zeda.errors, so that zeda.config
    (imported by every part of zeda) can never close an import cycle or pull in torch; resolving a
    target share imports the losses lazily, inside the method."""
    light = {"__future__", "dataclasses", "typing", "math", "zeda.errors"}
    for rel in ("zero/config.py", "distillation/config.py", "evaluation/config.py"):
        source = REPO / "zeda" / rel
        top = {n for n in _imports(source)} - {"zeda.distillation.losses"}
        assert top <= light, f"{rel} imports {top - light}"
    zeda_deps = {
        n for n in _imports(REPO / "zeda/config.py") | _imports(REPO / "zeda/recipe.py") if "zeda" in n
    }
    allowed = {"zeda", "zeda.errors", "zeda.recipe", "zeda.zero.config"}
    allowed |= {"zeda.distillation.config", "zeda.evaluation.config", "zeda.distillation.losses"}
    allowed |= {"zeda.defaults"}  # the router-kind defaults: yaml, json and zeda.recipe at import
    assert zeda_deps <= allowed, zeda_deps - allowed
    top = {n for n in _imports(REPO / "zeda/defaults/__init__.py") if "zeda" in n} - {"zeda.families"}
    assert top <= {"zeda.errors", "zeda.recipe"}, top
    for rel in ("config.py", "recipe.py"):
        assert len((REPO / "zeda" / rel).read_text().splitlines()) < 450, rel


def test_every_field_has_a_docstring() -> None:
    docs = field_docs()
    missing = [k for k in valid_keys() if not docs.get(k)]
    assert not missing, f"fields without a docstring: {missing}"
    assert len(valid_keys()) == len(set(valid_keys()))


def test_dict_and_yaml_round_trip(tmp_path: Path) -> None:
    cfg = apply_overrides(
        RunConfig(),
        [
            "balance.target_zero_share=0.3",
            "eval.zero_bias_sweep=[-1, 0.5]",
            "stage1.lr=3e-5",
            "data.prompt_file=p.jsonl",
        ],
    )
    assert from_dict(to_dict(cfg)) == cfg
    path = save_recipe(cfg, tmp_path / "sub" / "run.yaml")
    assert load_recipe(path) == cfg
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)


# ------------------------------------------------------------------------------------------
# Overrides and coercion
# ------------------------------------------------------------------------------------------


def test_overrides_coerce_types() -> None:
    base = RunConfig()
    cfg = apply_overrides(
        base,
        [
            "stage1.lr=2e-4",  # PyYAML reads this as a string; must become a float
            "train.batch_size=16",
            "lora.enabled=false",
            "lora.full_experts=true",
            "eval.tasks=[ref_perplexity, gsm8k]",
            "eval.zero_bias_sweep=[-1, 0.5]",
            "inject.num_zero_experts=4",
            "data.max_prompts=null",
            "model.dtype=bfloat16",
            "model.name_or_path=123",
            "balance.alpha=1",
        ],
    )
    assert cfg.stage1.lr == 2e-4 and isinstance(cfg.stage1.lr, float)
    assert cfg.train.batch_size == 16 and cfg.lora.enabled is False and cfg.lora.full_experts is True
    assert cfg.eval.tasks == ["ref_perplexity", "gsm8k"]
    assert cfg.eval.zero_bias_sweep == [-1.0, 0.5] and all(
        isinstance(x, float) for x in cfg.eval.zero_bias_sweep
    )
    assert cfg.inject.num_zero_experts == 4 and cfg.data.max_prompts is None
    assert cfg.model.dtype == "bfloat16" and cfg.model.name_or_path == "123"
    assert isinstance(cfg.balance.alpha, float)
    # the input config is untouched
    assert base == RunConfig()
    # later overrides win; a scalar for a list field is a one-element list
    cfg = apply_overrides(base, ["lora.r=4", "lora.r=32", "eval.tasks=gsm8k", "inject.num_zero_experts=null"])
    assert cfg.lora.r == 32 and cfg.eval.tasks == ["gsm8k"] and cfg.inject.num_zero_experts is None
    # a whole section as a flow mapping merges into it
    cfg = apply_overrides(base, ["lora={r: 16, alpha: 32}"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.enabled) == (16, 32, True)


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        (
            "balance.targt_zero_share=0.5",
            ["balance.targt_zero_share", "did you mean 'balance.target_zero_share'"],
        ),
        ("lora.rank=4", ["lora.rank", "'lora.r'"]),
        ("trian.seed=1", ["trian.seed", "'train.seed'"]),
        ("train.max_steps=200", ["train.max_steps", "stage1.steps"]),
        ("xyz=1", ["xyz", "model, inject"]),
    ],
)
def test_unknown_key_names_key_and_suggests(override: str, needles: list[str]) -> None:
    msg = _err(apply_overrides, RunConfig(), [override])
    for needle in needles:
        assert needle in msg


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        (
            "stage1.kd=forward-kl",
            ["stage1.kd", "'forward_kl', 'reverse_kl', 'nll'", "did you mean 'forward_kl'"],
        ),
        ("model.dtype=bf16", ["model.dtype", "'bfloat16'"]),
        ("lora.r=abc", ["lora.r", "integer"]),
        ("lora.r=1.5", ["lora.r", "integer"]),
        ("lora.r=true", ["lora.r", "integer"]),
        ("lora.enabled=maybe", ["lora.enabled", "true or false"]),
        ("stage1.lr=fast", ["stage1.lr", "number"]),
        ("eval.zero_bias_sweep=[1, x]", ["eval.zero_bias_sweep[1]"]),
        ("lora=3", ["lora", "section"]),
        ("model.name_or_path=[a]", ["model.name_or_path", "string"]),
        ("eval.tasks={a: 1}", ["eval.tasks", "mapping"]),
    ],
)
def test_bad_values_are_one_line_errors(override: str, needles: list[str]) -> None:
    msg = _err(apply_overrides, RunConfig(), [override])
    for needle in needles:
        assert needle in msg


def test_malformed_overrides() -> None:
    assert "key=value" in _err(parse_overrides, ["lora.r"])
    assert "empty key" in _err(parse_overrides, ["lora..r=1"])
    assert "not valid YAML" in _err(parse_overrides, ["eval.tasks=[a"])
    assert parse_overrides(["a.b=1", "a.c=[x]", "d=e=f"]) == {"a": {"b": 1, "c": ["x"]}, "d": "e=f"}


# ------------------------------------------------------------------------------------------
# Cross-field validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("balance.target_zero_share=0", "balance.target_zero_share"),
        ("balance.target_zero_share=1.0", "balance.target_zero_share"),
        ("balance.w=0", "balance.w"),
        ("balance.alpha=-1", "balance.alpha"),
        ("lora.r=0", "lora.r"),
        ("stage1.lr=0", "stage1.lr"),
        ("stage2.lr=-1e-5", "stage2.lr"),
        ("stage1.steps=0", "stage1.steps"),
        ("stage1.temperature=0", "stage1.temperature"),
        ("train.warmup_ratio=1.0", "train.warmup_ratio"),
        ("train.batch_size=0", "train.batch_size"),
        ("inject.num_zero_experts=0", "inject.num_zero_experts"),
        ("data.seq_len=0", "data.seq_len"),
        ("eval.tasks=[a, a]", "eval.tasks"),
        ("lora.full_experts=true", "lora.full_experts"),  # with lora.enabled=true
    ],
)
def test_constraints(override: str, key: str) -> None:
    assert repr(key) in _err(apply_overrides, RunConfig(), [override])


def test_cross_section_constraints() -> None:
    msg = _err(apply_overrides, RunConfig(), ["train.resume=true", "train.overwrite=true"])
    assert "train.resume" in msg
    msg = _err(apply_overrides, RunConfig(), ["lora.enabled=false", "lora.train_router=false"])
    assert "nothing to train" in msg
    # ...which is fine when no stage trains
    apply_overrides(RunConfig(), ["lora.enabled=false", "lora.train_router=false", "stage1.enabled=false"])
    # a disabled stage may have 0 steps
    assert apply_overrides(RunConfig(), ["stage1.enabled=false", "stage1.steps=0"]).stage1.steps == 0


def test_w_and_target_are_exclusive(tmp_path: Path) -> None:
    msg = _err(apply_overrides, RunConfig(), ["balance.w=3", "balance.target_zero_share=0.5"])
    assert "balance.w" in msg and "target_zero_share" in msg
    both = _write(tmp_path / "both.yaml", {"balance": {"w": 3.0, "target_zero_share": 0.5}})
    assert "not both" in _err(load_recipe, both)
    # an override of one clears the other inherited from the recipe
    target = _write(tmp_path / "target.yaml", {"balance": {"target_zero_share": 0.4}})
    cfg = load_recipe(target, ["balance.w=3"])
    assert (cfg.balance.w, cfg.balance.target_zero_share) == (3.0, None)
    cfg = load_recipe(target, ["balance.target_zero_share=0.2"])
    assert (cfg.balance.w, cfg.balance.target_zero_share) == (None, 0.2)
    # nulling one does not clear the other
    cfg = load_recipe(target, ["balance.w=null"])
    assert cfg.balance.target_zero_share == 0.4


def test_resolve_w_matches_losses() -> None:
    cfg = apply_overrides(RunConfig(), ["balance.target_zero_share=0.3"])
    assert cfg.balance.resolve_w(16, 4) == pytest.approx(w_for_target(0.3, 16, 4))
    assert cfg.balance.resolve_target_share(16, 4) == pytest.approx(0.3)
    cfg = apply_overrides(RunConfig(), ["balance.w=3"])
    assert cfg.balance.resolve_w(16, 4) == 3.0
    assert cfg.balance.resolve_target_share(16, 4) == pytest.approx(equilibrium_zero_share(16, 4, 3.0))


# ------------------------------------------------------------------------------------------
# Files, inheritance
# ------------------------------------------------------------------------------------------


def test_base_inheritance(tmp_path: Path) -> None:
    (tmp_path / "common").mkdir()
    _write(
        tmp_path / "common" / "base.yaml",
        {"lora": {"r": 4, "alpha": 8}, "balance": {"w": 3.0}, "eval": {"tasks": ["a", "b"]}},
    )
    child = _write(
        tmp_path / "child.yaml",
        {
            "base": "common/base.yaml",
            "lora": {"r": 16},
            "balance": {"target_zero_share": 0.4},
            "eval": {"tasks": ["c"]},
        },
    )
    cfg = load_recipe(child, ["train.seed=5"])
    assert (cfg.lora.r, cfg.lora.alpha) == (16, 8)  # mappings merge key by key
    assert cfg.eval.tasks == ["c"]  # lists replace
    assert (cfg.balance.w, cfg.balance.target_zero_share) == (None, 0.4)  # child's target clears base's w
    assert cfg.train.seed == 5


def test_base_cycle_and_missing(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", {"base": "b.yaml"})
    _write(tmp_path / "b.yaml", {"base": "a.yaml"})
    assert "cycle" in _err(load_recipe, tmp_path / "a.yaml")
    _write(tmp_path / "c.yaml", {"base": "nope.yaml"})
    assert "not found" in _err(load_recipe, tmp_path / "c.yaml")


def test_bad_files(tmp_path: Path) -> None:
    assert "not found" in _err(validate_recipe, tmp_path / "missing.yaml")
    bad = _write(tmp_path / "bad.yaml", "lora:\n  r: [1,\n")
    assert "line 3 column 1" in _err(validate_recipe, bad)
    tabs = _write(tmp_path / "tabs.yaml", "lora:\n\tr: 4\n")
    assert "line 2 column 1" in _err(validate_recipe, tabs)
    lst = _write(tmp_path / "list.yaml", "- a\n- b\n")
    assert "mapping" in _err(validate_recipe, lst)
    typo = _write(tmp_path / "typo.yaml", {"lora": {"rr": 4}})
    msg = _err(validate_recipe, typo)
    assert "typo.yaml" in msg and "lora.rr" in msg and "'lora.r'" in msg
    # an empty recipe is the default config
    assert isinstance(validate_recipe(_write(tmp_path / "empty.yaml", "")), RunConfig)
    # Without a readable model config (no router-kind default) a bare recipe is the dataclass defaults.
    empty = _write(tmp_path / "bare.yaml", f"model: {{name_or_path: {tmp_path / 'no_model'}}}")
    assert validate_recipe(empty) == apply_overrides(
        RunConfig(), [f"model.name_or_path={tmp_path / 'no_model'}"]
    )


# ------------------------------------------------------------------------------------------
# Shipped recipes
# ------------------------------------------------------------------------------------------


def test_recipes_exist() -> None:
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    for expected in (
        "reference/quickstart.yaml",
        "qwen3/30b_a3b_zeda.yaml",
        "glm/4.7_flash_zeda.yaml",
        "mixtral/8x7b_zeda.yaml",
        "olmoe/1b_7b_zeda.yaml",
    ):
        assert expected in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_recipe_validates_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = validate_recipe(path)
    raw = yaml.safe_load(path.read_text())
    # every recipe but the minimal one spells out every key, so the file alone says what runs
    # (the minimal one shows what a user writes: the model, the data and the target share)
    if path.name != "minimal.yaml":
        assert set(raw) - {"base"} == set(to_dict(cfg))
        for section, values in raw.items():
            if section != "base":
                assert set(values) == set(to_dict(cfg)[section]), f"{path}: section {section} is incomplete"
        # ... so the router kind's default changes nothing in it
        assert load_recipe(path, router_defaults=False) == cfg
    assert load_recipe(save_recipe(cfg, tmp_path / "saved.yaml")) == cfg


def test_quickstart_recipe() -> None:
    cfg = load_recipe(REPO / "recipes/reference/quickstart.yaml")
    assert cfg.model.name_or_path == "evals/reference/model"
    assert cfg.stage1.enabled and cfg.stage1.mode == "text"
    assert cfg.balance.target_zero_share == 0.5 and cfg.balance.w is None
    tokens = cfg.stage1.steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    # <= ~3 minutes of training at ~1k tokens/s on 2 CPU cores, leaving time for evaluation
    assert tokens <= 200_000
    assert cfg.model.dtype == "float32" and cfg.lora.enabled


def test_paper_recipes() -> None:
    qwen = load_recipe(REPO / "recipes/qwen3/30b_a3b_zeda.yaml")
    assert qwen.model.name_or_path == "Qwen/Qwen3-30B-A3B" and qwen.model.dtype == "bfloat16"
    assert qwen.inject.num_zero_experts == 64
    assert qwen.balance.resolve_w(128, 64) == 2.0 and qwen.balance.alpha == 0.1
    assert qwen.balance.resolve_target_share(128, 64) == pytest.approx(0.5)
    assert qwen.stage1.mode == "rollout" and qwen.stage1.lr == 2e-5
    assert qwen.train.lr_schedule == "cosine" and qwen.train.warmup_ratio == 0.1
    assert qwen.stage2.enabled and qwen.stage2.lr == 5e-6 and qwen.stage2.steps == 320
    assert qwen.stage2.num_prompts_per_step == 32
    assert qwen.lora.full_experts and not qwen.lora.enabled

    glm = load_recipe(REPO / "recipes/glm/4.7_flash_zeda.yaml")
    assert glm.model.name_or_path == "zai-org/GLM-4.7-Flash"
    assert glm.inject.num_zero_experts == 32 and glm.stage2.lr == 1e-6
    assert glm.balance.resolve_w(64, 32) == 2.0


def test_errors_name_the_file_that_holds_the_key(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", {"lora": {"rank": 4}})
    child = _write(tmp_path / "child.yaml", {"base": "base.yaml", "lora": {"r": 4}})
    msg = _err(load_recipe, child)
    assert msg.startswith(str(tmp_path / "base.yaml")) and "'lora.r'" in msg
    # a constraint broken by the merged recipe names the recipe that was loaded
    _write(tmp_path / "base.yaml", {"stage1": {"steps": 0}})
    msg = _err(load_recipe, child)
    assert msg.startswith(str(child)) and "stage1.steps" in msg
    # an override may not rescue a recipe that is invalid on its own...
    assert "stage1.steps" in _err(load_recipe, child, ["stage1.enabled=false"])
    # ...but its own errors carry no file name
    msg = _err(load_recipe, tmp_path / "base.yaml", ["stage1.enabled=false", "lora.rr=1"])
    assert "base.yaml" in msg  # the recipe itself fails first
    ok = _write(tmp_path / "ok.yaml", {})
    msg = _err(load_recipe, ok, ["lora.rr=1"])
    assert "ok.yaml" not in msg and "'lora.r'" in msg


def test_interpolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZEDA_TEST_DATA", "/data/x")
    recipe = _write(tmp_path / "r.yaml", "data:\n  train_file: ${oc.env:ZEDA_TEST_DATA}/train.jsonl\n")
    cfg = load_recipe(recipe, ["data.eval_file=${data.train_file}"])
    assert cfg.data.train_file == cfg.data.eval_file == "/data/x/train.jsonl"
    # the saved recipe holds the resolved values
    saved = save_recipe(cfg, tmp_path / "saved.yaml")
    assert "${" not in saved.read_text() and load_recipe(saved) == cfg
    assert "data.train_file" in _err(apply_overrides, RunConfig(), ["data.train_file=${nope}"])


def test_retired_key_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old_run = to_dict(RunConfig())
    old_run["export"]["merge_lora"] = True  # written by zeda <= 0.1 into every run's recipe.yaml
    path = _write(tmp_path / "recipe.yaml", old_run)
    with caplog.at_level(logging.WARNING, logger="zeda.recipe"):
        assert load_recipe(path) == RunConfig()
    assert "export.merge_lora" in caplog.text
    assert (
        "merge_lora" not in valid_keys_text()
        and "merge_lora" not in save_recipe(RunConfig(), path).read_text()
    )


def valid_keys_text() -> str:
    return " ".join(valid_keys())


def test_save_recipe_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "run" / "recipe.yaml"
    save_recipe(RunConfig(), path)
    cfg = apply_overrides(RunConfig(), ["lora.r=4"])
    save_recipe(cfg, path)
    assert load_recipe(path) == cfg
    assert sorted(p.name for p in path.parent.iterdir()) == ["recipe.yaml"]


def test_docs_match_the_cli_and_the_loop() -> None:
    docs = field_docs()
    texts = [REPO / "zeda/config.py", *(REPO / "zeda").glob("*/config.py"), *RECIPES]
    for path in texts:
        assert "zeda train" not in path.read_text(), (
            f"{path} tells users to run 'zeda train' (it is 'zeda run')"
        )
    assert (
        "zeda run recipes/reference/quickstart.yaml"
        in (REPO / "recipes/reference/quickstart.yaml").read_text()
    )
    assert "LoRA" in docs["train.seed"] and "before the student is built" in docs["train.seed"]
    assert "every prompt" in docs["data.max_prompts"]
    assert "no cache" in docs["data.rollout_cache"]
    # train.resume documents every resumable key (sections by their wildcard)
    resume_doc = docs["train.resume"]
    for key in RESUMABLE_KEYS:
        section = key.split(".")[0]
        assert key in resume_doc or f"{section}.*" in resume_doc, key


# ------------------------------------------------------------------------------------------
# Resume: which recipe changes a resumed run accepts
# ------------------------------------------------------------------------------------------


def _changed(cfg: RunConfig, key: str) -> RunConfig:
    """A copy of ``cfg`` with ``key`` set to some other value of its type (not validated)."""
    section, name = key.split(".")
    old = getattr(getattr(cfg, section), name)
    tp = typing.get_type_hints(type(getattr(cfg, section)))[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        new: object = next(a for a in args if a != old)
    elif isinstance(old, bool):
        new = not old
    elif isinstance(old, list):
        new = [*old, 0.5 if args == [float] else "x"]
    elif isinstance(old, str) or (old is None and str in args):
        new = f"{old}x"
    elif isinstance(old, int) or (old is None and int in args):
        new = (old or 0) + 3
    else:
        new = (old or 0.25) * 1.5
    changed = dataclasses.replace(getattr(cfg, section), **{name: new})
    return dataclasses.replace(cfg, **{section: changed})


def test_resumable_keys_are_valid_keys() -> None:
    assert RESUMABLE_KEYS <= set(valid_keys())
    assert {
        "stage1.steps",
        "stage2.steps",
        "train.resume",
        "train.overwrite",
        "eval.tasks",
        "export.out_dir",
    } <= (RESUMABLE_KEYS)
    for refused in ("stage1.lr", "lora.r", "lora.alpha", "train.seed", "train.batch_size", "balance.alpha"):
        assert refused not in RESUMABLE_KEYS


@pytest.mark.parametrize("stage2_enabled", [False, True])
def test_recipe_differences_one_line_per_refused_key(stage2_enabled: bool) -> None:
    old = apply_overrides(RunConfig(), [f"stage2.enabled={stage2_enabled}", "balance.target_zero_share=0.5"])
    assert recipe_differences(old, old) == []
    for key in valid_keys():
        new = _changed(old, key)
        assert new != old, key
        lines = recipe_differences(old, new)
        free = key in RESUMABLE_KEYS or (key.startswith("stage2.") and not stage2_enabled)
        if free:
            assert lines == [], key
        else:
            (line,) = lines
            section, name = key.split(".")
            x, y = getattr(getattr(old, section), name), getattr(getattr(new, section), name)
            assert line.startswith(f"{key}: ") and repr(x) in line and repr(y) in line, line


def test_recipe_differences_examples() -> None:
    old = load_recipe(REPO / "recipes/reference/quickstart.yaml")
    ok = apply_overrides(
        old,
        [
            "stage1.steps=300",
            "eval.tasks=[ref_perplexity, gsm8k]",
            "eval.limit=5",
            "export.out_dir=elsewhere",
            "train.resume=true",
            "train.log_every=1",
            "train.save_every=5",
            "train.output_dir=runs/moved",
            "data.rollout_cache=cache",
            "stage2.enabled=true",
            "stage2.lr=1e-6",  # stage 2 never ran in the stored run
        ],
    )
    assert recipe_differences(old, ok) == []
    bad = apply_overrides(old, ["stage1.lr=1e-4", "lora.r=16", "stage1.steps=50", "train.seed=1"])
    lines = recipe_differences(old, bad)
    assert lines == [
        "lora.r: 32 -> 16",
        "stage1.steps: 150 -> 50 (a resumed run may add steps, not remove them)",
        "stage1.lr: 0.002 -> 0.0001",
        "train.seed: 0 -> 1",
    ]
    # the caller may accept more (e.g. a lower learning rate after a non-finite stop), never fewer steps
    assert recipe_differences(old, bad, allow={"stage1.lr", "lora.r", "train.seed", "stage1.steps"}) == [
        "stage1.steps: 150 -> 50 (a resumed run may add steps, not remove them)"
    ]
    # a run that trained stage 2 refuses changes to it
    s2 = apply_overrides(old, ["stage2.enabled=true"])
    assert recipe_differences(s2, apply_overrides(s2, ["stage2.lr=1e-6"])) == ["stage2.lr: 5e-05 -> 1e-06"]
    # switching balance.w for target_zero_share changes two keys
    assert len(recipe_differences(old, apply_overrides(old, ["balance.w=3"]))) == 2


def test_unknown_baseline_kind_fails_before_any_compute():
    with pytest.raises(ZedaError, match="eval.baselines.*unknown"):
        apply_overrides(RunConfig(), ["eval.baselines=[top_k_magic]"])


def test_baseline_kinds_are_the_ones_the_library_calibrates():
    from zeda.evaluation.baselines import POLICY_KINDS
    from zeda.evaluation.config import BASELINE_KINDS

    assert set(POLICY_KINDS) == set(BASELINE_KINDS) >= {"top_p", "top_p_no_renorm", "adaptive_k"}
