#!/usr/bin/env bash
# Prepare, on a machine WITH network, the pure-Python wheels that an offline GPU machine lacks, so that
# scripts/gpu_run.sh can run vattn's GPU tests and benchmarks there from the working tree.
#
# The GPU image (Python 3.12, x86-64) already has CUDA torch 2.11, Triton 3.6, transformers, cuda-bindings 13,
# pytest, hypothesis, httpx, anyio, prometheus-client, matplotlib, numpy, safetensors, tokenizers, tqdm, ...
# It lacks the server and client stack: fastapi, uvicorn, pydantic, openai. This script resolves those for
# CPython 3.12 on manylinux x86-64 (binary wheels only: pydantic-core and jiter are compiled), drops what the
# image already has, and leaves one wheel per project in $WHEELS (default .gpu-wheels/, gitignored) with a
# MANIFEST. gpu_run.sh installs them with `pip install --no-index --no-deps --target` and never reaches a network.
#
# Usage: scripts/gpu_wheels.sh [extra requirement ...]      e.g. scripts/gpu_wheels.sh 'pytest-timeout'
# With the device tool: run this in the checkout that travels, then name .gpu-wheels in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.gpu-wheels}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# the versions this checkout is tested with: pinned to those installed next to $PY, else pyproject's floors
WANT=()
for spec in fastapi:0.110 uvicorn:0.29 pydantic:2.6 openai:1.40; do
  name=${spec%%:*}
  if v=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null); then
    WANT+=("$name==$v")
  else
    WANT+=("$name>=${spec#*:}")
  fi
done
WANT+=("$@")
echo "resolving for CPython 3.12 / manylinux x86-64: ${WANT[*]}"
# already in the GPU image (/work/.library/device/KINDS.md, "Python packages already there"): not downloaded.
# typing-extensions is kept on purpose: a newer one shadowing the image's is backward compatible, an older one
# in the image could be too old for pydantic-core.
HAVE="anyio certifi click h11 httpcore httpx idna tqdm sniffio annotated-doc"

rm -rf "$WHEELS" && mkdir -p "$WHEELS"
PLATFORMS=()
for n in 17 24 27 28 31 34 35 39; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
"$PY" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  "${PLATFORMS[@]}" -d "$WHEELS" "${WANT[@]}"

for w in "$WHEELS"/*.whl; do
  name=$(basename "$w" | cut -d- -f1 | tr '[:upper:]_.' '[:lower:]--')
  for h in $HAVE; do
    if [ "$name" = "$h" ]; then rm -f "$w"; fi
  done
done

# one version per project, or the --no-deps install on the GPU box fails
dups=$(for w in "$WHEELS"/*.whl; do basename "$w" | cut -d- -f1; done | sort | uniq -d)
[ -z "$dups" ] || { echo "more than one wheel of: $dups" >&2; exit 1; }

(cd "$WHEELS" && ls -1 *.whl > MANIFEST)
# a dry install for the GPU box's Python: every wheel is installable there, without an index
"$PY" -m pip install --quiet --dry-run --no-index --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --target "$(mktemp -d)" "$WHEELS"/*.whl
echo "$(wc -l < "$WHEELS/MANIFEST") wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS:"
sed 's/^/  /' "$WHEELS/MANIFEST"
