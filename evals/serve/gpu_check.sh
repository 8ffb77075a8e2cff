#!/usr/bin/env bash
# The serving checks that need a GPU, prepared for a lent one. Never run by the tests or CI.
#
#   bash evals/serve/gpu_check.sh [WORKDIR]          # one NVIDIA GPU; about 10 minutes
#
# 1. a fresh venv with the CUDA build of the tested vLLM (vllm>=0.32.0,<0.33) and this checkout of
#    zeda (editable); WHEELHOUSE=DIR installs from a directory of wheels instead of the index;
# 2. the vLLM parity check (tests/serving/test_vllm_parity.py, a GPU-sized subset of its cases:
#    natural and forced routing, group-limited sigmoid routing, tied embeddings), once in eager mode
#    and once with CUDA graphs (vLLM's default on GPUs: the plugin's expert-map path, no host sync);
# 3. the serving benchmark on Qwen3-30B-A3B-shaped layers at forced zero shares 0% and 50% (plus
#    the 100% ablation that measures f), CUDA graphs on, wall clock;
# 4. SGLang 0.5.23, if it installs: one greedy completion of a tiny zeda export served by
#    zeda_sglang.models against zeda's transformers model.
# It ends with one summary table. Nothing here was run on a GPU when it was written (none was lent).
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
WORK=${1:-/tmp/zeda_gpu_check}
mkdir -p "$WORK"
START=$SECONDS
PIP=(--quiet)
if [ -n "${WHEELHOUSE:-}" ]; then PIP+=(--no-index --find-links "$WHEELHOUSE"); fi
declare -A RESULT

GPU=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
if [ -z "$GPU" ]; then echo "gpu_check: no NVIDIA GPU visible (nvidia-smi)"; exit 2; fi

# --- 1. vLLM (CUDA) + zeda ---
if [ ! -x "$WORK/vllm/bin/python" ]; then python3 -m venv "$WORK/vllm"; fi
V=$WORK/vllm/bin/python
if ! "$V" -m pip install "${PIP[@]}" "vllm>=0.32.0,<0.33" "pytest>=8"; then
  echo "gpu_check: installing vLLM failed (no package index reachable? set WHEELHOUSE=DIR)"; exit 2
fi
"$V" -m pip install "${PIP[@]}" -e "$REPO" || { echo "gpu_check: installing zeda failed"; exit 2; }
VLLM_VERSION=$("$V" -c "import vllm; print(vllm.__version__)")
export ZEDA_VLLM_PYTHON=$V HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$REPO

# --- 2. parity, eager then CUDA graphs ---
export ZEDA_VLLM_PARITY_CASES=qwen3_ref,qwen3_ref_forced50,glm4_moe_tiny,glm4_moe_tiny_tied,mixtral_tiny_forced50
for mode in eager graphs; do
  graphs=0; [ "$mode" = graphs ] && graphs=1
  if ZEDA_VLLM_GRAPHS=$graphs timeout 420 "$V" -m pytest -q -p no:cacheprovider tests/serving/test_vllm_parity.py \
      > "$WORK/parity_$mode.log" 2>&1; then
    RESULT[parity_$mode]="pass ($(tail -1 "$WORK/parity_$mode.log"))"
  else
    RESULT[parity_$mode]="FAIL (see $WORK/parity_$mode.log)"
  fi
done
unset ZEDA_VLLM_PARITY_CASES

# --- 3. the benchmark: Qwen3-30B-A3B-shaped layers, 0% and 50% ---
if timeout 420 "$V" evals/serve/bench_vllm.py --models q30 --shares 0,0.5 --layers 2 --clock wall --graphs \
    --repeats 2 --passes 1 --work "$WORK/bench_work" --out "$WORK/bench" > "$WORK/bench.log" 2>&1; then
  RESULT[bench]="done ($WORK/bench.md)"
else
  RESULT[bench]="FAIL (see $WORK/bench.log)"
fi

# --- 4. SGLang, if it installs ---
RESULT[sglang]="not run"
if [ ! -x "$WORK/sglang/bin/python" ]; then python3 -m venv "$WORK/sglang"; fi
S=$WORK/sglang/bin/python
if "$S" -m pip install "${PIP[@]}" "sglang==0.5.23" > "$WORK/sglang_install.log" 2>&1 \
    && "$S" -m pip install "${PIP[@]}" --no-deps -e "$REPO" >> "$WORK/sglang_install.log" 2>&1; then
  "$V" - "$WORK/sglang_tiny" <<'PY' > "$WORK/sglang_ref.json"
import json, sys, torch, zeda
from zeda.tiny import tiny_model
m = tiny_model("qwen3_moe", hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
zeda.inject_zero_experts(m, seed=0)
zeda.export(m, sys.argv[1], overwrite=True)
m = zeda.load(sys.argv[1])
ids = torch.tensor([[5, 9, 2, 7, 11, 3, 8, 4]])
with torch.no_grad():
    out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
print(json.dumps({"input_ids": ids[0].tolist(), "tokens": out[0, ids.shape[1]:].tolist()}))
PY
  SGLANG_EXTERNAL_MODEL_PACKAGE=zeda_sglang.models timeout 300 "$S" -m sglang.launch_server \
    --model-path "$WORK/sglang_tiny" --skip-tokenizer-init --dtype float32 --moe-runner-backend triton \
    --disable-shared-experts-fusion --port 30123 > "$WORK/sglang_server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 150); do curl -sf localhost:30123/health > /dev/null && break; sleep 2; done
  RESULT[sglang]=$("$S" - "$WORK/sglang_ref.json" <<'PY'
import json, sys, urllib.request
ref = json.load(open(sys.argv[1]))
body = {"input_ids": ref["input_ids"], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
req = urllib.request.Request("http://localhost:30123/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
try:
    got = json.load(urllib.request.urlopen(req, timeout=60))["output_ids"]
    print("pass (greedy tokens equal)" if got == ref["tokens"] else f"FAIL (served {got}, transformers {ref['tokens']})")
except Exception as exc:
    print(f"FAIL ({type(exc).__name__}: {exc}; see sglang_server.log)")
PY
)
  kill "$SERVER" 2> /dev/null
else
  RESULT[sglang]="skipped: sglang==0.5.23 did not install (see $WORK/sglang_install.log)"
fi

# --- summary ---
echo
echo "## zeda GPU check: $GPU, vLLM $VLLM_VERSION, $((SECONDS - START)) s"
echo
echo "| check | result |"
echo "|---|---|"
echo "| vLLM parity, eager | ${RESULT[parity_eager]} |"
echo "| vLLM parity, CUDA graphs | ${RESULT[parity_graphs]} |"
echo "| serving benchmark (q30, 0% / 50%) | ${RESULT[bench]} |"
echo "| SGLang 0.5.23 greedy | ${RESULT[sglang]} |"
echo
[ -f "$WORK/bench.md" ] && cat "$WORK/bench.md"
