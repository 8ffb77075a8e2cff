"""Real speed of a zeda-converted MoE model versus its original, side by side in one process.

What is compared (same weights, same inputs, interleaved repeats, median wall time):

- ``original``: the unconverted model with transformers' stock ``eager`` experts (the fastest
  stock CPU backend);
- ``noop``: the original with every routed-experts call replaced by ``zeros_like`` (used only
  to measure ``f``, the share of forward time spent in the routed experts:
  ``f = 1 - t_noop / t_original``);
- ``zeda@s``: the converted model (``inject_zero_experts``: E real + E/2 zero experts, top-k
  unchanged) with zeda's experts backend and routing forced so that exactly share ``s`` of the
  slots go to zero experts (``router_settings(model, forced_zero_share=s)``, with
  ``zero_logit_bias=-1e4`` so the router's own picks add none); ``zeda@real`` is
  the converted model's own routing, with its measured zero share;
- ``eager@0.5``: the converted model at forced share 0.5 with stock ``eager`` (the anchor).

For every setting it reports the speedup ``t_original / t_converted``, the ideal
``1 / (1 - f·s)`` with ``f`` measured in the same run, the achieved share of the ideal and, for
decode steps, the distinct experts touched per step (original vs converted) with the
distinct-experts bound ``1 / (1 - f·(1 - D_conv/D_orig))`` (at batched decode the expert weights
read shrink only as far as the distinct experts touched shrink).

Shapes: by default Qwen3-30B-A3B layer shapes (hidden 2048, 128 experts + 64 zero experts, expert
FFN 768, top-8, 32/4 attention heads of 128) with random weights, 2 decoder layers for prefill and
4 for decode, and a 1024-token vocabulary (so the LM head does not dominate the timing).
``--config`` takes any built-in config name (``zeda/configs``), a ``config.json`` or an HF
model directory. ``--model DIR`` benchmarks a trained checkpoint end to end (prefill time and
``generate`` tokens/s, real routing); ``--converted DIR`` gives its converted (e.g. distilled)
checkpoint, otherwise the original is converted in memory (untrained zero-expert rows).

Prefill: one forward of ``1×N`` tokens without a cache. Decode-like step: one forward of ``B``
new tokens (one per sequence) through the full model with a KV cache holding ``--context``
tokens per sequence; the cache is cropped back after every step so each step sees the same
state (the context is prefilled once with the ``noop`` model: the cache contents do not change
the timing).

Usage::

    python evals/speed/bench_speed.py                     # the CPU table of README.md
    python evals/speed/bench_speed.py --smoke             # tiny shapes, seconds (CI)
    python evals/speed/bench_speed.py --model evals/reference/model
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from zeda.zero import experts as _zeda_experts  # noqa: F401  (registers the zeda backends)
from zeda.zero.inject import find_moe_layers, inject_zero_experts, set_experts_backend
from zeda.zero.routing import router_settings

HERE = Path(__file__).resolve().parent
NOOP = "zeda_bench_noop"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _noop_experts(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts backend doing no work at all (measures the time outside the routed experts)."""
    return torch.zeros_like(hidden_states)


if NOOP not in ALL_EXPERTS_FUNCTIONS:
    ExpertsInterface.register(NOOP, _noop_experts)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def build_config(name: str, layers: int, vocab: int | None, smoke: bool) -> Any:
    """The benchmark config: a built-in/JSON config with ``layers`` decoder layers.

    Per-layer list fields of the config (``layer_types``, ``mlp_layer_types``) are cut to match.
    """
    if smoke:
        from zeda.tiny import tiny_config

        cfg = tiny_config("qwen3_moe", num_hidden_layers=layers)
    else:
        from zeda.evaluation.flops import load_config

        cfg = load_config(name)
        old = cfg.num_hidden_layers
        for key, value in list(vars(cfg).items()):
            if isinstance(value, list) and len(value) == old and key.endswith("layer_types"):
                setattr(cfg, key, value[:layers])
        cfg.num_hidden_layers = layers
        if vocab:
            cfg.vocab_size = vocab
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) >= cfg.vocab_size:
                setattr(cfg, key, 0)
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = True
    return cfg


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters are the very same tensors (no extra memory)."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


@dataclass
class Models:
    """The three models of a run; all share the original's parameters except the grown routers."""

    original: nn.Module
    noop: nn.Module
    converted: nn.Module
    num_experts: int
    num_zero_experts: int
    description: str

    def all(self) -> list[nn.Module]:
        """Every model."""
        return [self.original, self.noop, self.converted]

    def to(self, dtype: torch.dtype, device: str) -> None:
        """Move every model (shared parameters convert once, in place)."""
        for m in self.all():
            m.to(device=device, dtype=dtype)


def make_models(
    original: nn.Module, converted: nn.Module | None, num_zero_experts: int | None, description: str
) -> Models:
    """Original (stock eager), no-op twin and converted (zeda backend) models."""
    original.eval().set_experts_implementation("eager")
    noop = shared_copy(original)
    noop.set_experts_implementation(NOOP)
    if converted is None:
        converted = shared_copy(original)
        inject_zero_experts(converted, num_zero_experts=num_zero_experts, experts_implementation="zeda")
    else:
        set_experts_backend(converted, "zeda")
    converted.eval()
    router = find_moe_layers(converted)[0].router
    return Models(original, noop, converted, router.num_experts, router.num_zero_experts, description)


@contextmanager
def first_layers(models: Models, n: int) -> Iterator[None]:
    """Run only the first ``n`` decoder layers of every model (prefill uses fewer layers)."""
    saved = []
    for m in models.all():
        base = m.get_decoder() if hasattr(m, "get_decoder") else m.model
        saved.append((m.config, m.config.num_hidden_layers, base, base.layers))
        m.config.num_hidden_layers = n
        base.layers = nn.ModuleList(list(base.layers)[:n])
    try:
        yield
    finally:
        for cfg, old_n, base, layers in saved:
            cfg.num_hidden_layers = old_n
            base.layers = layers


# ----------------------------------------------------------------------------------------------
# Routing statistics (untimed): zero share and distinct experts touched per forward
# ----------------------------------------------------------------------------------------------


@dataclass
class RouteStats:
    """Routing seen by the experts modules during one forward.

    Attributes:
        slots: Routed slots seen.
        zero_slots: Slots with the sentinel index (no expert work).
        distinct: Distinct real experts touched, per MoE layer.
    """

    slots: int = 0
    zero_slots: int = 0
    distinct: list[int] = field(default_factory=list)

    @property
    def zero_share(self) -> float:
        """Share of slots on zero experts."""
        return self.zero_slots / self.slots if self.slots else 0.0

    @property
    def mean_distinct(self) -> float:
        """Mean distinct experts touched per MoE layer."""
        return statistics.fmean(self.distinct) if self.distinct else 0.0


@contextmanager
def route_stats(model: nn.Module) -> Iterator[RouteStats]:
    """Record the top-k indices reaching every experts module of ``model``."""
    stats = RouteStats()
    handles = []

    def hook(module: nn.Module, args: tuple) -> None:
        idx = args[1]
        e = module.num_experts
        real = idx[idx < e]
        stats.slots += idx.numel()
        stats.zero_slots += int((idx >= e).sum())
        stats.distinct.append(int(torch.unique(real).numel()))

    for layer in find_moe_layers(model):
        handles.append(layer.experts.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One timed model configuration."""

    name: str
    model: nn.Module
    share: float | None = None  # forced zero share; None = the model's own routing
    backend: str | None = None  # experts backend to switch to for this variant
    converted: bool = False

    @contextmanager
    def active(self) -> Iterator[None]:
        """Routing and backend of this variant."""
        old = self.model.config._experts_implementation
        if self.backend is not None and self.backend != old:
            self.model.set_experts_implementation(self.backend)
        ctx = nullcontext()
        if self.converted and self.share is not None:
            # forced_zero_share adds forced zero slots to those the router picks itself; a large
            # negative zero-logit bias keeps the router's own picks off the zero experts (the
            # E+Z router still runs), so the measured share is exactly the forced one.
            ctx = router_settings(self.model, forced_zero_share=self.share, zero_logit_bias=-1e4)
        try:
            with ctx:
                yield
        finally:
            if self.model.config._experts_implementation != old:
                self.model.set_experts_implementation(old)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(
    variants: list[Variant],
    step: Callable[[nn.Module], Any],
    repeats: int,
    warmup: int,
    device: str,
) -> tuple[dict[str, list[float]], dict[str, RouteStats]]:
    """Interleaved timing: every repeat runs every variant once (rotating the order).

    The first pass (a warmup pass when ``warmup >= 1``) also records each variant's routing.

    Returns:
        Wall times in seconds per variant name, and the routing seen per variant name.
    """
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    stats: dict[str, RouteStats] = {}
    for r in range(warmup + repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            with v.active(), route_stats(v.model) if r == 0 else nullcontext() as st:
                _sync(device)
                t0 = time.perf_counter()
                step(v.model)
                _sync(device)
                dt = time.perf_counter() - t0
            if r == 0:
                stats[v.name] = st
            if r >= warmup:
                times[v.name].append(dt)
    return times, stats


def variants_for(models: Models, shares: list[float], stock_anchor: bool, real: bool) -> list[Variant]:
    """The variants timed at every setting."""
    out = [Variant("original", models.original), Variant("noop", models.noop)]
    for s in shares:
        out.append(Variant(f"zeda@{s:g}", models.converted, share=s, converted=True))
    if real:
        out.append(Variant("zeda@real", models.converted, share=None, converted=True))
    if stock_anchor:
        out.append(Variant("eager@0.5", models.converted, share=0.5, backend="eager", converted=True))
    return out


def summarise(
    setting: dict[str, Any],
    variants: list[Variant],
    times: dict[str, list[float]],
    stats: dict[str, RouteStats],
) -> list[dict[str, Any]]:
    """One result row per converted variant (plus the original's)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    t_orig, t_noop = med["original"], med["noop"]
    f = max(0.0, 1.0 - t_noop / t_orig)
    d_orig = stats["original"].mean_distinct
    t_zero = med.get("zeda@0")
    rows = [
        {
            **setting,
            "variant": "original",
            "backend": "eager",
            "time_s": t_orig,
            "times_s": times["original"],
            "noop_time_s": t_noop,
            "f_experts": f,
            "distinct_experts": d_orig,
        }
    ]
    for v in variants:
        if v.name in ("original", "noop"):
            continue
        st = stats[v.name]
        s = st.zero_share
        speedup = t_orig / med[v.name]
        ideal = 1.0 / (1.0 - f * s)
        row: dict[str, Any] = {
            **setting,
            "variant": v.name,
            "backend": v.backend or "zeda",
            "forced_share": v.share,
            "zero_share": s,
            "time_s": med[v.name],
            "times_s": times[v.name],
            "f_experts": f,
            "speedup": speedup,
            "ideal": ideal,
            "of_ideal": speedup / ideal if ideal > 1.0 + 1e-9 else None,
            "distinct_experts_original": d_orig,
            "distinct_experts": st.mean_distinct,
            "speedup_vs_zeda0": t_zero / med[v.name] if t_zero else None,
        }
        if setting["phase"] == "decode" and d_orig:
            s_d = max(0.0, 1.0 - st.mean_distinct / d_orig)
            bound = 1.0 / (1.0 - f * s_d)
            row["distinct_bound"] = bound
            row["of_distinct_bound"] = speedup / bound if bound > 1.0 + 1e-9 else None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------


def burn_in(models: Models, variants: list[Variant], args: argparse.Namespace) -> None:
    """Untimed forwards for ``args.burn_in`` seconds after a dtype change.

    On the 2-core VM the first tens of seconds of work on freshly written weights run several
    times slower than later (measured: 3-7x on the same call), which one warmup pass per
    setting does not absorb.
    """
    if args.burn_in <= 0:
        return
    vocab = models.original.config.vocab_size
    ids = torch.randint(0, vocab, (1, 256), generator=torch.Generator().manual_seed(1)).to(args.device)
    t0 = time.perf_counter()
    with torch.inference_mode(), first_layers(models, args.prefill_layers):
        while time.perf_counter() - t0 < args.burn_in:
            for v in variants:
                with v.active():
                    v.model(input_ids=ids, use_cache=False, logits_to_keep=1)


def bench_prefill(
    models: Models, variants: list[Variant], tokens: int, layers: int, args: argparse.Namespace, dtype: str
) -> list[dict[str, Any]]:
    """Prefill ``1×tokens`` without a cache through the first ``layers`` decoder layers."""
    vocab = models.original.config.vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(tokens)).to(
        args.device
    )

    def step(model: nn.Module) -> Any:
        return model(input_ids=ids, use_cache=False, logits_to_keep=1)

    with torch.inference_mode(), first_layers(models, layers):
        times, stats = time_variants(variants, step, args.repeats, args.warmup, args.device)
    setting = {"phase": "prefill", "shape": f"1x{tokens}", "batch": 1, "tokens": tokens, "layers": layers}
    setting["dtype"] = dtype
    return summarise(setting, variants, times, stats)


def bench_decode(
    models: Models, variants: list[Variant], batch: int, layers: int, args: argparse.Namespace, dtype: str
) -> list[dict[str, Any]]:
    """One decode-like step of ``batch`` tokens with a KV cache of ``args.context`` tokens each."""
    vocab = models.original.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    ctx_ids = torch.randint(0, vocab, (batch, args.context), generator=gen).to(args.device)
    new_ids = torch.randint(0, vocab, (batch, 1), generator=gen).to(args.device)
    with torch.inference_mode(), first_layers(models, layers):
        first = models.noop(input_ids=ctx_ids, use_cache=True, logits_to_keep=1)
        # transformers 5.24 renamed the KV-cache argument and output field to ``cache``.
        cache_kw = (
            "cache" if "cache" in inspect.signature(models.original.forward).parameters else "past_key_values"
        )
        cache = getattr(first, cache_kw)

        def step(model: nn.Module) -> Any:
            out = model(input_ids=new_ids, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
            cache.crop(-1)
            return out

        reps = args.repeats * args.decode_repeat_factor
        times, stats = time_variants(variants, step, reps, args.warmup + 1, args.device)
    setting = {"phase": "decode", "shape": f"B={batch}", "batch": batch, "tokens": batch, "layers": layers}
    setting["context"] = args.context
    setting["dtype"] = dtype
    return summarise(setting, variants, times, stats)


def _prompt_ids(model_dir: str, length: int, vocab: int) -> torch.Tensor:
    """A natural-text prompt if the directory has a tokenizer (real routing needs real text)."""
    text = (
        "The history of science is the study of the development of science and scientific "
        "knowledge, including both the natural and social sciences. Science is a body of "
        "empirical, theoretical, and practical knowledge about the natural world, produced by "
        "scientists who emphasize the observation, explanation, and prediction of real-world "
        "phenomena. "
    )
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = tok(text * (1 + length // 40), return_tensors="pt").input_ids[:, :length]
        if ids.shape[1] == length:
            return ids
    except Exception:  # noqa: BLE001 - no tokenizer: random ids
        pass
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))


def bench_reference(models: Models, args: argparse.Namespace, dtype: str) -> list[dict[str, Any]]:
    """Trained checkpoint, real routing: prefill time and ``generate`` tokens/s, original vs converted."""
    cfg = models.original.config
    length = min(
        args.ref_prompt, getattr(cfg, "max_position_embeddings", args.ref_prompt) - args.ref_new_tokens
    )
    ids = _prompt_ids(args.model, length, cfg.vocab_size).to(args.device)
    variants = [Variant("original", models.original), Variant("noop", models.noop)]
    variants.append(Variant("zeda@real", models.converted, share=None, converted=True))
    rows = []
    with torch.inference_mode():

        def prefill(model: nn.Module) -> Any:
            return model(input_ids=ids, use_cache=False, logits_to_keep=1)

        times, stats = time_variants(variants, prefill, args.repeats, args.warmup, args.device)
        setting = {"phase": "reference-prefill", "shape": f"1x{length}", "batch": 1, "tokens": length}
        setting.update(layers=cfg.num_hidden_layers, dtype=dtype)
        rows += summarise(setting, variants, times, stats)

        n = args.ref_new_tokens

        def generate(model: nn.Module) -> Any:
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        gen_vars = [variants[0], variants[2]]
        gtimes, gstats = time_variants(gen_vars, generate, max(1, args.repeats // 2), 0, args.device)
        gstats["noop"] = gstats["original"]
        gtimes["noop"] = [float("nan")]
        setting = {"phase": "reference-generate", "shape": f"1x{length}+{n}", "batch": 1, "tokens": n}
        setting.update(layers=cfg.num_hidden_layers, dtype=dtype)
        grows = summarise(setting, gen_vars, gtimes, gstats)
        f_prefill = rows[0]["f_experts"]
        for r in grows:
            r["tokens_per_s"] = n / r["time_s"]
            r["f_experts"] = f_prefill  # generate has no noop twin timed; f from the prefill
            r.pop("noop_time_s", None)
            if "speedup" in r:
                r["ideal"] = 1.0 / (1.0 - f_prefill * r["zero_share"])
                r["of_ideal"] = r["speedup"] / r["ideal"] if r["ideal"] > 1 + 1e-9 else None
        rows += grows
    return rows


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ".2f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    return f"{x:{spec}}{suffix}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table (one line per converted variant)."""
    head = (
        "| phase | shape | layers | dtype | variant | zero share | f (experts) | original ms | converted ms "
        "| speedup | ideal 1/(1−f·s) | of ideal | vs zeda@0 | distinct experts orig → conv | distinct bound "
        "| of bound |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    orig = {}
    for r in rows:
        key = (r["phase"], r["shape"], r["dtype"])
        if r["variant"] == "original":
            orig[key] = r
            continue
        o = orig[key]
        distinct = (
            f"{r['distinct_experts_original']:.1f} → {r['distinct_experts']:.1f}"
            if r["phase"] != "prefill"
            else "–"
        )
        lines.append(
            f"| {r['phase']} | {r['shape']} | {r['layers']} | {r['dtype']} | {r['variant']} "
            f"| {_fmt(r['zero_share'], '.0%')} | {_fmt(r['f_experts'])} | {_fmt(o['time_s'] * 1e3, '.1f')} "
            f"| {_fmt(r['time_s'] * 1e3, '.1f')} | {_fmt(r['speedup'], '.2f', '×')} | {_fmt(r['ideal'], '.2f', '×')} "
            f"| {_fmt(r['of_ideal'], '.2f')} | {_fmt(r.get('speedup_vs_zeda0'), '.2f', '×')} | {distinct} | {_fmt(r.get('distinct_bound'), '.2f', '×')} "
            f"| {_fmt(r.get('of_distinct_bound'), '.2f')} |"
        )
    gen = [r for r in rows if r["phase"] == "reference-generate"]
    if gen:
        lines += ["", "| generate | dtype | variant | zero share | tokens/s |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['shape']} | {r['dtype']} | {r['variant']} | {_fmt(r.get('zero_share'), '.0%')} "
            f"| {_fmt(r['tokens_per_s'], '.2f')} |"
            for r in gen
        ]
    return "\n".join(lines)


def background_jobs() -> list[str]:
    """Other busy processes worth recording next to CPU timings (e.g. a training job)."""
    try:
        out = subprocess.run(["pgrep", "-af", "train_model"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.stdout.splitlines() if line.strip() and "pgrep" not in line]


def device_name(device: str) -> str:
    """A human name of the device the timings come from."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu}, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="qwen3-30b-a3b", help="built-in config name, config.json or HF dir")
    p.add_argument("--model", default=None, help="trained original checkpoint: end-to-end run, real routing")
    p.add_argument("--converted", default=None, help="its converted (zeda) checkpoint; default: inject now")
    p.add_argument("--num-zero-experts", type=int, default=None, help="Z (default E/2)")
    p.add_argument("--prefill-layers", type=int, default=2)
    p.add_argument("--decode-layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary of the synthetic model")
    p.add_argument("--shares", default="0,0.25,0.5,0.75", help="forced zero shares")
    p.add_argument("--prefill", default="512,2048", help="prefill lengths (batch 1)")
    p.add_argument("--decode", default="1,8,64", help="decode batch sizes")
    p.add_argument("--context", type=int, default=64, help="KV-cache tokens per sequence at decode")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (median)")
    p.add_argument("--decode-repeat-factor", type=int, default=3, help="decode runs repeats × this")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--burn-in", type=float, default=60.0, help="untimed seconds after each dtype change")
    p.add_argument("--no-real", action="store_true", help="skip the converted model's own routing")
    p.add_argument("--no-anchor", action="store_true", help="skip stock eager on the converted model")
    p.add_argument("--ref-prompt", type=int, default=256, help="--model: prompt tokens")
    p.add_argument("--ref-new-tokens", type=int, default=32, help="--model: generated tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (CI)")
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--markdown", default=str(HERE / "results.md"))
    args = p.parse_args(argv)
    if args.smoke:
        args.prefill, args.decode, args.shares = "16", "1,4", "0,0.5"
        args.prefill_layers, args.decode_layers, args.context = 2, 2, 8
        args.repeats, args.warmup, args.decode_repeat_factor, args.burn_in = 1, 0, 1, 0.0
        args.ref_prompt, args.ref_new_tokens = 16, 4
    return args


def load_models(args: argparse.Namespace) -> Models:
    """The original/no-op/converted trio for a synthetic config or a checkpoint."""
    torch.manual_seed(args.seed)
    if args.model:
        from zeda.io import load

        original = load(
            args.model, dtype="float32", experts_implementation="eager", attn_implementation="sdpa"
        )
        converted = None
        desc = f"checkpoint {args.model}"
        if args.converted:
            converted = load(args.converted, dtype="float32", attn_implementation="sdpa")
            desc += f", converted checkpoint {args.converted}"
        else:
            desc += ", converted in memory (untrained zero-expert router rows)"
        return make_models(original, converted, args.num_zero_experts, desc)
    layers = max(args.prefill_layers, args.decode_layers)
    cfg = build_config(args.config, layers, args.vocab, args.smoke)
    original = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    desc = f"{'tiny qwen3_moe' if args.smoke else args.config} shapes, random weights, vocab {cfg.vocab_size}"
    return make_models(original, None, args.num_zero_experts, desc)


def run(
    args: argparse.Namespace, on_progress: Callable[[list[dict[str, Any]]], None] | None = None
) -> dict[str, Any]:
    """Run every setting; returns the JSON-able report (``on_progress`` sees partial rows)."""
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    bg_start = background_jobs()
    t_start = time.time()
    models = load_models(args)
    shares = [float(s) for s in args.shares.split(",") if s]
    rows: list[dict[str, Any]] = []
    for dname in args.dtypes.split(","):
        models.to(DTYPES[dname], args.device)
        if args.model:
            rows += bench_reference(models, args, dname)
            continue
        variants = variants_for(models, shares, not args.no_anchor, not args.no_real)
        burn_in(models, variants, args)
        # Decode first, then prefill (cheapest first); results are written after every setting.
        for b in [int(x) for x in args.decode.split(",") if x]:
            rows += bench_decode(models, variants, b, args.decode_layers, args, dname)
            print(f"done decode B={b} {dname}", file=sys.stderr, flush=True)
            if on_progress:
                on_progress(rows)
        for n in [int(x) for x in args.prefill.split(",") if x]:
            rows += bench_prefill(models, variants, n, args.prefill_layers, args, dname)
            print(f"done prefill 1x{n} {dname}", file=sys.stderr, flush=True)
            if on_progress:
                on_progress(rows)
    cfg = models.original.config
    meta = {
        "command": "python " + " ".join([os.path.relpath(__file__, Path.cwd())] + sys.argv[1:]),
        "device": device_name(args.device),
        "gpu": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else "not measured (no CUDA device)",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "threads": torch.get_num_threads(),
        "models": models.description,
        "hidden_size": cfg.hidden_size,
        "num_experts": models.num_experts,
        "num_zero_experts": models.num_zero_experts,
        "top_k": getattr(cfg, "num_experts_per_tok", None),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "background_jobs_start": bg_start,
        "background_jobs_end": background_jobs(),
        "wall_s": time.time() - t_start,
        # zeda's CPU bf16/fp16 strategy per (dtype, E, down_proj shape, transposed, gated,
        # kept-row bucket), as autotuned during the warmup passes of this run.
        "cpu_strategy_choices": [
            {"key": [str(k) if isinstance(k, torch.dtype) else k for k in key], "strategy": choice}
            for key, choice in _zeda_experts.cpu_strategy_choices().items()
        ],
        "how": {
            "speedup": "t_original / t_converted, medians of interleaved repeats in one process",
            "f_experts": "1 - t_noop / t_original; noop = original with routed experts returning zeros",
            "ideal": "1 / (1 - f * s), s = measured zero share of the converted variant",
            "distinct_bound": "decode: 1 / (1 - f * (1 - D_conv / D_orig)), D = distinct experts per layer",
            "decode": "forward of B tokens (one per sequence) through the full model with a KV cache "
            "of `context` tokens, cropped back after each step",
        },
    }
    return {"meta": meta, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)

    def partial(rows: list[dict[str, Any]]) -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            doc = {"meta": {"partial": True, "loadavg": os.getloadavg(), "argv": sys.argv[1:]}, "rows": rows}
            Path(args.out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")

    report = run(args, partial)
    table = markdown_table(report["rows"])
    meta = report["meta"]
    header = (
        f"Device: {meta['device']}; GPU: {meta['gpu']}; torch {meta['torch']}, transformers "
        f"{meta['transformers']}; {meta['models']}; E={meta['num_experts']}, Z={meta['num_zero_experts']}, "
        f"k={meta['top_k']}; load average start {meta['loadavg_start'][0]:.2f} / end "
        f"{meta['loadavg_end'][0]:.2f}; background jobs: {len(meta['background_jobs_start'])} at start, "
        f"{len(meta['background_jobs_end'])} at end.\n\nCommand: `{meta['command']}`"
    )
    print(header)
    print()
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(header + "\n\n" + table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
