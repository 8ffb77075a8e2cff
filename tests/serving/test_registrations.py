"""One process, several registrations: the engine adapters' config classes beside zeda's own.

Once vLLM loads its general plugins (any ``vllm.LLM`` in a process where ``zeda[vllm]`` is
installed) or SGLang its plugins, the adapters register ``zeda_<family>`` config classes with
transformers. zeda must still load its own exports in that process, whichever registered first:
served families (qwen3_moe) and families the adapters refuse (flex_olmo) alike. Runs in fresh
processes (registration is process-global); no engine is imported, only the adapters' configs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zeda
from zeda.tiny import tiny_model

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import sys, torch
order, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]

def adapters():
    import zeda_sglang.config, zeda_vllm.config
    zeda_vllm.config.register_configs()
    zeda_sglang.config.register_configs()

if order == "adapters_first":
    adapters()
import zeda
if order == "zeda_first":
    adapters()
ids = torch.arange(2, 14)[None]
logits = {}
with torch.no_grad():
    for path in paths:
        model = zeda.load(path)
        logits[path] = model(input_ids=ids).logits
        assert hasattr(model, "zeda_spec"), type(model)
adapters()  # registering again changes nothing
with torch.no_grad():
    for path in paths:
        assert torch.equal(zeda.load(path)(input_ids=ids).logits, logits[path])
torch.save(logits, out)
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("registrations")
    out = {}
    for family in ("qwen3_moe", "flex_olmo"):
        model = tiny_model(family)
        zeda.inject_zero_experts(model, seed=0)
        zeda.export(model, root / family)
        with torch.no_grad():
            out[family] = (
                str(root / family),
                zeda.load(root / family)(input_ids=torch.arange(2, 14)[None]).logits,
            )
    return out


@pytest.mark.parametrize("order", ["adapters_first", "zeda_first"])
def test_zeda_loads_its_exports_beside_the_engine_adapters(exports, order: str, tmp_path: Path) -> None:
    out = tmp_path / "logits.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, order, str(out), *(p for p, _ in exports.values())],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    for path, logits in exports.values():
        assert torch.equal(got[path], logits), path
