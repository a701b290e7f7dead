#!/usr/bin/env bash
# Create .venv with dpfl and its pinned dependencies, and make Fashion-MNIST, nginx (the
# coordinator's Fleet proxy, used by the deployment tests) and chromium (the live report's
# browser test) available.
# Idempotent: a second run with unchanged pins does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.dpfl-installed
extras='test,dicom'
want="$( (cat pyproject.toml requirements/constraints.txt; echo "$extras") | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing torch 2.13.0 and pinned dependencies into .venv ..."
  pip install -q --disable-pip-version-check torch==2.13.0
  pip install -q --disable-pip-version-check -c requirements/constraints.txt -e ".[$extras]"
  echo "$want" > "$stamp"
fi
fm="${DPFL_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
if [ ! -f "$fm/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's dataset-fashion-mnist ..."
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[setup] Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or set DPFL_FASHION_MNIST" >&2
  fi
fi
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's nginx-light (the coordinator's Fleet proxy) ..."
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
  else
    echo "[setup] nginx missing: run 'sudo apt-get install nginx-light' (dpfl-server serve and its tests need it)" >&2
  fi
fi
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's chromium (browser test of the live report) ..."
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
      || echo "[setup] chromium could not be installed; tests/test_report_browser.py will be skipped" >&2
  else
    echo "[setup] chromium missing: run 'sudo apt-get install chromium' (tests/test_report_browser.py is skipped without it)" >&2
  fi
fi
