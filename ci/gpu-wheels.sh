#!/usr/bin/env bash
# `make gpu-wheels`: the packages the GPU machine's image lacks for the cases of bench/gpu_check.py
# that need them (DeepSpeed ZeRO-1 and its resume; webdataset for embed), as Python 3.12 manylinux
# wheels in the ignored .whl/ (< 64 MiB: it travels with the repository to that machine, which has
# no package index; gpu_check installs them with pip install --no-index --no-deps --target).
# Versions: those of this repository's venv, the ones its tests run. DeepSpeed is an sdist on PyPI:
# built here into a pure wheel with its C++/CUDA ops off (DS_BUILD_OPS=0; its JIT ops are not used
# by the trainer's SGD path).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.whl}
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PINS=()
for p in webdataset braceexpand hjson ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection \
         msgpack einops psutil nvidia-ml-py; do
  v=$(ver "$p" 2>/dev/null) || { echo "gpu-wheels: $p is not in $PY's environment" >&2; continue; }
  PINS+=("$p==$v")
done
rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 \
  --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" "${PINS[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed -w "$DEST" "deepspeed==$(ver deepspeed)"
ls "$DEST"
du -sh "$DEST"
