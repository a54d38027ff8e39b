#!/usr/bin/env bash
# GPU session: the GPU tests, then the comparative benchmarks at H100/H200 sizes.
# Everything lands under benchmarks/results/<gpu-name>/ (plus gpu_run.log there). Each command is capped at
# 8 minutes; a failing command is logged and the next one still runs. Usage: scripts/gpu_run.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export VATTN_BENCH_MODELS=${VATTN_BENCH_MODELS:-/tmp/vattn-bench-models}
export TOKENIZERS_PARALLELISM=false
CAP=${CAP:-480}
QUICK=${1:-}

OUT=$($PY -c "from benchmarks.common import results_dir; print(results_dir('cuda'))") || {
  echo "no CUDA GPU visible to torch"; exit 1; }
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
: > "$LOG"
FAILED=()

step() {  # step NAME CMD...: run with a time cap, tee into the log, remember failures
  local name=$1; shift
  echo "=== [$name] $* ($(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$LOG"
  timeout "$CAP" "$@" 2>&1 | grep -v "Writing model shards" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "!!! [$name] exit $rc" | tee -a "$LOG"; FAILED+=("$name"); fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$LOG"

# 1. GPU tests (allocator on the CUDA driver, kernels, engine on cuda)
step tests "$PY" -m pytest -m gpu -q -x

# 2. the random Llama-3-8B-shaped model (4 layers, bf16), built once
step model "$PY" -c "import torch; from benchmarks.common import model_dir; print(model_dir('llama3-8b-4l', torch.bfloat16))"

N_SHAREGPT=256; N_ALPACA=512; REPEATS=2
if [ "$QUICK" = "--quick" ]; then N_SHAREGPT=32; N_ALPACA=64; REPEATS=1; fi
COMMON=(--device cuda --preset llama3-8b-4l --page-sizes 2M --kv-layouts per_layer,interleaved --block-size 16 --kv-memory 16G --max-num-seqs 64
        --max-num-batched-tokens 4096 --repeats "$REPEATS")

# 3. end to end, both KV paths on the same requests. Default kernels first (contiguous: flash-attn or torch's
#    flash; paged: our Triton kernel), then both on our Triton kernel family (the layout is the only difference).
step compare_sharegpt "$PY" -m benchmarks.compare --dist sharegpt --scale 1.0 --num-requests "$N_SHAREGPT" "${COMMON[@]}" \
  --out "$OUT/compare_sharegpt.json"
step compare_sharegpt_triton "$PY" -m benchmarks.compare --dist sharegpt --scale 1.0 --num-requests "$N_SHAREGPT" \
  "${COMMON[@]}" --contiguous-kernel triton --out "$OUT/compare_sharegpt_triton.json"
step compare_alpaca "$PY" -m benchmarks.compare --dist alpaca --scale 1.0 --num-requests "$N_ALPACA" "${COMMON[@]}" \
  --out "$OUT/compare_alpaca.json"
step compare_sharegpt_poisson "$PY" -m benchmarks.compare --dist sharegpt --scale 1.0 --num-requests "$N_SHAREGPT" \
  --rate 16 "${COMMON[@]}" --out "$OUT/compare_sharegpt_poisson.json"
# memory pressure: a pool too small for 64 sequences, so preemption policy and granularity show
step compare_sharegpt_tight "$PY" -m benchmarks.compare --dist sharegpt --scale 1.0 --num-requests "$N_SHAREGPT" \
  "${COMMON[@]}" --kv-memory 2G --out "$OUT/compare_sharegpt_tight.json"

# 4. sharing (2 MiB pages hold 1024 tokens of one layer for these shapes: expect little sharing on that path)
step sharing "$PY" -m benchmarks.bench_sharing --device cuda --preset llama3-8b-4l --num-requests 16 --widths 2,4,6 \
  --page-sizes 2M --kv-memory 16G --out "$OUT/sharing.json"

# 5. kernels: Llama-3-8B attention shapes, decode and prefill
step kernels "$PY" -m benchmarks.bench_kernels --device cuda --batch 32 --prefill-batch 4 --contexts 1024,4096 \
  --heads 32 --kv-heads 8 --head-dim 128 --interleave-layers 32 --repeats 50 --warmup 5 --out "$OUT/kernels.json"

# 6. allocator map/unmap latency on the CUDA driver (someone else's benchmark; run here for the record)
step allocator "$PY" -m benchmarks.bench_allocator --backend cuda --sizes 2M --pages 256 --out "$OUT/allocator.json"

echo "results in $OUT; failed: ${FAILED[*]:-none}" | tee -a "$LOG"
[ ${#FAILED[@]} -eq 0 ]
