"""vLLM (CPU) throughput of original MoE models against their zeda conversions, side by side.

Run from the repository root in the main environment (it needs zeda to build the models);
the measurements run in the vLLM environment (``.venv-vllm``) as a subprocess::

    python evals/serve/bench_vllm.py --out evals/serve/results

Models (bf16):

- ``ref``: the shipped reference qwen3_moe (``evals/reference/model``: 32 experts, top-4),
  original on stock vLLM against the same model injected with 16 zero experts (seed 0, *no
  distillation*) on the zeda_vllm plugin, with its own (natural) routing. The zero share of
  that routing is measured by zeda's ``RouterTelemetry`` on the benchmark prompts.
- ``q30``: Qwen3-30B-A3B-shaped layers (``--layers`` decoder layers, hidden 2048, 32/4 heads
  of 128, 128 experts of width 768, top-8, vocabulary 4096, random weights), original on stock
  vLLM against the injected export (+64 zero experts) at forced zero shares 0/25/50/75%
  (``hf_overrides={"zeda_forced_zero_share": s}``).

Workloads: decode at batch 1, 8 and 64 (16-token prompts; decode time = time for ``1 + n``
new tokens minus time for 1) and one 512-token prefill. Each cell is the fastest of
``--repeats`` runs after one warm-up, timed by the CPU time of the engine process (one torch
thread; wall times are kept in the JSON too: on a shared machine they mostly measure the
other jobs); the whole set of runs is measured in ``--passes``
passes of alternating order and each cell keeps its fastest time (the machine is shared).

``f``, the share of the original's time spent in routed experts, is measured in the same run
by ablation: the converted model at a forced 100% share runs everything except the routed
experts (one dummy row of expert work per layer remains), so ``f = 1 - t(100%) / t(original)``.
The ideal speed-up at share ``s`` is ``1 / (1 - f·s)``; "of ideal" is achieved / ideal.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("ZEDA_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
BATCHES = (1, 8, 64)
PREFILL = 512
PROMPT_LEN = 16
SHARES = (0.0, 0.25, 0.5, 0.75)


# ---------------------------------------------------------------------------------------------
# main environment: build the models with zeda, then run the vLLM side
# ---------------------------------------------------------------------------------------------


def _prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, length), generator=g).tolist()


def prepare(work: Path, layers: int, shares: tuple[float, ...] = SHARES) -> dict:
    """Build (or reuse) the original and converted checkpoints; returns the vLLM-side spec."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    import zeda

    work.mkdir(parents=True, exist_ok=True)
    ref_export = work / "ref_zeda"
    ref_prompts = _prompts(8192, max(BATCHES), PROMPT_LEN, seed=0)
    if not (ref_export / "config.json").exists():
        m = AutoModelForCausalLM.from_pretrained(REPO / "evals/reference/model", dtype=torch.bfloat16)
        zeda.inject_zero_experts(m, num_zero_experts=16, seed=0)
        zeda.export(m, ref_export, overwrite=True)
    m = AutoModelForCausalLM.from_pretrained(ref_export, dtype=torch.float32).eval()
    with zeda.RouterTelemetry(m) as tel, torch.no_grad():
        m(input_ids=torch.tensor(ref_prompts))
    ref_share = tel.zero_share
    del m

    q_orig, q_export = work / f"q30_{layers}l_original", work / f"q30_{layers}l_zeda"
    if not (q_export / "config.json").exists():
        cfg = Qwen3MoeConfig(
            vocab_size=4096,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=layers,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
            norm_topk_prob=True,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        m.save_pretrained(q_orig)
        zeda.inject_zero_experts(m, num_zero_experts=64, seed=0)
        zeda.export(m, q_export, overwrite=True)
        del m
    q_prompts = _prompts(4096, max(BATCHES), PROMPT_LEN, seed=0)
    runs = [
        {"model": "ref", "label": "original", "path": str(REPO / "evals/reference/model"), "share": 0.0},
        {"model": "ref", "label": "zeda", "path": str(ref_export), "share": ref_share},
        {"model": "ref", "label": "zeda@100%", "path": str(ref_export), "force": 1.0, "share": 1.0},
        {"model": "q30", "label": "original", "path": str(q_orig), "share": 0.0},
        *[
            {"model": "q30", "label": f"zeda@{int(s * 100)}%", "path": str(q_export), "force": s, "share": s}
            for s in sorted(
                {1.0, *shares}, key=lambda x: (x != 1.0, x != 0.5, x)
            )  # the ablation (f) and 50% first
        ],
    ]
    return {
        "runs": runs,
        "prompts": {"ref": ref_prompts, "q30": q_prompts},
        "vocab": {"ref": 8192, "q30": 4096},
    }


def summarise(raw: list[dict]) -> list[dict]:
    """Speed-ups against the original, the measured f and the ideal, per model and workload."""
    rows = []
    by = {(r["model"], r["label"]): r for r in raw}
    for model in ("ref", "q30"):
        orig = by.get((model, "original"))
        full = by.get((model, "zeda@100%"))
        if orig is None or full is None:
            continue
        for r in raw:
            if r["model"] != model or r["label"] in ("original", "zeda@100%"):
                continue
            for work, t in r["times"].items():
                t0, t100 = orig["times"][work], full["times"][work]
                f = max(0.0, 1.0 - t100 / t0)
                ideal = 1.0 / (1.0 - f * r["share"])
                speedup = t0 / t
                rows.append(
                    {
                        "model": model,
                        "label": r["label"],
                        "share": round(r["share"], 4),
                        "workload": work,
                        "original_tok_s": round(orig["tok_s"][work], 1),
                        "zeda_tok_s": round(r["tok_s"][work], 1),
                        "speedup": round(speedup, 3),
                        "f": round(f, 3),
                        "ideal": round(ideal, 3),
                        "of_ideal": round(speedup / ideal, 3),
                    }
                )
    return rows


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# vLLM serving throughput ({meta.get('device', 'CPU')}): original vs zeda conversion",
        "",
        f"Command: `{meta['command']}`",
        f"vLLM {meta.get('vllm')}, torch {meta.get('torch')}, bf16, {meta.get('mode', 'eager mode')}, "
        "in-process engine, "
        + (
            "times = wall time, "
            if meta.get("clock") == "wall"
            else "times = CPU time of the engine process, "
        )
        + f"{meta.get('threads')} torch thread(s); CPU: {meta.get('cpu')}; fastest of {meta['repeats']} runs x "
        f"{meta['passes']} passes; "
        f"load average before/after: {meta.get('load_before')} / {meta.get('load_after')}.",
        "",
        "| model | converted | zero share | workload | original tok/s | zeda tok/s | speed-up | f | ideal | of ideal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['label']} | {r['share']:.2f} | {r['workload']} | {r['original_tok_s']} | "
            f"{r['zeda_tok_s']} | {r['speedup']:.2f}x | {r['f']:.2f} | {r['ideal']:.2f}x | {r['of_ideal']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="evals/serve/results", help="writes OUT.json and OUT.md")
    ap.add_argument("--work", default="runs/serve_bench", help="checkpoints are built (and reused) here")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--passes", type=int, default=2, help="passes over all runs (alternating order); min kept"
    )
    ap.add_argument("--models", default="ref,q30", help="comma-separated subset of ref,q30")
    ap.add_argument(
        "--shares", default="0,0.25,0.5,0.75", help="q30's forced zero shares (100%% is always run: f)"
    )
    ap.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: the engine process's CPU time; wall (GPUs)",
    )
    ap.add_argument(
        "--graphs", action="store_true", help="let vLLM capture CUDA graphs (default: eager mode)"
    )
    ap.add_argument(
        "--summarise-only", action="store_true", help="re-summarise WORK/raw.json (e.g. a cut-short run)"
    )
    args = ap.parse_args()
    if args.summarise_only:
        _write(args, json.loads((REPO / args.work / "raw.json").read_text()), None)
        return
    spec = prepare(REPO / args.work, args.layers, tuple(float(x) for x in args.shares.split(",")))
    spec.update(
        repeats=args.repeats,
        new_tokens=args.new_tokens,
        passes=args.passes,
        clock=args.clock,
        enforce_eager=not args.graphs,
    )
    spec["runs"] = [r for r in spec["runs"] if r["model"] in args.models.split(",")]
    work = REPO / args.work
    (work / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(PYTHONPATH=str(REPO), VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1")  # this checkout
    env["TOKENIZERS_PARALLELISM"] = "false"
    load_before = os.getloadavg()[0]
    subprocess.run(
        [
            str(VLLM_PYTHON),
            str(Path(__file__).resolve()),
            "--worker",
            str(work / "spec.json"),
            str(work / "raw.json"),
        ],
        cwd="/tmp",
        env=env,
        check=True,
    )
    _write(args, json.loads((work / "raw.json").read_text()), load_before)


def _write(args: argparse.Namespace, raw: dict, load_before: float | None) -> None:
    meta = raw.pop("meta")
    meta.update(
        command="python evals/serve/bench_vllm.py " + " ".join(sys.argv[1:]),
        clock=args.clock,
        mode="CUDA graphs allowed" if args.graphs else "eager mode",
        repeats=args.repeats,
        passes=args.passes,
        load_before=None if load_before is None else round(load_before, 2),
        load_after=round(os.getloadavg()[0], 2),
    )
    rows = summarise(raw["runs"])
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows, "raw": raw["runs"]}, indent=1)
    )
    out.with_suffix(".md").write_text(to_markdown(rows, meta))
    sys.stdout.write(to_markdown(rows, meta))


# ---------------------------------------------------------------------------------------------
# vLLM environment: the measurements
# ---------------------------------------------------------------------------------------------


def _timed(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` for one ``generate`` call."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    t, c = time.perf_counter(), time.process_time()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t, time.process_time() - c


def measure(
    run: dict,
    prompts: list[list[int]],
    vocab: int,
    repeats: int,
    new: int,
    clock: str = "cpu",
    enforce_eager: bool = True,
) -> dict:
    """Time decode at each batch size and a 512-token prefill for one model/setting.

    Both clocks are kept: wall time, and the CPU time of the (single-process) engine, which a
    shared machine's contention inflates far less. ``times``/``tok_s`` use ``clock`` (the CPU
    clock on CPUs; on GPUs the work is on the device, so the wall clock).
    """
    c = 1 if clock == "cpu" else 0
    import torch
    from vllm import LLM

    overrides = {"zeda_forced_zero_share": run["force"]} if "force" in run else None
    llm = LLM(
        model=run["path"],
        dtype="bfloat16",
        enforce_eager=enforce_eager,
        skip_tokenizer_init=True,
        max_model_len=PREFILL + 64,
        max_num_seqs=max(BATCHES),
        max_num_batched_tokens=1024,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=2 * 2**30,
        seed=0,
        hf_overrides=overrides,
    )
    long = torch.randint(2, vocab, (1, PREFILL), generator=torch.Generator().manual_seed(1)).tolist()
    times, wall, tok_s = {}, {}, {}
    _timed(llm, prompts[:8], 4)  # warm-up
    for b in BATCHES:
        ps = prompts[:b]
        deltas = []
        for _ in range(repeats):
            full, one = _timed(llm, ps, 1 + new), _timed(llm, ps, 1)
            deltas.append((full[0] - one[0], full[1] - one[1]))
        key = f"decode B={b}"
        wall[key] = min(d[0] for d in deltas)
        times[key] = min(d[c] for d in deltas)
        tok_s[key] = b * new / times[key]
    _timed(llm, long, 1)
    pre = [_timed(llm, long, 1) for _ in range(repeats)]
    key = f"prefill {PREFILL}"
    wall[key], times[key] = min(p[0] for p in pre), min(p[c] for p in pre)
    tok_s[key] = PREFILL / times[key]
    del llm
    gc.collect()
    return {**run, "times": times, "tok_s": tok_s, "wall_times": wall}


def worker(spec_path: str, out_path: str) -> None:

    spec = json.loads(Path(spec_path).read_text())
    best: dict[int, dict] = {}
    for p in range(spec.get("passes", 1)):
        # alternate the order so drifts in machine load hit originals and conversions alike
        order = list(range(len(spec["runs"])))[:: 1 if p % 2 == 0 else -1]
        for i in order:
            run = spec["runs"][i]
            t = time.time()
            prompts, vocab = spec["prompts"][run["model"]], spec["vocab"][run["model"]]
            r = measure(
                run,
                prompts,
                vocab,
                spec["repeats"],
                spec["new_tokens"],
                spec.get("clock", "cpu"),
                spec.get("enforce_eager", True),
            )
            if i not in best:
                best[i] = r
            for work, sec in r["times"].items():
                if sec < best[i]["times"][work]:
                    best[i]["times"][work], best[i]["tok_s"][work] = sec, r["tok_s"][work]
                best[i]["wall_times"][work] = min(best[i]["wall_times"][work], r["wall_times"][work])
            sys.stderr.write(
                f"[bench] pass {p} {run['model']} {run['label']}: {r['tok_s']} ({time.time() - t:.0f}s)\n"
            )
            _dump(out_path, [best[j] for j in sorted(best)])
    _dump(out_path, [best[i] for i in range(len(spec["runs"]))])


def _dump(out_path: str, results: list[dict]) -> None:
    """Write what has been measured so far (a cut-short run still leaves its measurements)."""
    import platform

    import torch
    import vllm

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    meta = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "load_average_at_write": round(os.getloadavg()[0], 2),
    }
    Path(out_path).write_text(json.dumps({"meta": meta, "runs": results}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
