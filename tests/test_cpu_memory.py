"""`zeda.cpu_memory`: freed host memory is reused during a CPU run, and glibc is restored after."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zeda import cpu_memory

ROOT = Path(__file__).resolve().parents[1]

# A fresh process (glibc's own settings): page faults of a 256 MiB tensor after one was freed, and
# the resident set after the block ends and the tensor is freed.
_PROBE = """
import json, resource, torch
from zeda.cpu_memory import reuse_freed_memory

def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))

def faults(n=64 * 2**20, reps=3):
    # Page faults of each of a few repeats: once in a full test run a repeat went the other way
    # (a reused block faulted in again inside the block, or a fresh one faulted nothing outside
    # it), so the test reads the fewest for reuse and the most for glibc's own behaviour.
    a = torch.empty(n); a.fill_(1.0); del a
    counts = []
    for _ in range(reps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = torch.empty(n); a.fill_(1.0); del a
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return counts

import os
out = {
    "env": sorted(k for k in os.environ if k.startswith(("MALLOC", "LD_", "GLIBC", "THP", "PYTORCH", "TORCH"))),
    "rlimit_data_as": [resource.getrlimit(resource.RLIMIT_DATA), resource.getrlimit(resource.RLIMIT_AS)],
    "before": faults(),
}
with reuse_freed_memory("cpu") as on:
    out["on"] = on
    with reuse_freed_memory("cpu") as inner:
        out["inner"] = inner
    out["inside"] = faults()  # the inner block ending restores nothing
    kept = rss()
out["trimmed"] = kept - rss()
out["after"] = faults()
with reuse_freed_memory("meta") as other:
    out["meta"] = other
print(json.dumps(out))
"""

PAGES = 64 * 2**20 * 4 // 4096  # one 256 MiB tensor


def _probe(**env: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        check=True,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(cpu_memory._glibc() is None or not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_blocks_are_reused_inside_and_glibc_is_restored_after() -> None:
    out = _probe()
    assert max(out["before"]) > 0.9 * PAGES, out  # glibc maps and zeroes every large block afresh
    assert out["on"] is True and out["inner"] is True
    assert min(out["inside"]) < 0.02 * PAGES, out  # the freed block is reused: no page faults
    assert out["trimmed"] > 200 * 2**20, out  # the kept heap goes back to the kernel at the end
    assert max(out["after"]) > 0.9 * PAGES, out  # glibc's own behaviour again
    assert out["meta"] is False


@pytest.mark.skipif(cpu_memory._glibc() is None or not sys.platform.startswith("linux"), reason="glibc only")
def test_the_users_own_malloc_tunables_are_left_alone() -> None:
    for env in ({"MALLOC_TRIM_THRESHOLD_": "131072"}, {"MALLOC_ARENA_MAX": "2"}):
        out = _probe(**env)
        assert out["on"] is False and max(out["inside"]) > 0.9 * PAGES, (env, out)


def test_a_cpu_run_trains_inside_the_block(tmp_path, monkeypatch) -> None:
    """`zeda.run` (the CLI and the API) trains and evaluates on CPU with freed memory reused."""
    import zeda.pipeline
    from zeda.io import atomic_save
    from zeda.tiny import tiny_corpus, tiny_model, tiny_tokenizer

    seen = []
    real = zeda.pipeline.reuse_freed_memory
    real_distill = zeda.pipeline.distill

    @contextlib.contextmanager
    def spy(device):
        with real(device) as on:
            seen.append((str(device), on))
            yield on

    def distill(*args, **kwargs):
        seen.append(("distill", cpu_memory._depth))
        return real_distill(*args, **kwargs)

    monkeypatch.setattr(zeda.pipeline, "reuse_freed_memory", spy)
    monkeypatch.setattr(zeda.pipeline, "distill", distill)
    atomic_save(tiny_model("qwen3_moe"), tmp_path / "model", tokenizer=tiny_tokenizer())
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(24)))
    (tmp_path / "recipe.yaml").write_text(
        "model: {name_or_path: model, dtype: float32}\n"
        "data: {train_file: data.jsonl, eval_file: data.jsonl, seq_len: 32}\n"
        "stage1: {steps: 1, lr: 0.01}\n"
        "train: {batch_size: 2, output_dir: run, warmup_ratio: 0.0}\n"
    )
    monkeypatch.chdir(tmp_path)
    zeda.pipeline.run("recipe.yaml", evaluate=False)
    glibc = cpu_memory._glibc() is not None and not cpu_memory._user_tuned()
    assert seen == [("cpu", glibc), ("distill", int(glibc))]
    assert cpu_memory._depth == 0  # restored after the run
