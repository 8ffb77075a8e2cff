"""Run many trade-off trainings in parallel and compare each with the committed baselines.

Each job of a sweep file is one ``evals/tradeoff/run_tradeoff.py --skip-baselines`` run (one
target, one step count, its own recipe overrides, its own run folder). Jobs run as separate
processes, ``--parallel`` at a time; on a GPU machine many small jobs share the GPU (each is
launch-bound, one CPU thread per job). As each job ends, ``<out>/sweep.md`` is rewritten: the
job's measured share, ppl ratio, top-1 agreement and KL, against the committed training-free
rows of the same model and target (``evals/tradeoff/results.json`` or
``evals/reference_sigmoid/tradeoff/results.json``, calibrated to the committed zeda row's share).
The comparison is a *search* aid: a setting that wins here is then rerun by ``run_tradeoff.py``
itself, which calibrates the baselines to its own measured share.

    python evals/tradeoff/sweep.py evals/tradeoff/sweep.yaml --device cuda --parallel 16 --deadline 480

Sweep file (YAML)::

    jobs:
      - {name: ref50_rel_fwd, model: reference, target: 0.5, steps: 1800, overrides: [stage1.kd=forward_kl]}

``model`` is ``reference`` (``evals/reference/model`` with ``recipes/reference/quickstart.yaml``)
or ``sigmoid`` (``evals/reference_sigmoid/model`` with ``recipes/reference_sigmoid/quickstart.yaml``).
Jobs still running at ``--deadline`` seconds are stopped and reported as such.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
from run_tradeoff import versus_rules  # noqa: E402

MODELS = {
    "reference": (
        "evals/reference/model",
        "recipes/reference/quickstart.yaml",
        "evals/tradeoff/results.json",
    ),
    "sigmoid": (
        "evals/reference_sigmoid/model",
        "recipes/reference_sigmoid/quickstart.yaml",
        "evals/reference_sigmoid/tradeoff/results.json",
    ),
}
JOB_KEYS = {"name", "model", "target", "steps", "overrides"}


def load_jobs(path: Path) -> list[dict]:
    """The sweep file's jobs, checked (unknown keys, unknown models and repeated names fail)."""
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or set(spec) != {"jobs"}:
        raise SystemExit(f"sweep: {path} must hold one key, 'jobs' (a list)")
    jobs, seen = [], set()
    for i, job in enumerate(spec["jobs"]):
        extra = set(job) - JOB_KEYS
        missing = JOB_KEYS - {"overrides"} - set(job)
        if extra or missing:
            raise SystemExit(
                f"sweep: job {i} of {path}: unknown keys {sorted(extra)}, missing {sorted(missing)}"
            )
        if job["model"] not in MODELS:
            raise SystemExit(f"sweep: job {job['name']}: model must be one of {sorted(MODELS)}")
        if job["name"] in seen:
            raise SystemExit(f"sweep: job name {job['name']} repeats; names must be unique")
        seen.add(job["name"])
        jobs.append({"overrides": [], **job})
    return jobs


def command(job: dict, runs: Path, args: argparse.Namespace) -> list[str]:
    """The ``run_tradeoff.py`` command line of one job."""
    model, recipe, _ = MODELS[job["model"]]
    return [
        sys.executable,
        str(HERE / "run_tradeoff.py"),
        *("--model", str(ROOT / model), "--recipe", str(ROOT / recipe)),
        *("--targets", str(job["target"]), "--steps", str(job["steps"])),
        *("--runs", str(runs / job["name"]), "--out", str(runs / job["name"])),
        *("--threads", str(args.threads), "--device", args.device, "--eval-tokens", str(args.eval_tokens)),
        "--skip-baselines",
        *job["overrides"],
    ]


@functools.cache
def _committed(model: str) -> dict:
    """The committed trade-off results of ``model`` (read once per sweep)."""
    return json.loads((ROOT / MODELS[model][2]).read_text())


def compare(job: dict, row: dict) -> dict:
    """The job's row against the committed baselines of its model and target."""
    base = _committed(job["model"])
    rules = [r for r in base["rows"] if r["method"] != "zeda" and abs(r["target"] - job["target"]) < 1e-9]
    if not rules:
        return {}
    vs = versus_rules(row, rules)
    return {
        "best_rule": vs["best_baseline"],
        "best_rule_ppl_ratio": vs["best_baseline_ppl_ratio"],
        "increase_ratio": vs["increase_ratio"],
        "dominates": vs["zeda_dominates"],
    }


def write_table(results: list[dict], out: Path, argv: list[str]) -> None:
    """``sweep.md`` and ``sweep.jsonl`` from the finished (or stopped) jobs."""
    lines = [
        "| job | model | target | steps | overrides | skipped | ppl ratio | top-1 agr | KL | best rule (ppl) | zeda / best | dominates | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        j = r["job"]
        head = f"| {j['name']} | {j['model']} | {j['target']} | {j['steps']} | {' '.join(j['overrides'])} |"
        if "row" not in r:
            lines.append(f"{head} {r['status']} | | | | | | | |")
            continue
        row, c = r["row"], r["comparison"]
        lines.append(
            f"{head} {row['skipped_share']:.3f} | {row['ppl_ratio']:.4f} | {row['top1_agreement']:.4f} | "
            f"{row['kl']:.4f} | {c.get('best_rule', '–')} ({c.get('best_rule_ppl_ratio', float('nan')):.4f}) | "
            f"{c.get('increase_ratio', float('nan')):.2f} | {'yes' if c.get('dominates') else 'no'} | "
            f"{row['train_seconds']} |"
        )
    lines += ["", "Command:", "", "    python evals/tradeoff/sweep.py " + " ".join(argv)]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    (out / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path, help="the sweep file (YAML, see above)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs/sweep", help="one run folder per job")
    ap.add_argument(
        "--out", type=Path, default=None, help="where sweep.md/.jsonl and logs go (default: --runs)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per job")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument(
        "--deadline", type=float, default=None, help="stop jobs still running after this many seconds"
    )
    args = ap.parse_args()
    jobs = load_jobs(args.sweep)
    out = args.out or args.runs
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    pending, running, results = list(jobs), {}, []
    while pending or running:
        while pending and len(running) < args.parallel:
            job = pending.pop(0)
            log = open(out / "logs" / f"{job['name']}.log", "w")  # noqa: SIM115  (closed when the job ends)
            proc = subprocess.Popen(
                command(job, args.runs, args), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
            running[job["name"]] = (job, proc, log, time.monotonic())
            print(f"[{time.monotonic() - t0:5.0f}s] start {job['name']}", flush=True)
        time.sleep(2)
        late = args.deadline is not None and time.monotonic() - t0 > args.deadline
        for name, (job, proc, log, started) in list(running.items()):
            if proc.poll() is None and not late:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            del running[name]
            row_file = args.runs / name / f"target_{job['target']:.2f}" / "tradeoff_row.json"
            result = {"job": job, "seconds": round(time.monotonic() - started)}
            if proc.returncode == 0 and row_file.exists():
                row = json.loads(row_file.read_text())
                result.update(status="done", row=row, comparison=compare(job, row))
            else:
                result["status"] = "stopped at deadline" if late else f"failed (exit {proc.returncode})"
            results.append(result)
            print(f"[{time.monotonic() - t0:5.0f}s] {result['status']} {name}", flush=True)
            write_table(results, out, sys.argv[1:])
        if late:
            for job in pending:
                results.append({"job": job, "status": "not started before the deadline"})
            pending = []
            write_table(results, out, sys.argv[1:])
    print((out / "sweep.md").read_text())


if __name__ == "__main__":
    main()
