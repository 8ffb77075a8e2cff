"""A serving suite that could not run says so in one loud line, and fails a run that requires it.

The vLLM tests skip where ``.venv-vllm`` is missing; CI (``.ci/run``) sets
``ZEDA_REQUIRE_SERVING=1`` so that such a run fails instead of passing quietly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("required", [False, True])
def test_a_skipped_serving_suite_is_loud_and_fails_when_required(required: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ZEDA_REQUIRE_SERVING"}
    env.update(PYTHONPATH=str(REPO), ZEDA_VLLM_PYTHON="/nonexistent/python")
    if required:
        env["ZEDA_REQUIRE_SERVING"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/serving/test_transformers_floor.py",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "SERVING SUITE SKIPPED: 2 tests in tests/serving did not run" in proc.stdout, proc.stdout[-2000:]
    assert proc.returncode == (1 if required else 0), proc.stdout[-2000:]
