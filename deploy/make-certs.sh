#!/usr/bin/env bash
# Create the federation's CA, the coordinator's TLS certificate and one node-authentication
# key pair per site (ECDSA P-384, OpenSSH format as flower-supernode expects).
#   deploy/make-certs.sh OUT_DIR HOST[,HOST...] SITE [SITE...]
#   deploy/make-certs.sh deploy/pki coordinator.example.org,10.0.0.5 site-a site-b site-c
# An existing OUT_DIR is refused unless --force comes first: then the CA is kept, the server
# certificate re-issued for HOST... and key pairs made for new sites only.
set -euo pipefail
force=0
if [ "${1:-}" = "--force" ]; then force=1; shift; fi
out=${1:?usage: $0 [--force] OUT_DIR HOST[,HOST...] SITE [SITE...]}; hosts=${2:?hosts}; shift 2
if [ -e "$out/ca.crt" ] && [ "$force" = 0 ]; then
  echo "$0: $out already holds a CA (ca.crt); re-running would re-issue server.crt. Pass --force first to do so (the CA and existing site keys are kept)." >&2
  exit 2
fi
args=(--out "$out")
IFS=, read -ra hs <<<"$hosts"; for h in "${hs[@]}"; do args+=(--host "$h"); done
for s in "$@"; do args+=(--site "$s"); done
exec dpfl-server certs "${args[@]}"
