"""Component probes behind two of `zeda plan`'s coefficients (peak RSS, CPU, one process each).

``loss``: the forward-KL loss on ``(1, N, V)`` logits at the Qwen3 vocabulary: peak of the loss
forward in fp32 ``N x V`` units (student logits and the loss's temporaries; the teacher logits
exist before the baseline). Measured with the dense chunk layout: 3.33 units at N = 256 and
1.58 at N = 1024 for bf16 logits (4.0 bytes per element plus ~5.4 fp32 chunk temporaries).

``experts``: forward + backward of a PEFT-LoRA Qwen3-shaped model (hidden 2048, expert width 768,
top-8) through zeda's experts backend: peaks in units of ``E * I * H * bytes``. Measured with
E = 32: the backward adds 6.1-6.5 units above the end of the forward (the per-expert weight
gradients, expanded to the whole expert stack and accumulated), i.e. about 2.15x one layer's
``gate_up + down`` (3 units); after the forward, each layer but the first keeps 3 units of merged
``W + s*BA`` weights for backward and the first keeps ``down_proj`` only (1 unit). All of this
is PEFT's merged path (``--merged``, ``lora.split=false``); split LoRA (the default) keeps none
of it: measured with E = 32, 2 layers, 128 tokens: 0.01 units after the forward, +0.03 in
backward (the rank-8 factors' gradients).

    python evals/plan/probe.py loss --tokens 1024 --dtype bfloat16
    python evals/plan/probe.py experts --experts 32 --layers 2 --tokens 128
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch


def _mib(field: str = "VmRSS") -> float:
    return (
        int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024
    )


def _reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def probe_loss(tokens: int, dtype: torch.dtype) -> None:
    from zeda.distillation.losses import forward_kl

    vocab = 151_936
    h = torch.randn(1, tokens, 256, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, 256, dtype=dtype) * 0.05
    with torch.no_grad():
        t = h.detach() @ w.T
    mask = torch.ones(1, tokens)
    mask[:, -1] = 0
    unit = tokens * vocab * 4 / 2**20
    base = _mib()
    _reset()
    s = h @ w.T
    loss = forward_kl(s, t, mask)
    fwd = _mib("VmHWM") - base
    del s
    loss.backward()
    print(f"loss forward peak {fwd / unit:.2f} fp32 units (N*V*4 bytes = {unit:.0f} MiB)")


def probe_experts(experts: int, layers: int, tokens: int, split: bool = True) -> None:
    import zeda
    from zeda.config import RunConfig, apply_overrides
    from zeda.distillation.student import build_student
    from zeda.tiny import tiny_model

    h, i = 2048, 768
    model = tiny_model(
        "qwen3_moe",
        num_experts=experts,
        hidden_size=h,
        moe_intermediate_size=i,
        num_hidden_layers=layers,
        vocab_size=256,
        num_experts_per_tok=8,
        head_dim=128,
        num_attention_heads=32,
        num_key_value_heads=4,
    ).to(torch.bfloat16)
    zeda.inject_zero_experts(model, experts_implementation="zeda")
    student = build_student(
        model, apply_overrides(RunConfig(), ["lora.r=8", f"lora.split={str(split).lower()}"])
    )
    unit = experts * i * h * 2 / 2**20
    ids = torch.randint(0, 256, (1, tokens))
    base = _mib()
    _reset()
    out = student(input_ids=ids).logits.float().sum()
    after_fwd = _mib() - base
    _reset()
    out.backward()
    bwd = _mib("VmHWM") - base
    print(
        f"E={experts} layers={layers} tokens={tokens} {'split' if split else 'merged'} LoRA: after forward {after_fwd / unit:.2f} units, "
        f"backward peak {bwd / unit:.2f} (+{(bwd - after_fwd) / unit:.2f}); unit E*I*H*2 = {unit:.0f} MiB"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["loss", "experts"])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--merged", action="store_true", help="experts: PEFT's merged LoRA (lora.split=false)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.what == "loss":
        probe_loss(args.tokens, getattr(torch, args.dtype))
    else:
        probe_experts(args.experts, args.layers, args.tokens, split=not args.merged)


if __name__ == "__main__":
    main()
