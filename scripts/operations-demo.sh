#!/usr/bin/env bash
# A two-site deployment on this machine as its operators see it, written as transcripts
# (NN-*.txt, serve-*.log, site-*.log) into WORKDIR [default: runs/operations]; the source of
# docs/operations.md. About 15 minutes on 2 cores: certificates, serve, two sites joining,
# status, a 3-round run followed by `dpfl-server run` across a kill -9 of the coordinator
# and its restart, site status, a second run stopped with `dpfl-server stop`, SIGTERM.
#   bash scripts/operations-demo.sh [WORKDIR]
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mkdir -p "${1:-$ROOT/runs/operations}" && cd "${1:-$ROOT/runs/operations}" && pwd)"
cd "$WORK"
export FLWR_DISABLE_UPDATE_CHECK=1 OMP_NUM_THREADS=1 PATH="$ROOT/.venv/bin:$PATH"
BASE="$ROOT/models/fmnist-base"
say() { echo "\$ $*"; }
run() { say "$@"; "$@" 2>&1; echo; }
serve() { dpfl-server serve --pki pki --state-dir coord --host 127.0.0.1 --port 39093 --api-port 39095 \
    --model-root "$ROOT/models" --site-examples site-a=400 --site-examples site-b=400 >> "$1" 2>&1 & echo $! > serve.pid; }
ready() { for _ in $(seq 240); do grep -q "SuperLink ready" "$1" && return 0; sleep 1; done; return 1; }
rm -rf pki coord state-a state-b silos ./*.txt ./*.log
# two small hospital silos from the private split: site-a an image folder named by class,
# site-b an .npz; 400 images each, non-IID
python - <<'PY'
from pathlib import Path
import numpy as np
from PIL import Image
from dpfl.shared.data.fmnist import standard_split
from dpfl.shared.data.readers import ImageSet, write_npz

priv = standard_split(0).private
names = priv.class_names
rng = np.random.default_rng(1)
def pick(classes, n):
    idx = np.flatnonzero(np.isin(priv.labels, classes))
    return rng.choice(idx, n, replace=False)
a = pick([0, 2, 4, 5, 7, 9], 400)
root = Path("silos/site-a")
for i in a:
    folder = root / names[priv.labels[i]].replace("/", "%2F")
    folder.mkdir(parents=True, exist_ok=True)
    img = (priv.images[i, ..., 0] * 255).round().astype(np.uint8) if priv.images.dtype != np.uint8 else priv.images[i, ..., 0]
    Image.fromarray(img).save(folder / f"img-{i}.png")
b = pick([1, 3, 5, 6, 8, 9], 400)
write_npz("silos/site-b.npz", ImageSet(priv.images[b], priv.labels[b], names, "site-b"))
print("site-a", len(a), "site-b", len(b))
PY
run dpfl-server certs --out pki --site site-a --site site-b > 01-certs.txt
say "dpfl-server serve --pki pki --state-dir coord --host 127.0.0.1 --port 39093 --api-port 39095 --model-root $ROOT/models --site-examples site-a=400 --site-examples site-b=400" > serve-1.log
serve serve-1.log; ready serve-1.log
dpfl-client join --superlink 127.0.0.1:39093 --ca-cert pki/ca.crt --node-key pki/sites/site-a/node.key \
  --site-id site-a --data silos/site-a --base-model $BASE --state-dir state-a --epsilon-budget 10 \
  --delta 1e-5 --runtime-port 39101 > site-a.log 2>&1 & echo $! > site-a.pid
dpfl-client join --superlink 127.0.0.1:39093 --ca-cert pki/ca.crt --node-key pki/sites/site-b/node.key \
  --site-id site-b --data silos/site-b.npz --base-model $BASE --state-dir state-b --epsilon-budget 10 \
  --delta 1e-5 --runtime-port 39102 > site-b.log 2>&1 & echo $! > site-b.pid
for _ in $(seq 120); do [ "$(dpfl-server status --pki pki --state-dir coord --json 2>/dev/null | grep -c '"online"')" = 2 ] && break; sleep 2; done
run dpfl-server status --pki pki --state-dir coord > 02-status.txt
( run dpfl-server run --pki pki --state-dir coord --set base-model=$BASE --set run-dir=runs/fed-1 \
    --set num-rounds=3 --set target-epsilon=4 --set min-available-nodes=2 --set batch-size=32 \
    --set noise-multiplicity=2 --set sample-steps=20 > 03-run.txt ) & RUNPID=$!
for _ in $(seq 900); do [ -s coord/runs/fed-1/metrics.jsonl ] && break; sleep 1; done
echo "[$(date -u +%T)] kill -9 of the coordinator (dpfl-server serve) after round 1" > 03b-crash.txt
kill -9 "$(cat serve.pid)"; sleep 5
say "dpfl-server serve ... (restarted, same state directory)" > serve-2.log
serve serve-2.log; ready serve-2.log
wait $RUNPID
run dpfl-server status --pki pki --state-dir coord > 04-status.txt
run dpfl-client status --state-dir state-a > 05-site-a-status.txt
run dpfl-server run --pki pki --state-dir coord --no-wait --set base-model=$BASE --set run-dir=runs/fed-2 \
    --set num-rounds=20 --set min-available-nodes=2 --set batch-size=32 > 06-run2.txt
sleep 40
ID=$(grep -o "^run [0-9]*" 06-run2.txt | head -1 | cut -d' ' -f2)
run dpfl-server stop "$ID" --pki pki --state-dir coord > 07-stop.txt
run dpfl-server status --pki pki --state-dir coord > 08-status.txt
run dpfl-client status --state-dir state-b > 09-site-b-status.txt
kill -TERM "$(cat serve.pid)" "$(cat site-a.pid)" "$(cat site-b.pid)"; sleep 15
ps aux | grep -E "nginx|flower|flwr" | grep "$WORK" | grep -v grep > 10-left.txt
echo done
