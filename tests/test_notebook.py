"""The quickstart notebook runs end to end on CPU (nbclient, python3 kernel), with few steps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # The kernel inherits this environment: a short run, offline, one intra-op thread (2 shared cores).
    for key, value in {
        "ZEDA_QUICKSTART_STEPS": "2",
        "ZEDA_QUICKSTART_LIMIT": "2",
        "ZEDA_QUICKSTART_EVAL_TOKENS": "512",
        "ZEDA_QUICKSTART_BATCH": "2",
        "ZEDA_QUICKSTART_SWEEP": "[1.0]",
        "ZEDA_QUICKSTART_OUT": str(tmp_path / "out"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # Result objects render as tables, plots show inline.
    assert any("text/markdown" in o.get("data", {}) or "text/html" in o.get("data", {}) for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)
    for name in ("results.json", "report.md", "zero_share_per_layer.png", "frontier.png"):
        assert (tmp_path / "out" / "eval" / name).exists(), name
    assert (tmp_path / "out" / "export" / "README.md").exists()
    assert os.listdir(tmp_path / "out" / "export")
