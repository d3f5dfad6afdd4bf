#!/usr/bin/env bash
# Every GPU measurement of issue 6 in one go (a few minutes on one H100/H200), for a session that
# has a GPU: the paper's LRC-1.5B shape (Llama-3.2-3B-shaped teacher with random bf16 weights ->
# d_S 1536, seq 2048) at batch 1 and 3, and with 4 micro-batches per optimizer step (LRC generating
# its weights once per step vs per micro-batch). The batch-1 run also writes each method's
# torch.profiler operator table (one extra, untimed step) to table8_torch_profiler_b1/.
# Writes CSVs and logs to ${OUT:-results/paper-1.5b/tables} and prints each run's last lines
# (lrc_over_bound=... lrc_over_ordinary=... lrc_tokens_per_s=... mfu=...). A failed run is reported
# and the next one still runs; the exit status is non-zero if any failed.
#   bash benchmarks/gpu_table8.sh            (PYTHON=python3 bash ... where `python` is not the one with torch)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # lrc_src from this checkout, installed or not
out="${OUT:-results/paper-1.5b/tables}"
mkdir -p "$out"
py="${PYTHON:-python}"
failed=0
run() {  # name, extra args
  local name=$1; shift
  echo "== $name: $*"
  if ! "$py" benchmarks/throughput.py --profile paper-1.5b --device cuda --steps 5 --warmup 2 \
      --output "$out/table8_throughput_$name.csv" "$@" 2> "$out/table8_throughput_$name.log" | tail -14; then
    echo "== $name FAILED; the end of $out/table8_throughput_$name.log:"
    tail -25 "$out/table8_throughput_$name.log"
    failed=1
  fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
run b1 --torch-profiler "$out/table8_torch_profiler_b1"         # every method, one sequence per step
run b3 --batch-size 3 --methods lrc,scratch,bound                # the authors' per-GPU batch
run b1x4 --grad-accum 4 --methods lrc,lrc_regen,scratch,bound    # weights generated once per step
exit $failed
