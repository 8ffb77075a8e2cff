"""zeda.evaluate (zeda.evaluation.run_eval) on tiny models with a task YAML written on the fly (offline, no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zeda
from zeda.cli import main as cli_main
from zeda.config import RunConfig, apply_overrides
from zeda.evaluation.result import EvalResult
from zeda.evaluation.run_eval import evaluate
from zeda.tiny import tiny_corpus, tiny_model, tiny_tokenizer

TASK_YAML = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The CI machine has 2 shared cores: intra-op threads only add contention for these tiny models.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaltasks")
    docs = tiny_corpus(24)
    (root / "tasks").mkdir()
    with open(root / "tasks" / "docs.jsonl", "w") as f:
        for d in docs[:8]:
            f.write(json.dumps({"text": d}) + "\n")
    (root / "tasks" / "tiny_ppl.yaml").write_text(TASK_YAML.format(data=root / "tasks" / "docs.jsonl"))
    with open(root / "heldout.jsonl", "w") as f:
        for d in docs[8:]:
            f.write(json.dumps({"text": d}) + "\n")
    return root


def _cfg(root: Path, *extra: str) -> RunConfig:
    return apply_overrides(
        RunConfig(),
        [
            f"data.eval_file={root / 'heldout.jsonl'}",
            "data.seq_len=32",
            "eval.max_eval_tokens=256",
            "eval.tasks=[]",
            "eval.baselines=[]",
            *extra,
        ],
    )


def _injected(seed: int = 0) -> torch.nn.Module:
    model = tiny_model("qwen3_moe", seed=seed, num_experts_per_tok=4)
    zeda.inject_zero_experts(model, 4, seed=3)
    return model


@pytest.fixture(scope="module")
def full_result(workdir: Path) -> EvalResult:
    cfg = _cfg(
        workdir,
        "eval.tasks=[tiny_ppl]",
        "eval.limit=4",
        "eval.zero_bias_sweep=[2.0]",
        "eval.baselines=[top_p,top_p_no_renorm,adaptive_k]",
    )
    return evaluate(_injected(), cfg, tiny_tokenizer(), include_paths=[workdir / "tasks"], progress=False)


def test_tasks_recovery_and_measured_flops(full_result: EvalResult, workdir: Path) -> None:
    r = full_result
    assert set(r.tasks) == {"tiny_ppl"} and set(r.teacher_tasks) == {"tiny_ppl"}
    assert set(r.tasks["tiny_ppl"]) == {"word_perplexity", "bits_per_byte"}
    assert r.higher_is_better["tiny_ppl"]["word_perplexity"] is False
    for name, value in r.tasks["tiny_ppl"].items():  # lower is better: original / converted
        assert r.recovery["tiny_ppl"][name] == pytest.approx(r.teacher_tasks["tiny_ppl"][name] / value)
    # FLOPs measured during this evaluation, padding excluded: exactly the tokens forwarded.
    tok = tiny_tokenizer()
    docs = [json.loads(line)["text"] for line in open(workdir / "tasks" / "docs.jsonl")][:4]
    task_tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs)
    assert r.measured_tokens == task_tokens + r.intrinsic["tokens"] + r.intrinsic["tokens"] // 31
    assert 0.0 < r.zero_share < 1.0
    assert r.routed_flop_reduction == pytest.approx(r.zero_share)
    assert 0.0 < r.total_flop_reduction < r.routed_flop_reduction
    assert sorted(r.zero_share_per_layer) == [0, 1]
    assert sum(r.real_experts_histogram) == r.measured_tokens * len(r.zero_share_per_layer)
    assert r.intrinsic["teacher_ppl"] > 1 and r.intrinsic["ppl_ratio"] > 0
    assert 0.0 <= r.intrinsic["top1_agreement"] <= 1.0 and r.intrinsic["mean_kl"] >= 0.0


def test_sweep_and_matched_baselines(full_result: EvalResult) -> None:
    by = {p.label: p for p in full_result.curve}
    assert by["original"].ppl_ratio == 1.0 and by["original"].zero_share == 0.0
    zeda_pt, swept = by["zeda"], by["zeda bias=+2"]
    assert swept.zero_share > zeda_pt.zero_share  # a positive bias routes more slots to zero experts
    base = [p for p in full_result.curve if p.method == "top_p"]
    assert len(base) == 2  # matched to the converted model and to the sweep point
    for p in base:
        reachable = min(p.target_share, 0.75)  # top-1 is always kept: at most (k-1)/k skipped
        assert abs(p.zero_share - reachable) <= 0.03
        assert p.routed_flop_reduction == pytest.approx(p.zero_share)


def test_summary_table_rows_at_the_same_share(full_result: EvalResult) -> None:
    table = full_result.summary_table()
    lines = table.splitlines()
    assert lines[1].split()[:2] == ["setting", "skipped"] and lines[3].startswith("zeda ")
    rows = {line.split()[0] for line in lines[3:] if line and not line.startswith(("note", "expert"))}
    assert rows == {"zeda", "top_p", "top_p_no_renorm", "adaptive_k"}  # sweep-matched ones are not listed
    zeda_pt = next(p for p in full_result.curve if p.label == "zeda")
    assert f"{100 * zeda_pt.zero_share:.1f}%" in lines[3]
    assert f"{full_result.intrinsic['ppl_ratio']:.4f}" in lines[3]
    raw = next(p for p in full_result.curve if p.method == "top_p_no_renorm")
    ren = next(p for p in full_result.curve if p.method == "top_p" and p.target_share == raw.target_share)
    # Same calibrated value; the kept weights differ, so later layers route (slightly) differently.
    assert raw.setting == ren.setting and abs(raw.zero_share - ren.zero_share) < 0.02 and raw.ppl != ren.ppl


def test_save_writes_everything_and_refuses_existing(full_result: EvalResult, tmp_path: Path) -> None:
    out = full_result.save(tmp_path / "eval")
    data = json.loads((out / "results.json").read_text())
    for key in (
        "tasks",
        "teacher_tasks",
        "recovery",
        "intrinsic",
        "flops",
        "zero_share_per_layer",
        "real_experts_histogram",
        "curve",
        "calibrations",
        "routed_flop_reduction",
        "total_flop_reduction",
    ):
        assert key in data, key
    for png in ("zero_share_per_layer.png", "frontier.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "routed-expert FLOP reduction" in (out / "report.md").read_text()
    with pytest.raises(zeda.ZedaError, match="already exists"):
        full_result.save(out)
    full_result.save(out, overwrite=True)
    assert "<table>" in full_result._repr_html_() and "| tiny_ppl |" in full_result._repr_markdown_()


def test_original_model_reports_zero_saved(workdir: Path) -> None:
    model = tiny_model("qwen3_moe", num_experts_per_tok=4)
    r = evaluate(model, _cfg(workdir, "eval.baselines=[top_p]"), tiny_tokenizer(), progress=False)
    assert r.routed_flop_reduction == 0.0 and r.total_flop_reduction == 0.0 and not r.injected
    assert r.intrinsic["ppl_ratio"] == 1.0 and r.intrinsic["top1_agreement"] == 1.0
    assert r.zero_share_per_layer == {0: 0.0, 1: 0.0}
    assert any("0% FLOPs saved" in n for n in r.notes)
    assert not zeda.is_injected(model) and not any(hasattr(m, "zeda_layer_index") for m in model.modules())


def test_separate_teacher_equals_teacher_mode(workdir: Path) -> None:
    cfg = _cfg(workdir, "eval.baselines=[keep_top_m]")
    tok = tiny_tokenizer()
    own = evaluate(_injected(), cfg, tok, progress=False)
    teacher = tiny_model("qwen3_moe", num_experts_per_tok=4)
    sep = evaluate(_injected(), cfg, tok, teacher=teacher, progress=False)
    # Same original (the separate one runs transformers' experts backend, teacher mode zeda's).
    for key, value in own.intrinsic.items():
        assert sep.intrinsic[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert [(p.label, p.zero_share) for p in own.curve] == [(p.label, p.zero_share) for p in sep.curve]
    for a, b in zip(own.curve, sep.curve, strict=True):
        assert b.ppl == pytest.approx(a.ppl, rel=1e-4)


def test_unknown_task_is_one_clear_error(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZEDA_LM_EVAL_REGISTRY", "0")  # skip indexing lm-eval's registry (slow)
    with pytest.raises(zeda.ZedaError, match=r"unknown task\(s\) no_such_task; looked in .*tasks") as exc:
        evaluate(
            _injected(),
            _cfg(workdir, "eval.tasks=[tiny_ppl,no_such_task]"),
            tiny_tokenizer(),
            include_paths=[workdir / "tasks"],
        )
    assert "\n" not in str(exc.value) and "network" in str(exc.value)


def test_cli_refuses_existing_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "out").mkdir()
    rc = cli_main(["eval", "--model", str(tmp_path / "m"), "--tasks", "x", "--out", str(tmp_path / "out")])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_cli_eval_end_to_end(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _injected()
    zeda.atomic_save(model, tmp_path / "m", tokenizer=tiny_tokenizer())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data: {{eval_file: {workdir / 'heldout.jsonl'}, seq_len: 32}}\n"
        "eval: {max_eval_tokens: 128, baselines: [keep_top_m]}\n"
    )
    monkeypatch.setenv("ZEDA_TASK_PATHS", str(workdir / "tasks"))
    out = tmp_path / "out"
    args = ["eval", "--model", str(tmp_path / "m"), "--tasks", "tiny_ppl", "--limit", "2"]
    assert cli_main([*args, "--recipe", str(recipe), "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["tasks"]["tiny_ppl"] and data["routed_flop_reduction"] > 0
    assert (out / "frontier.png").exists()
    assert cli_main([*args, "--out", str(out)]) == 2  # exists, no --overwrite


def _regression_runner():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "evals" / "regression" / "run.py"
    spec = importlib.util.spec_from_file_location("zeda_regression_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_regression_checks_catch_misses(full_result: EvalResult, tmp_path: Path) -> None:
    run = _regression_runner()
    r = full_result
    ok = run.check(r, {"min_routed_flop_reduction": r.routed_flop_reduction - 0.01, "recovery_min": 0.0})
    assert ok and all(passed for *_, passed in ok)
    rows = run.check(
        r,
        {
            "min_routed_flop_reduction": r.routed_flop_reduction + 0.01,
            "ppl_ratio_max": r.intrinsic["ppl_ratio"] - 1e-3,
            "recovery_min_per_metric": {"tiny_ppl/word_perplexity": 0.0, "no_task/acc": 0.5},
            "beat_baselines": ["top_p", "threshold"],
        },
    )
    result = {name: passed for name, _, _, passed in rows}
    assert not result["routed-expert FLOP reduction"] and not result["held-out ppl_ratio"]
    assert result["recovery tiny_ppl/word_perplexity"] and not result["recovery no_task/acc"]
    assert not result["mean_kl vs threshold at matched FLOPs"]  # not evaluated: a miss, not a pass
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nrecipe: y\nthresholds: {ppl_ratio_maxx: 1}\n")
    with pytest.raises(run.SuiteError, match="ppl_ratio_maxx"):
        run.load_suite(bad, quick=False)
    missing = tmp_path / "missing.yaml"
    missing.write_text(
        "model: /nonexistent\nrecipe: recipes/reference/quickstart.yaml\nthresholds: {ppl_ratio_max: 2}\n"
    )
    assert run.main([str(missing)]) == 1


def test_expert_saturation_is_reported(full_result: EvalResult, tmp_path: Path) -> None:
    r = full_result
    assert sorted(r.busiest_expert_share) == sorted(r.zero_share_per_layer)
    assert all(0.0 < v <= 1.0 for v in r.busiest_expert_share.values())
    assert set(r.saturated_layers) <= set(r.busiest_expert_share) and r.saturation_factor > 1
    flagged = EvalResult(**{**vars(r), "saturated_layers": {1: 9.5}, "notes": []})
    assert "expert saturation alarm: 1 layer(s)" in flagged.summary_table()
    assert "layer 1, 9.5x" in flagged.summary_table()
    out = flagged.save(tmp_path / "sat")
    assert "SATURATED" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["saturated_layers"] == {"1": 9.5}


def test_unknown_baseline_fails_before_any_compute(workdir: Path) -> None:
    # The recipe refuses it at validation, before a model is even loaded.
    with pytest.raises(zeda.ZedaError, match=r"eval.baselines.*unknown \['top_q'\].*adaptive_k"):
        _cfg(workdir, "eval.baselines=[top_p,top_q]")
    # A config built in Python without validation is refused by evaluate before any forward.
    cfg = _cfg(workdir)
    cfg.eval.baselines = ["top_p", "top_q"]
    with pytest.raises(
        zeda.ZedaError, match=r"unknown baseline\(s\) top_q in eval.baselines; use .*adaptive_k"
    ):
        evaluate(_injected(), cfg, tiny_tokenizer(), progress=False)


def test_merged_export_needs_a_separate_teacher(workdir: Path, tmp_path: Path) -> None:
    """An export's LoRA is merged into its experts, so its teacher mode is not the original:
    evaluating it without a teacher is refused in one line; with the original it runs."""
    from zeda.distillation.student import build_student

    student = build_student(_injected(), RunConfig())
    zeda.export(student, tmp_path / "export", tokenizer=tiny_tokenizer())
    exported = zeda.load(tmp_path / "export")
    cfg = _cfg(workdir)
    with pytest.raises(zeda.ZedaError, match="LoRA merged.*--teacher"):
        evaluate(exported, cfg, tiny_tokenizer(), progress=False)
    original = tiny_model("qwen3_moe", num_experts_per_tok=4)
    r = evaluate(exported, cfg, tiny_tokenizer(), teacher=original, progress=False)
    assert r.settings["teacher"] == "separate model"
