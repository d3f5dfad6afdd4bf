#!/usr/bin/env bash
# Every GPU measurement of issue 6 in one go (a few minutes on one H100/H200), for a session that
# has a GPU: the paper's LRC-1.5B shape (Llama-3.2-3B-shaped teacher with random bf16 weights ->
# d_S 1536, seq 2048) at batch 1 and 3, and with 4 micro-batches per optimizer step (LRC generating
# its weights once per step vs per micro-batch). Writes CSVs to ${OUT:-results/paper-1.5b/tables}
# and prints each run's last line (lrc_over_bound=... lrc_over_ordinary=... lrc_tokens_per_s=... mfu=...).
#   bash benchmarks/gpu_table8.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results/paper-1.5b/tables}"
mkdir -p "$out"
py="${PYTHON:-python}"
run() {  # name, extra args
  local name=$1; shift
  echo "== $name: $*"
  "$py" benchmarks/throughput.py --profile paper-1.5b --device cuda --steps 5 --warmup 2 \
    --output "$out/table8_throughput_$name.csv" "$@" 2> "$out/table8_throughput_$name.log" | tail -12
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
run b1                                                   # every method, one sequence per step
run b3 --batch-size 3 --methods lrc,scratch,bound        # the authors' per-GPU batch
run b1x4 --grad-accum 4 --methods lrc,lrc_regen,scratch,bound   # weights generated once per step
