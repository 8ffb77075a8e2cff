"""CI regression evals: distill, evaluate, and check every threshold of each suite YAML.

    python evals/regression/run.py                                   # every evals/regression/*_cpu.yaml
    python evals/regression/run.py evals/regression/reference_cpu.yaml --quick
    python evals/regression/run.py evals/regression/qwen3_30b_a3b_gpu.yaml --out runs/regression

Each suite YAML names a model and a recipe (with overrides), the lm-eval tasks and limit, and
thresholds (see ``reference_cpu.yaml``). The runner injects zero experts, distills for the
configured steps (or evaluates a ready converted checkpoint given as ``converted:``), runs
`zeda.evaluate` (which measures the original in teacher mode on the same tasks), prints one
table of every check and exits 1 if any check misses (2 on a broken suite file).

Checks (all optional, all relative to the unconverted model where they are ratios):

- ``min_routed_flop_reduction``: measured routed-expert FLOP reduction during the evaluation;
- ``ppl_ratio_max``, ``top1_agreement_min``, ``mean_kl_max``: held-out text vs the original;
- ``recovery_min``: every lm-eval metric's recovery (converted / original, inverted when lower
  is better) is at least this; ``recovery_min_per_metric`` overrides it per ``task/metric``;
- ``beat_baselines``: on held-out text, zeda is at least as good as each named training-free
  baseline calibrated to the same measured skipped share (the value distillation adds), on each
  of ``beat_baselines_metrics`` (default ``[mean_kl]``: KL(original ‖ model), the quantity stage-1
  distillation minimises; ``ppl_ratio`` and ``top1_agreement`` can be added).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

SUITE_KEYS = {
    "name",
    "description",
    "model",
    "converted",
    "recipe",
    "overrides",
    "quick",
    "eval",
    "thresholds",
    "threads",
}
THRESHOLD_KEYS = {
    "min_routed_flop_reduction",
    "ppl_ratio_max",
    "top1_agreement_min",
    "mean_kl_max",
    "recovery_min",
    "recovery_min_per_metric",
    "beat_baselines",
    "beat_baselines_metrics",
}


class SuiteError(Exception):
    """A malformed suite file or a missing input."""


def load_suite(path: Path, quick: bool) -> dict[str, Any]:
    """Read and check one suite YAML; with ``quick`` merge its ``quick:`` section on top."""
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise SuiteError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SUITE_KEYS)}")
    bad = set(data.get("thresholds") or {}) - THRESHOLD_KEYS
    if bad:
        raise SuiteError(f"{path}: unknown threshold(s) {sorted(bad)}; allowed: {sorted(THRESHOLD_KEYS)}")
    if not data.get("thresholds"):
        raise SuiteError(f"{path}: a suite needs thresholds")
    if "model" not in data or "recipe" not in data:
        raise SuiteError(f"{path}: a suite needs 'model' and 'recipe'")
    data.setdefault("name", path.stem)
    data.setdefault("overrides", [])
    data.setdefault("eval", {})
    if quick and data.get("quick"):
        q = data["quick"]
        data["overrides"] = list(data["overrides"]) + list(q.get("overrides", []))
        data["eval"] = {**data["eval"], **(q.get("eval") or {})}
        data["thresholds"] = {**data["thresholds"], **(q.get("thresholds") or {})}
    return data


def _path(p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() or q.exists() else REPO / q


def run_suite(suite: dict[str, Any], work: Path) -> tuple[Any, dict[str, Any]]:
    """Distill (or load) and evaluate one suite; return ``(EvalResult, info)``."""
    import zeda
    from zeda.config import load_recipe

    model_dir = _path(suite["model"])
    if not (model_dir / "config.json").exists():
        raise SuiteError(f"model {suite['model']} not found (no config.json at {model_dir})")
    ev = suite["eval"]
    overrides = [
        f"model.name_or_path={model_dir}",
        f"train.output_dir={work / suite['name']}",
        "train.overwrite=true",
        *[f"data.{k}={_path(v)}" for k, v in (ev.get("data") or {}).items()],
        *suite["overrides"],
    ]
    for key in ("max_eval_tokens", "zero_bias_sweep", "baselines"):
        if key in ev:
            overrides.append(f"eval.{key}={json.dumps(ev[key])}")
    cfg = load_recipe(_path(suite["recipe"]), overrides)
    info: dict[str, Any] = {"overrides": overrides}
    t0 = time.perf_counter()
    if suite.get("converted"):
        model = zeda.load(_path(suite["converted"]))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(_path(suite["converted"]))
    else:
        model = zeda.load(cfg.model.name_or_path, dtype=cfg.model.dtype)
        tok = zeda.load_tokenizer(cfg.model.name_or_path, model)
        model, res = zeda.distill(model, cfg, tok)  # injects the original, then both stages
        info["distill"] = res.to_dict()
    info["distill_seconds"] = time.perf_counter() - t0
    # A converted checkpoint's teacher mode runs its merged experts: compare with the original.
    teacher = zeda.load(_path(suite["model"]), dtype=cfg.model.dtype) if suite.get("converted") else None
    result = zeda.evaluate(
        model,
        cfg,
        tok,
        teacher=teacher,
        tasks=list(ev.get("tasks", cfg.eval.tasks)),
        limit=ev.get("limit", cfg.eval.limit),
        baselines_at_sweep=False,
        model_name=suite["name"],
        progress=False,
    )
    info["eval_seconds"] = result.wall_seconds
    return result, info


def check(result: Any, thresholds: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """Every check as ``(check, measured, required, passed)``."""
    rows: list[tuple[str, str, str, bool]] = []

    def add(name: str, value: float | None, op: str, limit: float) -> None:
        ok = value is not None and (value >= limit if op == ">=" else value <= limit)
        rows.append((name, "missing" if value is None else f"{value:.4f}", f"{op} {limit:g}", bool(ok)))

    t = thresholds
    if "min_routed_flop_reduction" in t:
        add(
            "routed-expert FLOP reduction",
            result.routed_flop_reduction,
            ">=",
            float(t["min_routed_flop_reduction"]),
        )
    intr = result.intrinsic or {}
    for key, metric, op in (
        ("ppl_ratio_max", "ppl_ratio", "<="),
        ("top1_agreement_min", "top1_agreement", ">="),
        ("mean_kl_max", "mean_kl", "<="),
    ):
        if key in t:
            add(f"held-out {metric}", intr.get(metric), op, float(t[key]))
    per_metric = dict(t.get("recovery_min_per_metric") or {})
    if "recovery_min" in t or per_metric:
        for task, metrics in result.recovery.items():
            for name, rec in metrics.items():
                key = f"{task}/{name}"
                limit = per_metric.pop(key, t.get("recovery_min"))
                if limit is not None:
                    add(f"recovery {key}", rec, ">=", float(limit))
        for key, limit in per_metric.items():  # named but not measured: a miss
            add(f"recovery {key}", None, ">=", float(limit))
    zeda_pt = next((p for p in result.curve if p.label == "zeda"), None)
    metrics = list(t.get("beat_baselines_metrics") or ["mean_kl"])
    for kind in t.get("beat_baselines") or []:
        pts = [p for p in result.curve if p.method == kind]
        for metric in metrics:
            higher = metric == "top1_agreement"
            op = ">=" if higher else "<="
            if zeda_pt is None or not pts:
                rows.append((f"{metric} vs {kind} at matched FLOPs", "missing", f"{op} baseline", False))
                continue
            base = min(pts, key=lambda p: abs(p.zero_share - zeda_pt.zero_share))
            mine, theirs = getattr(zeda_pt, metric), getattr(base, metric)
            rows.append(
                (
                    f"{metric} vs {kind} at matched FLOPs ({100 * base.zero_share:.1f}% skipped)",
                    f"{mine:.4g}",
                    f"{op} {theirs:.4g}",
                    mine >= theirs if higher else mine <= theirs,
                )
            )
    return rows


def print_table(name: str, rows: list[tuple[str, str, str, bool]]) -> None:
    """Print one suite's checks as a Markdown table."""
    print(f"\n### {name}\n")
    print("| check | measured | required | result |")
    print("|---|---|---|---|")
    for check_name, measured, required, ok in rows:
        print(f"| {check_name} | {measured} | {required} | {'pass' if ok else 'MISS'} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="suite YAMLs (default: evals/regression/*_cpu.yaml)")
    ap.add_argument(
        "--quick", action="store_true", help="apply each suite's quick: section (fewer steps/examples)"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write each suite's evaluation (results.json, report, plots) here",
    )
    ap.add_argument(
        "--work-dir", type=Path, default=None, help="training run directories (default: a temp dir)"
    )
    ap.add_argument("--model", default=None, help="use this original model directory instead of each suite's")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: suite's, else torch's)"
    )
    args = ap.parse_args(argv)
    files = [f.resolve() for f in args.files] or sorted(HERE.glob("*_cpu.yaml"))
    if args.out:
        args.out = args.out.resolve()
    if args.work_dir:
        args.work_dir = args.work_dir.resolve()
    os.chdir(REPO)  # recipes name their data relative to the repository root
    if not files:
        print("no suite files found", file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    summary: list[tuple[str, int, int, float]] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="zeda-regression-") as tmp:
        work = args.work_dir or Path(tmp)
        for f in files:
            t0 = time.perf_counter()
            try:
                suite = load_suite(f, args.quick)
                if args.model:
                    suite["model"] = str(Path(args.model).resolve())
                if args.model:
                    suite["model"] = str(Path(args.model).resolve())
                threads = args.threads or suite.get("threads")
                if threads:
                    torch.set_num_threads(int(threads))
                result, info = run_suite(suite, work)
            except Exception as exc:  # a broken suite or model is a failure, reported in one line
                print(
                    f"\n### {f.name}\n\nERROR: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                )
                summary.append((f.name, 0, 1, time.perf_counter() - t0))
                failed = True
                continue
            rows = check(result, suite["thresholds"])
            print_table(f"{suite['name']} ({f.name}{', quick' if args.quick else ''})", rows)
            n_miss = sum(not ok for *_, ok in rows)
            failed |= n_miss > 0
            wall = time.perf_counter() - t0
            summary.append((f.name, len(rows) - n_miss, n_miss, wall))
            print(
                f"\n(distill {info['distill_seconds']:.0f} s, evaluate {info['eval_seconds']:.0f} s, "
                f"{result.measured_tokens:,} tokens measured)"
            )
            if args.out:
                result.save(args.out / suite["name"], overwrite=True)
                (args.out / suite["name"] / "regression.json").write_text(
                    json.dumps(
                        {
                            "suite": str(f),
                            "quick": args.quick,
                            "checks": rows,
                            "info": info,
                            "wall_seconds": wall,
                        },
                        indent=1,
                        default=str,
                    )
                )
    print("\n| suite | passed | missed | seconds |\n|---|---|---|---|")
    for name, ok, miss, wall in summary:
        print(f"| {name} | {ok} | {miss} | {wall:.0f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
