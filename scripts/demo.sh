#!/usr/bin/env bash
# Set up (if needed) and run the demo on 2 CPU cores in a few minutes:
#   the shipped, publicly pretrained base model -> three simulated hospitals holding non-IID
#   Fashion-MNIST silos (all ten classes, while the public model saw only classes 0-4) ->
#   federated DP-LoRA fine-tuning at epsilon <= 10 per site (delta 1e-5) -> the privacy
#   ledger and sample grids before/after. Outputs go to runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 RAY_DEDUP_LOGS=1
out=runs/demo
base=models/fmnist-base
rm -rf "$out/federated"
mkdir -p "$out"
echo "== public base model (fingerprint recomputed from the weights)"
dpfl-server info "$base" | python -c 'import json,sys; d=json.load(sys.stdin); c=d["card"]; print(json.dumps({k: c.get(k) for k in ("data","examples","classes_seen","unet_steps","unet_parameters")})); print("fingerprint", d["fingerprint"])'
echo "== federated DP fine-tuning: 3 hospitals, Dirichlet(0.5) silos of the private split"
if ! dpfl-server simulate --base-model "$base" --data fmnist:private --sites 3 \
    --scheme dirichlet --alpha 0.5 --max-examples 4500 --epsilon-budget 10 --delta 1e-5 \
    --run-dir "$out/federated" --set num-rounds=3 --set batch-size=128 \
    --set noise-multiplicity=2 --set target-epsilon=10 --set lr=0.003 --set lora-rank=8 \
    --set lora-alpha=8 --set sample-steps=25 > "$out/simulate.log" 2>&1; then
  tail -40 "$out/simulate.log"; echo "demo failed; full log: $out/simulate.log" >&2; exit 1
fi
grep -E "dpfl.client.site|site-[0-9]+: [0-9]+ images" "$out/simulate.log" | sed 's/.*INFO[^:]*: *//' | head -20 || true
echo "== privacy ledger (each site's own accountant; global = max by parallel composition)"
sed -n '/^site  /,/^global/p' "$out/simulate.log" | tail -n 5
echo "== results"
ls "$out/federated"/samples_round_*.png
echo "before: $out/federated/samples_round_000.png   after: $(ls "$out/federated"/samples_round_*.png | tail -1)"
echo "privacy ledger: $out/federated/ledger.json   adapter: $out/federated/adapter/"
echo "run report (epsilon over rounds, grids, guarantee): $out/federated/report/report.html"
