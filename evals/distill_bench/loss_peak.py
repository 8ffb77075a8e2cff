"""Peak memory and time of the forward-KL loss at the real Qwen3 vocabulary: zeda's current
`zeda.distillation.losses` vs the version of a given commit (default: before the dense chunk
layout), each in a fresh process.

Logits ``(1, N, 151936)`` are made from a ``(1, N, 256)`` hidden state; the peak is VmHWM of the
loss forward + backward above the RSS before the student logits exist (the teacher logits are
already resident), in units of one fp32 ``N x V`` tensor.

    python evals/distill_bench/loss_peak.py [--before 5b18895] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VOCAB = 151_936


def _mib(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def worker(path: str, dtype_name: str, tokens: int) -> dict:
    """Peak and time of one forward + backward of ``forward_kl`` from the module at ``path``."""
    import torch

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("losses_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, 256, dtype=dtype, generator=g).requires_grad_(True)
    w = torch.randn(VOCAB, 256, dtype=dtype, generator=g) * 0.05
    with torch.no_grad():
        t = h.detach() @ w.T
    mask = torch.ones(1, tokens)
    mask[:, -1] = 0
    unit = tokens * VOCAB * 4 / 2**20
    base = _mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.process_time()
    s = h @ w.T
    loss = mod.forward_kl(s, t, mask)
    loss.backward()
    cpu = time.process_time() - t0
    return {"peak_units": (_mib("VmHWM") - base) / unit, "unit_mib": unit, "cpu_s": cpu, "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="5b18895", help="commit of the earlier losses.py")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.tokens)))
        return
    old = subprocess.run(
        ["git", "show", f"{args.before}:zeda/distillation/losses.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(old)
    variants = {"before": f.name, "now": str(REPO / "zeda/distillation/losses.py")}
    print(f"forward_kl on (1, {args.tokens}, {VOCAB}) logits, 1 thread; peak in fp32 N x V units")
    print("| dtype | version | peak (units) | CPU s (fwd+bwd) |\n|---|---|---|---|")
    for dtype in ("bfloat16", "float32"):
        for name, path in variants.items():
            cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--worker", path, dtype]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            print(f"| {dtype} | {name} | {r['peak_units']:.2f} | {r['cpu_s']:.2f} |")
    Path(f.name).unlink()


if __name__ == "__main__":
    main()
