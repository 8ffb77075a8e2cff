"""evals/transfer: a minimal-recipe run with the router-kind default, resumable, then scored on test once."""

from __future__ import annotations

import dataclasses
import json

import pytest

import zeda
from evals.transfer import distill as transfer_distill
from evals.transfer import score as transfer_score
from evals.transfer import select as transfer_select
from evals.transfer import table as transfer_table
from zeda.evaluation.baselines import POLICY_KINDS
from zeda.tiny import tiny_corpus, tiny_model, tiny_tokenizer

FAST = [
    "stage1.steps=3",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.eval_every=1",
    "train.eval_tokens=512",
    "train.best_tolerance=0.5",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    zeda.atomic_save(tiny_model("deepseek_v3"), root / "model", tokenizer=tiny_tokenizer())
    texts = tiny_corpus(120)
    (root / "data").mkdir()
    for name, part in (("train", texts[:80]), ("validation", texts[80:100]), ("test", texts[100:])):
        (root / "data" / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    argv = ["--model", str(root / "model"), "--data", str(root / "data"), "--share", "0.5"]
    argv += ["--runs", str(root / "runs"), "--name", "tiny", *FAST]
    record = transfer_distill.main(argv)
    return root, argv, record


def test_distill_runs_the_minimal_recipe_with_the_router_default(finished):
    root, _, record = finished
    run = root / "runs" / "tiny" / "share_0.5"
    assert record["finished"] and record["variant"] == "lora" and record["steps"]["stage1"] == 3
    assert record["verdict"]["split"] == "validation" and record["cpu_seconds"] >= 0
    stored = (run / "recipe.yaml").read_text()
    assert "kd: forward_kl" in stored and "zero_ratio: 1.0" in stored  # the sigmoid_bias default
    written = (root / "runs" / "tiny" / "share_0.5.recipe.yaml").read_text()
    assert "forward_kl" not in written  # the input recipe names only model, data and share
    assert json.loads((run / "export" / "config.json").read_text())["zeda"]["verdict"]["beats"] in (
        True,
        False,
    )
    # Rerunning a finished run leaves it as it is.
    before = (run / "metrics.jsonl").read_text()
    assert transfer_distill.main(finished[1]) == record
    assert (run / "metrics.jsonl").read_text() == before


def test_score_rates_the_export_and_every_rule_on_test(finished, tmp_path):
    root, _, record = finished
    run = root / "runs" / "tiny" / "share_0.5"
    out = transfer_score.main([str(run), "--tokens", "512", "--seq-len", "32", "--calibration-tokens", "256"])
    assert (run / "test_scores.json").is_file()
    assert out["test_file"].endswith("test.jsonl") and out["calibrated_on"].endswith("validation.jsonl")
    assert sorted(r["kind"] for r in out["rules"]) == sorted(POLICY_KINDS)
    share = out["zeda"]["zero_share"]
    assert 0 < share < 1 and all(r["target_share"] == pytest.approx(share, abs=1e-6) for r in out["rules"])
    assert out["verdict"]["split"] == "test" and out["verdict"]["zero_share"] == share
    assert out["validation_verdict"] == record["verdict"]
    assert out["tokens"] == (512 // 32) * 31
    # The expert loads: the original's from its own routing, zeda's from the export's, per MoE layer.
    loads = out["expert_load_ratio"]
    assert loads["original"].keys() == loads["zeda"].keys() and loads["original"]
    assert all(v >= 1.0 for d in loads.values() for v in d.values())
    # Every rule's, counted while it skipped; the best rule's beside zeda's.
    assert sorted(out["rule_load_ratio"]) == sorted(r["rule"] for r in out["rules"])
    assert loads["best_rule"] == out["rule_load_ratio"][out["verdict"]["rule"]]
    assert all(d.keys() == loads["original"].keys() for d in out["rule_load_ratio"].values())
    # A rule that skips slots moves load among the experts, so its loads are not the original's.
    assert any(d != loads["original"] for d in out["rule_load_ratio"].values())
    # Each layer's skipped share, whose mean over layers is the share over all slots.
    per_layer = out["zero_share_per_layer"]
    assert per_layer["zeda"].keys() == per_layer["best_rule"].keys() == loads["original"].keys()
    for who, share in (
        ("zeda", out["zeda"]["zero_share"]),
        ("best_rule", out["verdict"]["rule_figures"]["zero_share"]),
    ):
        assert sum(per_layer[who].values()) / len(per_layer[who]) == pytest.approx(share, abs=1e-6)


def test_table_lists_the_scored_run_with_its_commands(finished):
    root, _, record = finished
    run = root / "runs" / "tiny" / "share_0.5"
    if not (run / "test_scores.json").is_file():
        transfer_score.main([str(run), "--tokens", "512", "--seq-len", "32", "--calibration-tokens", "256"])
    scores = json.loads((run / "test_scores.json").read_text())
    text = transfer_table.main(["--runs", str(root / "runs")])
    (row,) = [line for line in text.splitlines() if line.startswith("| `tiny`")]
    # The variant, then every setting the run took off the default (here the test's short schedule).
    assert "outside the zoo" in row and "| 50% | lora + `stage1.steps=3` + `data.seq_len=32`" in row
    assert f"{scores['verdict']['zeda']['ppl_ratio']:.4f}" in row
    assert ("| yes |" in row) == bool(scores["verdict"]["beats"]) != ("| no: " in row)
    assert record["command"] in text and scores["command"] in text
    z, o, b = (scores["expert_load_ratio"][k] for k in ("zeda", "original", "best_rule"))
    assert f"| {max(z.values()):.1f} ({max(o.values()):.1f}; best rule {max(b.values()):.1f}) at most" in row


def test_table_joins_run_folders_filters_members_and_names_off_default_settings(finished, tmp_path):
    root, _, _ = finished
    run = root / "runs" / "tiny" / "share_0.5"
    if not (run / "test_scores.json").is_file():
        transfer_score.main([str(run), "--tokens", "512", "--seq-len", "32", "--calibration-tokens", "256"])
    # A second folder holding the same run recorded with one setting off the default.
    other = tmp_path / "other" / "tiny" / "share_0.5"
    other.mkdir(parents=True)
    record = json.loads((run / "transfer.json").read_text())
    record["overrides"] = [*record["overrides"], "balance.real_alpha=1.0"]
    (other / "transfer.json").write_text(json.dumps(record))
    (other / "test_scores.json").write_text((run / "test_scores.json").read_text())
    argv = ["--runs", str(root / "runs"), "--runs", str(tmp_path / "other"), "--title", "# Balance"]
    text = transfer_table.main([*argv, "--note", "Both rows read the 2,000-step weights."])
    rows = [line for line in text.splitlines() if line.startswith("| `tiny`")]
    assert text.startswith("# Balance\n") and len(rows) == 2
    assert "\nBoth rows read the 2,000-step weights.\n\n| model |" in text
    assert "`train.best_tolerance=0.5` |" in rows[0]
    assert "`train.best_tolerance=0.5` + `balance.real_alpha=1.0` |" in rows[1]
    assert not [
        x for x in transfer_table.main([*argv, "--member", "mixtral"]).splitlines() if x.startswith("| `")
    ]


def test_select_reads_validation_verdicts_and_chooses_by_the_fixed_rule(finished, tmp_path):
    root, argv, record = finished
    tagged = transfer_distill.main([*argv, "--tag", "lr2e-3", "stage1.lr=2e-3"])
    assert (root / "runs" / "tiny" / "share_0.5_lr2e-3" / "transfer.json").is_file()
    assert tagged["tag"] == "lr2e-3" and tagged["overrides"][-1] == "stage1.lr=2e-3"
    text = transfer_select.main(["--runs", str(root / "runs"), "--allow", "tiny"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`tiny`" in line]
    assert len(rows) == 2 and "stage1.lr=2e-3`" in rows[1] and "stage1.lr" not in rows[0]
    for row, rec in zip(rows, (record, tagged), strict=True):
        assert f"{rec['verdict']['zeda']['ppl_ratio']:.4f} / " in row  # the validation verdict's figures
    assert "no test text was read" in text and record["command"] in text and tagged["command"] in text

    # The rule, on the two real runs with their outcome set (the first standing for the default):
    # only candidates that beat every rule on every tuning member of the group qualify, and the
    # lowest mean increase wins unless it ties the default's.
    first, other = transfer_select.load([root / "runs"], ["tiny"])
    assert other.label == first.label + " stage1.lr=2e-3"
    default = dataclasses.replace(first, label=transfer_select.DEFAULT)

    def as_(c, beats, increase, kl=0.01):
        v = dict(
            c.verdict, beats=beats, zeda=dict(c.verdict["zeda"]), rule_figures=dict(c.verdict["rule_figures"])
        )
        v["rule_figures"]["ppl_ratio"], v["zeda"]["ppl_ratio"] = 1.1, 1.0 + 0.1 * increase
        v["zeda"]["mean_kl"] = kl
        return dataclasses.replace(c, verdict=v)

    def chosen(*cands):
        (group,) = transfer_select.choose(cands).values()
        return group["chosen"]

    assert chosen(as_(default, True, 0.30), as_(other, True, 0.20)) == other.label
    assert chosen(as_(default, True, 0.30), as_(other, True, 0.29)) == transfer_select.DEFAULT  # a tie
    # A lower perplexity increase bought with a higher validation KL does not replace the default.
    assert chosen(as_(default, True, 0.30), as_(other, True, 0.20, kl=0.011)) == transfer_select.DEFAULT
    assert chosen(as_(default, True, 0.30), as_(other, True, 0.20, kl=0.009)) == other.label
    assert chosen(as_(default, False, 0.30), as_(other, True, 0.20, kl=0.011)) == other.label
    assert chosen(as_(default, True, 0.30), as_(other, False, 0.10)) == transfer_select.DEFAULT
    assert chosen(as_(default, False, 0.30), as_(other, False, 0.10)) is None
    second = dataclasses.replace(default, member="tiny2")
    # A candidate not run on every tuning member of its group does not qualify.
    assert (
        chosen(as_(default, True, 0.3), as_(second, True, 0.3), as_(other, True, 0.1))
        == transfer_select.DEFAULT
    )


def test_validation_scores_read_no_test_text_and_select_shows_their_loads(finished, tmp_path, capsys):
    root, _, record = finished
    src = root / "runs" / "tiny" / "share_0.5"
    runs = tmp_path / "runs"
    (runs / "tiny").mkdir(parents=True)
    for name in ("transfer.json", "recipe.yaml"):  # select reads these; the export stays where it is
        (runs / "tiny" / "share_0.5").mkdir(exist_ok=True)
        (runs / "tiny" / "share_0.5" / name).write_bytes((src / name).read_bytes())
    (runs / "tiny" / "share_0.5.recipe.yaml").write_bytes((src.parent / "share_0.5.recipe.yaml").read_bytes())
    small = ["--tokens", "512", "--seq-len", "32", "--calibration-tokens", "256"]
    out = transfer_score.main([str(src), "--split", "validation", *small])
    assert out["split"] == "validation" and out["verdict"]["split"] == "validation"
    assert out["test_file"] == out["calibrated_on"] and out["test_file"].endswith("validation.jsonl")
    scores = src / "validation_scores.json"
    (runs / "tiny" / "share_0.5" / "validation_scores.json").write_bytes(scores.read_bytes())
    z, o = out["expert_load_ratio"]["zeda"], out["expert_load_ratio"]["original"]
    text = transfer_select.main(["--runs", str(runs), "--allow", "tiny"])
    (row,) = [line for line in text.splitlines() if line.startswith("| ") and "`tiny`" in line]
    worst = max(z[i] / o[i] for i in z)
    best = max(out["expert_load_ratio"]["best_rule"].values())
    assert row.endswith(
        f"| {max(z.values()):.1f} ({max(o.values()):.1f}); {worst:.2f}× the original's in the worst layer; "
        f"best rule {best:.1f} |"
    )
    assert "busiest real expert / mean, validation" in text
    capsys.readouterr()
    with pytest.raises(SystemExit):
        transfer_score.main([str(src), "--split", "validation", "--test", "x.jsonl"])
    assert "--test names test text" in capsys.readouterr().err

    # A scores file of test text next to a candidate is refused: settings are chosen on validation text.
    test_scores = transfer_score.main([str(src), *small, "--out", str(tmp_path / "t.json")])
    bad = runs / "tiny" / "share_0.5" / "validation_scores.json"
    bad.write_text(json.dumps(test_scores))
    before = bad.read_bytes()
    with pytest.raises(SystemExit, match="not the run's validation text"):
        transfer_select.main(["--runs", str(runs), "--allow", "tiny"])
    assert bad.read_bytes() == before


def test_select_refuses_a_validation_member(finished, tmp_path):
    root, _, _ = finished
    run = tmp_path / "runs" / "mixtral" / "share_0.5"
    run.mkdir(parents=True)
    record = json.loads((root / "runs" / "tiny" / "share_0.5" / "transfer.json").read_text())
    (run / "transfer.json").write_text(json.dumps(record | {"name": "mixtral"}))
    with pytest.raises(SystemExit, match="'mixtral' is not a tuning member"):
        transfer_select.main(["--runs", str(tmp_path / "runs")])


def _clock_child(tmp_path, every: float):
    """A child process inside an InvocationClock that says when it is in, then sleeps."""
    import subprocess
    import sys

    code = (
        "import sys, time; from pathlib import Path; from evals.transfer.distill import InvocationClock\n"
        f"with InvocationClock(Path({str(tmp_path / 't.jsonl')!r}), every={every}):\n"
        "    print('in', flush=True); time.sleep(60)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_invocation_clock_writes_its_line_when_terminated(tmp_path):
    child = _clock_child(tmp_path, every=30)
    assert child.stdout.readline().strip() == "in"
    child.terminate()
    assert child.wait(timeout=30) == 128 + 15
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["finished"] is False and lines[0]["wall_seconds"] >= 0
    assert not (tmp_path / "t.jsonl.running").exists()


def test_invocation_clock_keeps_a_killed_invocations_time_for_the_next(tmp_path):
    import time

    child = _clock_child(tmp_path, every=0.05)
    assert child.stdout.readline().strip() == "in"
    pending = tmp_path / "t.jsonl.running"
    for _ in range(200):
        if pending.is_file():
            break
        time.sleep(0.05)
    child.kill()
    child.wait(timeout=30)
    assert pending.is_file() and not (tmp_path / "t.jsonl").exists()
    with transfer_distill.InvocationClock(tmp_path / "t.jsonl"):
        pass
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [(x["finished"], x.get("killed")) for x in lines] == [(False, True), (True, None)]
    assert not pending.exists()


def test_table_names_settings_against_todays_default(finished, tmp_path, monkeypatch):
    """A run at the default of its day is named off today's default once the default changes, and
    a lead's override that became the default is no longer named."""
    import shutil

    import yaml

    import zeda.defaults

    root, argv, _ = finished
    transfer_distill.main([*argv, "--tag", "lr2e-3", "stage1.lr=2e-3"])
    for run in ("share_0.5", "share_0.5_lr2e-3"):
        if not (root / "runs" / "tiny" / run / "test_scores.json").is_file():
            transfer_score.main(
                [
                    str(root / "runs" / "tiny" / run),
                    "--tokens",
                    "512",
                    "--seq-len",
                    "32",
                    "--calibration-tokens",
                    "256",
                ]
            )

    def variants() -> list[str]:
        text = transfer_table.main(["--runs", str(root / "runs")])
        return [line.split(" | ")[4] for line in text.splitlines() if line.startswith("| `tiny`")]

    before = variants()
    assert "stage1.lr" not in before[0] and "`stage1.lr=2e-3`" in before[1]
    # Today's default changes: the LoRA variant of this router kind now trains at lr 2e-3.
    here = tmp_path / "defaults"
    shutil.copytree(zeda.defaults.HERE, here)
    kind = zeda.defaults.router_kind_of(finished[2]["model"])[1]
    was = zeda.defaults.default_values(kind, "lora")["stage1.lr"]
    data = yaml.safe_load((here / zeda.defaults.FILES[kind]).read_text())
    data["variants"]["lora"].setdefault("stage1", {})["lr"] = 2e-3
    (here / zeda.defaults.FILES[kind]).write_text(yaml.safe_dump(data))
    monkeypatch.setattr(zeda.defaults, "HERE", here)
    after = variants()
    assert f"`stage1.lr={was}` (the default then)" in after[0]
    assert "stage1.lr" not in after[1] and after[1] == before[0]


def test_a_run_at_every_position_is_todays_default_where_the_head_budget_gives_every_position():
    """``stage1.head_budget`` joined the defaults after most runs: only a member whose share of
    positions it changes (the large-vocabulary ``deepseek_v3``) has its older rows named."""
    same = transfer_table._same_effect
    assert not same({"name": "deepseek_v3"}, "stage1.head_budget", None, 2.0, 256)
    assert same({"name": "deepseek_v3"}, "stage1.head_budget", 2.0, 2.0, 256)
    for member in ("mixtral", "olmoe", "gpt_oss", "reference", "reference_sigmoid"):
        assert same({"name": member}, "stage1.head_budget", None, 2.0, 256), member
    assert not same({"name": "mixtral"}, "stage1.lr", 5e-4, 1e-3, 256)
    assert not same({"name": "mixtral"}, "stage1.head_budget", None, 2.0, None)
