#!/usr/bin/env bash
# Build (once) a Python 3.12 venv that holds only the GPU device image's packages
# (bench/device_image.txt) and nothing of this repository's own dependency list: no lenstronomy,
# webdataset, deepspeed, astropy, umap-learn, faiss, pytest. tests/test_device_image.py runs
# `bench/gpu_check.py --cpu-smoke` in it with the network off. Usage: ci/device-image-env.sh DIR
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.device-image}
REQ=bench/device_image.txt
STAMP="$DIR/.built-$(sha256sum "$REQ" | cut -c1-16)"
if [ -f "$STAMP" ]; then echo "device-image-env: $DIR is up to date"; exit 0; fi
PY=""
if python3.12 -V >/dev/null 2>&1; then PY=python3.12
elif command -v pyenv >/dev/null; then
  v=$(pyenv versions --bare | grep -E '^3\.12(\.|$)' | tail -1 || true)
  [ -n "$v" ] && PY="$(pyenv root)/versions/$v/bin/python3.12"
fi
if [ -z "$PY" ]; then echo "device-image-env: no python3.12 on this machine" >&2; exit 3; fi
rm -rf "$DIR"
"$PY" -m venv "$DIR"
"$DIR/bin/python" -m pip install -q -U pip
"$DIR/bin/python" -m pip install -q -r "$REQ"
"$DIR/bin/python" -m pip freeze > "$DIR/freeze.txt"
touch "$STAMP"
echo "device-image-env: built $DIR ($("$DIR/bin/python" -V), $(wc -l < "$DIR/freeze.txt") packages)"
