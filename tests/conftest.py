"""Shared fixtures: tiny in-process models of every supported family (no network)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import zeda  # noqa: E402,F401  (registers families and backends)
from zeda.config import RunConfig, apply_overrides  # noqa: E402
from zeda.tiny import TINY, tiny_corpus  # noqa: E402

FAMILIES = sorted(TINY)
# Families whose experts module is transformers' ``@use_experts_implementation`` one, i.e. the
# direct contract of the experts backends. Llama 4's experts scale their inputs and run behind its
# family adapter (tested through the module in tests/zero/test_experts.py).
DECORATED_FAMILIES = [f for f in FAMILIES if zeda.get_spec(f).experts_attrs is None]


# The environment of a test's child processes (torchrun / accelerate launch): CPU, one thread each,
# offline, and this checkout's zeda on the path.
LAUNCH_ENV = {
    **os.environ,
    "ACCELERATE_USE_CPU": "true",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONPATH": str(Path(__file__).parents[1]),
}


def free_port() -> str:
    """A free local TCP port for a launcher's rendezvous (port 0 can hang a launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def token_batch(batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    """Deterministic ``(batch, seq)`` token ids."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --- a skipped serving suite is said loudly, and fails the run where it is required (CI) ---
REQUIRE_SERVING_ENV = "ZEDA_REQUIRE_SERVING"


def _serving_skips(terminalreporter) -> list:
    return [r for r in terminalreporter.stats.get("skipped", []) if r.nodeid.startswith("tests/serving/")]


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    skipped = _serving_skips(terminalreporter)
    if skipped:
        reason = str(skipped[0].longrepr[-1]) if isinstance(skipped[0].longrepr, tuple) else ""
        terminalreporter.write_line(
            f"SERVING SUITE SKIPPED: {len(skipped)} tests in tests/serving did not run ({reason}); "
            "vLLM serving is untested in this run",
            red=True,
            bold=True,
        )


def pytest_sessionfinish(session, exitstatus) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get(REQUIRE_SERVING_ENV) == "1" and reporter is not None and _serving_skips(reporter):
        session.exitstatus = 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 96-document tiny training corpus, ``<tmp>/train.jsonl`` (modules may override it)."""
    d = tmp_path_factory.mktemp("data")
    with (d / "train.jsonl").open("w") as f:
        for t in tiny_corpus(96):
            f.write(json.dumps({"text": t}) + "\n")
    return d / "train.jsonl"


def run_config(corpus: Path, out: Path, *overrides: str) -> RunConfig:
    """A tiny distillation recipe: trains and validates on ``corpus`` in 32-token rows, batches of
    4, writes to ``out``; ``overrides`` on top."""
    return apply_overrides(
        RunConfig(),
        [
            f"data.train_file={corpus}",
            f"data.eval_file={corpus}",
            "data.seq_len=32",
            "train.batch_size=4",
            f"train.output_dir={out}",
            *overrides,
        ],
    )


def metrics(run: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]
