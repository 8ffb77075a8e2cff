"""Run the offline lm-eval reference tasks on the reference model and record the result.

    python evals/reference/run_lm_eval.py                  # -> evals/reference/results_lm_eval.json
    python evals/reference/run_lm_eval.py --tasks ref_cloze --limit 50 --out /tmp/r.json

Runs fully offline (``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``) with tasks from
``evals/tasks`` and writes the metrics, sample counts, the model's weight hash, the versions used
and the exact command to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TASKS_DIR = REPO / "evals" / "tasks"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _clean(value: object) -> object:
    """JSON-safe metric values (NaN/inf become strings)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HERE / "model"))
    ap.add_argument("--tasks", default="ref_perplexity,ref_cloze")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="context for lm-eval (default: the model's 1024; trained at 256)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results_lm_eval.json"))
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"

    import lm_eval
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = HFLM(
        pretrained=model,
        tokenizer=tok,
        backend="causal",
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=args.tasks.split(","),
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
        limit=args.limit,
        bootstrap_iters=0,
        log_samples=False,
    )
    wall = time.perf_counter() - t0
    argv = [a if not a.startswith(str(REPO)) else os.path.relpath(a, REPO) for a in sys.argv[1:]]
    record = {
        "command": "python evals/reference/run_lm_eval.py" + "".join(f" {shlex.quote(a)}" for a in argv),
        "model": os.path.relpath(model_dir.resolve(), REPO),
        "model_sha256": _sha256(model_dir / "model.safetensors"),
        "dtype": "float32 (weights stored in bfloat16)",
        "max_length": lm.max_length,
        "limit": args.limit,
        "results": {t: {k: _clean(v) for k, v in r.items()} for t, r in out["results"].items()},
        "n_samples": out.get("n-samples", {}),
        "versions": {
            "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "0.4.x",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "wall_seconds": round(wall, 1),
        "threads": args.threads,
    }
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(record["results"], indent=1))


if __name__ == "__main__":
    main()
