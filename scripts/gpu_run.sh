#!/usr/bin/env bash
# The GPU session: the GPU tests, the whole suite, compute-sanitizer, then the comparative benchmarks at
# Llama-3-8B shapes. Runs from the working tree on a machine WITHOUT network: the image's Python (CUDA torch,
# Triton, transformers, cuda-bindings) plus the wheels of scripts/gpu_wheels.sh (.gpu-wheels/), installed into a
# scratch folder and put first on PYTHONPATH with the checkout. Nothing is installed into the image.
#
#   scripts/gpu_run.sh [--quick] [STAGE ...]
#   stages: gpu (pytest -m gpu), suite (all tests), sanitizer, model, compare, sharing, kernels, allocator;
#           none named: all of them, in that order. --quick: smaller benchmark workloads.
#
# Results land in benchmarks/results/<gpu-name>/: gpu_run.log (everything this script printed, appended per
# run), junit_<stage>.xml per test stage, the benchmarks' JSON. A failing stage is logged and the next still runs
# (no -x: every failure shows); the exit status says whether any failed. Each stage is capped at $CAP seconds.
# When $OUT is set (the device tool's return folder) the log, the junit files and a tarball of the results are
# copied there at the end.
#
# With the device tool (10 minutes per command, 30 per session), in the checkout that travels:
#   scripts/gpu_wheels.sh                                  # here, with network: .gpu-wheels/ (about 6 MB)
#   run(command="scripts/gpu_run.sh gpu sanitizer", carry=[".gpu-wheels"], timeout_s=600)
#   run(command="scripts/gpu_run.sh --quick model compare kernels allocator", carry=[".gpu-wheels"])
#   run(command="scripts/gpu_run.sh suite", carry=[".gpu-wheels"])   # make test's view of a GPU box
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${PY:-}" ]; then PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python; fi
CAP=${CAP:-540}
# the whole suite in parallel where pytest-xdist is there (one module per worker: module fixtures stay whole)
SUITE_ARGS=${SUITE_ARGS:--n 8 --dist loadfile}
WHEELS=${WHEELS:-.gpu-wheels}
SITE=${SITE:-/tmp/vattn-site}

QUICK=""
STAGES=()
for a in "$@"; do
  case $a in
    --quick) QUICK=1 ;;
    gpu|suite|sanitizer|model|compare|sharing|kernels|allocator) STAGES+=("$a") ;;
    *) echo "unknown argument: $a (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ ${#STAGES[@]} -gt 0 ] || STAGES=(gpu suite sanitizer model compare sharing kernels allocator)

# -- environment: offline, the checkout and the wheels first on the path ------------------------------------
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { echo "installing $WHEELS into $SITE failed" >&2; exit 1; }
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export VATTN_BENCH_MODELS=${VATTN_BENCH_MODELS:-/tmp/vattn-bench-models}

RESULTS=$("$PY" -c "from benchmarks.common import results_dir; print(results_dir('cuda'))") || {
  echo "no CUDA GPU visible to torch ($PY)" >&2; exit 1; }
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_run.log"
exec 3>&1 4>&2
exec > >(tee -a "$LOG") 2>&1
TEE=$!
FAILED=()

step() {  # step NAME CMD...: run with a time cap, remember failures
  local name=$1; shift
  echo "=== [$name] $* ($(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg))"
  timeout "$CAP" "$@" 2>&1 | grep --line-buffered -v "Writing model shards"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "!!! [$name] exit $rc"; FAILED+=("$name"); else echo "=== [$name] ok"; fi
}

echo "##### gpu_run.sh ${*:-} at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
step preflight "$PY" -c "
import sys, importlib.metadata as m, torch, triton, transformers
from allocator.cuda import bindings_version, check_cuda_versions
check_cuda_versions(torch.version.cuda, bindings_version())
import fastapi, uvicorn, openai, pydantic, hypothesis  # noqa: F401  (the wheels, or the image)
print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda,
      '| triton', triton.__version__, '| transformers', transformers.__version__, '| cuda-bindings', bindings_version(),
      '| fastapi', fastapi.__version__, '| openai', openai.__version__, '| pydantic', pydantic.VERSION)
print('gpu', torch.cuda.get_device_name(), '| devices', torch.cuda.device_count())"

N_SHAREGPT=256; N_ALPACA=512; REPEATS=2
if [ -n "$QUICK" ]; then N_SHAREGPT=32; N_ALPACA=64; REPEATS=1; fi
COMMON=(--device cuda --preset llama3-8b-4l --page-sizes 2M --kv-layouts per_layer,interleaved --block-size 16
        --kv-memory 16G --max-num-seqs 64 --max-num-batched-tokens 4096 --repeats "$REPEATS")
SANITIZE=(compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20)
GEN=(-m vattn.cli generate --device cuda --prompt "The virtual KV cache" --prompt "Paged attention" --max-tokens 8)

for stage in "${STAGES[@]}"; do
  case $stage in
    gpu)  # the cuda backend, the kernels on virtual tensors, the engine on cuda (both paths, fp32 and bf16)
      step gpu "$PY" -m pytest -m gpu -v -rA -p no:cacheprovider --junitxml="$RESULTS/junit_gpu.xml" ;;
    suite)  # what `make test` sees on a GPU box: CPU tests pinned to the CPU, GPU tests on the GPU
      xdist=(); "$PY" -c "import xdist" 2>/dev/null && read -ra xdist <<< "$SUITE_ARGS"
      step suite "$PY" -m pytest -q -rfEs -p no:cacheprovider "${xdist[@]}" --junitxml="$RESULTS/junit_suite.xml" ;;
    sanitizer)  # a short engine run on each KV path under memcheck: zero errors
      step sanitizer_vattention "${SANITIZE[@]}" "$PY" "${GEN[@]}" --kv-cache vattention
      step sanitizer_paged "${SANITIZE[@]}" "$PY" "${GEN[@]}" --kv-cache paged ;;
    model)  # the random Llama-3-8B-shaped model (4 layers, bf16), built once
      step model "$PY" -c "import torch; from benchmarks.common import model_dir; print(model_dir('llama3-8b-4l', torch.bfloat16))" ;;
    compare)  # end to end, both KV paths on the same requests; default kernels, then one Triton family
      step compare_sharegpt "$PY" -m benchmarks.compare --dist sharegpt --scale 1.0 --num-requests "$N_SHAREGPT" \
        "${COMMON[@]}" --out "$RESULTS/compare_sharegpt.json"
      step compare_sharegpt_triton "$PY" -m benchmarks.compare --dist sharegpt --scale 1.0 \
        --num-requests "$N_SHAREGPT" "${COMMON[@]}" --contiguous-kernel triton --out "$RESULTS/compare_sharegpt_triton.json"
      step compare_alpaca "$PY" -m benchmarks.compare --dist alpaca --scale 1.0 --num-requests "$N_ALPACA" \
        "${COMMON[@]}" --out "$RESULTS/compare_alpaca.json"
      step compare_sharegpt_poisson "$PY" -m benchmarks.compare --dist sharegpt --scale 1.0 \
        --num-requests "$N_SHAREGPT" --rate 16 "${COMMON[@]}" --out "$RESULTS/compare_sharegpt_poisson.json"
      step compare_sharegpt_tight "$PY" -m benchmarks.compare --dist sharegpt --scale 1.0 \
        --num-requests "$N_SHAREGPT" "${COMMON[@]}" --kv-memory 2G --out "$RESULTS/compare_sharegpt_tight.json" ;;
    sharing)
      step sharing "$PY" -m benchmarks.bench_sharing --device cuda --preset llama3-8b-4l --num-requests 16 \
        --widths 2,4,6 --page-sizes 2M --kv-memory 16G --out "$RESULTS/sharing.json" ;;
    kernels)  # Llama-3-8B attention shapes, decode and prefill
      step kernels "$PY" -m benchmarks.bench_kernels --device cuda --batch 32 --prefill-batch 4 --contexts 1024,4096 \
        --heads 32 --kv-heads 8 --head-dim 128 --interleave-layers 32 --repeats 50 --warmup 5 \
        --out "$RESULTS/kernels.json" ;;
    allocator)  # map/unmap latency on the CUDA driver
      step allocator "$PY" -m benchmarks.bench_allocator --backend cuda --sizes 2M --pages 256 \
        --out "$RESULTS/allocator.json" ;;
  esac
done

echo "##### results in $RESULTS; failed: ${FAILED[*]:-none}"
exec 1>&3 2>&4  # close the log's pipe and let tee finish before the log is copied
wait "$TEE" 2>/dev/null
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then  # the device tool brings back at most 8 files from $OUT
  cp "$LOG" "$OUT/" 2>/dev/null
  for j in "$RESULTS"/junit_*.xml; do [ -f "$j" ] && cp "$j" "$OUT/"; done
  tar czf "$OUT/results.tgz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
fi
[ ${#FAILED[@]} -eq 0 ]
