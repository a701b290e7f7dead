#!/usr/bin/env bash
# Set up (if needed) and run the demo: load the shipped, publicly pretrained base model
# and sample a grid from it. Outputs go to runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
out=runs/demo
mkdir -p "$out"
base=models/fmnist-base
echo "== base model card (fingerprint recomputed from the weights)"
dpfl-server info "$base" | python -c 'import json,sys; d=json.load(sys.stdin); c=d["card"]; print(json.dumps({k: c.get(k) for k in ("data","examples","classes_seen","unet_steps","unet_parameters")}, indent=1)); print("fingerprint", d["fingerprint"])'
echo "== sampling the public base model (classes 5-9 were never seen in public data)"
dpfl-server sample "$base" --out "$out/base_samples.png" --per-class 8 --steps 50
echo "demo done: $out/base_samples.png"
