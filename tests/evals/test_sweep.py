"""evals/tradeoff/sweep.py: its sweep files are checked, its jobs are run_tradeoff commands, and
each finished row is compared with the committed baselines of its model and target."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "evals/tradeoff/sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["sweep.yaml", "sweep_sigmoid25.yaml"])
def test_committed_sweep_files_load_and_their_overrides_are_valid(sweep, name):
    from zeda.config import load_recipe

    jobs = sweep.load_jobs(ROOT / "evals/tradeoff" / name)
    assert jobs
    for job in jobs:
        load_recipe(ROOT / sweep.MODELS[job["model"]][1], job["overrides"]).validate()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("jobs:\n  - {name: a, model: reference, target: 0.5, steps: 10, lr: 1}\n", "unknown keys ['lr']"),
        ("jobs:\n  - {name: a, model: mixtral, target: 0.5, steps: 10}\n", "model must be one of"),
        (
            "jobs:\n  - {name: a, model: reference, target: 0.5, steps: 10}\n"
            "  - {name: a, model: sigmoid, target: 0.5, steps: 10}\n",
            "repeats",
        ),
        ("runs: x\njobs: []\n", "one key, 'jobs'"),
    ],
)
def test_bad_sweep_files_fail_in_one_line(sweep, tmp_path, text, problem):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit, match=problem.replace("[", r"\[").replace("]", r"\]")):
        sweep.load_jobs(path)
    assert path.read_text() == text


def test_job_command_carries_device_target_steps_and_overrides(sweep, tmp_path):
    import argparse

    job = {"name": "j", "model": "sigmoid", "target": 0.25, "steps": 7, "overrides": ["stage1.lr=1e-3"]}
    args = argparse.Namespace(threads=1, device="cuda", eval_tokens=1024)
    cmd = sweep.command(job, tmp_path, args)
    assert cmd[1].endswith("evals/tradeoff/run_tradeoff.py")
    flat = " ".join(cmd)
    for part in (
        "--targets 0.25",
        "--steps 7",
        "--device cuda",
        "--skip-baselines",
        "evals/reference_sigmoid/model",
    ):
        assert part in flat
    assert cmd[-1] == "stage1.lr=1e-3"
    assert f"--runs {tmp_path / 'j'}" in flat


def test_comparison_uses_the_committed_rules_of_that_target(sweep):
    base = json.loads((ROOT / "evals/tradeoff/results.json").read_text())
    rules = [r for r in base["rows"] if r["method"] != "zeda" and r["target"] == 0.5]
    best = min(rules, key=lambda r: r["ppl_ratio"])
    job = {"model": "reference", "target": 0.5}
    winner = {"ppl_ratio": 1.0, "top1_agreement": 1.0, "kl": 0.0}
    c = sweep.compare(job, winner)
    assert c["best_rule"] == best["method"] and c["dominates"] and c["increase_ratio"] == 0
    loser = {"ppl_ratio": best["ppl_ratio"] * 2 - 1, "top1_agreement": 1.0, "kl": 0.0}
    c = sweep.compare(job, loser)
    assert not c["dominates"] and c["increase_ratio"] == pytest.approx(2.0)
