#!/usr/bin/env bash
# Copy the records of finished runs (transfer.json, test_scores.json, validation_scores.json, metrics.jsonl, the recipes
# written and stored) from a runs folder into evals/transfer/records/ (or DEST), the table's committed input:
#   bash evals/transfer/keep.sh runs/transfer && python -m evals.transfer.table --out evals/transfer/results.md
#   bash evals/transfer/keep.sh runs/real_balance evals/transfer/records_real_balance
set -euo pipefail
src=${1:?usage: keep.sh RUNS [DEST]}
dst=${2:-"$(dirname "$0")/records"}
for rec in "$src"/*/*/transfer.json; do
  run=$(dirname "$rec"); rel=${run#"$src"/}
  mkdir -p "$dst/$rel"
  for f in transfer.json test_scores.json validation_scores.json metrics.jsonl recipe.yaml; do
    [ -f "$run/$f" ] && cp "$run/$f" "$dst/$rel/$f"
  done
  cp "$run.recipe.yaml" "$dst/$rel.recipe.yaml"
done
