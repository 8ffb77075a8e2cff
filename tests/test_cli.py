"""The command line: contract of inject / flops / ls / validate, and one-line errors."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import token_batch

import zeda
from zeda.cli import build_parser, main
from zeda.io import atomic_save, load
from zeda.tiny import tiny_model, tiny_tokenizer


def test_inject_cli_round_trip(tmp_path, capsys):
    original = tiny_model("qwen3_moe")
    atomic_save(original, tmp_path / "orig", tokenizer=tiny_tokenizer())
    rc = main(
        [
            "inject",
            "--model",
            str(tmp_path / "orig"),
            "--out",
            str(tmp_path / "inj"),
            "--num-zero-experts",
            "3",
            "--seed",
            "7",
            "--dtype",
            "float32",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_zero_experts"] == 3 and report["seed"] == 7 and report["num_experts"] == 8
    injected = load(tmp_path / "inj", attn_implementation="eager")
    assert injected.config.zeda["num_zero_experts"] == 3
    assert (tmp_path / "inj" / "tokenizer.json").exists()
    original.set_experts_implementation("eager")
    ids = token_batch()
    with torch.no_grad(), zeda.teacher_mode(injected):
        assert torch.equal(injected(ids).logits, original(ids).logits)
    # Refuses to overwrite, and says how.
    rc = main(["inject", "--model", str(tmp_path / "orig"), "--out", str(tmp_path / "inj")])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    # Re-injecting an injected checkpoint fails with one line.
    rc = main(["inject", "--model", str(tmp_path / "inj"), "--out", str(tmp_path / "inj2")])
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("zeda: error:")]
    assert rc == 2 and len(line) == 1 and "already has zero experts" in line[0]


def test_flops_json_contract(capsys):
    assert main(["flops", "--model-config", "qwen3-30b-a3b", "--zero-share", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("total_params", "active_params", "flops_per_token", "routed_expert_flops_per_token"):
        assert key in out
    assert out["routed_flop_reduction"] == pytest.approx(0.5)
    assert main(["flops", "--model-config", "no-such-model"]) == 2
    assert "built-in names" in capsys.readouterr().err


def test_ls_and_validate(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for family in zeda.supported_model_types():
        assert family in out
    assert "qwen3-30b-a3b" in out
    assert main(["validate", "recipes/reference/quickstart.yaml"]) == 0


def test_plan_verb(capsys):
    assert main(["plan", "recipes/reference/quickstart.yaml", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


def test_unknown_recipe_key_fails(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batchsize: 4\n")
    assert main(["validate", str(bad)]) == 2
    assert "did you mean" in capsys.readouterr().err


# ---- the README's contract: every public name resolves, every command line parses ----------

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _resolve(dotted: str) -> object:
    """``zeda.a.b`` → the object, importing submodules on the way (as a user's import would)."""
    obj: object = zeda
    parts = dotted.split(".")[1:]
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            importlib.import_module(".".join(["zeda", *parts[: i + 1]]))
        obj = getattr(obj, part)
    return obj


def test_readme_python_names_resolve():
    code = "\n".join(_blocks("python"))
    names = set(re.findall(r"\bzeda\.([A-Za-z_]\w*)", code))
    names |= {n.strip() for imp in re.findall(r"from zeda import ([\w, ]+)", code) for n in imp.split(",")}
    assert {"load", "inject_zero_experts", "distill", "evaluate", "export"} <= names
    missing = sorted(n for n in names if not hasattr(zeda, n))
    assert not missing, f"README uses zeda.{missing} which the package does not export"
    # The two API functions that once doubled as modules are plain functions.
    assert inspect.isfunction(zeda.evaluate) and inspect.isfunction(zeda.export)


def test_readme_prose_references_resolve():
    refs = set(re.findall(r"`(zeda(?:\.[A-Za-z_]\w*)+)`", README))
    broken = []
    for ref in sorted(refs):
        try:
            _resolve(ref)
        except (AttributeError, ImportError):
            broken.append(ref)
    assert not broken, f"README names {broken}, which do not resolve"


def test_readme_file_references_exist():
    refs = set(re.findall(r"`((?:zeda|recipes|evals|examples|docs|tests)/[\w./*-]*)`", README))
    missing = sorted(r for r in refs if not any(ROOT.glob(r.rstrip("/"))))
    assert not missing, f"README names {missing}, which are not in the tree"


def test_readme_command_lines_parse():
    parser = build_parser()
    verbs = {a.dest for a in parser._subparsers._group_actions[0]._choices_actions}
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():  # join continued lines
            for part in line.split("#")[0].split("&&"):
                words = shlex.split(part)
                if words and words[0] == "zeda":
                    lines.append(words[1:])
    assert lines, "README shows no zeda command line"
    for words in lines:
        assert words[0] in verbs, f"README shows `zeda {words[0]}`, which the CLI does not have"
        try:
            parser.parse_args(words)
        except SystemExit as exc:  # argparse exits on an unknown flag or a missing argument
            raise AssertionError(f"README command `zeda {' '.join(words)}` does not parse") from exc


def test_no_module_class_swaps_or_getattr_tricks():
    pkg = ROOT / "zeda"
    offenders = [
        str(p.relative_to(ROOT))
        for p in pkg.rglob("*.py")
        if re.search(
            r"sys\.modules\[.*\]\.__class__\s*=|\(types\.ModuleType\)|^def __getattr__",
            p.read_text(),
            flags=re.M,
        )
    ]
    assert not offenders, offenders


# ---- a quiet console: `zeda run` ends with the summary table and the paths ---------------------


def test_run_ends_with_summary_table_and_paths(tmp_path, capsys, monkeypatch):
    from zeda.tiny import tiny_corpus

    atomic_save(tiny_model("qwen3_moe"), tmp_path / "model", tokenizer=tiny_tokenizer())
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(48)))
    (tmp_path / "recipe.yaml").write_text(
        "model: {name_or_path: model, dtype: float32}\n"
        "data: {train_file: data.jsonl, eval_file: data.jsonl, seq_len: 32}\n"
        "stage1: {steps: 2, lr: 0.01}\n"
        "train: {batch_size: 4, output_dir: run, warmup_ratio: 0.0}\n"
        "eval: {tasks: [], max_eval_tokens: 256, baselines: [keep_top_m]}\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["run", "recipe.yaml"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) < 25, out  # a table and three paths, not the whole result as JSON
    assert not any(line.lstrip().startswith(("{", '"')) for line in out)
    table = "\n".join(out)
    assert "zeda" in table and "ppl ratio" in table and "keep" in table  # the baseline row
    paths = dict(line.split(None, 1) for line in out[-3:])
    assert Path(paths["report"]) == Path("run/eval/report.md") and Path(paths["report"]).is_file()
    assert Path(paths["export"]) == Path("run/export") and (Path(paths["export"]) / "config.json").is_file()
    assert json.loads(Path(paths["run"]).read_text())["export_dir"] == paths["export"]
    # --json keeps the machine-readable form for scripts.
    assert main(["run", "recipe.yaml", "train.resume=true", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output_dir"] == "run"


# ---- zeda export --format zeda-reference ---------------------------------------------------------


def test_export_format_choices_match_the_library():
    from zeda.io import EXPORT_FORMATS

    export = build_parser()._subparsers._group_actions[0].choices["export"]
    fmt = next(a for a in export._actions if a.dest == "format")
    assert tuple(fmt.choices) == tuple(EXPORT_FORMATS) and fmt.default == "zeda"


def test_export_reference_format_round_trip(tmp_path, capsys):
    model = tiny_model("qwen3_moe")
    zeda.inject_zero_experts(model, 4)
    zeda.atomic_save(model, tmp_path / "injected", tokenizer=tiny_tokenizer())
    args = ["export", "--model", str(tmp_path / "injected"), "--out", str(tmp_path / "ref")]
    assert main([*args, "--format", "zeda-reference"]) == 0
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoePlusPlusForCausalLM"] and config["zce_nums"] == [4]
    ids = token_batch(2, 8)
    back = load(tmp_path / "ref")  # read back and converted to zeda's format
    model.set_experts_implementation("eager")
    back.set_experts_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    # A family the reference format cannot express: one line, nothing written.
    mixtral = tiny_model("mixtral")
    zeda.inject_zero_experts(mixtral, 4)
    zeda.atomic_save(mixtral, tmp_path / "mixtral", tokenizer=tiny_tokenizer())
    capsys.readouterr()
    args = ["export", "--model", str(tmp_path / "mixtral"), "--out", str(tmp_path / "ref2")]
    assert main([*args, "--format", "zeda-reference"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("zeda: error:")]
    assert len(err) == 1 and "mixtral" in err[0] and not (tmp_path / "ref2").exists()


# ---- zeda calibrate ------------------------------------------------------------------------------


def test_calibrate_cli_bakes_the_budget_into_the_export(tmp_path, capsys):
    from zeda.tiny import tiny_corpus

    model = tiny_model("qwen3_moe")
    zeda.inject_zero_experts(model)
    atomic_save(model, tmp_path / "m", tokenizer=tiny_tokenizer())
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(64)))
    args = ["calibrate", "--model", str(tmp_path / "m"), "--data", str(data), "--seq-len", "32"]
    assert main([*args, "--target-share", "0.3", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "held-out share" in out and out.strip().splitlines()[-1].split() == [
        "export",
        str(tmp_path / "out"),
    ]
    bias = json.loads((tmp_path / "out" / "config.json").read_text())["zeda"]["zero_logit_bias"]
    reloaded = load(tmp_path / "out")
    with zeda.RouterTelemetry(reloaded) as tel, torch.no_grad():
        reloaded(token_batch(4, 32))
    assert isinstance(bias, float) and tel.zero_share == pytest.approx(0.3, abs=0.1)
    assert all(layer.router.zero_logit_bias == bias for layer in zeda.find_moe_layers(reloaded))
    # A share outside (0, 1) is refused before the model is loaded; the existing output stays.
    assert main([*args, "--target-share", "1.5", "--out", str(tmp_path / "out2")]) == 2
    assert "between 0 and 1" in capsys.readouterr().err and not (tmp_path / "out2").exists()
    assert main([*args, "--target-share", "0.3", "--out", str(tmp_path / "m"), "--overwrite"]) == 2
    assert "input" in capsys.readouterr().err
