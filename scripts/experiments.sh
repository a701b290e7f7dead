#!/usr/bin/env bash
# The standard privacy-utility series on Fashion-MNIST (see server/experiment.py):
#   bash scripts/experiments.sh [PRESET] [OUT]     (PRESET: tiny | cpu | fulldata | full; default cpu)
# Rows go to OUT/results.jsonl and OUT/results.md (default runs/experiments), each row's record in
# the committed schema to OUT/NAME/record.json (docs/results/ holds the committed ones). On a 2-core CPU
# the cpu preset takes about an hour without the scratch rows (add SCRATCH=1 for those).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
preset="${1:-cpu}"
out="${2:-runs/experiments}"
threads="${THREADS:-1}"
run() { OMP_NUM_THREADS="$threads" dpfl-server experiment --preset "$preset" --out "$out" \
          --threads "$threads" "$@"; }
run --setting floor
run --setting ceiling
# the autoencoder ceiling: the CNN on the base model's VAE reconstructions of the private images
# (what no UNet-only DP recipe can pass); its record.json goes to docs/results/ (issue #15)
run --setting ae-ceiling
for eps in 10 1; do
  run --setting central --epsilon "$eps"
  run --setting federated --epsilon "$eps"
done
if [ "${SCRATCH:-0}" = 1 ]; then
  for eps in 10 1; do run --setting scratch --epsilon "$eps"; done
fi
cat "$out/results.md"
