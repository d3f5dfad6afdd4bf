#!/usr/bin/env bash
# One GPU session's checks in one call, about 6 minutes on one H100/H200 (at most 8 with the
# limits below): Table 8's b3x8_parts, b3x8_parts_eager_head and b3_paired runs (gpu_table8.sh:
# LRC and the bound at the paper's LRC-1.5B shape, eager and compiled in the same rounds, the
# steps split into their parts, the head compiled and not), then the tests that need CUDA or touch
# the compiled layers and the compiled head (18 tests; the rest of those files runs on the CPU).
#
# The device machine has no network: the tests read the ci profile's assets from $LRC_CACHE, so
# bring the micro teacher, the KJV corpus and the token caches along (about 24 MB), e.g. with the
# device call's carry: .lrc_cache/teachers/random-llama-micro, .lrc_cache/corpora/kjv,
# .lrc_cache/tokens. Writes the CSVs, the logs and the tests' log to $OUT (default
# results/paper-1.5b/tables); exits non-zero if a run or a test failed.
#   OUT=$OUT PYTHON=python3 bash benchmarks/gpu_check.sh
#
# The tokens/s target and the committed Table 8 are H200 numbers, so run it on an H200 where there
# is a choice; on an 80 GB H100 the ratios (LRC/bound, compiled/eager) still answer the questions,
# its tokens/s do not compare with the H200's.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # lrc_src from this checkout, installed or not
export LRC_CACHE="${LRC_CACHE:-$PWD/.lrc_cache}"
out="${OUT:-results/paper-1.5b/tables}"
mkdir -p "$out"
py="${PYTHON:-python}"

# At 49,152 tokens per step the process held up to 74 GiB on the H200 (peak_total_mb: the teacher,
# LRC's and the ordinary student's states, LRC's working memory), a few GiB under an 80 GB card's
# total. On such a card the CUDA allocator grows its segments in place instead of leaving
# fragments; a larger card keeps the default allocator the committed runs used, so its numbers
# stay comparable with theirs.
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
if [[ "$mem_mib" =~ ^[0-9]+$ ]] && [ "$mem_mib" -lt 100000 ] && [ -z "${PYTORCH_CUDA_ALLOC_CONF:-}" ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
fi
echo "== GPU memory ${mem_mib:-unknown} MiB, PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-default}"

OUT="$out" PYTHON="$py" timeout 300 bash benchmarks/gpu_table8.sh b3x8_parts b3x8_parts_eager_head b3_paired
benchmarks=$?

echo "== tests that need CUDA or touch the compiled layers, the compiled head and the export"
timeout 180 "$py" -m pytest -q -rA -p no:cacheprovider tests/test_clone.py tests/test_losses.py \
  tests/test_train.py tests/test_export.py tests/test_starts.py \
  -k "(cuda or compile or does_not_depend_on_the_device) and not ddp" \
  > "$out/tests_cuda.log" 2>&1
tests=$?
tail -15 "$out/tests_cuda.log"
echo "== benchmarks exit $benchmarks, tests exit $tests"
[ "$benchmarks" -eq 0 ] && [ "$tests" -eq 0 ]
