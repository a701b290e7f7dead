#!/usr/bin/env bash
# Create the federation's CA, the coordinator's TLS certificate and one node-authentication
# key pair per site (ECDSA P-384, OpenSSH format as flower-supernode expects).
#   deploy/make-certs.sh OUT_DIR HOST[,HOST...] SITE [SITE...]
#   deploy/make-certs.sh deploy/pki coordinator.example.org,10.0.0.5 site-a site-b site-c
set -euo pipefail
out=${1:?usage: $0 OUT_DIR HOST[,HOST...] SITE [SITE...]}; hosts=${2:?hosts}; shift 2
args=(--out "$out")
IFS=, read -ra hs <<<"$hosts"; for h in "${hs[@]}"; do args+=(--host "$h"); done
for s in "$@"; do args+=(--site "$s"); done
exec dpfl-server certs "${args[@]}"
