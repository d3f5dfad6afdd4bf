#!/usr/bin/env bash
# Every GPU measurement of Table 8 in one go, for a session that has a GPU (all runs: about 9-10
# minutes on one H100/H200, compiles included, by the runs' own timings so far): the paper's
# LRC-1.5B shape (Llama-3.2-3B-shaped teacher with random bf16 weights -> d_S 1536, seq 2048).
# Runs, most important first (a failed or cut-off run leaves the earlier CSVs):
#   b3x8        batch 3 x 8 micro-batches = 49,152 tokens per optimizer step: the authors' global
#               step (3 per GPU x 8 GPUs) on one card; LRC generates its weights once per step
#   b3x8_parts  the same, lrc and the bound, eager and compiled (decoder layers and, on CUDA, the
#               head's per-chunk softmax/KL/gradient work) in the same rounds, every step split into
#               its parts (--parts): LRC's step over the bound's as 8 x its extra per micro-batch +
#               its extra once per step (weight generation, closing backward), each beside its floor
#   b3x8_parts_eager_head  the same with the head's per-chunk work left eager (--compile-head off):
#               against b3x8_parts, what compiling the head gives
#   b3x8_paired the same, every method timed eagerly and with its decoder layers through torch.compile
#               (the bound's teacher forward too) in the same rounds (--compile both): compiled/eager
#               and LRC/bound of each mode, paired round by round
#   b1x4        batch 1 x 4 micro-batches: LRC generating once per step (lrc) vs per micro-batch
#               (lrc_regen); torch.profiler operator tables in table8_torch_profiler_b1x4/
#   b3_foreach  batch 3 (the authors' per-GPU batch), PyTorch's default AdamW kernel: the "before"
#   b3          the same with the fused AdamW the trainer now uses on CUDA: the "after"; profiled
#   b3_paired   batch 3, fused AdamW, eager and compiled in the same rounds; profiled (both modes)
#   b1          batch 1, every method (sequential: their states do not fit one GPU together)
# Names given as arguments run only those runs, in the order given (default: all, in this order);
# with a few minutes of GPU time: benchmarks/gpu_check.sh (b3x8_parts, b3x8_parts_eager_head,
# b3_paired and the CUDA tests). All but b1 alternate their methods round-robin (drift hits all
# alike). Writes CSVs, printed summaries (.out) and logs to ${OUT:-results/paper-1.5b/tables} and prints each run's last lines
# (lrc_over_bound=... lrc_over_ordinary=... lrc_tokens_per_s=... mfu=...). A failed run is
# reported and the next one still runs; the exit status is non-zero if any failed.
#   bash benchmarks/gpu_table8.sh            (PYTHON=python3 bash ... where `python` is not the one with torch)
#   bash benchmarks/gpu_table8.sh b3x8_paired b3_paired
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
  if ! "$py" benchmarks/throughput.py --profile paper-1.5b --device cuda \
      --output "$out/table8_throughput_$name.csv" "$@" 2> "$out/table8_throughput_$name.log" \
      | tee "$out/table8_throughput_$name.out" | tail -15; then
    echo "== $name FAILED; the end of $out/table8_throughput_$name.log:"
    tail -25 "$out/table8_throughput_$name.log"
    failed=1
  fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
rr="--schedule round-robin"
declare -A runs=(
  [b3x8]="--batch-size 3 --grad-accum 8 --steps 4 --warmup 1 --methods lrc,scratch,bound $rr"
  [b3x8_parts]="--batch-size 3 --grad-accum 8 --steps 3 --warmup 1 --methods lrc,bound $rr --compile both --parts"
  [b3x8_parts_eager_head]="--batch-size 3 --grad-accum 8 --steps 3 --warmup 1 --methods lrc,bound $rr --compile both --parts --compile-head off"
  [b3x8_paired]="--batch-size 3 --grad-accum 8 --steps 4 --warmup 1 --methods lrc,scratch,bound $rr --compile both"
  [b1x4]="--grad-accum 4 --steps 5 --warmup 2 --methods lrc,lrc_regen,scratch,bound $rr --torch-profiler $out/table8_torch_profiler_b1x4"
  [b3_foreach]="--batch-size 3 --steps 5 --warmup 2 --methods lrc,scratch,bound $rr --adamw foreach"
  [b3]="--batch-size 3 --steps 5 --warmup 2 --methods lrc,scratch,bound $rr --torch-profiler $out/table8_torch_profiler_b3"
  [b3_paired]="--batch-size 3 --steps 5 --warmup 2 --methods lrc,scratch,bound $rr --compile both --torch-profiler $out/table8_torch_profiler_b3_paired"
  [b1]="--steps 5 --warmup 2"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(b3x8 b3x8_parts b3x8_parts_eager_head b3x8_paired b1x4 b3_foreach b3 b3_paired b1)
for name in "${names[@]}"; do
  if [ -z "${runs[$name]+x}" ]; then
    echo "gpu_table8.sh: unknown run $name (known: ${!runs[*]})" >&2
    failed=1
    continue
  fi
  # shellcheck disable=SC2086  # the options are words
  run "$name" ${runs[$name]}
done
exit $failed
